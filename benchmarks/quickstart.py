"""Time the README's real-data Quick start run, first and again, and keep its artefact.

    python benchmarks/quickstart.py --root ../shared/data/cifar10-jpeg \\
        --out docs/results/quickstart/quickstart.json

Runs ``ARGS`` below (the README's command, ``data.root`` given here) as a user would,
with an empty cache (so the teacher is trained and its logits computed), then the same
command again (everything but the students found in the store). Records each run's wall
time, the phases its log listed, and its metrics: the student's accuracy over the seeds
and the paired KD - CE difference.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kd.cost import device_name  # noqa: E402

# The README's Quick start command, after `python run.py data=folder data.root=PATH`.
ARGS = [
    "loss=kd",
    "data.train_size=10000",
    "data.val_size=2000",
    "data.test_size=2000",
    "teacher.epochs=3",
    "trainer.epochs=5",
    "trial.seeds=[1,2,3]",
]


def run_once(root: str, cache: Path, out: Path) -> dict:
    command = [sys.executable, str(REPO / "run.py"), "data=folder", f"data.root={root}", *ARGS]
    started = time.perf_counter()
    proc = subprocess.run(
        [*command, f"paths.cache_dir={cache}", f"hydra.run.dir={out}"], capture_output=True, text=True, check=False
    )
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"the quick start run failed ({proc.returncode}): {proc.stderr[-2000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    phases = next(line.split("phases: ", 1)[1] for line in proc.stdout.splitlines() if "phases: " in line)
    return {
        "wall_seconds": round(wall, 1),
        "phases": phases,
        "teacher_val_acc": metrics.get("teacher_val_acc"),
        "teacher_source": metrics.get("teacher_source"),
        **{key: metrics.get(key) for key in ("val_acc", "val_acc_se", "test_acc", "test_acc_se", "baseline")},
        "kd_minus_ce": metrics.get("kd_minus_ce"),
        "seeds": metrics.get("seeds"),
        "train_examples": metrics.get("train_examples"),
        "val_examples": metrics.get("val_examples"),
        "test_examples": metrics.get("test_examples"),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", required=True, help="an ImageFolder copy of CIFAR-10")
    parser.add_argument("--out", type=Path, default=None, help="also write the figures to this JSON file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        first = run_once(args.root, Path(tmp) / "cache", Path(tmp) / "first")
        again = run_once(args.root, Path(tmp) / "cache", Path(tmp) / "again")
    result = {
        "command": " ".join(["python run.py data=folder data.root=PATH", *ARGS]),
        "data": f"CIFAR-10 JPEG q75 copy ({args.root}), a class-balanced subset",
        "machine": f"{device_name(torch.device('cpu'))}, {os.cpu_count()} cores, {platform.machine()}",
        "first_run": first,
        "rerun": again,
    }
    print(json.dumps(result, indent=2))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
