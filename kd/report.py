"""Tables and plots from run, multirun and sweep directories.

    python -m kd.report DIR [DIR ...] [--out OUT] [--title TITLE]

Finds every ``metrics.json`` under the directories, groups runs that differ only in
their seed, and writes ``OUT/report.md`` (a table in the seed README's shape, mean ±
std over seeds) and ``OUT/summary.json``. For an Optuna sweep directory (one holding
``optuna.db``) it also writes PNG plots: objective against temperature and alpha, and
Optuna's optimisation history and parameter importances. Runs that have not finished
(no ``metrics.json`` yet) or that diverged are listed as skipped, with the reason, so
the report can be made while a sweep is still writing.
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

MODEL_NAMES = {"DeepNN": "Teacher", "LightNN": "Student"}


@dataclass
class Collected:
    runs: list[dict] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (directory, reason)


def collect(roots: list[Path]) -> Collected:
    """Completed runs under ``roots``, and the run directories skipped with why."""
    found = Collected()
    for root in roots:
        for hydra_dir in sorted(root.rglob(".hydra")):
            run_dir = hydra_dir.parent
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
            found.runs.append(metrics)
    return found


def label(run: dict) -> str:
    name = MODEL_NAMES.get(run["model"], run["model"])
    if run["loss"] == "kd":
        return f"{name} + KD (T={run['temperature']:.3g}, α={run['alpha']:.3g})"
    return name


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def _fmt(mean: float, std: float | None, unit: str = "") -> str:
    return f"{mean:.2f}{unit}" if std is None else f"{mean:.2f} ± {std:.2f}{unit}"


def summarise(runs: list[dict]) -> list[dict]:
    """One row per setting (runs that differ only in seed are pooled)."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for run in runs:
        key = (
            run["model"],
            run["loss"],
            run.get("temperature"),
            run.get("alpha"),
            run["epochs"],
            run.get("dataset"),
            run.get("train_examples"),
        )
        groups[key].append(run)
    rows = []
    for group in groups.values():
        first = group[0]
        test_mean, test_std = _mean_std([r["test_acc"] for r in group])
        time_mean, time_std = _mean_std([r["train_seconds"] for r in group])
        vals = [r["val_acc"] for r in group if r.get("val_acc") is not None]
        rows.append(
            {
                "label": label(first),
                "model": first["model"],
                "params": first["params"],
                "loss": first["loss"],
                "temperature": first.get("temperature"),
                "alpha": first.get("alpha"),
                "epochs": first["epochs"],
                "dataset": first.get("dataset"),
                "train_examples": first.get("train_examples"),
                "seeds": sorted(r["seed"] for r in group),
                "test_acc_mean": test_mean,
                "test_acc_std": test_std,
                "val_acc_mean": statistics.fmean(vals) if vals else None,
                "train_seconds_mean": time_mean,
                "train_seconds_std": time_std,
                "device": first.get("device"),
            }
        )
    order = {"DeepNN": 0, "LightNN": 1}
    rows.sort(key=lambda r: (order.get(r["model"], 2), r["loss"] != "ce", -r["test_acc_mean"]))
    return rows


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| Model | Parameters | Training time | Test accuracy | Seeds |",
        "| ----- | ---------: | ------------: | ------------: | ----- |",
    ]
    for r in rows:
        minutes = r["train_seconds_mean"] / 60
        time_text = f"{minutes:.1f} min" if minutes >= 1 else f"{r['train_seconds_mean']:.1f} s"
        seeds = ", ".join(str(s) for s in r["seeds"])
        lines.append(
            f"| {r['label']} | {r['params']:,} | {time_text} | "
            f"{_fmt(r['test_acc_mean'], r['test_acc_std'], ' %')} | {seeds} |"
        )
    return "\n".join(lines)


def sweep_plots(sweep_dir: Path, out: Path) -> list[str]:
    """PNG plots for an Optuna sweep directory; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    storage = f"sqlite:///{sweep_dir / 'optuna.db'}"
    names = optuna.get_all_study_summaries(storage)
    if not names:
        return []
    study = optuna.load_study(study_name=names[0].study_name, storage=storage)
    trials = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    written: list[str] = []

    def save(fig: Any, name: str, size: tuple[float, float]) -> None:
        fig.set_size_inches(*size)
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        written.append(str(out / name))

    if not trials:
        return written
    values = [t.value for t in trials]
    for param, log_scale, title in [("loss.temperature", True, "temperature T"), ("loss.alpha", False, "alpha")]:
        if not all(param in t.params for t in trials):
            continue
        fig, ax = plt.subplots()
        xs = [t.params[param] for t in trials]
        points = ax.scatter(xs, values, c=[t.number for t in trials], cmap="viridis", edgecolors="k", linewidths=0.4)
        best = study.best_trial
        ax.scatter([best.params[param]], [best.value], marker="*", s=220, c="red", label=f"best (trial {best.number})")
        if log_scale:
            from matplotlib.ticker import NullFormatter, ScalarFormatter

            ax.set_xscale("log")
            ax.set_xticks([1, 2, 5, 10, 20])
            ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(title)
        ax.set_ylabel("objective: validation accuracy (%)")
        ax.set_title(f"{study.study_name}: objective vs {title}", fontsize=10)
        fig.colorbar(points, ax=ax, label="trial number")
        ax.legend(loc="best", fontsize=8)
        ax.grid(alpha=0.3)
        save(fig, f"objective_vs_{param.split('.')[-1]}.png", (5, 3.6))

    from optuna.visualization import matplotlib as optuna_plots

    ax = optuna_plots.plot_optimization_history(study, target_name="validation accuracy (%)")
    save(ax.figure, "optimization_history.png", (5.5, 3.6))
    if len(trials) >= 3:
        # optuna 2.10's default fANOVA evaluator fails on numpy 2; mean decrease in
        # impurity (a random forest over the trials) works and is seeded.
        evaluator = optuna.importance.MeanDecreaseImpurityImportanceEvaluator(seed=0)
        ax = optuna_plots.plot_param_importances(study, evaluator=evaluator)
        save(ax.figure, "param_importances.png", (5.5, 2.8))
    return written


def report(dirs: list[Path], out: Path, title: str = "Results") -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    found = collect(dirs)
    rows = summarise(found.runs)
    plots = []
    sweep = {}
    for d in dirs:
        if (d / "optuna.db").exists():
            plots += sweep_plots(d, out)
            results = d / "optimization_results.yaml"
            if results.exists():
                import yaml

                sweep = yaml.safe_load(results.read_text())
    lines = [f"# {title}", "", markdown_table(rows), ""]
    if sweep:
        lines += [f"Best trial {sweep.get('best_trial')}: {sweep.get('best_params')} -> {sweep.get('best_value')}", ""]
    if found.skipped:
        lines += [f"Skipped {len(found.skipped)} run(s):", ""]
        lines += [f"- `{d}`: {why}" for d, why in found.skipped]
        lines.append("")
    for p in plots:
        lines.append(f"![{Path(p).stem}]({Path(p).name})")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    summary = {
        "rows": rows,
        "skipped": [{"run_dir": d, "reason": w} for d, w in found.skipped],
        "plots": [Path(p).name for p in plots],
        "sweep": sweep,
        "runs": len(found.runs),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kd.report", description="Tables and plots from run directories.")
    parser.add_argument("dirs", nargs="+", type=Path, help="run, multirun or sweep directories")
    parser.add_argument("--out", type=Path, default=None, help="where to write (default: the first DIR)")
    parser.add_argument("--title", default="Results")
    args = parser.parse_args(argv)
    missing = [str(d) for d in args.dirs if not d.is_dir()]
    if missing:
        print(f"kd.report: error: not a directory: {', '.join(missing)}", file=sys.stderr)
        return 2
    summary = report(args.dirs, args.out or args.dirs[0], args.title)
    print(markdown_table(summary["rows"]))
    for item in summary["skipped"]:
        print(f"skipped {item['run_dir']}: {item['reason']}")
    for plot in summary["plots"]:
        print(f"wrote {plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
