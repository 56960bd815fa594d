"""Trials in flight (hydra_plugins/kd_sweeper/flight.py): with n_jobs = k, k trials run
and the next starts when any ends, on joblib; Ctrl-C and SIGKILL leave nothing RUNNING
and a rerun resumes; the failure budget lets the trials in flight finish.

The app's trials wait on files, not on the clock: trial 0 runs until trial 3 has run,
which only happens when trials start while trial 0 is still in flight."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

pytestmark = pytest.mark.slow

GATED_APP = """
import os, time
from pathlib import Path
import hydra

@hydra.main(config_path="conf", config_name="gated")
def main(cfg):
    n = int(os.environ["KD_OPTUNA_TRIAL"])
    here = Path(cfg.dir)
    if cfg.fail_from >= 0 and n >= cfg.fail_from:
        raise RuntimeError(f"trial {n} fails on purpose")
    (here / f"started_{n}").touch()
    (here / f"node_{n}").write_text(os.environ.get("SLURMD_NODENAME", "local"))
    if n == 0:  # the long trial: runs until trial 3 has started (or wait_s passes)
        deadline = time.monotonic() + cfg.wait_s
        while not (here / "started_3").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        (here / ("released" if (here / "started_3").exists() else "timed_out")).touch()
    (here / f"ended_{n}").touch()
    return float(n)

if __name__ == "__main__":
    main()
"""
GATED_CONF = """
defaults:
  - override hydra/sweeper: kd_optuna
  - override hydra/launcher: joblib
  - _self_
x: 0.0
dir: .
wait_s: 60
fail_from: -1
hydra:
  sweep:
    dir: sweep
  sweeper:
    n_trials: 6
    n_jobs: 2
    study_name: gated
    storage: sqlite:///${hydra.sweep.dir}/optuna.db
    heartbeat_interval: 1
    grace_period: 10
    sampler:
      seed: 0
    params:
      x: interval(0.0, 1.0)
"""


def _app(tmp: Path) -> None:
    (tmp / "conf").mkdir(exist_ok=True)
    (tmp / "conf" / "gated.yaml").write_text(GATED_CONF)
    (tmp / "gated.py").write_text(GATED_APP)


def _start(tmp: Path, *overrides: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.Popen(
        # two joblib workers: n_jobs=-1 (every core) is one under pytest-xdist's one-core mask, in this process
        [sys.executable, "gated.py", "-m", f"dir={tmp}", "hydra.launcher.n_jobs=2", *overrides], cwd=tmp, env=env,
        text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
        # a shell's background job would pass on an ignored SIGINT: Python would never raise KeyboardInterrupt
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip


def _trials(tmp: Path) -> list:
    return optuna.load_study(study_name="gated", storage=f"sqlite:///{tmp}/sweep/optuna.db").trials


def _wait_for_told(tmp: Path, proc: subprocess.Popen, numbers: list[int], limit: float = 120) -> None:
    """Until the study holds ``numbers`` COMPLETE (their jobs ended and the sweeper told it)."""
    deadline = time.monotonic() + limit
    while True:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"trials {numbers} never completed"
        if (tmp / "started_1").exists():  # the sweeper has made the study (reading it before could race)
            done = {t.number for t in _trials(tmp) if t.state == TrialState.COMPLETE}
            if done >= set(numbers):
                return
        time.sleep(0.1)


def test_a_short_trials_worker_starts_the_next_while_a_long_trial_runs(tmp_path):
    _app(tmp_path)
    proc = _start(tmp_path)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    files = sorted(p.name for p in tmp_path.iterdir())
    trials = _trials(tmp_path)
    seen = [(t.number, t.state.name, t.user_attrs.get("fail_reason")) for t in trials]
    assert (tmp_path / "released").exists() and not (tmp_path / "timed_out").exists(), (files, seen)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 6
    assert sorted(p.name for p in (tmp_path / "sweep").iterdir() if p.is_dir()) == [str(n) for n in range(6)]


def test_in_batches_the_long_trial_holds_back_the_next_trials(tmp_path):
    # The same app in Hydra's batches: trial 3 cannot start while trial 0 runs.
    _app(tmp_path)
    proc = _start(tmp_path, "hydra.sweeper.asynchronous=false", "wait_s=2")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert (tmp_path / "timed_out").exists() and not (tmp_path / "released").exists()


def test_ctrl_c_fails_the_trials_in_flight_and_a_rerun_finishes_the_sweep(tmp_path):
    _app(tmp_path)
    proc = _start(tmp_path, "hydra.sweeper.n_trials=3", "wait_s=600")  # trial 3 never comes: 0 waits
    _wait_for_told(tmp_path, proc, [1, 2])
    started = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-3000:]
    assert time.monotonic() - started < 30  # joblib's workers are stopped, not waited for
    assert err.strip().splitlines()[-1].startswith("kd_optuna: interrupted; rerun the same command")
    trials = _trials(tmp_path)
    assert TrialState.RUNNING not in [t.state for t in trials]
    assert trials[0].state == TrialState.FAIL and trials[0].user_attrs["fail_reason"] == "kd_optuna:interrupted"
    (tmp_path / "started_3").touch()  # let the long trial end this time
    again = _start(tmp_path, "hydra.sweeper.n_trials=3", "wait_s=600")
    _, err = again.communicate(timeout=300)
    assert again.returncode == 0, err[-3000:]
    states = [t.state for t in _trials(tmp_path)]
    assert states.count(TrialState.COMPLETE) == 3 and TrialState.RUNNING not in states


def test_a_killed_sweeper_in_flight_resumes_with_nothing_left_running(tmp_path):
    _app(tmp_path)
    proc = _start(tmp_path, "hydra.sweeper.n_trials=3", "wait_s=600")
    _wait_for_told(tmp_path, proc, [1, 2])
    os.killpg(proc.pid, signal.SIGKILL)  # the sweeper and its workers, as an OOM killer or scancel would
    proc.communicate(timeout=60)
    assert TrialState.RUNNING in [t.state for t in _trials(tmp_path)]  # what the kill left behind
    (tmp_path / "started_3").touch()
    again = _start(tmp_path, "hydra.sweeper.n_trials=3", "wait_s=600")
    _, err = again.communicate(timeout=300)
    assert again.returncode == 0, err[-3000:]
    states = [t.state for t in _trials(tmp_path)]
    # trials 1 and 2 were kept; the killed trial 0 failed (its owner is dead) and was retried
    assert states[1:3] == [TrialState.COMPLETE] * 2 and states.count(TrialState.COMPLETE) == 3
    assert TrialState.RUNNING not in states


def test_past_the_failure_budget_no_trial_starts_and_those_in_flight_finish(tmp_path):
    _app(tmp_path)
    # trials 1, 2, ... fail at once while trial 0 waits (for a trial 3 that fails, so
    # until wait_s): of 6 trials ceil(0.25 x 6) = 2 may fail, the third ends the sweep
    proc = _start(tmp_path, "fail_from=1", "wait_s=15")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err[-3000:]
    assert "trials failed, more than max_failure_rate=0.25 allows" in err.strip().splitlines()[-1]
    trials = _trials(tmp_path)
    assert trials[0].state == TrialState.COMPLETE  # in flight when the budget ran out: it finished
    assert [t.state for t in trials[1:]] == [TrialState.FAIL] * 3 and len(trials) == 4
    assert TrialState.RUNNING not in [t.state for t in trials]


@pytest.mark.parametrize(
    "space",
    [
        ["hydra/sweeper/sampler=grid", "x=choice(0,1,2)", "y=choice(0,1)", "hydra.sweeper.n_trials=6",
         "~hydra/sweeper/pruner"],
        ["hydra.sweeper.direction=[minimize,minimize]", "objectives=2", "~hydra/sweeper/pruner",
         "hydra.sweeper.n_trials=6"],
    ],
    ids=["grid", "two-objectives"],
)  # fmt: skip
def test_grids_and_several_objectives_run_in_flight_as_in_batches(tmp_path, space):
    from tests.test_any_app import study, sweep

    proc = sweep(tmp_path, *space, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "hydra.sweeper.n_jobs=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "up to 2 trials in flight" in proc.stdout + proc.stderr
    assert "#0 : x=" in proc.stdout and "env_set" not in proc.stdout  # how a job finds its trial: not shown
    trials = study(tmp_path).trials
    why = [(t.number, t.state.name, t.user_attrs) for t in trials if t.state != TrialState.COMPLETE]
    logs = [log.read_text()[-1500:] for n, *_ in why for log in (tmp_path / "s" / str(n)).glob("*.log")]
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 6, f"{why}\n{logs}\n{proc.stdout[-3000:]}"
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 6  # the grid: every point once
    results = (tmp_path / "s" / "optimization_results.yaml").read_text()
    assert ("solutions:" in results) == ("objectives=2" in space)
