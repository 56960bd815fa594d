"""Ctrl-C stops a sweep even when Python drops its KeyboardInterrupt: a SIGINT that lands
while a finalizer runs raises inside the finalizer, where Python prints it and goes on."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import optuna
import pytest

from hydra_plugins.kd_sweeper.refusals import Interrupts

# The dropped KeyboardInterrupts are the point here: pytest would report each as a warning.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


class _DropsCtrlC:
    """Sends SIGINT from its finalizer: the KeyboardInterrupt is raised there and dropped."""

    def __del__(self) -> None:
        signal.raise_signal(signal.SIGINT)


def _drop_a_ctrl_c() -> None:
    _DropsCtrlC()  # collected at once: its finalizer runs here


def test_python_drops_a_ctrl_c_that_lands_in_a_finalizer():
    _drop_a_ctrl_c()  # no KeyboardInterrupt reaches this test: the case the latch is for


def test_the_latch_remembers_a_dropped_ctrl_c_and_restores_the_handler():
    before = signal.getsignal(signal.SIGINT)
    with Interrupts() as latch:
        latch.check()  # nothing yet
        _drop_a_ctrl_c()
        assert latch.seen
        with pytest.raises(KeyboardInterrupt):
            latch.check()
    assert signal.getsignal(signal.SIGINT) is before
    with pytest.raises(KeyboardInterrupt), Interrupts():  # the chained handler still raises where it can
        signal.raise_signal(signal.SIGINT)


def test_a_fresh_latch_does_not_carry_an_earlier_sweeps_interrupt():
    with Interrupts() as first:
        _drop_a_ctrl_c()
    with Interrupts() as second:
        second.check()
    assert first.seen and not second.seen


def test_the_latch_leaves_an_ignored_sigint_alone():
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with Interrupts() as latch:
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            signal.raise_signal(signal.SIGINT)
            latch.check()
    finally:
        signal.signal(signal.SIGINT, previous)


APP = """
import signal
import hydra
from hydra_plugins.kd_sweeper import job

class DropsCtrlC:
    def __del__(self):
        signal.raise_signal(signal.SIGINT)

@hydra.main(config_path="conf", config_name="app")
def main(cfg):
    if job.trial_number() == 1:
        DropsCtrlC()  # Ctrl-C during this trial, dropped by Python
    return cfg.x

if __name__ == "__main__":
    main()
"""
CONF = """
defaults:
  - override hydra/sweeper: kd_optuna
  - _self_
x: 0
hydra:
  sweep:
    dir: multirun/app
  sweeper:
    study_name: app
    storage: sqlite:///${hydra.sweep.dir}/optuna.db
    n_trials: 5
    params:
      x: range(0, 10)
"""


def test_a_sweep_stops_before_its_next_trial_after_a_dropped_ctrl_c(tmp_path: Path):
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "app.yaml").write_text(textwrap.dedent(CONF))
    (tmp_path / "app.py").write_text(textwrap.dedent(APP))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "app.py", "-m"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert "Exception ignored" in proc.stderr, proc.stderr[-3000:]  # Python did drop it
    assert proc.returncode == 130, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("kd_optuna: interrupted; rerun the same command")
    study = optuna.load_study(study_name="app", storage=f"sqlite:///{tmp_path}/multirun/app/optuna.db")
    assert [t.number for t in study.trials] == [0, 1]  # trial 1 finished; none started after it
