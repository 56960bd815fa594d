"""The sweeper's pure parts, checked directly: outcomes, counting, failure allowance,
the study's identity and its differences."""

from __future__ import annotations

import contextlib
import math
import os
import pickle
import sqlite3
import subprocess
import sys
import time

import optuna
import pytest
from hydra.core.utils import JobReturn, JobStatus
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.storages import RDBStorage
from optuna.trial import TrialState, create_trial

from hydra_plugins.kd_sweeper.config import failure_allowance
from hydra_plugins.kd_sweeper.kd_sweeper import KDOptunaSweeperImpl
from hydra_plugins.kd_sweeper.liveness import HEARTBEAT
from hydra_plugins.kd_sweeper.space import FIXED, SPACE, describe_differences, space_identity, trial_seed
from hydra_plugins.kd_sweeper.study import (
    FAIL_REASON,
    HeartbeatJournalStorage,
    counts,
    fail_stale_trials,
    heal_journal,
    open_storage,
    shown,
)
from kd.errors import Pruned

outcome = KDOptunaSweeperImpl.outcome


def returned(value) -> JobReturn:
    ret = JobReturn()
    ret.status, ret.return_value = JobStatus.COMPLETED, value
    return ret


def raised(error: BaseException) -> JobReturn:
    ret = JobReturn()
    ret.status, ret.return_value = JobStatus.FAILED, error
    return ret


@pytest.mark.parametrize(
    ("ret", "n", "expected"),
    [
        (returned(0.5), 1, (TrialState.COMPLETE, [0.5], "")),
        (returned("2"), 1, (TrialState.COMPLETE, [2.0], "")),
        (returned([1, 2.5]), 2, (TrialState.COMPLETE, [1.0, 2.5], "")),
        (returned(math.nan), 1, (TrialState.FAIL, None, "kd_optuna:diverged: objective nan")),
        (returned(-math.inf), 1, (TrialState.FAIL, None, "kd_optuna:diverged: objective -inf")),
        (returned([1.0, math.inf]), 2, (TrialState.FAIL, None, "kd_optuna:diverged: objective [1.0, inf]")),
        (returned(None), 1, (TrialState.FAIL, None, "kd_optuna:error: the job returned None, not 1 number(s)")),
        (returned([1.0]), 2, (TrialState.FAIL, None, "kd_optuna:error: the job returned 1 values for 2 objectives")),
        (
            returned([1.0, 2.0, 3.0]),
            2,
            (TrialState.FAIL, None, "kd_optuna:error: the job returned 3 values for 2 objectives"),
        ),
        (raised(RuntimeError("boom\nmore")), 1, (TrialState.FAIL, None, "kd_optuna:error: RuntimeError: boom")),
        (raised(ValueError()), 1, (TrialState.FAIL, None, "kd_optuna:error: ValueError")),
        (raised(optuna.TrialPruned()), 1, (TrialState.PRUNED, None, "")),
        (raised(pickle.loads(pickle.dumps(Pruned(3, 50.0)))), 1, (TrialState.PRUNED, None, "")),
    ],
)
def test_a_job_return_becomes_one_outcome(ret, n, expected):
    assert outcome(ret, n) == expected


@pytest.mark.parametrize(
    ("rate", "n_trials", "allowed"),
    [
        (0.0, 10, 0),
        (0.25, 3, 1),
        (0.25, 4, 1),
        (0.25, 5, 2),
        (0.5, 20, 10),
        (1.0, 20, 20),
        (0.1, 30, 3),
        (0.07, 100, 7),
    ],
)
def test_the_failure_allowance_rounds_up_the_rate(rate, n_trials, allowed):
    assert failure_allowance(rate, n_trials) == allowed


def _trial(state: TrialState, reason: str | None = None) -> optuna.trial.FrozenTrial:
    attrs = {FAIL_REASON: reason} if reason is not None else {}
    value = 1.0 if state == TrialState.COMPLETE else None
    return create_trial(state=state, value=value, user_attrs=attrs, params={}, distributions={})


@pytest.mark.parametrize(
    ("trial", "counted"),
    [
        (_trial(TrialState.COMPLETE), True),
        (_trial(TrialState.PRUNED), True),
        (_trial(TrialState.WAITING), True),
        (_trial(TrialState.FAIL, "kd_optuna:diverged: objective nan"), True),
        (_trial(TrialState.FAIL, "kd_optuna:error: RuntimeError: x"), True),
        (_trial(TrialState.FAIL, "kd_optuna:surplus"), False),
        (_trial(TrialState.FAIL, "kd:diverged: objective nan"), True),  # labels of older studies
        (_trial(TrialState.FAIL, "kd:error: RuntimeError: x"), True),
        (_trial(TrialState.FAIL, "kd:surplus"), False),
        (_trial(TrialState.FAIL), False),  # stale (heartbeat) or voided by an older kd
        (_trial(TrialState.FAIL, "other"), False),
    ],
)
def test_which_trials_count_towards_n_trials(trial, counted):
    assert counts(trial) is counted


def test_the_identity_holds_distributions_and_fixed_values():
    identity = space_identity({"b": FloatDistribution(0, 1), "a": IntDistribution(1, 3)}, {"c": 0.5, "d": "x"}, ["~z"])
    assert list(identity[SPACE]) == ["a", "b"]
    assert optuna.distributions.json_to_distribution(identity[SPACE]["b"]) == FloatDistribution(0, 1)
    assert identity[FIXED] == {"c": "0.5", "d": "x", "~z": "<deleted>"}


def test_differences_name_each_changed_key_with_both_values():
    old = space_identity({"x": FloatDistribution(0, 1), "y": CategoricalDistribution([1, 2])}, {}, [])
    new = space_identity({"x": FloatDistribution(0, 2)}, {"y": 1}, [])
    swept = describe_differences(old[SPACE], new[SPACE], "swept")
    fixed = describe_differences(old[FIXED], new[FIXED], "fixed")
    assert (
        swept[0].startswith("swept x: FloatDistribution{") and "'high': 1.0" in swept[0] and "'high': 2.0" in swept[0]
    )
    assert swept[1].startswith("swept y: CategoricalDistribution") and swept[1].endswith("-> <unset>")
    assert fixed == ["fixed y: <unset> -> 1"]
    assert describe_differences(old[SPACE], old[SPACE], "swept") == []
    assert describe_differences({"k": "a" * 80}, {}, "setting") == [f"setting k: {'a' * 57}... -> <unset>"]


def test_trial_seeds_depend_on_seed_and_number_only():
    # the same in another process with another hash seed (a str hash would differ there)
    code = "from hydra_plugins.kd_sweeper.space import trial_seed; print(trial_seed(42, 3))"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    other = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert int(other.stdout) == trial_seed(42, 3)
    assert len({trial_seed(42, n) for n in range(100)}) == 100
    assert trial_seed(42, 3) != trial_seed(43, 3)
    assert 0 <= trial_seed(0, 0) < 2**32


def test_trial_seeds_are_pinned():
    # Resumed studies sample on from these: a changed recipe would change their draws.
    assert (trial_seed(42, 3), trial_seed(0, 0)) == (3165930393, 2318824108)


def test_long_values_are_cut_at_sixty_characters():
    assert describe_differences({"k": "a" * 60}, {}, "s") == [f"s k: {'a' * 60} -> <unset>"]
    assert describe_differences({"k": "a" * 61}, {}, "s") == [f"s k: {'a' * 57}... -> <unset>"]


def test_storages_take_heartbeats_only_when_asked(tmp_path):
    assert open_storage(None, heartbeat_interval=5) is None
    url = f"sqlite:///{tmp_path}/a.db"
    plain = open_storage(url)
    assert isinstance(plain, RDBStorage) and plain.heartbeat_interval is None
    assert plain.get_heartbeat_stale_trial_callback() is None
    rdb = open_storage(url, heartbeat_interval=5, grace_period=7)
    assert isinstance(rdb, RDBStorage) and rdb.heartbeat_interval == 5 and rdb.grace_period == 7
    assert rdb.get_heartbeat_stale_trial_callback() is not None
    journal = open_storage(f"journal://{tmp_path}/j.log", heartbeat_interval=3)
    assert isinstance(journal, HeartbeatJournalStorage) and journal.get_heartbeat_interval() == 3
    assert journal._grace == 6  # twice the interval by default
    assert open_storage(f"journal://{tmp_path}/g.log", heartbeat_interval=3, grace_period=7)._grace == 7
    quiet = open_storage(f"journal://{tmp_path}/k.log")
    assert quiet.get_heartbeat_interval() is None and quiet.get_heartbeat_stale_trial_callback() is None


def _age_beat(study: optuna.Study, trial: optuna.Trial, url: str, seconds: float) -> None:
    """Move a trial's last heartbeat ``seconds`` into the past, as if its worker had
    stopped then: no test waits out a grace period on the clock."""
    if url.startswith("journal://"):
        study._storage.set_trial_system_attr(trial._trial_id, HEARTBEAT, time.time() - seconds)
        return
    path = url.removeprefix("sqlite:///")
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.execute(
            "UPDATE trial_heartbeats SET heartbeat = datetime(heartbeat, ?) WHERE trial_id = ?",
            (f"-{seconds} seconds", trial._trial_id),
        )


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used")  # asked by hand here
@pytest.mark.parametrize("kind", ["journal", "sqlite"])
def test_a_trial_whose_worker_stopped_beating_fails_and_is_queued_again(tmp_path, kind, monkeypatch):
    # The grace is a multiple of the interval with room for a loaded machine: a beat made
    # just before the check is never stale; a beat aged past it always is.
    interval = 1
    grace = 10 * interval
    url = f"journal://{tmp_path}/s.log" if kind == "journal" else f"sqlite:///{tmp_path}/s.db"
    study = optuna.create_study(
        study_name="hb", storage=open_storage(url, heartbeat_interval=interval, grace_period=grace)
    )
    dead, alive, unbeaten = study.ask(), study.ask(), study.ask()
    for trial in (dead, alive, unbeaten):
        trial.suggest_float("x", 0, 1)
    for trial in (dead, alive):
        study._storage.record_heartbeat(trial._trial_id)
    _age_beat(study, dead, url, 3 * grace)  # its worker stopped long ago
    fail_stale_trials(study)
    trials = study.get_trials()
    # A trial with no beat yet (asked a moment ago) is not stale.
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.RUNNING, TrialState.RUNNING, TrialState.WAITING]
    assert not counts(trials[0]) and counts(trials[3])  # the retry counts, the stale one does not
    assert trials[3].system_attrs["failed_trial"] == dead.number
    assert trials[3].params == trials[0].params  # run again with the same parameters
    again = study.ask()
    assert again.number == trials[3].number  # and asked before any new trial
    study._storage.record_heartbeat(again._trial_id)
    _age_beat(study, again, url, 3 * grace)
    fail_stale_trials(study)
    states = [t.state for t in study.get_trials()]
    assert states[3] == TrialState.FAIL and len(states) == 4  # retried once only


def test_a_journal_torn_by_a_kill_is_cut_back_and_the_study_resumes(tmp_path, caplog):
    url = f"journal://{tmp_path}/study.log"
    study = optuna.create_study(study_name="torn", storage=open_storage(url))
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    log_file = tmp_path / "study.log"
    whole = log_file.read_bytes()
    log_file.write_bytes(whole + b'{"op_code": 5, "worker_id": "w", "trial_id": 2, "sta')  # a kill mid-record
    assert heal_journal(str(log_file)) == len(b'{"op_code": 5, "worker_id": "w", "trial_id": 2, "sta')
    assert log_file.read_bytes() == whole
    # The torn record glued to a newer one (what the next append would have made) is cut too.
    log_file.write_bytes(whole + b'{"op_code": 5, "wor{"op_code": 1}\n')
    with caplog.at_level("WARNING"):
        again = optuna.load_study(study_name="torn", storage=open_storage(url))
    assert "torn last record" in caplog.text and log_file.read_bytes() == whole
    again.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
    assert len(optuna.load_study(study_name="torn", storage=open_storage(url)).trials) == 3
    assert heal_journal(str(tmp_path / "absent.log")) == 0


def test_a_storage_is_written_down_without_its_password():
    assert shown("postgresql://kd:secret@dbhost:5432/kd") == "postgresql://kd:***@dbhost:5432/kd"
    assert shown("postgresql+psycopg://kd@dbhost/kd") == "postgresql+psycopg://kd@dbhost/kd"  # no password
    assert shown("sqlite:///multirun/s/optuna.db") == "sqlite:///multirun/s/optuna.db"
    assert shown("journal:///shared/kd/study.log") == "journal:///shared/kd/study.log"
    assert shown("not a url") == "not a url"
    assert shown(None) is None


def test_a_sweeps_time_left_reads_as_a_person_plans_by_it():
    from hydra_plugins.kd_sweeper.trials import duration

    cases = {None: "?", float("inf"): "?", float("nan"): "?", -1.0: "?", 0.4: "0s", 59.4: "59s", 60.0: "1m00s"}
    cases.update({185.0: "3m05s", 3599.0: "59m59s", 3600.0: "1h00m", 3720.0: "1h02m"})
    assert {s: duration(s) for s in cases} == cases
