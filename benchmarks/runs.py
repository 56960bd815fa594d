"""``run.py`` runs for the study scripts: each in its own directory, skipped once finished."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def finished(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a run whose metrics.json says completed."""
    metrics = run_dir / "metrics.json"
    return metrics.exists() and json.loads(metrics.read_text()).get("status") == "completed"


def run_logged(run_dir: Path, overrides: list[str]) -> int:
    """``python run.py OVERRIDES hydra.run.dir=RUN_DIR``, its output appended to
    ``RUN_DIR.log``; returns the exit code."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir.with_suffix(".log"), "a") as log:
        cmd = [sys.executable, str(ROOT / "run.py"), *overrides, f"hydra.run.dir={run_dir}"]
        return subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT).returncode
