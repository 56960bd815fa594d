"""Does KD move the accuracy-vs-FLOPs front? Two multi-objective sweeps, their fronts on fresh seeds.

    # 1. the sweeps, one seed each (selection on validation), e.g.
    python run.py -m hparams_search=kd_pareto experiment=kd_resnet_teacher data.augment=false \\
        data=folder data.root=DATA teacher.checkpoint=TEACHER trainer.epochs=10 trial.baseline=false \\
        hydra.sweeper.n_trials=24 hydra.sweep.dir=SWEEPS/kd
    python run.py -m hparams_search=ce_pareto experiment=student_long data=folder data.root=DATA \\
        trainer.epochs=10 hydra.sweeper.n_trials=24 hydra.sweep.dir=SWEEPS/ce
    # 2. this script: each front trial again on fresh seeds, then the figures
    python benchmarks/pareto_study.py OUT --kd-sweep SWEEPS/kd --ce-sweep SWEEPS/ce
    python benchmarks/pareto_study.py OUT --kd-sweep ... --ce-sweep ... --summarise-only

The Pareto-front trials of either sweep (non-dominated in seed 42's validation accuracy
and FLOPs per image, as the sampler optimised them; thinned to ``--per-front`` at evenly
spaced log FLOPs, both ends kept) are run again with the same
overrides on ``--seeds`` (default 43, 44, 45: seeds the sweep never saw, so the front's
selection does not inflate its own figures). A KD front trial runs with
``trial.baseline=true``: each of its seeds is paired with the CE student of the same
width, seed and recipe, so KD - CE at that width is a paired difference with its 95 %
t interval. ``--jobs`` runs go side by side, ``--threads`` each.

Resumable: a run whose metrics.json says completed is not run again. Written to OUT:
``pareto.json`` (every sweep trial and every re-run front trial), ``pareto.png`` (both
fronts, validation accuracy against FLOPs), and with ``--export`` the knee of the KD
front (its largest distance, in log FLOPs and accuracy, from the chord between the
front's ends) exported to ONNX with ``python -m kd.export``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import subprocess
import sys
from pathlib import Path

import optuna
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.runs import finished, run_logged  # noqa: E402
from kd.run_table import seed_records  # noqa: E402
from kd.stats import describe  # noqa: E402

# Overrides of a sweep trial that the re-runs set themselves (or must not carry).
DROPPED = ("hparams_search=", "trial.seeds=", "trial.baseline=", "trainer.num_threads=", "hydra.", "++hydra.")


def load_study(sweep_dir: Path) -> optuna.Study:
    return optuna.load_study(study_name=None, storage=f"sqlite:///{sweep_dir / 'optuna.db'}")


def sweep_trials(sweep_dir: Path) -> tuple[list[dict], set[int]]:
    """Every completed trial of a two-objective sweep, and the numbers on its front."""
    study = load_study(sweep_dir)
    trials = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        metrics = json.loads((sweep_dir / str(t.number) / "metrics.json").read_text())
        trials.append(
            {
                "trial": t.number,
                "params": t.params,
                "val_acc": t.values[0],
                "flops": metrics["flops"],
                "params_count": metrics["params"],
                "test_acc": metrics["test_acc"],
            }
        )
    return trials, {t.number for t in study.best_trials}


def thinned(front: list[dict], count: int) -> list[dict]:
    """At most ``count`` front trials, the nearest to evenly spaced log10 FLOPs between
    the front's ends (both ends kept): when accuracy rises with width almost every trial
    is on the front, and re-running all of them on fresh seeds would cost the sweep again."""
    ordered = sorted(front, key=lambda t: t["flops"])
    if len(ordered) <= count:
        return ordered
    logs = [math.log10(t["flops"]) for t in ordered]
    targets = [logs[0] + (logs[-1] - logs[0]) * i / (count - 1) for i in range(count)]
    chosen: list[int] = []
    for target in targets:
        free = [i for i in range(len(ordered)) if i not in chosen]
        chosen.append(min(free, key=lambda i: abs(logs[i] - target)))
    return [ordered[i] for i in sorted(chosen)]


def rerun_overrides(sweep_dir: Path, trial: int, kd: bool, seeds: str, threads: int) -> list[str]:
    overrides = yaml.safe_load((sweep_dir / str(trial) / ".hydra" / "overrides.yaml").read_text())
    kept = [o for o in overrides if not o.startswith(DROPPED)]
    return [*kept, f"trial.seeds={seeds}", f"trainer.num_threads={threads}", *(["trial.baseline=true"] if kd else [])]


def run_one(run_dir: Path, overrides: list[str]) -> str:
    if finished(run_dir):
        return f"{run_dir}: done before"
    return f"{run_dir}: exit {run_logged(run_dir, overrides)}"


def rerun_summary(run_dir: Path, kd: bool) -> dict | None:
    metrics_file = run_dir / "metrics.json"
    if not metrics_file.exists():
        return None
    metrics = json.loads(metrics_file.read_text())
    records = seed_records(metrics)
    row = {
        "seeds": [r["seed"] for r in records],
        "flops": metrics["flops"],
        "params_count": metrics["params"],
        "latency_ms": metrics.get("latency_ms"),
        "val_acc": describe([r["val_acc"] for r in records]),
        "test_acc": describe([r["test_acc"] for r in records]),
    }
    if kd:  # the run paired each seed with its CE student (trial.baseline) and recorded KD - CE
        row["ce_val_acc"] = describe([r["baseline"]["val_acc"] for r in records])
        row["ce_test_acc"] = describe([r["baseline"]["test_acc"] for r in records])
        row["kd_minus_ce_val"] = metrics["kd_minus_ce"]["val_acc"]
        row["kd_minus_ce_test"] = metrics["kd_minus_ce"]["test_acc"]
    return row


def non_dominated(points: list[dict]) -> list[dict]:
    """The points no other point beats on both higher validation accuracy and fewer FLOPs."""

    def beaten(p: dict) -> bool:
        return any(
            q["flops"] <= p["flops"] and q["val"] >= p["val"] and (q["flops"], q["val"]) != (p["flops"], p["val"])
            for q in points
        )

    return sorted((p for p in points if not beaten(p)), key=lambda p: p["flops"])


def knee(front: list[dict]) -> dict:
    """The front point farthest from the chord between its ends, in log10 FLOPs and
    accuracy scaled to the front's ranges (the end points themselves are never knees)."""
    if len(front) < 3:
        return front[-1]
    xs = [math.log10(p["flops"]) for p in front]
    ys = [p["val"] for p in front]
    span_x, span_y = (xs[-1] - xs[0]) or 1.0, (max(ys) - min(ys)) or 1.0
    u = [((x - xs[0]) / span_x, (y - ys[0]) / span_y) for x, y in zip(xs, ys, strict=True)]
    (x1, y1) = u[-1]
    norm = math.hypot(x1, y1)
    distances = [abs(x1 * y - y1 * x) / norm for x, y in u]
    return front[max(range(1, len(front) - 1), key=lambda i: distances[i])]


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for arm, colour in (("kd", "tab:blue"), ("ce", "tab:orange")):
        sweep = summary[arm]["sweep"]
        ax.scatter(
            [t["flops"] for t in sweep],
            [t["val_acc"] for t in sweep],
            s=14,
            color=colour,
            alpha=0.3,
            label=f"{arm.upper()} sweep trials (seed 42)",
        )
        reruns = [r for r in summary[arm]["front"] if r.get("rerun")]
        ax.errorbar(
            [r["rerun"]["flops"] for r in reruns],
            [r["rerun"]["val_acc"]["mean"] for r in reruns],
            yerr=[r["rerun"]["val_acc"]["se"] or 0 for r in reruns],
            fmt="o",
            color=colour,
            capsize=3,
            label=f"{arm.upper()} front trials, seeds {summary['seeds']} (mean ± SE)",
        )
        line = summary[arm]["front_on_fresh_seeds"]
        ax.plot([p["flops"] for p in line], [p["val"] for p in line], color=colour)
    if summary.get("knee"):
        k = summary["knee"]
        ax.annotate("knee", (k["flops"], k["val"]), textcoords="offset points", xytext=(8, -14))
    ax.set_xscale("log")
    ax.set_xlabel("FLOPs per image (forward, FlopCounterMode)")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title("LightNN students on the CIFAR-10 JPEG copy: KD from ResNet-20 vs CE")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--kd-sweep", type=Path, required=True)
    parser.add_argument("--ce-sweep", type=Path, required=True)
    parser.add_argument("--seeds", default="[43,44,45]")
    parser.add_argument("--per-front", type=int, default=6, help="front trials re-run per sweep (thinned)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--summarise-only", action="store_true")
    parser.add_argument("--export", action="store_true", help="export the KD front's knee to ONNX")
    args = parser.parse_args()
    args.out = args.out.resolve()
    arms = {"kd": args.kd_sweep.resolve(), "ce": args.ce_sweep.resolve()}
    summary: dict = {"seeds": args.seeds, "sweeps": {arm: str(d) for arm, d in arms.items()}}
    jobs = []
    for arm, sweep_dir in arms.items():
        trials, front = sweep_trials(sweep_dir)
        on_front = [t for t in trials if t["trial"] in front]
        summary[arm] = {"sweep": trials, "sweep_front": sorted(front), "front": thinned(on_front, args.per_front)}
        for t in summary[arm]["front"]:
            overrides = rerun_overrides(sweep_dir, t["trial"], arm == "kd", args.seeds, args.threads)
            t["overrides"] = overrides
            jobs.append((args.out / arm / f"trial{t['trial']}", overrides))
    if not args.summarise_only:
        with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
            for line in pool.map(lambda job: run_one(*job), jobs):
                print(line, flush=True)
    for arm in arms:
        for t in summary[arm]["front"]:
            t["rerun"] = rerun_summary(args.out / arm / f"trial{t['trial']}", arm == "kd")
        points = [
            {"trial": t["trial"], "flops": t["rerun"]["flops"], "val": t["rerun"]["val_acc"]["mean"]}
            for t in summary[arm]["front"]
            if t["rerun"]
        ]
        summary[arm]["front_on_fresh_seeds"] = non_dominated(points)
    kd_line = summary["kd"]["front_on_fresh_seeds"]
    summary["knee"] = knee(kd_line) if kd_line else None
    if args.export and summary["knee"]:
        run_dir = args.out / "kd" / f"trial{summary['knee']['trial']}"
        seed = json.loads(args.seeds)[0]
        cmd = [sys.executable, "-m", "kd.export", str(run_dir), "--format", "onnx", "--seed", str(seed)]
        subprocess.run(cmd, cwd=ROOT, check=True)
        records = seed_records(json.loads((run_dir / "metrics.json").read_text()))
        checkpoint = Path(next(r["checkpoint"] for r in records if r["seed"] == seed))
        summary["knee_export"] = json.loads(checkpoint.with_suffix(".onnx.json").read_text())
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "pareto.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot(summary, args.out / "pareto.png")
    print(f"wrote {args.out / 'pareto.json'} and {args.out / 'pareto.png'}")


if __name__ == "__main__":
    main()
