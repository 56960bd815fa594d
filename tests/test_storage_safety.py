"""Storages and store entries: only what is provably a study's (or the store's) is mended,
anything else is refused untouched, and whatever is removed is kept beside it.

Generated faults: files that belong to someone else at a storage path, journals torn at
their tail or damaged in their middle, SQLite files that are text or cut short, and store
entries damaged in their bytes, their shape or their schema."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from optuna.trial import TrialState

import kd.storage
from hydra_plugins.kd_sweeper.journal import (
    DamagedStorage,
    check_sqlite,
    heal_journal,
    is_record,
    keep_aside,
    whole_records,
)
from hydra_plugins.kd_sweeper.liveness import (
    OWNER,
    SilentTrials,
    has_heartbeat,
    owner_alive,
    process_start,
    start_ticks,
    this_process,
)
from hydra_plugins.kd_sweeper.study import RetryStale, open_storage
from kd.storage import build_once, dict_fits, load_fitting, move_aside, save_checked, tensor_fits
from kd.teacher import TeacherStore, checkpoint_fits

FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
optuna.logging.set_verbosity(optuna.logging.WARNING)

# Files a user may have at a mistyped storage path: bytes, text, JSON that is not a journal.
FOREIGN = st.one_of(
    st.binary(min_size=1, max_size=300),
    st.text(min_size=1, max_size=200).map(str.encode),
    st.lists(st.dictionaries(st.text(max_size=5), st.integers(), max_size=3), min_size=1, max_size=4).map(
        lambda rows: b"".join(json.dumps(r).encode() + b"\n" for r in rows)
    ),
)
NO_NEWLINE = st.binary(min_size=1, max_size=120).filter(lambda b: b"\n" not in b)


def _journal(folder: Path, trials: int = 2) -> Path:
    path = folder / "study.log"
    study = optuna.create_study(study_name="s", storage=open_storage(f"journal://{path}"))
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=trials)
    return path


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def test_a_journal_record_is_a_json_object_with_a_known_operation_and_a_worker():
    assert is_record(b'{"op_code": 4, "worker_id": "w"}\n')
    assert is_record(b'{"op_code": 10, "worker_id": ""}')
    assert not is_record(b'{"op_code": 11, "worker_id": "w"}')  # no such operation
    assert not is_record(b'{"op_code": -1, "worker_id": "w"}')
    assert not is_record(b'{"op_code": true, "worker_id": "w"}')  # a bool is no op code
    assert not is_record(b'{"op_code": "4", "worker_id": "w"}')
    assert not is_record(b'{"op_code": 4}')
    assert not is_record(b'{"op_code": 4, "worker_id": 7}')
    assert not is_record(b'[{"op_code": 4, "worker_id": "w"}]')
    assert not is_record(b"\xff\xfe")
    assert not is_record(b'{"op_code": 4, "worker_id": "w"')


def test_whole_records_splits_a_journal_at_its_first_damage():
    create, trial = b'{"op_code":0,"worker_id":"w"}\n', b'{"op_code":4,"worker_id":"w"}\n'
    assert whole_records(b"") == (0, None)
    assert whole_records(create + trial) == (len(create + trial), None)
    assert whole_records(create + trial + b"torn") == (len(create + trial), None)
    assert whole_records(create + b"junk\n" + b"more junk") == (len(create), None)  # a tail: may be cut
    assert whole_records(create + b"junk\n" + trial) == (len(create), 2)  # records after it: damage in the middle
    assert whole_records(create + trial + b"junk\n" + trial + b"x") == (len(create + trial), 3)
    assert whole_records(trial + create) == (0, 1)  # a journal starts by creating a study
    assert whole_records(create[:-1]) == (0, None)  # not even its first record is whole


@FAST
@given(foreign=FOREIGN)
def test_a_file_that_is_no_journal_is_refused_and_left_untouched(tmp_path_factory, foreign):
    assume(whole_records(foreign)[0] == 0)  # (random bytes never start with a whole study record)
    folder = tmp_path_factory.mktemp("foreign")
    (folder / "data.txt").write_bytes(foreign)
    before = _snapshot(folder)
    with pytest.raises(DamagedStorage, match="is not an Optuna journal.*left untouched") as refused:
        open_storage(f"journal://{folder / 'data.txt'}", heartbeat_interval=1)
    assert "\n" not in str(refused.value)
    assert _snapshot(folder) == before  # nothing cut, nothing added beside it


@FAST
@given(tail=st.one_of(NO_NEWLINE, st.lists(NO_NEWLINE, min_size=1, max_size=3).map(lambda ls: b"\n".join(ls) + b"\n")))
def test_a_torn_tail_is_cut_back_to_the_last_whole_record_and_kept_beside_it(tmp_path_factory, tail):
    assume(not is_record(tail.split(b"\n")[0] + b"\n"))
    folder = tmp_path_factory.mktemp("torn")
    path = _journal(folder)
    whole = path.read_bytes()
    path.write_bytes(whole + tail)
    assert heal_journal(path) == len(tail)
    assert path.read_bytes() == whole
    (aside,) = folder.glob("study.log.torn-*")
    assert aside.read_bytes() == tail  # every cut byte is kept
    study = optuna.load_study(study_name="s", storage=open_storage(f"journal://{path}"))
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 3


@FAST
@given(damage=NO_NEWLINE, where=st.integers(min_value=1))
def test_a_journal_damaged_in_its_middle_is_refused_untouched_naming_the_line(tmp_path_factory, damage, where):
    assume(not is_record(damage + b"\n"))
    folder = tmp_path_factory.mktemp("middle")
    path = _journal(folder)
    lines = path.read_bytes().splitlines(keepends=True)
    line = 1 + where % (len(lines) - 2)  # any line but the first and the last: whole records follow
    lines[line] = damage + b"\n"
    path.write_bytes(b"".join(lines))
    before = _snapshot(folder)
    with pytest.raises(DamagedStorage, match=f"damaged at line {line + 1} .*nothing was changed"):
        open_storage(f"journal://{path}")
    assert _snapshot(folder) == before


def test_an_empty_or_missing_journal_is_a_new_study_and_a_directory_is_refused(tmp_path):
    (tmp_path / "empty.log").touch()
    assert heal_journal(tmp_path / "empty.log") == 0 and heal_journal(tmp_path / "absent.log") == 0
    optuna.create_study(study_name="new", storage=open_storage(f"journal://{tmp_path / 'empty.log'}"))
    with pytest.raises(DamagedStorage, match="is a directory"):
        open_storage(f"journal://{tmp_path}")


def test_kept_aside_bytes_never_overwrite_earlier_ones(tmp_path):
    first, second = keep_aside(tmp_path / "j.log", b"one"), keep_aside(tmp_path / "j.log", b"two")
    assert first != second and first.read_bytes() == b"one" and second.read_bytes() == b"two"


@FAST
@given(foreign=FOREIGN.filter(lambda b: not b.startswith(b"SQLite format 3\x00")))
def test_a_file_that_is_no_sqlite_database_is_refused_untouched(tmp_path_factory, foreign):
    folder = tmp_path_factory.mktemp("sqlite")
    (folder / "notes.db").write_bytes(foreign)
    before = _snapshot(folder)
    with pytest.raises(DamagedStorage, match="is not a SQLite database.*left untouched"):
        open_storage(f"sqlite:///{folder / 'notes.db'}")
    assert _snapshot(folder) == before


def test_a_sqlite_path_that_is_missing_empty_or_a_database_opens(tmp_path):
    check_sqlite(tmp_path / "absent.db")
    (tmp_path / "empty.db").touch()
    check_sqlite(tmp_path / "empty.db")
    optuna.create_study(study_name="s", storage=f"sqlite:///{tmp_path / 'real.db'}")
    assert optuna.load_study(study_name="s", storage=open_storage(f"sqlite:///{tmp_path / 'real.db'}")).trials == []
    with pytest.raises(DamagedStorage, match="is a directory"):
        check_sqlite(tmp_path)


# ----------------------------------------------------------------- store entries
ENTRY_KINDS = {
    "logits": (lambda: torch.randn(6, 3), tensor_fits((6, 3), (torch.float32,))),
    "view column": (lambda: torch.randn(6, 3).half(), tensor_fits((6, 3), (torch.float16,))),
    "view orders": (lambda: torch.arange(12, dtype=torch.int16).view(6, 2), tensor_fits((6, None), (torch.int16,))),
    "features": (
        lambda: {"conv": torch.zeros(6, 2, 4, 4).half()},
        dict_fits(conv=tensor_fits((6, ...), (torch.float16,))),
    ),
    "checkpoint": (
        lambda: {"model_target": "kd.models.LightNN", "num_classes": 10, "state_dict": {"w": torch.ones(2)}},
        checkpoint_fits,
    ),
}
# Entries with a valid checksum that load but are not what their reader needs.
WRONG = st.one_of(
    st.builds(torch.zeros, st.lists(st.integers(0, 7), max_size=4).map(tuple)),
    st.builds(lambda n: torch.zeros(6, n, dtype=torch.int64), st.integers(1, 4)),
    st.builds(lambda n: torch.zeros(6, n, dtype=torch.float64), st.integers(1, 4)),
    st.dictionaries(st.sampled_from(["conv", "fc", "state_dict", "model_target"]), st.integers(), max_size=3),
    st.lists(st.integers(), max_size=3),
    st.integers(),
    st.text(max_size=5),
)


@FAST
@given(kind=st.sampled_from(sorted(ENTRY_KINDS)), wrong=WRONG)
def test_a_store_entry_of_the_wrong_shape_or_schema_is_moved_aside_and_rebuilt(tmp_path_factory, kind, wrong):
    build, fits = ENTRY_KINDS[kind]
    assume(fits(wrong) is not None)
    folder = tmp_path_factory.mktemp("entry")
    path = folder / "entry.pt"
    save_checked(wrong, path)  # a checksum that matches: only its form is wrong
    wrong_bytes = path.read_bytes()
    stored, built = build_once(path, build, fits)
    assert built and fits(stored) is None
    (aside,) = folder.glob("entry.pt.bad-*")  # kept for inspection, not deleted
    assert aside.read_bytes() == wrong_bytes
    again, built_again = build_once(path, lambda: pytest.fail("rebuilt twice"), fits)  # no longer wedged
    assert not built_again and fits(again) is None


@FAST
@given(kind=st.sampled_from(sorted(ENTRY_KINDS)), damage=st.binary(max_size=100))
def test_a_store_entry_with_damaged_bytes_is_rebuilt(tmp_path_factory, kind, damage):
    build, fits = ENTRY_KINDS[kind]
    folder = tmp_path_factory.mktemp("bytes")
    path = folder / "entry.pt"
    build_once(path, build, fits)
    path.write_bytes(damage)
    stored, built = build_once(path, build, fits)
    assert built and fits(stored) is None
    (aside,) = folder.glob("entry.pt.bad-*")  # the damaged bytes are kept, not overwritten
    assert aside.read_bytes() == damage


def test_the_fits_checks_say_what_is_wrong():
    logits = tensor_fits((6, 3), (torch.float32,))
    assert logits(torch.zeros(6, 3)) is None
    assert logits(torch.zeros(6, 4)) == "its shape is 6x4, not 6x3"
    assert logits(torch.zeros(6, 3, 1)) == "its shape is 6x3x1, not 6x3"
    assert logits(torch.zeros(6)) == "its shape is 6, not 6x3"
    assert logits(torch.zeros(6, 3).half()) == "its dtype is torch.float16, not torch.float32"
    assert logits([1]) == "it holds a list, not a tensor"
    rows = tensor_fits((6, ...))
    assert rows(torch.zeros(6)) is None and rows(torch.zeros(6, 2, 2)) is None
    assert rows(torch.zeros(5, 2)) == "its shape is 5x2, not 6x..." and rows(torch.zeros(())) is not None
    assert tensor_fits((None, 2))(torch.zeros(9, 2)) is None
    pair = dict_fits(a=logits)
    assert pair({"a": torch.zeros(6, 3)}) is None
    assert pair({"a": torch.zeros(6, 3), "b": 1}) == "its keys are ['a', 'b'], not ['a']"
    assert pair({"a": torch.zeros(1)}) == "a: its shape is 1, not 6x3"
    assert pair(torch.zeros(1)) == "it holds a Tensor, not a dict"
    good = {"model_target": "m", "num_classes": 10, "state_dict": {"w": torch.ones(1)}}
    assert checkpoint_fits(good) is None
    assert checkpoint_fits({**good, "state_dict": {"w": 1}}) == "its state_dict is not a dict of tensors"
    assert checkpoint_fits({**good, "num_classes": "10"}) == "it names no model_target and num_classes"
    assert checkpoint_fits({**good, "model_target": None}) == "it names no model_target and num_classes"
    assert checkpoint_fits([good]) == "it holds a list, not a checkpoint"


def test_cached_view_logits_of_another_shape_are_rebuilt_not_wedged(tmp_path):
    """The hostile case: a view column with a valid checksum but the wrong shape."""
    store = TeacherStore(tmp_path)
    orders = lambda: torch.arange(8, dtype=torch.int16).view(4, 2)  # noqa: E731
    column = lambda views: views.float()[:, None].expand(-1, 3).half()  # noqa: E731
    logits, _ = store.view_logits("t", "d", 0, 2, orders, column, (4, 3))
    (entry,) = tmp_path.glob("views/*/view001.pt")
    save_checked(torch.zeros(4, 5).half(), entry)
    again, _ = store.view_logits("t", "d", 0, 2, orders, column, (4, 3))
    assert torch.equal(again, logits) and len(list(entry.parent.glob("view001.pt.bad-*"))) == 1


def test_a_fitting_entry_is_never_moved(tmp_path):
    save_checked(torch.ones(2), tmp_path / "e.pt")
    assert torch.equal(load_fitting(tmp_path / "e.pt", tensor_fits((2,))), torch.ones(2))
    assert load_fitting(tmp_path / "absent.pt", tensor_fits((2,))) is None
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".verified")) == ["e.pt", "e.pt.sha256"]


# ----------------------------------------------------------------- trials nobody runs
def test_an_owner_is_alive_while_its_process_runs_and_judged_only_on_its_machine():
    me = this_process(beats=True)
    assert owner_alive(me) is True and me["heartbeat"] is True
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    assert owner_alive({**me, "pid": gone.pid, "started": None}) is False
    assert owner_alive({**me, "host": me["host"] + "-elsewhere"}) is None  # cannot be checked from here
    if me["boot"] is not None:
        assert owner_alive({**me, "boot": "another-boot"}) is False  # rebooted since: gone
    if me["started"] is not None:
        assert process_start(os.getpid()) == me["started"]
        assert owner_alive({**me, "started": me["started"] + 1}) is False  # the pid was reused
    assert owner_alive(None) is None and owner_alive({"host": me["host"]}) is None
    assert owner_alive({**me, "pid": "7"}) is None


def _study_with_a_silent_trial(tmp_path: Path, owner: dict | None) -> optuna.Study:
    tmp_path.mkdir(exist_ok=True)
    study = optuna.create_study(study_name="s", storage=open_storage(f"journal://{tmp_path / 'j.log'}"))
    trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    if owner is not None:
        study._storage.set_trial_system_attr(trial._trial_id, OWNER, owner)
    return study


def test_the_start_time_is_field_22_even_when_the_process_name_holds_parentheses():
    fields = " ".join(str(n) for n in range(3, 30))  # field k holds k
    assert start_ticks(f"42 (a) b) c) {fields}") == 22
    assert start_ticks(f"42 (plain) {fields}") == 22
    assert start_ticks("42 (short) S 1 2") is None
    if Path("/proc/self/stat").exists():
        own = Path(f"/proc/{os.getpid()}/stat").read_text()
        assert process_start(os.getpid()) == int(own[own.rfind(")") + 2 :].split()[19])
        assert this_process(beats=False)["boot"] == Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    assert process_start(2**22 + 12345) is None  # no such process


def test_a_trial_whose_owner_cannot_be_checked_is_retried_after_the_grace_period_only(tmp_path, caplog):
    study = _study_with_a_silent_trial(tmp_path, None)  # an older sweep: no owner, no heartbeat
    study.tell(study.ask({"x": optuna.distributions.FloatDistribution(0, 1)}), 0.5)  # a finished one: not judged
    silent = SilentTrials(grace=30, retry=RetryStale(max_retry=1))
    with caplog.at_level("WARNING", logger="hydra_plugins.kd_sweeper.liveness"):
        assert silent.retire(study, now=100.0) == []  # first seen: the wait starts, and is named
        assert silent.retire(study, now=129.9) == []
        assert silent.retire(study, now=130.0) == [0]
    assert caplog.messages == [
        "trial 0 is RUNNING with no heartbeat and a sweeper this machine cannot check (an older sweep, or "
        "heartbeats off): it is failed and queued again if still RUNNING in 30 s",
        "trial 0: no heartbeat and still RUNNING after 30 s; failed and queued again with its parameters",
    ]
    states = [t.state for t in study.trials]
    assert states == [TrialState.FAIL, TrialState.COMPLETE, TrialState.WAITING]
    assert study.trials[2].params == study.trials[0].params  # queued again with its parameters
    assert silent.retire(study, now=500.0) == []  # a WAITING trial is nobody's to judge


def _gone_pid() -> int:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    return gone.pid


def test_a_dead_owner_on_this_machine_is_retried_at_once_a_live_one_is_left(tmp_path, caplog):
    dead = {**this_process(beats=False), "pid": _gone_pid(), "started": None}
    study = _study_with_a_silent_trial(tmp_path / "dead", dead)
    with caplog.at_level("WARNING", logger="hydra_plugins.kd_sweeper.liveness"):
        assert SilentTrials(grace=None, retry=RetryStale(max_retry=1)).retire(study) == [0]  # the clock's own now
    assert caplog.messages == [
        f"trial 0: its sweeper (process {dead['pid']} on {dead['host']}) is gone; failed and queued again with "
        "its parameters"
    ]
    live = _study_with_a_silent_trial(tmp_path / "live", this_process(beats=False))
    judge = SilentTrials(grace=1, retry=RetryStale(max_retry=1))
    assert judge.retire(live, now=0.0) == [] and judge.retire(live, now=1e9) == []


def test_every_running_trial_is_judged_not_only_the_first(tmp_path):
    study = _study_with_a_silent_trial(tmp_path, this_process(beats=False))  # trial 0: running here
    dead = {**this_process(beats=False), "pid": _gone_pid(), "started": None}
    second = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    study._storage.set_trial_system_attr(second._trial_id, OWNER, dead)
    assert SilentTrials(grace=None, retry=RetryStale(max_retry=1)).retire(study, now=0.0) == [1]


def test_a_trial_that_ends_while_it_is_judged_is_left_as_it_ended(tmp_path):
    study = _study_with_a_silent_trial(tmp_path, None)

    class Late(SilentTrials):  # the trial finishes between the verdict and the failing
        def verdicts(self, study, now):
            due = super().verdicts(study, now)
            for trial, _ in due:
                study.tell(trial.number, 1.0)
            return due

    assert Late(grace=0, retry=RetryStale(max_retry=1)).retire(study, now=0.0) == []
    assert [t.state for t in study.trials] == [TrialState.COMPLETE]


def test_with_heartbeats_off_an_uncheckable_trial_is_not_waited_on_and_beating_trials_are_left_to_optuna(tmp_path):
    elsewhere = {**this_process(beats=False), "host": "another-machine"}
    study = _study_with_a_silent_trial(tmp_path / "off", elsewhere)
    silent = SilentTrials(grace=None, retry=RetryStale(max_retry=1))
    assert silent.retire(study, now=0.0) == [] and silent.retire(study, now=1e9) == []
    beating = _study_with_a_silent_trial(tmp_path / "beat", {**elsewhere, "heartbeat": True})
    judge = SilentTrials(grace=1, retry=RetryStale(max_retry=1))
    assert judge.retire(beating, now=0.0) == [] and judge.retire(beating, now=1e9) == []
    stamped = _study_with_a_silent_trial(tmp_path / "stamped", None)
    stamped._storage.record_heartbeat(stamped.trials[0]._trial_id)
    judge = SilentTrials(grace=1, retry=RetryStale(max_retry=1))
    assert judge.retire(stamped, now=0.0) == [] and judge.retire(stamped, now=1e9) == []


def test_an_rdb_storage_says_whether_a_trial_ever_beat(tmp_path):
    storage = open_storage(f"sqlite:///{tmp_path / 'hb.db'}", heartbeat_interval=60)
    study = optuna.create_study(study_name="s", storage=storage)
    quiet, beating = study.ask(), study.ask()
    storage.record_heartbeat(beating._trial_id)
    trials = study.get_trials(deepcopy=False)
    for seen_as in (storage, study._storage):  # as given, and as the study wraps it
        assert not has_heartbeat(seen_as, trials[quiet.number]) and has_heartbeat(seen_as, trials[beating.number])
    judge = SilentTrials(grace=5, retry=RetryStale(max_retry=1))
    assert judge.retire(study, now=0.0) == [] and judge.retire(study, now=10.0) == [quiet.number]


# ----------------------------------------------------------------- names and messages
def test_what_is_moved_or_kept_aside_is_named_by_time_and_process_and_never_overwritten(tmp_path, monkeypatch):
    monkeypatch.setattr(time, "strftime", lambda fmt: f"<{fmt}>")
    first, second = keep_aside(tmp_path / "j.log", b"one"), keep_aside(tmp_path / "j.log", b"two")
    assert first.name == f"j.log.torn-<%Y%m%d-%H%M%S>-{os.getpid()}" and second.name == first.name + "-1"
    for n in (1, 2):
        (tmp_path / f"e{n}.pt").write_bytes(b"x" * n)
    moved = [move_aside(tmp_path / f"e{n}.pt", "why") for n in (1, 2)]
    (tmp_path / "e1.pt").write_bytes(b"again")
    again = move_aside(tmp_path / "e1.pt", "why")
    assert moved[0].name == f"e1.pt.bad-<%Y%m%d-%H%M%S>-{os.getpid()}" and again.name == moved[0].name + "-1"
    assert moved[0].read_bytes() == b"x" and again.read_bytes() == b"again"


def test_a_moved_entry_is_named_in_one_warning_with_why(tmp_path, caplog):
    path = tmp_path / "e.pt"
    save_checked(torch.zeros(2, 2), path)
    with caplog.at_level("WARNING", logger="kd.storage"):
        assert load_fitting(path, tensor_fits((3,))) is None
    (aside,) = tmp_path.glob("e.pt.bad-*")
    assert caplog.messages == [f"{path} is damaged (its shape is 2x2, not 3): moved aside to {aside.name} and rebuilt"]
    assert not (tmp_path / "e.pt.sha256").exists()  # its checksum went with it
    caplog.clear()
    path.write_bytes(b"torn")  # no checksum beside it: an unfinished write, under the lock: damaged
    with caplog.at_level("WARNING", logger="kd.storage"):
        build_once(path, lambda: torch.ones(1))
    assert "is damaged (its checksum does not match): moved aside to" in caplog.text
    assert (tmp_path / "e.pt.lock").exists()  # built under the lock beside it


def test_an_entry_finished_by_another_process_while_waiting_for_the_lock_is_loaded_not_rebuilt(tmp_path, monkeypatch):
    path, real_locked = tmp_path / "e.pt", kd.storage.locked

    def another_process_finishes(lock_path):  # it held the lock and wrote the entry
        save_checked(torch.ones(3), path)
        return real_locked(lock_path)

    monkeypatch.setattr(kd.storage, "locked", another_process_finishes)
    value, built = build_once(path, lambda: pytest.fail("built twice"), tensor_fits((3,)))
    assert not built and torch.equal(value, torch.ones(3))


def test_shapes_name_open_axes_and_every_allowed_dtype():
    assert tensor_fits((None, 2))(torch.zeros(3, 3)) == "its shape is 3x3, not *x2"
    two_axes = tensor_fits((6, 2, ...))
    assert (
        two_axes(torch.zeros(6, 2, 5)) is None and two_axes(torch.zeros(6, 3, 5)) == "its shape is 6x3x5, not 6x2x..."
    )
    halves = tensor_fits((1,), (torch.float16, torch.bfloat16))
    assert halves(torch.zeros(1)) == "its dtype is torch.float32, not torch.float16 or torch.bfloat16"


def test_a_journal_starting_with_an_empty_line_is_damaged_there():
    create, trial = b'{"op_code":0,"worker_id":"w"}\n', b'{"op_code":4,"worker_id":"w"}\n'
    assert whole_records(b"\n" + create + trial) == (0, 1)


def test_the_refusals_say_what_to_do(tmp_path):
    (tmp_path / "notes.txt").write_text("mine\n")
    with pytest.raises(DamagedStorage) as journal:
        open_storage(f"journal://{tmp_path / 'notes.txt'}")
    assert str(journal.value) == (
        f"{tmp_path / 'notes.txt'} is not an Optuna journal (its first line is no study record); it was left "
        "untouched: check the journal:// path, or name a new file to start a new study"
    )
    with pytest.raises(DamagedStorage) as sqlite:
        check_sqlite(tmp_path / "notes.txt")
    assert str(sqlite.value) == (
        f"{tmp_path / 'notes.txt'} is not a SQLite database; it was left untouched: check the sqlite:/// path, "
        "or name a new file to start a new study"
    )


def test_healing_waits_for_the_journals_own_lock_and_rechecks_under_it(tmp_path, caplog):
    import threading

    from optuna.storages.journal import JournalFileSymlinkLock

    path = _journal(tmp_path)
    whole = path.read_bytes()
    path.write_bytes(whole + b'{"op_code": 5, "wor')
    lock = JournalFileSymlinkLock(str(path))  # a worker appending holds it
    assert lock.acquire()
    result: list[int] = []
    healer = threading.Thread(target=lambda: result.append(heal_journal(path)))
    healer.start()
    healer.join(0.5)
    assert healer.is_alive() and path.read_bytes().endswith(b"wor")  # it waits, and cuts nothing meanwhile
    path.write_bytes(whole)  # the lock holder mended it meanwhile
    lock.release()
    healer.join(10)
    assert result == [0] and path.read_bytes() == whole and not list(tmp_path.glob("study.log.torn-*"))
    path.write_bytes(whole + b"torn")
    with caplog.at_level("WARNING", logger="hydra_plugins.kd_sweeper.journal"):
        assert heal_journal(path) == 4
    (aside,) = tmp_path.glob("study.log.torn-*")
    assert caplog.messages == [
        f"{path}: cut a torn last record (4 bytes, left by a killed worker) back to its last whole one; the cut "
        f"bytes are in {aside.name}; the study resumes"
    ]


def test_the_read_only_opener_changes_nothing_and_refuses_what_it_cannot_read(tmp_path):
    import optuna

    from hydra_plugins.kd_sweeper.journal import DamagedStorage
    from hydra_plugins.kd_sweeper.study import masked, open_readonly

    journal = tmp_path / "s.log"
    study = optuna.create_study(study_name="s", storage=open_storage(f"journal://{journal}"))
    study.tell(study.ask(), 1.0)
    torn = journal.read_bytes() + b'{"op_code": 4, "worker_id": "w", "trial_id'
    journal.write_bytes(torn)
    reader = open_readonly(f"journal://{journal}")
    assert [t.value for t in optuna.load_study(study_name="s", storage=reader).trials] == [1.0]
    assert journal.read_bytes() == torn  # the sweeper's opening would have cut the torn tail
    with pytest.raises(FileNotFoundError, match="no journal file"):
        open_readonly(f"journal://{tmp_path / 'absent.log'}")
    (tmp_path / "bad.log").write_bytes(b"not a journal\n")
    with pytest.raises(DamagedStorage):
        open_readonly(f"journal://{tmp_path / 'bad.log'}")
    db = tmp_path / "o.db"
    assert open_readonly(f"sqlite:///{db}") == f"sqlite:///file:{db.resolve()}?mode=ro&uri=true"
    uri = f"sqlite:///file:{db}?mode=ro&uri=true"
    assert open_readonly(uri) == uri and open_readonly("postgresql://u@h/d") == "postgresql://u@h/d"
    assert masked("postgresql://u:***@h/d") and not masked("postgresql://u:pw@h/d")
    assert not masked(f"sqlite:///{db}") and not masked("not a url")


def test_a_write_waits_out_another_writers_lock_on_an_sqlite_study(tmp_path):
    """A job's report that meets a lock held longer than sqlite3's own 5 s waits for it
    (on a loaded machine that is how a fine trial used to fail)."""
    import sqlite3
    import threading

    from hydra_plugins.kd_sweeper.study import open_storage

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    trial = optuna.create_study(study_name="s", storage=open_storage(url)).ask()
    holder = sqlite3.connect(tmp_path / "optuna.db", isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")  # another writer, in the middle of a long write
    release = threading.Timer(6.0, holder.execute, ("COMMIT",))
    release.start()
    try:
        job_side = optuna.load_study(study_name="s", storage=open_storage(url))
        job_side.tell(job_side.trials[0].number, 1.5)
    finally:
        release.join()
    assert optuna.load_study(study_name="s", storage=url).trials[0].value == 1.5
    assert trial.number == 0
