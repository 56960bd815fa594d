"""One kd sweep with pruning on the CIFAR-10 copy, in batches and in flight.

    python benchmarks/async_kd.py --data-root ../shared/data/cifar10-jpeg [--trials 8] \\
        [--out docs/results/async/kd_cifar.json]

Runs ``hparams_search=kd experiment=seed_kd data.val_size=5000`` (LightNN distilled from the seed
recipe's DeepNN, 10 epochs) with ASHA pruning on joblib, 2 workers, the same sampler
seed and n_trials, once with ``hydra.sweeper.asynchronous=false`` and once in flight.
Each sweep resumes if the script is stopped and started again (its study is in its
sweep dir). Per mode: wall time (the first trial's ask to the last one's tell), trials
per hour, pruned trials, the best validation accuracy, and the share of worker-seconds
in which no job ran (a job's span is its metrics.json's ``wall_seconds`` up to the
file's last write).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import optuna

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "results" / "async" / "kd_cifar.json"


def sweep(mode: str, args: argparse.Namespace) -> dict:
    sweep_dir = args.work / mode
    overrides = [
        "hparams_search=kd", "experiment=seed_kd", "data=folder", f"data.root={args.data_root}",
        "data.val_size=5000",
        "hydra/sweeper/pruner=asha", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "hydra.sweeper.n_jobs=2",
        f"hydra.sweeper.n_trials={args.trials}", "hydra.sweeper.sampler.seed=0",
        f"hydra.sweeper.study_name=async_kd_{mode}", f"hydra.sweep.dir={sweep_dir}",
        f"hydra.sweeper.asynchronous={'true' if mode == 'async' else 'false'}",
    ]  # fmt: skip
    proc = subprocess.run([sys.executable, str(ROOT / "run.py"), "-m", *overrides], cwd=args.work)
    if proc.returncode != 0:
        raise SystemExit(f"the {mode} sweep failed (exit {proc.returncode}); rerun this script to resume it")
    study = optuna.load_study(study_name=f"async_kd_{mode}", storage=f"sqlite:///{sweep_dir}/optuna.db")
    trials = [t for t in study.trials if t.state.is_finished() and t.datetime_complete]
    begin = min(t.datetime_start.timestamp() for t in trials)
    end = max(t.datetime_complete.timestamp() for t in trials)
    working = 0.0
    for t in trials:
        metrics = sweep_dir / str(t.number) / "metrics.json"
        working += json.loads(metrics.read_text())["wall_seconds"]
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    return {
        "mode": mode,
        "command": "python run.py -m " + " ".join(overrides),
        "trials": len(trials),
        "pruned": sum(t.state == optuna.trial.TrialState.PRUNED for t in trials),
        "wall_s": end - begin,
        "trials_per_hour": len(trials) / (end - begin) * 3600,
        "idle": 1.0 - working / (2 * (end - begin)),
        "best_val_acc": max(t.value for t in complete) if complete else None,
        "best_params": max(complete, key=lambda t: t.value).params if complete else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, required=True)
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--work", type=Path, default=Path("async_kd_runs"))
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    args.work = args.work.resolve()
    args.data_root = args.data_root.resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    runs = [sweep(mode, args) for mode in ("batch", "async")]
    record = {
        "command": "python benchmarks/async_kd.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores (this project's CPU machine), float32",
        "data": "CIFAR-10 JPEG q75 copy: 45,000 train / 5,000 validation",
        "runs": runs,
        "speedup": runs[0]["wall_s"] / runs[1]["wall_s"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
