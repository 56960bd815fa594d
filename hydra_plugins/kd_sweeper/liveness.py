"""RUNNING trials that no heartbeat covers: judged by a stated rule, never waited on forever.

A trial left RUNNING by a sweeper that never beat for it (an older sweep, heartbeats
off, or a kill between asking the trial and its first beat) never goes stale under
Optuna's heartbeat rule, so a sweep waiting for it would wait forever. The rule here:

1. Each sweeper records itself as the trial's owner (system attribute
   ``kd_optuna:owner``: host, boot, process id and start time, and whether it beats).
2. A trial whose owner is on this machine is judged by its owner's liveness: a process
   that is gone (or a machine rebooted since) means the trial is failed and queued
   again at once; a live owner is left alone.
3. A trial that beats is left to Optuna's heartbeat rule.
4. Any other trial (no owner record, or an owner on another machine that does not
   beat) is failed and queued again if it is still RUNNING ``grace`` seconds after this
   sweeper first saw it; the log names the wait when it starts.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from hydra_plugins.kd_sweeper import _compat
from hydra_plugins.kd_sweeper._compat import rdb_has_heartbeat, rdb_storage, study_storage, trial_id

OWNER = "kd_optuna:owner"
HEARTBEAT = "kd_optuna:heartbeat"  # journal storage: trial system attribute, unix time
log = logging.getLogger(__name__)


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def start_ticks(stat: str) -> int | None:
    """The start time (field 22, clock ticks since boot) in a /proc/<pid>/stat line,
    whose second field, the process name in parentheses, may itself hold ") "."""
    fields = stat[stat.rfind(")") + 2 :].split()  # from field 3 (state) on
    return int(fields[19]) if len(fields) > 19 else None


def process_start(pid: int) -> int | None:
    """When process ``pid`` started (Linux's /proc), so that a process id reused by a
    later process is not taken for the owner; None where it cannot be read."""
    stat = _read(f"/proc/{pid}/stat")
    return None if stat is None else start_ticks(stat)


def this_process(beats: bool) -> dict[str, Any]:
    """The owner record of a trial this process runs."""
    pid = os.getpid()
    return {
        "host": socket.gethostname(),
        "boot": _read("/proc/sys/kernel/random/boot_id"),
        "pid": pid,
        "started": process_start(pid),
        "heartbeat": beats,
    }


def owner_alive(owner: Any) -> bool | None:
    """Whether the process in an owner record still runs: True or False where this
    machine can tell (the owner ran here), None where it cannot."""
    if not isinstance(owner, dict) or not isinstance(owner.get("pid"), int):
        return None
    here = this_process(beats=False)
    if owner.get("host") != here["host"]:
        return None
    if owner.get("boot") != here["boot"]:
        return False  # the machine has rebooted since: every process of then is gone
    pid = owner["pid"]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's live process
    started = owner.get("started")
    return started is None or process_start(pid) in (None, started)


def has_heartbeat(storage: Any, trial: FrozenTrial) -> bool:
    """Whether any heartbeat was ever recorded for ``trial``."""
    if HEARTBEAT in trial.system_attrs:
        return True
    rdb = rdb_storage(storage)
    return rdb is not None and rdb_has_heartbeat(rdb, trial_id(trial))


class SilentTrials:
    """Finds and retires RUNNING trials nobody will finish, by the module's rule.

    ``grace`` (seconds) bounds the wait on a trial whose owner cannot be checked; None
    (heartbeats off) waits on none of them: the sweep then stops instead, as it says."""

    def __init__(self, grace: float | None, retry: Callable[[optuna.Study, FrozenTrial], None]) -> None:
        self.grace, self.retry = grace, retry
        self.first_seen: dict[int, float] = {}

    def verdicts(self, study: optuna.Study, now: float) -> list[tuple[FrozenTrial, str]]:
        """RUNNING trials to fail now, each with why."""
        storage = study_storage(study)
        due = []
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            owner = trial.system_attrs.get(OWNER)
            alive = owner_alive(owner)
            if alive is False:
                due.append((trial, f"its sweeper (process {owner['pid']} on {owner['host']}) is gone"))
                continue
            if alive or (isinstance(owner, dict) and owner.get("heartbeat")) or has_heartbeat(storage, trial):
                continue  # running here, or Optuna's heartbeat rule judges it
            if self.grace is None:
                continue
            if trial.number not in self.first_seen:
                self.first_seen[trial.number] = now
                log.warning(
                    "trial %d is RUNNING with no heartbeat and a sweeper this machine cannot check (an older sweep, "
                    "or heartbeats off): it is failed and queued again if still RUNNING in %g s",
                    trial.number,
                    self.grace,
                )
            if now - self.first_seen[trial.number] >= self.grace:
                due.append((trial, f"no heartbeat and still RUNNING after {self.grace:g} s"))
        return due

    def retire(self, study: optuna.Study, now: float | None = None) -> list[int]:
        """Fail (and queue again with its parameters) each trial :meth:`verdicts` names;
        returns their numbers."""
        retired = []
        for trial, why in self.verdicts(study, time.monotonic() if now is None else now):
            with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):  # it ended meanwhile
                study_storage(study).set_trial_state_values(trial_id(trial), TrialState.FAIL)
                log.warning("trial %d: %s; failed and queued again with its parameters", trial.number, why)
                self.retry(study, study_storage(study).get_trial(trial_id(trial)))
                retired.append(trial.number)
        return retired


class Heartbeat:
    """Beats for the trials this sweeper is running, from a background thread."""

    def __init__(self, study: optuna.Study) -> None:
        storage = _compat.study_storage(study)
        self.interval = storage.get_heartbeat_interval() if isinstance(storage, _compat.BaseHeartbeat) else None
        self.storage, self.trial_ids, self.lock = storage, set(), threading.Lock()
        self.stopped = threading.Event()
        if self.interval:
            threading.Thread(target=self._run, name="kd_optuna-heartbeat", daemon=True).start()

    def add(self, trial: optuna.Trial) -> None:
        if self.interval:
            with self.lock:
                self.trial_ids.add(_compat.trial_id(trial))
            self.storage.record_heartbeat(_compat.trial_id(trial))

    def remove(self, trial: optuna.Trial) -> None:
        with self.lock:
            self.trial_ids.discard(_compat.trial_id(trial))

    def _run(self) -> None:
        while not self.stopped.wait(self.interval):
            with self.lock:
                ids = list(self.trial_ids)
            for beating in ids:
                with contextlib.suppress(Exception):  # a busy database: the next beat comes soon
                    self.storage.record_heartbeat(beating)

    def stop(self) -> None:
        self.stopped.set()
