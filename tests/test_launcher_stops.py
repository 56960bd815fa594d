"""Every launcher ends an expected stop of a grid the way the basic launcher does: one
``kd: error:`` line and its exit code (3 diverged, 2 bad input), never a traceback; and
checks that need no teacher run before any teacher, view or logit work."""

from __future__ import annotations

import pytest

from tests.conftest import FAST, run_py

pytestmark = pytest.mark.slow

LAUNCHERS = ["basic", "population", "joblib"]


def _stop_lines(stderr: str) -> list[str]:
    """stderr less its log records (they start with a timestamp)."""
    return [line for line in stderr.splitlines() if line.strip() and not line.startswith("[")]


def _grid(workdir, launcher: str, *args: str):
    return run_py(["-m", *FAST, f"hydra/launcher={launcher}", "hydra.sweep.dir=grid", *args], cwd=workdir)


def _assert_one_stop(proc, code: int, *words: str) -> None:
    lines = _stop_lines(proc.stderr)
    assert proc.returncode == code, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Error executing job" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in lines if line.startswith("kd: error: ")]
    assert len(errors) == 1 and all(w in errors[0] for w in words), lines
    assert all(line.startswith("kd: ") for line in lines), lines  # per-job notes at most, each one line


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_a_diverging_job_ends_the_grid_with_exit_3_in_one_line(workdir, launcher):
    proc = _grid(workdir, launcher, "optim.lr=1e9,1e-3", "trainer.check_every=1")
    _assert_one_stop(proc, 3, "job", "diverged")
    assert (workdir / "grid" / "1" / "metrics.json").exists()  # the other job finished


@pytest.mark.parametrize("launcher", ["basic", "population"])
def test_a_grid_whose_jobs_all_diverge_ends_with_exit_3(workdir, launcher):
    proc = _grid(workdir, launcher, "optim.lr=1e9,1e10", "trainer.check_every=1")
    _assert_one_stop(proc, 3, "job(s) 0, 1 diverged")


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_a_bad_value_in_one_job_ends_the_grid_with_exit_2_in_one_line(workdir, launcher):
    proc = _grid(workdir, launcher, "loss=kd", "loss.alpha=0.5,7")
    _assert_one_stop(proc, 2, "loss.alpha must be in [0, 1], got 7")


def test_the_population_refuses_a_schedule_without_steps_before_any_teacher_work(workdir):
    # 192 training images in batches of 64: 3 steps, and a warm-up of 1/3 of them ends at step 0.
    proc = _grid(
        workdir, "population", "loss=kd", "seed=1,2", "schedule=onecycle", "schedule.pct_start=0.3333333333333333"
    )
    _assert_one_stop(proc, 2, "schedule=onecycle over 3 optimiser steps")
    store = workdir / "cache" / "store"
    assert not any((store / kind).exists() for kind in ("models", "logits", "views")), sorted(store.rglob("*"))
