"""Tables and plots from run, multirun and sweep directories.

    python -m kd.report DIR [DIR ...] [--out OUT] [--title TITLE]

Finds every ``metrics.json`` under the directories, groups runs identical in every
resolved setting but the seed (each row says which settings tell it apart), and writes
``OUT/report.md`` and ``OUT/summary.json``: mean ± standard error over seeds, and for
KD the paired difference to the CE student of the same seeds and recipe with its 95 %
interval. An Optuna sweep directory (one holding ``optuna.db``) gets its own table,
read from the study (completed trials only, never voided or failed ones), ordered by
the objective it was optimised on, with the selected trial marked and its test
accuracy alone shown; and PNG plots: objective against each parameter, Optuna's
optimisation history and parameter importances. Runs that have not finished (no
``metrics.json`` yet) or that diverged are listed as skipped, with the reason.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.visualization import matplotlib as optuna_plots

from hydra_plugins.kd_sweeper.journal import DamagedStorage
from kd.errors import StorageError
from kd.race_report import race_markdown, race_table, seed_spread_plot
from kd.stats import describe, fmt_difference, fmt_mean_se, paired_difference
from kd.storage import check_writable

MODEL_NAMES = {"DeepNN": "Teacher", "LightNN": "Student"}


class ReportError(Exception):
    """A one-line problem with the directories given to the report."""


@dataclass
class Collected:
    runs: list[dict] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (directory, reason)


def collect(roots: list[Path], sweep_dirs: list[Path] = ()) -> Collected:
    """Completed runs under ``roots`` (outside ``sweep_dirs``, which the study reports),
    and the run directories skipped with why."""
    found = Collected()
    for root in roots:
        for hydra_dir in sorted(root.rglob(".hydra")):
            run_dir = hydra_dir.parent
            if any(run_dir.is_relative_to(d) for d in sweep_dirs):
                continue
            metrics_file = run_dir / "metrics.json"
            if not metrics_file.exists():
                found.skipped.append((str(run_dir), "no metrics.json: still running, or stopped before finishing"))
                continue
            try:
                metrics = json.loads(metrics_file.read_text())
            except (OSError, json.JSONDecodeError) as err:
                found.skipped.append((str(run_dir), f"unreadable metrics.json ({type(err).__name__})"))
                continue
            status = metrics.get("status", "completed")
            if status != "completed":
                where = f" at epoch {metrics.get('diverged_epoch')}, step {metrics.get('diverged_step')}"
                found.skipped.append((str(run_dir), status + (where if status == "diverged" else "")))
                continue
            metrics["run_dir"] = str(run_dir)
            metrics["finished_at"] = metrics_file.stat().st_mtime  # which of two copies is newer
            found.runs.append(metrics)
    return found


LOSS_NAMES = {
    "kd": "KD",
    "kd_std": "KD (standardised logits)",
    "dkd": "DKD",
    "cosine": "cosine",
    "regressor": "regressor",
}
SYMBOLS = {"temperature": "T", "alpha": "α", "beta": "β", "weight": "w", "warmup_epochs": "warm-up"}


def label(run: dict) -> str:
    """``Student + KD (T=2, α=0.25)``: the model, and the method with its hyperparameters."""
    name = MODEL_NAMES.get(run["model"], run["model"])
    if run["loss"] == "ce":
        return name
    hparams = run.get("loss_hparams") or {k: run[k] for k in ("temperature", "alpha") if run.get(k) is not None}
    order = list(SYMBOLS)  # metrics.json stores keys sorted; show them in the usual order
    ranked = sorted(hparams.items(), key=lambda kv: (order.index(kv[0]) if kv[0] in order else len(order), kv[0]))
    shown = ", ".join(f"{SYMBOLS.get(k, k)}={v:.3g}" for k, v in ranked)
    return f"{name} + {LOSS_NAMES.get(run['loss'], run['loss'])}" + (f" ({shown})" if shown else "")


def settings_of(run: dict) -> dict:
    """Every result-deciding setting but the seed (older metrics.json: the fields they had)."""
    if "settings" in run:
        return run["settings"]
    keys = ("model", "loss", "temperature", "alpha", "epochs", "batch_size", "lr", "dataset", "train_examples")
    return {k: run.get(k) for k in keys}


def seed_records(run: dict) -> list[dict]:
    """One record per seed the run trained (older runs: one)."""
    if run.get("per_seed"):
        return run["per_seed"]
    keys = ("seed", "val_acc", "test_acc", "train_seconds")
    return [{k: run.get(k) for k in keys}]


def unique_seeds(group: list[dict]) -> tuple[list[dict], list[dict]]:
    """One record per seed of a setting: a result is (settings, seed), counted once however
    many directories hold it. The newest run's record is kept; the others are returned
    as duplicates (seed, where, and where the kept one is)."""
    kept: dict[Any, tuple[dict, str | None]] = {}
    duplicates = []
    for run in sorted(group, key=lambda r: r.get("finished_at", 0.0), reverse=True):
        for record in seed_records(run):
            seed = record.get("seed")
            if seed is not None and seed in kept:
                duplicates.append({"seed": seed, "run_dir": run.get("run_dir"), "kept": kept[seed][1]})
                continue
            kept[seed if seed is not None else id(record)] = (record, run.get("run_dir"))
    records = [record for record, _ in kept.values()]
    records.sort(key=lambda r: (r.get("seed") is None, r.get("seed") or 0))
    return records, duplicates


def _values(records: list[dict], key: str) -> list[float]:
    return [r[key] for r in records if r.get(key) is not None]


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _paired(records: list[dict], key: str) -> dict | None:
    pairs = [(r[key], r["baseline"][key]) for r in records if r.get("baseline") and r.get(key) is not None]
    pairs = [(a, b) for a, b in pairs if b is not None]
    return paired_difference([a for a, _ in pairs], [b for _, b in pairs]) if pairs else None


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def summarise(runs: list[dict]) -> list[dict]:
    """One row per setting: runs identical in every resolved setting but the seed."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for run in runs:
        groups[json.dumps(settings_of(run), sort_keys=True, default=str)].append(run)
    rows = []
    for group in groups.values():
        first = group[0]
        records, duplicates = unique_seeds(group)
        rows.append(
            {
                "label": label(first),
                "model": first["model"],
                "params": first.get("params"),
                "flops": first.get("flops"),
                # Timed per run: the median over the group's runs (each on its own device and threads).
                "latency_ms": _median(_values(group, "latency_ms")),
                "cost": first.get("cost"),
                "loss": first["loss"],
                "temperature": first.get("temperature"),
                "alpha": first.get("alpha"),
                "epochs": first.get("epochs"),
                "dataset": first.get("dataset"),
                "train_examples": first.get("train_examples"),
                "seeds": sorted(r["seed"] for r in records),
                "val_acc": describe(_values(records, "val_acc")),
                "test_acc": describe(_values(records, "test_acc")),
                "kd_minus_ce": {"val_acc": _paired(records, "val_acc"), "test_acc": _paired(records, "test_acc")},
                "train_seconds_mean": describe(_values(records, "train_seconds"))["mean"],
                "device": first.get("device"),
                "settings": settings_of(first),
                "run_dirs": [r.get("run_dir") for r in group],
                "duplicates": duplicates,  # (seed, run_dir) counted once, from the newer run
            }
        )
    # Say what tells the rows apart: the settings whose values differ between them.
    all_keys = sorted({k for r in rows for k in r["settings"]})
    varying = [k for k in all_keys if len({json.dumps(r["settings"].get(k), default=str) for r in rows}) > 1]
    for r in rows:
        r["differs"] = {k: r["settings"].get(k) for k in varying if k not in ("loss._target_", "model._target_")}
    order = {"DeepNN": 0, "LightNN": 1}
    rows.sort(key=lambda r: (order.get(r["model"], 2), r["loss"] != "ce", r["label"], json.dumps(r["differs"])))
    return rows


def _time(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.1f} s"


def table(head: list[str], rows: list[list[str]], align: str = "") -> str:
    """A Markdown table: the one writer behind every table of the report, the README
    and docs. ``align`` has one letter per column (l, r, c; default: all right)."""
    align = align or "r" * len(head)
    if len(align) != len(head) or any(len(row) != len(head) for row in rows):
        raise ValueError(f"a table of {len(head)} columns got align {align!r} and rows of {[len(r) for r in rows]}")
    rule = {"l": ":---", "r": "---:", "c": ":---:"}
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join(rule[a] for a in align) + " |"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def runs_markdown(rows: list[dict]) -> str:
    """The runs table: one row per setting, accuracies over seeds, KD − CE paired."""
    head = ["Model", "Setting", "Parameters", "FLOPs", "Latency", "Seeds", "Val acc", "Test acc"]
    head += ["KD − CE, val [95% CI]", "KD − CE, test [95% CI]", "Training time"]
    cells = []
    for r in rows:
        # The label already names the method and its hyperparameters.
        setting = ", ".join(f"{k}={_short(v)}" for k, v in r["differs"].items() if not k.startswith("loss."))
        cells.append(
            [
                r["label"],
                setting or "—",
                *_cost_cells(r.get("params"), r.get("flops"), r.get("latency_ms")),
                ", ".join(str(s) for s in r["seeds"]),
                fmt_mean_se(r["val_acc"]),
                fmt_mean_se(r["test_acc"]),
                fmt_difference(r["kd_minus_ce"]["val_acc"]),
                fmt_difference(r["kd_minus_ce"]["test_acc"]),
                _time(r["train_seconds_mean"]),
            ]
        )
    note = (
        "Accuracies: mean ± standard error over seeds. KD − CE: the paired difference to the CE "
        "student trained with the same seeds and recipe, with its 95 % t interval."
    )
    note += (
        " FLOPs: one forward pass on one image. Latency: batch 1, timed on each run's device and "
        "threads (metrics.json `cost`); compare latencies only between runs on the same machine."
    )
    return table(head, cells, align="llrrrlrrllr") + "\n\n" + note


def _cost_cells(params: int | None, flops: int | None, latency_ms: float | None) -> list[str]:
    """A model's Parameters, FLOPs and Latency cells, as every table shows them."""
    return [
        f"{params:,}" if params is not None else "n/a",
        si(flops),
        f"{latency_ms:.3g} ms" if latency_ms is not None else "n/a",
    ]


def si(count: float | None) -> str:
    """A large count in engineering notation: 2.59 M, 188 M, 1.2 G."""
    if count is None:
        return "n/a"
    for factor, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if count >= factor:
            return f"{count / factor:.3g} {suffix}"
    return f"{count:g}"


SQLITE_HEADER = b"SQLite format 3\x00"
SQLITE = "optuna.db"  # sweep_storage's answer for the sweep directory's own SQLite file


def sweep_storage(sweep_dir: Path, storage: str | None = None) -> str | None:
    """Where a sweep directory's study is: its own ``optuna.db`` (:data:`SQLITE`), else
    ``storage`` or the storage the finished sweep recorded in optimization_results.yaml
    (a journal file, a database); None for a directory that is no Optuna sweep with a
    storage (a plain multirun, a study kept in memory)."""
    if (sweep_dir / "optuna.db").exists():
        return SQLITE
    results = _recorded_results(sweep_dir)
    return (storage or results.get("storage")) if results else None


def _recorded_results(sweep_dir: Path) -> dict:
    """A finished sweep's optimization_results.yaml ({} when missing or unreadable)."""
    try:
        results = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return results if isinstance(results, dict) else {}


def _open_readonly(url: str) -> Any:
    """An Optuna storage to read ``url`` from: a journal file as it is (the sweeper's own
    opening would mend a torn last line), a database URL as given."""
    from hydra_plugins.kd_sweeper.journal import check_journal
    from hydra_plugins.kd_sweeper.study import JOURNAL

    if url.startswith(JOURNAL):
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        path = Path(url[len(JOURNAL) :])
        if not path.is_file():
            raise FileNotFoundError(f"no journal file {path}")
        check_journal(path)  # names what is wrong with one that is damaged, and changes nothing
        return JournalStorage(JournalFileBackend(str(path)))
    return url


def _load_study(sweep_dir: Path, notes: list[str], storage: str | None = None) -> Any:
    """The sweep's study, opened read-only; None, with a note that says why, when it
    cannot be read (an empty or damaged ``optuna.db``, a database without its password)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    where = sweep_storage(sweep_dir, storage)
    if where == SQLITE:
        return _load_sqlite_study(sweep_dir, notes)
    if where is None:
        return None
    if ":***@" in where:
        notes.append(
            f"{sweep_dir}: its study is in {where}; pass --storage with the password to table it "
            "(its runs are reported as runs)."
        )
        return None
    try:
        backend = _open_readonly(where)
        names = [s.study_name for s in optuna.get_all_study_summaries(backend)]
        name = _recorded_results(sweep_dir).get("study_name") or (names[0] if len(names) == 1 else None)
        if name not in names:
            notes.append(f"{sweep_dir}: {where} holds no study {name or '(none named)'}: its sweep table is left out.")
            return None
        return optuna.load_study(study_name=name, storage=backend)
    except DamagedStorage as err:
        notes.append(f"{sweep_dir}: {err}; its sweep table is left out.")
        return None
    except Exception as err:  # a storage that is gone, unreachable or not Optuna's
        notes.append(f"{sweep_dir}: its study in {where} cannot be read ({type(err).__name__}): table left out.")
        return None


def _load_sqlite_study(sweep_dir: Path, notes: list[str]) -> Any:
    """The study in the sweep directory's own ``optuna.db``, opened read-only."""
    db = sweep_dir / "optuna.db"
    with open(db, "rb") as f:
        header = f.read(len(SQLITE_HEADER))
    if header != SQLITE_HEADER:
        what = "is empty (0 bytes)" if not header else "is not an SQLite database"
        notes.append(f"{db} {what}: its sweep table and plots are left out (its runs are reported as runs).")
        return None
    storage = f"sqlite:///file:{db.resolve()}?mode=ro&uri=true"
    try:
        names = optuna.get_all_study_summaries(storage)
    except RuntimeError as err:  # a study written by an older Optuna (e.g. 2.10)
        if "storage upgrade" not in str(err):
            raise
        raise ReportError(
            f"{db} was written by an older Optuna; upgrade it once with "
            f"`optuna storage upgrade --storage sqlite:///{db}` (back it up first)"
        ) from None
    except Exception as err:  # sqlalchemy's errors: a damaged or foreign database
        notes.append(f"{db} cannot be read ({type(err).__name__}): its sweep table and plots are left out.")
        return None
    if not names:
        notes.append(f"{db} holds no study yet: its sweep table and plots are left out.")
        return None
    return optuna.load_study(study_name=names[0].study_name, storage=storage)


def _completed(study: Any) -> list:
    """The study's completed trials (failed, pruned and running ones are never results)."""

    return study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))


def _trial_metrics(sweep_dir: Path, number: int) -> dict:
    """A trial's metrics.json ({} while it is missing or unreadable)."""
    metrics_file = sweep_dir / str(number) / "metrics.json"
    try:
        metrics = json.loads(metrics_file.read_text())
    except (OSError, ValueError):  # missing, or cut short (its run is listed as skipped, with why)
        return {}
    return metrics if isinstance(metrics, dict) else {}


def _unreadable_trial_metrics(sweep_dir: Path, study: Any) -> list[str]:
    """A note naming the completed trials whose metrics.json is there but cannot be read."""
    bad = [
        t.number
        for t in _completed(study)
        if (sweep_dir / str(t.number) / "metrics.json").exists() and not _trial_metrics(sweep_dir, t.number)
    ]
    if not bad:
        return []
    return [
        f"{sweep_dir}: the metrics.json of trial(s) {', '.join(map(str, bad))} cannot be read (cut short?): "
        "their seeds, accuracies and test accuracy are shown as n/a."
    ]


def _trial_records(sweep_dir: Path, number: int) -> tuple[dict, list[dict]]:
    """A trial's metrics.json and its per-seed records (both empty while it is missing)."""
    metrics = _trial_metrics(sweep_dir, number)
    return metrics, seed_records(metrics) if metrics else []


def sweep_table(sweep_dir: Path, study: Any) -> dict:
    """A sweep's trials from its study (completed, not voided), best objective first.

    Test accuracy is given for the selected trial only: it is reported, never ranked on.
    """

    if len(study.directions) > 1:
        return pareto_table(sweep_dir, study)
    complete = _completed(study)
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    complete.sort(key=lambda t: -t.value if maximize else t.value)
    selected = complete[0].number if complete else None
    rows = []
    objective = "val_acc"
    for t in complete:
        metrics, records = _trial_records(sweep_dir, t.number)
        objective = metrics.get("objective", objective)
        rows.append(
            {
                "trial": t.number,
                "params": t.params,
                "objective_value": t.value,
                "seeds": [r.get("seed") for r in records],
                "val_acc": describe(_values(records, "val_acc")),
                "kd_minus_ce_val": _paired(records, "val_acc"),
                "selected": t.number == selected,
                "test_acc": describe(_values(records, "test_acc")) if t.number == selected else None,
                "kd_minus_ce_test": _paired(records, "test_acc") if t.number == selected else None,
            }
        )
    states = [t.state for t in study.get_trials(deepcopy=False)]
    failed = states.count(optuna.trial.TrialState.FAIL)
    pruned = states.count(optuna.trial.TrialState.PRUNED)
    return {
        "dir": str(sweep_dir),
        "study_name": study.study_name,
        "direction": "maximize" if maximize else "minimize",
        "objective": objective,
        "selected_trial": selected,
        "failed": failed,
        "pruned": pruned,
        "rows": rows,
    }


def pareto_table(sweep_dir: Path, study: Any) -> dict:
    """A multi-objective sweep: its Pareto front (the trials no other trial beats on every
    objective, judged on the objectives it was optimised on), first objective first."""
    front = sorted(study.best_trials, key=lambda t: t.number)
    objectives: Any = None
    rows = []
    for t in front:
        metrics, records = _trial_records(sweep_dir, t.number)
        objectives = metrics.get("objective", objectives)
        rows.append(
            {
                "trial": t.number,
                "params": t.params,
                "values": list(t.values),
                "params_count": metrics.get("params"),  # "params" are the trial's hyperparameters
                "flops": metrics.get("flops"),
                "latency_ms": metrics.get("latency_ms"),
                "val_acc": describe(_values(records, "val_acc")),
                "test_acc": describe(_values(records, "test_acc")),  # front members were chosen on validation
            }
        )
    names = objectives if isinstance(objectives, list) else [f"objective {i}" for i in range(len(study.directions))]
    return {
        "dir": str(sweep_dir),
        "study_name": study.study_name,
        "directions": [d.name.lower() for d in study.directions],
        "objective": names,
        "pareto_front": rows,
        "complete": len(_completed(study)),
    }


def pareto_markdown(sweep: dict) -> str:
    params = sorted({p for r in sweep["pareto_front"] for p in r["params"]})
    goals = [f"{n} ({d[:3]})" for n, d in zip(sweep["objective"], sweep["directions"], strict=False)]
    head = ["Trial", *params, *goals, "Parameters", "FLOPs", "Latency", "Val acc", "Test acc"]
    rows = []
    for r in sweep["pareto_front"]:
        cells = [str(r["trial"]), *(_short(r["params"].get(p)) for p in params), *(f"{v:.4g}" for v in r["values"])]
        cells += _cost_cells(r.get("params_count"), r.get("flops"), r.get("latency_ms"))
        rows.append(cells + [fmt_mean_se(r["val_acc"]), fmt_mean_se(r["test_acc"])])
    intro = (
        f"Study `{sweep['study_name']}`: the Pareto front, {len(sweep['pareto_front'])} of {sweep['complete']} "
        "completed trials (none of the others is at least as good on every objective and better on one)."
    )
    return intro + "\n\n" + table(head, rows)


def sweep_markdown(sweep: dict) -> str:
    if "pareto_front" in sweep:
        return pareto_markdown(sweep)
    if "racing" in sweep:
        return race_markdown(sweep)
    params = sorted({p for r in sweep["rows"] for p in r["params"]})
    head = ["Trial", *params, f"Objective ({sweep['objective']})", "Val acc", "KD − CE, val [95% CI]", "Test acc"]
    rows = []
    for r in sweep["rows"]:
        test = "—"
        if r["selected"]:
            test = fmt_mean_se(r["test_acc"]) + f"; KD − CE {fmt_difference(r['kd_minus_ce_test'])}"
        rows.append(
            [
                f"{r['trial']}{' ★' if r['selected'] else ''}",
                *(_short(r["params"].get(p)) for p in params),
                f"{r['objective_value']:.2f}",
                fmt_mean_se(r["val_acc"]),
                fmt_difference(r["kd_minus_ce_val"]),
                test,
            ]
        )
    intro = (
        f"Study `{sweep['study_name']}`: {len(sweep['rows'])} completed trials ordered by the objective "
        f"({sweep['direction']}); {sweep['failed']} failed and {sweep.get('pruned', 0)} pruned trial(s) left out. "
        "Test accuracy is shown for the selected trial (★) only."
    )
    return intro + "\n\n" + table(head, rows)


# matplotlib is imported in the functions that draw: sweep_plots selects the Agg
# backend (files only) before pyplot is first imported.


def _save(fig: Any, path: Path, size: tuple[float, float], written: list[str]) -> None:
    import matplotlib.pyplot as plt

    fig.set_size_inches(*size)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    written.append(str(path))


def _objective_vs_param(study: Any, trials: list, param: str, errors: list[float]) -> Any:
    """One parameter's scatter of the objective (± SE over seeds), the best trial starred."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator, NullFormatter, ScalarFormatter

    distribution = trials[-1].distributions[param]
    title = param.split(".")[-1]
    fig, ax = plt.subplots()
    xs, values = [t.params[param] for t in trials], [t.value for t in trials]
    if any(errors):
        ax.errorbar(xs, values, yerr=errors, fmt="none", ecolor="0.6", elinewidth=0.8, zorder=0, label="± SE")
    points = ax.scatter(xs, values, c=[t.number for t in trials], cmap="viridis", edgecolors="k", linewidths=0.4)
    best = study.best_trial
    ax.scatter([best.params[param]], [best.value], marker="*", s=220, c="red", label=f"best (trial {best.number})")
    if getattr(distribution, "log", False):
        ax.set_xscale("log")
        ticks = [v for v in (0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100) if distribution.low <= v <= distribution.high]
        ax.set_xticks(ticks or [distribution.low, distribution.high])
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(title)
    ax.set_ylabel("objective (%)" + (", mean ± SE over seeds" if any(errors) else ""))
    ax.set_title(f"{study.study_name}: objective vs {title}", fontsize=10)
    bar = fig.colorbar(points, ax=ax, label="trial number")
    bar.locator = MaxNLocator(integer=True)
    bar.update_ticks()
    ax.legend(loc="best", fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def sweep_plots(sweep_dir: Path, study: Any, out: Path, notes: list[str] | None = None) -> list[str]:
    """PNG plots for an Optuna sweep directory; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.ticker import MaxNLocator

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    trials = _completed(study)
    written: list[str] = []
    notes = notes if notes is not None else []
    if not trials:
        notes.append("No plots: the study has no completed trial yet.")
        return written
    if len(study.directions) > 1:
        if len(study.directions) <= 3:
            names = [str(n) for n in (_trial_metrics(sweep_dir, trials[0].number).get("objective") or [])]
            ax = optuna_plots.plot_pareto_front(study, target_names=names or None)
            _save(ax.figure, out / "pareto_front.png", (5.5, 4), written)
        return written
    errors = []  # the objective's standard error over each trial's seeds (0 for one seed)
    for t in trials:
        metrics = _trial_metrics(sweep_dir, t.number)
        errors.append(metrics.get(f"{metrics.get('objective', 'val_acc')}_se") or 0.0)
    for param in sorted({p for t in trials for p in t.params}):
        if all(param in t.params for t in trials):
            fig = _objective_vs_param(study, trials, param, errors)
            _save(fig, out / f"objective_vs_{param.split('.')[-1]}.png", (5, 3.6), written)
    ax = optuna_plots.plot_optimization_history(study, target_name="validation accuracy (%)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _save(ax.figure, out / "optimization_history.png", (5.5, 3.6), written)
    distinct = len({round(t.value, 9) for t in trials})
    if len(trials) < 3 or distinct < 2:
        notes.append(
            f"No parameter-importance plot: it needs at least 3 completed trials whose objectives "
            f"differ (this sweep has {len(trials)} completed, {distinct} distinct value(s))."
        )
    else:
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)  # Optuna's default, seeded
        ax = optuna_plots.plot_param_importances(study, evaluator=evaluator)
        _save(ax.figure, out / "param_importances.png", (5.5, 2.8), written)
    return written


def race_plots(race: dict, out: Path) -> list[str]:
    """A racing sweep's plot: the spread of every trial over its seeds."""
    import matplotlib

    matplotlib.use("Agg")
    written: list[str] = []
    if race["rows"]:
        fig = seed_spread_plot(race)
        _save(fig, out / f"seed_spread_{race['study_name']}.png", tuple(fig.get_size_inches()), written)
    return written


def report(dirs: list[Path], out: Path, title: str = "Results", storage: str | None = None) -> dict[str, Any]:
    """Write ``out/report.md`` and ``out/summary.json`` for ``dirs``; ``storage`` is the
    Optuna storage of sweeps whose study is not in their own ``optuna.db`` and was not
    recorded in full (a database URL with its password)."""
    out.mkdir(parents=True, exist_ok=True)
    plots: list[str] = []
    notes: list[str] = []
    sweeps, tabled = [], []
    for d in dirs:
        if sweep_storage(d, storage) is None:
            continue
        study = _load_study(d, notes, storage)  # once per sweep, for its table and its plots
        if study is None:  # its trials are reported as runs
            continue
        race = race_table(d, study)
        if race is not None:  # trial values are means over different seeds: the race tells
            sweeps.append(race)
            plots += race_plots(race, out)
        else:
            sweeps.append(sweep_table(d, study))
            notes += _unreadable_trial_metrics(d, study)
            plots += sweep_plots(d, study, out, notes)
        tabled.append(d)
    found = collect(dirs, tabled)
    rows = summarise(found.runs)
    lines = [f"# {title}", ""]
    if rows:
        lines += [runs_markdown(rows), ""]
    for sweep in sweeps:
        lines += [sweep_markdown(sweep), ""]
    duplicates = [(r["label"], d) for r in rows for d in r["duplicates"]]
    if duplicates:
        lines += [f"Counted once ({len(duplicates)} duplicate seed result(s) left out; the newer run is kept):", ""]
        lines += [f"- {name}, seed {d['seed']}: `{d['run_dir']}` (kept: `{d['kept']}`)" for name, d in duplicates]
        lines.append("")
    if found.skipped:
        lines += [f"Skipped {len(found.skipped)} run(s):", ""]
        lines += [f"- `{d}`: {why}" for d, why in found.skipped]
        lines.append("")
    lines += [f"{note}" for note in notes] + ([""] if notes else [])
    for p in plots:
        lines.append(f"![{Path(p).stem}]({Path(p).name})")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    summary = {
        "rows": rows,
        "sweeps": sweeps,
        "skipped": [{"run_dir": d, "reason": w} for d, w in found.skipped],
        "plots": [Path(p).name for p in plots],
        "notes": notes,
        "runs": len(found.runs),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kd.report", description="Tables and plots from run directories.")
    parser.add_argument("dirs", nargs="+", type=Path, help="run, multirun or sweep directories")
    parser.add_argument(
        "--out", type=Path, default=None, help="where to write (default: DIR.report beside the first DIR)"
    )
    parser.add_argument("--title", default="Results")
    parser.add_argument(
        "--storage",
        default=None,
        help="the sweeps' Optuna storage when it is not their optuna.db and was recorded without its password "
        "(postgresql://user:password@host/db)",
    )
    args = parser.parse_args(argv)
    missing = [str(d) for d in args.dirs if not d.is_dir()]
    if missing:
        print(f"kd.report: error: not a directory: {', '.join(missing)}", file=sys.stderr)
        return 2
    try:
        first = args.dirs[0].resolve()
        out = args.out or first.with_name(first.name + ".report")
        if out.exists() and not out.is_dir():
            raise ReportError(f"--out {out} is a file; name a folder (the report writes report.md and more into it)")
        check_writable(out, "--out")
        summary = report(args.dirs, out, args.title, args.storage)
    except ReportError as err:
        print(f"kd.report: error: {err}", file=sys.stderr)
        return 2
    except StorageError as err:
        print(f"kd.report: error: {err}", file=sys.stderr)
        return StorageError.exit_code
    if summary["rows"]:
        print(runs_markdown(summary["rows"]))
    for sweep in summary["sweeps"]:
        print(sweep_markdown(sweep))
    for item in summary["skipped"]:
        print(f"skipped {item['run_dir']}: {item['reason']}")
    for note in summary["notes"]:
        print(note)
    for plot in summary["plots"]:
        print(f"wrote {plot}")
    print(f"wrote {out / 'report.md'} and {out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
