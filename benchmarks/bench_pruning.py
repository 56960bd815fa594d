"""The median pruner against no pruner: the same TPE sweep (same seed, same trials
budget) run twice, one after the other, after one warm-up run has stored the teacher,
its logits and the CE baseline, so both sweeps only train students.

    python benchmarks/bench_pruning.py OUT [overrides...]        # e.g. data=folder data.root=...

Prints and writes OUT/pruning.json: wall time, epochs trained (pruned trials count
the epochs they ran), completed / pruned trials and the best value of each sweep,
and the ratios pruned / unpruned.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import optuna

REPO = Path(__file__).resolve().parents[1]


def run(args: list[str], log: Path) -> float:
    started = time.perf_counter()
    with open(log, "w") as out:
        subprocess.run([sys.executable, str(REPO / "run.py"), *args], check=True, stdout=out, stderr=subprocess.STDOUT)
    return time.perf_counter() - started


def summarise(sweep_dir: Path, seconds: float) -> dict:
    storage = f"sqlite:///{sweep_dir / 'optuna.db'}"
    (summary,) = optuna.get_all_study_summaries(storage)
    study = optuna.load_study(study_name=summary.study_name, storage=storage)
    epochs = 0
    for trial in study.trials:
        metrics = json.loads((sweep_dir / str(trial.number) / "metrics.json").read_text())
        epochs += metrics.get("epochs_trained", 0)
    states = [t.state.name for t in study.trials]
    return {
        "wall_seconds": seconds,
        "epochs_trained": epochs,
        "trials": len(states),
        "complete": states.count("COMPLETE"),
        "pruned": states.count("PRUNED"),
        "failed": states.count("FAIL"),
        "best_value": study.best_value,
        "best_trial": study.best_trial.number,
        "best_params": study.best_params,
    }


def main() -> None:
    out = Path(sys.argv[1]).resolve()
    overrides = sys.argv[2:]
    out.mkdir(parents=True, exist_ok=True)
    trials = os.environ.get("KD_TRIALS", "24")
    jobs = os.environ.get("KD_JOBS", "4")
    common = ["trainer.progress=false", *overrides]
    warm = run(["loss=kd", *common, f"hydra.run.dir={out}/warmup"], out / "warmup.log")
    print(f"warm-up (teacher, logits, CE baseline): {warm:.1f}s", flush=True)
    sweep = [
        "-m",
        "hparams_search=kd",
        *common,
        f"hydra.sweeper.n_trials={trials}",
        f"hydra.sweeper.n_jobs={jobs}",
        "hydra/launcher=joblib",
        f"hydra.launcher.n_jobs={jobs}",
    ]
    results: dict = {"trials": int(trials), "n_jobs": int(jobs), "overrides": overrides, "warmup_seconds": warm}
    for name, extra in [("no_pruner", []), ("median_pruner", ["hydra/sweeper/pruner=median"])]:
        sweep_dir = out / name
        seconds = run([*sweep, *extra, f"hydra.sweep.dir={sweep_dir}"], out / f"{name}.log")
        results[name] = summarise(sweep_dir, seconds)
        print(name, json.dumps(results[name]), flush=True)
        (out / "pruning.json").write_text(json.dumps(results, indent=2) + "\n")
    plain, pruned = results["no_pruner"], results["median_pruner"]
    results["ratios"] = {
        "wall_seconds": pruned["wall_seconds"] / plain["wall_seconds"],
        "epochs_trained": pruned["epochs_trained"] / plain["epochs_trained"],
        "best_value_difference": pruned["best_value"] - plain["best_value"],
    }
    (out / "pruning.json").write_text(json.dumps(results, indent=2) + "\n")
    print("median / none:", json.dumps(results["ratios"]))


if __name__ == "__main__":
    main()
