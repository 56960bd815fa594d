"""The sweep section of a report: a study's trials (completed only, ordered by the
objective, the selected trial marked, its test accuracy alone shown), its Pareto front
for several objectives, and the plots (objective against each parameter, Optuna's
history and parameter importances)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.visualization import matplotlib as optuna_plots

from hydra_plugins.kd_sweeper.constraints import feasible
from hydra_plugins.kd_sweeper.journal import DamagedStorage
from hydra_plugins.kd_sweeper.study import FAIL_REASON, counted_trials, masked, open_readonly, recorded_results
from kd.errors import ReportError
from kd.markdown import short, table
from kd.race_report import race_markdown, seed_spread_plot
from kd.run_table import cost_cells, paired, seed_records, values_of
from kd.stats import describe, fmt_difference, fmt_mean_se

SQLITE_HEADER = b"SQLite format 3\x00"


SQLITE = "optuna.db"  # sweep_storage's answer for the sweep directory's own SQLite file


def sweep_storage(sweep_dir: Path, storage: str | None = None) -> str | None:
    """Where a sweep directory's study is: its own ``optuna.db`` (:data:`SQLITE`), else
    ``storage`` or the storage the finished sweep recorded in optimization_results.yaml
    (a journal file, a database); None for a directory that is no Optuna sweep with a
    storage (a plain multirun, a study kept in memory)."""
    if (sweep_dir / "optuna.db").exists():
        return SQLITE
    results = recorded_results(sweep_dir)
    return (storage or results.get("storage")) if results else None


def load_study(sweep_dir: Path, notes: list[str], storage: str | None = None) -> Any:
    """The sweep's study, opened read-only; None, with a note that says why, when it
    cannot be read (an empty or damaged ``optuna.db``, a database without its password)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    where = sweep_storage(sweep_dir, storage)
    if where == SQLITE:
        return _load_sqlite_study(sweep_dir, notes)
    if where is None:
        return None
    if masked(where):
        notes.append(
            f"{sweep_dir}: its study is in {where}; pass --storage with the password to table it "
            "(its runs are reported as runs)."
        )
        return None
    try:
        backend = open_readonly(where)
        names = [s.study_name for s in optuna.get_all_study_summaries(backend)]
        name = recorded_results(sweep_dir).get("study_name") or (names[0] if len(names) == 1 else None)
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
    storage = open_readonly(f"sqlite:///{db}")
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


def unreadable_trial_metrics(sweep_dir: Path, study: Any) -> list[str]:
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
    # Under hydra.sweeper.constraints the selected trial is the best one that met them all.
    selected = next((t.number for t in complete if feasible(t)), None)
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
                "val_acc": describe(values_of(records, "val_acc")),
                "kd_minus_ce_val": paired(records, "val_acc"),
                "selected": t.number == selected,
                "feasible": feasible(t) if t.constraints else None,
                "test_acc": describe(values_of(records, "test_acc")) if t.number == selected else None,
                "kd_minus_ce_test": paired(records, "test_acc") if t.number == selected else None,
            }
        )
    counted = counted_trials(study)  # as the sweeper counts them
    failures = [
        {"trial": t.number, "reason": t.user_attrs.get(FAIL_REASON)}  # a counted failure has one
        for t in counted
        if t.state == optuna.trial.TrialState.FAIL
    ]
    pruned = sum(1 for t in counted if t.state == optuna.trial.TrialState.PRUNED)
    return {
        "dir": str(sweep_dir),
        "study_name": study.study_name,
        "direction": "maximize" if maximize else "minimize",
        "objective": objective,
        "selected_trial": selected,
        "failed": len(failures),
        "failures": failures,
        "pruned": pruned,
        "rows": rows,
        **_constraint_counts(complete),
    }


def _constraint_counts(complete: list) -> dict:
    """How many completed trials met every bound of a constrained sweep ({} otherwise)."""
    judged = [t for t in complete if t.constraints]
    if not judged:
        return {}
    bounds = sorted({name for t in judged for name in t.constraints})
    return {"constraints": {"bounds": bounds, "n_judged": len(judged), "n_feasible": sum(map(feasible, judged))}}


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
                "val_acc": describe(values_of(records, "val_acc")),
                "test_acc": describe(values_of(records, "test_acc")),  # front members were chosen on validation
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
        cells = [str(r["trial"]), *(short(r["params"].get(p)) for p in params), *(f"{v:.4g}" for v in r["values"])]
        cells += cost_cells(r.get("params_count"), r.get("flops"), r.get("latency_ms"))
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
        mark = " ★" if r["selected"] else " ✗" if r.get("feasible") is False else ""
        rows.append(
            [
                f"{r['trial']}{mark}",
                *(short(r["params"].get(p)) for p in params),
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
    if bounds := sweep.get("constraints"):
        intro += (
            f" Constraints {', '.join(f'`{b}`' for b in bounds['bounds'])}: {bounds['n_feasible']} of "
            f"{bounds['n_judged']} trials met them (✗: did not); the selected trial is the best that did."
        )
    why = "".join(f"\n- trial {f['trial']} failed: {f['reason']}" for f in sweep.get("failures", []))
    return intro + (f"\n{why}" if why else "") + "\n\n" + table(head, rows)


# Below this many completed trials, the importance plot says it is a rough guide: fANOVA's
# random forest over so few points ranks parameters by little more than chance.
FEW_FOR_IMPORTANCE = 20


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
    ax.legend(loc="best", fontsize=8)  # inside: Optuna's, beside the axes, took half the width
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
        if ax.get_legend() is not None:
            ax.get_legend().remove()  # one objective: the legend only covered a bar's label
        if len(trials) < FEW_FOR_IMPORTANCE:
            ax.set_title(f"Importances from {len(trials)} trials: a rough guide", loc="left", fontsize=10)
            notes.append(
                f"Parameter importances come from {len(trials)} completed trials: with fewer than "
                f"{FEW_FOR_IMPORTANCE}, fANOVA's ranking is a rough guide, not a finding."
            )
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
