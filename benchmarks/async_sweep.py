"""Batches against trials in flight: wall time, worker idle time and trials per hour.

    python benchmarks/async_sweep.py [--reps 3] [--jobs 2 4 8] [--out docs/results/async/sleep.json]

Sweeps benchmarks/sleep_app.py (trials sleep, so they need no CPU: 8 steps of
0.5 s x ``length``, ``length`` swept in [0.25, 2]) with kd_optuna on joblib, 24 trials,
with median and ASHA pruning, once with ``hydra.sweeper.asynchronous=false`` (Hydra's
batches of ``n_jobs``) and once in flight, for each ``n_jobs``; each pair shares the
sampler seed (the rep). From the study (each trial's ask and tell) and the times each
job logs:

- wall: the first trial's ask to the last one's tell (the sweeper's start-up, equal in
  both modes, left out);
- waiting: the share of worker-seconds (``n_jobs`` x wall) in which a worker had ended
  its trial and waited while trials remained: in batches, until the batch's slowest job
  ended; in flight, from a trial's tell to the next trial's ask;
- idle: the share in which no app code ran at all: waiting, Hydra's set-up of each job
  (the same in both modes) and the drain after the last trial started;
- trials per hour: 24 / wall.

Both modes ask trials from the same seeded sampler, but what the sampler is told, and
when, differs, so the trials differ too: compare distributions over reps.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "benchmarks" / "sleep_app.py"
OUT = ROOT / "docs" / "results" / "async" / "sleep.json"
N_TRIALS = 24
METRICS = ("wall_s", "waiting", "idle", "trials_per_hour", "pruned")


def sweep(n_jobs: int, pruner: str, asynchronous: bool, seed: int, work: Path) -> dict:
    """One sweep of the sleep app; its timings from the jobs' log."""
    work = work.resolve()
    name = f"j{n_jobs}-{pruner}-{'async' if asynchronous else 'batch'}-{seed}"
    log = work / f"{name}.log"
    args = [
        sys.executable, str(APP), "-m", f"hydra.sweep.dir={work / name}",
        f"hydra/sweeper/pruner={pruner}", f"hydra.sweeper.n_jobs={n_jobs}", f"hydra.sweeper.n_trials={N_TRIALS}",
        f"hydra.sweeper.sampler.seed={seed}", f"hydra.sweeper.asynchronous={str(asynchronous).lower()}",
    ]  # fmt: skip
    env = {**os.environ, "SLEEP_APP_LOG": str(log), "PYTHONPATH": str(ROOT)}
    started = time.perf_counter()
    proc = subprocess.run(args, cwd=work, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    jobs = [line.split() for line in log.read_text().splitlines()]
    study = optuna.load_study(study_name="sleep", storage=f"sqlite:///{work / name}/optuna.db")
    slots = [(t.datetime_start.timestamp(), t.datetime_complete.timestamp()) for t in study.trials]
    begin, end = min(s for s, _ in slots), max(e for _, e in slots)
    wall = end - begin
    working = sum(float(j[2]) - float(j[1]) for j in jobs)  # the app's own time
    return {
        "n_jobs": n_jobs,
        "pruner": pruner,
        "mode": "async" if asynchronous else "batch",
        "seed": seed,
        "trials": len(slots),
        "pruned": sum(int(j[3]) for j in jobs),
        "wall_s": wall,
        "waiting": (_batch_waits(jobs, n_jobs) if not asynchronous else _flight_waits(slots)) / (n_jobs * wall),
        "idle": 1.0 - working / (n_jobs * wall),
        "trials_per_hour": len(slots) / wall * 3600,
        "process_s": time.perf_counter() - started,
    }


def _batch_waits(jobs: list[list[str]], n_jobs: int) -> float:
    """Worker-seconds spent waiting for a batch's slowest job: trials 0..k-1 are a batch,
    k..2k-1 the next (one sweeper, nothing failed), and each job that ended before the
    batch's last one waited from its end to that end."""
    ends: dict[int, list[float]] = {}
    for number, _, end, _ in jobs:
        ends.setdefault(int(number) // n_jobs, []).append(float(end))
    return sum(max(batch) - end for batch in ends.values() for end in batch)


def _flight_waits(slots: list[tuple[float, float]]) -> float:
    """Worker-seconds from a trial's tell to the next trial's ask, while trials remained
    to be asked (the sweeper's own gap; the drain at the end is no wait)."""
    asks = sorted(start for start, _ in slots)
    waits = 0.0
    for _, told in sorted(slots, key=lambda s: s[1]):
        later = [a for a in asks if a >= told]
        if later:
            waits += later[0] - told
            asks.remove(later[0])
    return waits


def summarise(runs: list[dict]) -> list[dict]:
    """Per (n_jobs, pruner, mode): mean ± SE over reps; per (n_jobs, pruner): batch / async
    wall time paired on the rep, with its mean ± SE."""
    cells = []
    keys = sorted({(r["n_jobs"], r["pruner"]) for r in runs})
    for n_jobs, pruner in keys:
        cell: dict = {"n_jobs": n_jobs, "pruner": pruner}
        for mode in ("batch", "async"):
            group = [r for r in runs if (r["n_jobs"], r["pruner"], r["mode"]) == (n_jobs, pruner, mode)]
            cell[mode] = {k: _mean_se([r[k] for r in group]) for k in METRICS}
        by_seed = {r["seed"]: r for r in runs if (r["n_jobs"], r["pruner"], r["mode"]) == (n_jobs, pruner, "async")}
        ratios = [
            r["wall_s"] / by_seed[r["seed"]]["wall_s"]
            for r in runs
            if (r["n_jobs"], r["pruner"], r["mode"]) == (n_jobs, pruner, "batch") and r["seed"] in by_seed
        ]
        cell["speedup"] = _mean_se(ratios)
        cells.append(cell)
    return cells


def _mean_se(values: list[float]) -> dict:
    n = len(values)
    mean = statistics.fmean(values)
    se = statistics.stdev(values) / n**0.5 if n > 1 else None
    return {"n": n, "mean": mean, "se": se}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3, help="sampler seeds per cell")
    parser.add_argument("--jobs", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--pruners", nargs="+", default=["median", "asha"])
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    runs: list[dict] = []
    partial = args.out.with_suffix(".partial.json")  # resumable: finished sweeps are kept
    if partial.exists():
        runs = json.loads(partial.read_text())
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.reps):
            for n_jobs in args.jobs:
                for pruner in args.pruners:
                    for asynchronous in (False, True):
                        key = (n_jobs, pruner, "async" if asynchronous else "batch", seed)
                        if any((r["n_jobs"], r["pruner"], r["mode"], r["seed"]) == key for r in runs):
                            continue
                        runs.append(sweep(n_jobs, pruner, asynchronous, seed, Path(tmp)))
                        r = runs[-1]
                        print(
                            f"{key}: wall {r['wall_s']:.1f} s, idle {r['idle']:.1%}, pruned {r['pruned']}", flush=True
                        )
                        args.out.parent.mkdir(parents=True, exist_ok=True)
                        partial.write_text(json.dumps(runs, indent=1))
    record = {
        "command": "python benchmarks/async_sweep.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores (this project's CPU machine)",
        "n_trials": N_TRIALS,
        "app": "benchmarks/sleep_app.py: 8 steps of 0.5 s x length, length in [0.25, 2]",
        "cells": summarise(runs),
        "runs": runs,
    }
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    partial.unlink(missing_ok=True)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
