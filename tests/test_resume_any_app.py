"""A foreign Hydra app's sweep resumes with the same command, or says at once that it cannot."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from hydra_plugins.kd_sweeper.study import counted_trials, open_readonly, why_not_resumable
from tests.test_any_app import APP

COMMAND = [sys.executable, str(APP), "-m", "pause_s=0.15"]  # as a user types it: default settings


def _start(tmp: Path, *overrides: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.Popen(
        [*COMMAND, *overrides], cwd=tmp, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # as from a terminal
    )  # fmt: skip


def _complete(tmp: Path) -> list[optuna.trial.FrozenTrial]:
    db = tmp / "multirun" / "sphere" / "optuna.db"
    if not db.exists():
        return []
    try:  # read-only: a reader that created tables would race the sweeper creating them
        trials = optuna.load_study(study_name="sphere", storage=open_readonly(f"sqlite:///{db}")).trials
    except Exception:  # noqa: BLE001 - the sweeper is still creating the study's tables or the study
        return []
    return [t for t in trials if t.state == TrialState.COMPLETE]


def test_an_interrupted_sweep_of_a_foreign_app_resumes_with_the_same_command(tmp_path):
    proc = _start(tmp_path)
    deadline = time.monotonic() + 120
    while len(_complete(tmp_path)) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, out[-3000:]  # stopped mid-sweep, not after it
    assert out.strip().splitlines()[-1].startswith("kd_optuna: interrupted; rerun the same command to resume")
    assert "will not resume" not in out
    first = optuna.load_study(study_name="sphere", storage=f"sqlite:///{tmp_path}/multirun/sphere/optuna.db")
    counted = counted_trials(first)  # as the sweeper counts them: pruned ones (and one left RUNNING) too
    before = {t.number: t.params for t in counted if t.state in (TrialState.COMPLETE, TrialState.PRUNED)}
    assert 2 <= len(before) < 12

    again = subprocess.run(COMMAND, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"study sphere (sqlite:///multirun/sphere/optuna.db): {len(counted)} of 12 trials there" in again.stdout
    counts = [int(n) for n in re.findall(r"\] (\d+) of 12 trials done; ETA", again.stdout)]
    assert counts[0] > len(before) and counts[-1] == 12  # counted on from where the first run stopped
    study = optuna.load_study(study_name="sphere", storage=f"sqlite:///{tmp_path}/multirun/sphere/optuna.db")
    finished = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == 12
    assert {n: study.trials[n].params for n in before} == before  # the first run's trials are kept, not redone


@pytest.mark.parametrize(
    ("overrides", "why"),
    [
        (["hydra.sweeper.storage=null"], "kept in memory"),
        (["hydra.sweep.dir=multirun/${now:%Y-%m-%d_%H-%M-%S}"], "named by the time of the run"),
        (["hydra.sweeper.study_name=null"], "has no name"),
    ],
    ids=["in-memory", "timestamped-dir", "no-name"],
)
def test_a_sweep_that_cannot_resume_says_so_first_and_promises_nothing(tmp_path, overrides, why):
    proc = _start(tmp_path, "hydra.sweeper.n_trials=40", *overrides)
    lines, deadline = [], time.monotonic() + 120
    for line in proc.stdout:  # the warning is the sweeper's first line; interrupt at the first trial
        lines.append(line)
        if "#0 :" in line or time.monotonic() > deadline:
            break
    os.killpg(proc.pid, signal.SIGINT)
    out = "".join(lines) + proc.communicate(timeout=60)[0]
    assert proc.returncode == 130, out[-3000:]
    sweeper_lines = [ln for ln in lines if "kd_sweeper" in ln or "kd_optuna" in ln]
    assert "a rerun of this command will not resume this sweep" in sweeper_lines[0] and why in sweeper_lines[0]
    last = out.strip().splitlines()[-1]
    assert last.startswith("kd_optuna: interrupted; it cannot be resumed") and why in last
    assert "rerun the same command" not in last


def test_only_a_storage_that_a_rerun_finds_again_counts_as_resumable(tmp_path):
    stamped = "multirun/${now:%Y-%m-%d}/${now:%H-%M-%S}"
    run_dir = str(tmp_path / "multirun" / "2026-12-05" / "10-00-00")
    inside = f"sqlite:///{run_dir}/optuna.db"
    assert why_not_resumable(inside, "s", run_dir, stamped) is not None
    assert why_not_resumable(f"journal://{run_dir}/j.log", "s", run_dir, stamped) is not None
    assert why_not_resumable(inside, "s", run_dir, "multirun/fixed") is None  # the same dir next time
    assert why_not_resumable(f"sqlite:///{tmp_path}/optuna.db", "s", run_dir, stamped) is None  # outside it
    assert why_not_resumable("postgresql://u:p@host/db", "s", run_dir, stamped) is None
    assert why_not_resumable(None, "s", run_dir, "multirun/fixed") is not None
    assert why_not_resumable(inside, None, run_dir, "multirun/fixed") is not None
    assert why_not_resumable(object(), None, run_dir, stamped) is None  # a storage object: its owner's choice
