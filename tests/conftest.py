"""Shared fixtures: Hydra compose API and ``run.py`` in a subprocess, on synthetic data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
RUN_PY = REPO / "run.py"

# Small, fast settings every end-to-end run uses unless a test says otherwise.
FAST = [
    "data=synthetic",
    "data.train_size=256",
    "data.test_size=128",
    "data.val_size=64",
    "trainer.epochs=1",
    "trainer.batch_size=64",
    "teacher.epochs=1",
    "teacher.batch_size=64",
    "trainer.progress=false",
    "trainer.device=cpu",
    "cost.min_run_time=0.01",
]


@pytest.fixture
def compose_cfg() -> Callable[..., DictConfig]:
    def _compose(*overrides: str) -> DictConfig:
        with initialize_config_dir(config_dir=str(CONF)):
            return compose(config_name="config", overrides=list(overrides))

    return _compose


@pytest.fixture
def teacher_file(tmp_path: Path) -> Path:
    """A randomly initialised teacher checkpoint (seed 1), for tests that distil from a file."""
    import torch

    from kd.models import DeepNN
    from kd.storage import save_checked
    from kd.teacher import make_checkpoint

    torch.manual_seed(1)
    path = tmp_path / "teacher.pt"
    save_checked(make_checkpoint(DeepNN(), "kd.models.DeepNN", 10), path)
    return path


@pytest.fixture(autouse=True)
def _own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test its own cache and store (the default, ~/.cache/kd, is shared by design)."""
    monkeypatch.setenv("KD_CACHE_DIR", str(tmp_path / ".kd_cache"))
    monkeypatch.delenv("KD_STORE_DIR", raising=False)


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh directory to run in, with its own cache and teacher store."""
    monkeypatch.setenv("KD_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("KD_STORE_DIR", raising=False)
    return tmp_path


def run_py(args: list[str], cwd: Path, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run(
        [sys.executable, str(RUN_PY), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env
    )


def postgres_url() -> str:
    """The test PostgreSQL server's URL; skips without one, fails in CI (which starts one)."""
    url = os.environ.get("KD_TEST_POSTGRES_URL")
    if not url:
        if os.environ.get("CI") == "true":
            pytest.fail("CI must provide KD_TEST_POSTGRES_URL (.ci/run starts PostgreSQL)")
        pytest.skip("no PostgreSQL server: set KD_TEST_POSTGRES_URL (see .ci/postgres.sh)")
    return url


def read_metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())
