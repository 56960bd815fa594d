"""Sweep throughput with 1 and 2 parallel jobs (hydra-joblib-launcher), in one run.

    python benchmarks/bench_parallel.py [--trials 8] [--train-size 5000] [--epochs 3]

Runs the same Optuna sweep of N student KD trials on synthetic data twice, once with
``n_jobs=1`` and once with ``n_jobs=2`` (each job then gets half the cores), against
one teacher trained beforehand, and prints trials per minute and the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--train-size", type=int, default=5000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--jobs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kd_bench_parallel_"))
    env = {**os.environ, "KD_CACHE_DIR": str(work / "cache"), "PYTHONPATH": str(REPO)}
    common = [
        "data=synthetic",
        f"data.train_size={args.train_size}",
        "data.test_size=1000",
        "data.val_size=1000",
        f"trainer.epochs={args.epochs}",
        "trainer.progress=false",
    ]

    def run(extra: list[str], multirun: bool = False) -> float:
        start = time.perf_counter()
        flags = ["-m"] if multirun else []  # Hydra's flags come before the overrides
        subprocess.run(
            [sys.executable, str(REPO / "run.py"), *flags, *common, *extra],
            cwd=work,
            env=env,
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        return time.perf_counter() - start

    run(["loss=kd", "hydra.run.dir=warmup"])  # trains and stores the teacher once
    rows = []
    for jobs in args.jobs:
        seconds = run(
            [
                "hparams_search=kd",
                "hydra/launcher=joblib",
                f"hydra.launcher.n_jobs={jobs}",
                f"hydra.sweeper.n_jobs={jobs}",
                f"hydra.sweeper.n_trials={args.trials}",
                f"hydra.sweeper.study_name=jobs{jobs}",
                f"hydra.sweep.dir=sweep{jobs}",
            ],
            multirun=True,
        )
        threads = {json.loads(p.read_text())["num_threads"] for p in (work / f"sweep{jobs}").glob("*/metrics.json")}
        rows.append(
            {
                "n_jobs": jobs,
                "seconds": seconds,
                "trials_per_min": args.trials * 60 / seconds,
                "threads_per_job": sorted(threads),
            }
        )
    base = rows[0]["trials_per_min"]
    print(
        f"{args.trials} KD trials, {args.epochs} epochs on {args.train_size} synthetic images, {os.cpu_count()} cores"
    )
    print(f"{'n_jobs':>6} {'threads/job':>11} {'seconds':>8} {'trials/min':>10} {'vs n_jobs=1':>11}")
    for r in rows:
        print(
            f"{r['n_jobs']:>6} {str(r['threads_per_job']):>11} {r['seconds']:8.1f} {r['trials_per_min']:10.2f} "
            f"{r['trials_per_min'] / base:10.2f}x"
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"trials": args.trials, "epochs": args.epochs, "train_size": args.train_size, "rows": rows}, indent=2
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
