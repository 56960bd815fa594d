"""Storages and trial bookkeeping shared by the sweeper and the jobs it launches.

``storage`` is an Optuna RDB URL (``sqlite:///...``, ``postgresql://...``), or
``journal:///path/study.log``: a journal file on a shared file system, for workers on
several machines without a database server. Both take heartbeats: a worker that dies
stops beating, and after ``grace_period`` seconds its running trials become FAIL and are
queued again with the same parameters.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.storages import JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState

from hydra_plugins.kd_sweeper._compat import BaseHeartbeat, quiet_experimental, trial_id
from hydra_plugins.kd_sweeper.journal import check_journal, check_sqlite, heal_journal
from hydra_plugins.kd_sweeper.liveness import HEARTBEAT

JOURNAL = "journal://"
SQLITE = "sqlite:///"
# How long a writer waits for another's lock on an SQLite file before it fails. sqlite3's
# own 5 s is short on a loaded machine: a job's report or a heartbeat that hit it would
# fail a trial whose training was fine.
SQLITE_BUSY_TIMEOUT_S = 60
FAIL_REASON = "fail_reason"  # trial user attribute: why a FAIL trial failed
# Reasons of trials that ran and failed: they count as trials of the sweep.
DIVERGED = "kd_optuna:diverged"  # the objective was NaN or infinite
ERROR = "kd_optuna:error"  # the job raised, or returned something that is not an objective
COUNTED = (DIVERGED, ERROR, "kd:diverged", "kd:error")  # with the labels of studies from before 2026-12
# Reasons of trials that never got an outcome: they do not count.
SURPLUS = "kd_optuna:surplus"  # asked past n_trials in a race between workers
INTERRUPTED = "kd_optuna:interrupted"  # in flight when the sweep stopped (Ctrl-C, an error)


class HeartbeatJournalStorage(JournalStorage, BaseHeartbeat):
    """A journal storage with Optuna's heartbeat protocol (Optuna gives it to RDB storages
    only): heartbeats are trial system attributes, stamped with the writer's clock."""

    def __init__(self, path: str, heartbeat_interval: int | None, grace_period: int | None, callback: Any) -> None:
        heal_journal(path)
        super().__init__(JournalFileBackend(path))
        self._interval = heartbeat_interval
        self._grace = grace_period if grace_period is not None else 2 * (heartbeat_interval or 0)
        self._callback = callback

    def record_heartbeat(self, trial_id: int) -> None:
        self.set_trial_system_attr(trial_id, HEARTBEAT, time.time())

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        deadline = time.time() - self._grace
        running = self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,))
        return [trial_id(t) for t in running if t.system_attrs.get(HEARTBEAT, deadline) < deadline]

    def get_heartbeat_interval(self) -> int | None:
        return self._interval

    def get_heartbeat_stale_trial_callback(self) -> Callable[[optuna.Study, FrozenTrial], None] | None:
        return self._callback


class RetryStale:
    """Queue a stale trial again with its parameters (Optuna's retry callback, quietly)."""

    def __init__(self, max_retry: int | None) -> None:
        with quiet_experimental():
            self._retry = RetryHeartbeatStaleTrialCallback(max_retry=max_retry)

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        with quiet_experimental():
            self._retry(study, trial)


def open_storage(url: Any, heartbeat_interval: int | None = None, grace_period: int | None = None) -> Any:
    """An Optuna storage for ``url``; with ``heartbeat_interval`` (seconds), one that takes
    heartbeats and retries the trials of dead workers once. A file at the path that is
    not a study's storage raises :class:`~hydra_plugins.kd_sweeper.journal.DamagedStorage`
    and is left untouched."""
    if not isinstance(url, str):
        return url  # None (in memory) or a storage object
    callback = RetryStale(max_retry=1) if heartbeat_interval else None
    if url.startswith(JOURNAL):
        path = url[len(JOURNAL) :]
        return HeartbeatJournalStorage(path, heartbeat_interval, grace_period, callback)
    engine_kwargs = None
    if url.startswith(SQLITE):
        check_sqlite(url[len(SQLITE) :])
        engine_kwargs = {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_S}}
    if not heartbeat_interval and engine_kwargs is None:
        return url
    with quiet_experimental():
        return RDBStorage(
            url,
            engine_kwargs=engine_kwargs,
            heartbeat_interval=heartbeat_interval or None,
            grace_period=grace_period if heartbeat_interval else None,
            heartbeat_stale_trial_callback=callback,
        )


def open_readonly(url: str) -> Any:
    """A storage to read ``url`` from without changing it: a journal file as it is (the
    sweeper's own opening would mend a torn last line; a damaged one raises
    :class:`~hydra_plugins.kd_sweeper.journal.DamagedStorage`), an SQLite file through a
    read-only URI, any other database URL as given."""
    if url.startswith(JOURNAL):
        path = Path(url[len(JOURNAL) :])
        if not path.is_file():
            raise FileNotFoundError(f"no journal file {path}")
        check_journal(path)
        return JournalStorage(JournalFileBackend(str(path)))
    if url.startswith(SQLITE) and not url.startswith(SQLITE + "file:"):
        return f"{SQLITE}file:{Path(url[len(SQLITE) :]).resolve()}?mode=ro&uri=true"
    return url


def masked(url: str) -> bool:
    """Whether ``url`` is one :func:`shown` wrote down: its password replaced by ``***``."""
    from sqlalchemy.engine import make_url  # optuna's own dependency
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).password == "***"
    except ArgumentError:
        return False


def shown(url: Any) -> str | None:
    """``url`` as it may be logged and written down: an RDB URL's password masked
    (``***``); None for a storage given as an object or kept in memory."""
    if not isinstance(url, str):
        return None
    if url.startswith(JOURNAL):
        return url
    from sqlalchemy.engine import make_url  # optuna's own dependency
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:  # not a URL sqlalchemy can read: no password to find in it
        return url


def fail_stale_trials(study: optuna.Study) -> None:
    with quiet_experimental():
        optuna.storages.fail_stale_trials(study)


def counts(trial: FrozenTrial) -> bool:
    """Whether a trial is one of the sweep's ``n_trials``: it finished (COMPLETE, PRUNED),
    failed in its job, or is running or queued. A FAIL trial with no reason never got an
    outcome (its worker died and the heartbeat failed it, or an older version voided
    it) and does not count, nor does a surplus trial."""
    if trial.state == TrialState.FAIL:
        return str(trial.user_attrs.get(FAIL_REASON, "")).startswith(COUNTED)
    return True


def counted_trials(study: optuna.Study) -> list[FrozenTrial]:
    return [t for t in study.get_trials(deepcopy=False) if counts(t)]


def why_not_resumable(storage: Any, study_name: str | None, sweep_dir: str, raw_sweep_dir: str) -> str | None:
    """Why rerunning the same command would not find this study again (None: it would),
    with the fix. ``raw_sweep_dir`` is ``hydra.sweep.dir`` before interpolation: Hydra's
    default names it by the time of the run, so a rerun gets another one."""
    if storage is None:
        return "the study is kept in memory; set hydra.sweeper.storage (e.g. sqlite:///optuna.db) to keep it"
    if not isinstance(storage, str):
        return None  # a storage object: where it keeps the study is its owner's choice
    if study_name is None:
        return "the study has no name, so Optuna draws a new one each run; set hydra.sweeper.study_name"
    path = storage[len(SQLITE) :] if storage.startswith(SQLITE) else None
    path = storage[len(JOURNAL) :] if storage.startswith(JOURNAL) else path
    if path is None or "${now:" not in raw_sweep_dir:
        return None
    if Path(sweep_dir).resolve() in Path(path.split("?")[0]).resolve().parents:
        return (
            f"its storage is inside the sweep directory {sweep_dir}, which is named by the time of the run; "
            "set hydra.sweep.dir to a fixed path (e.g. multirun/NAME) or keep the storage outside it"
        )
    return None


def recorded_results(sweep_dir: Path) -> dict:
    """A finished sweep's optimization_results.yaml ({} when missing or unreadable)."""
    try:
        results = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return results if isinstance(results, dict) else {}


def find_study(spec: str) -> optuna.Study:
    """The study ``spec`` names, opened read-only: a sweep dir (its ``optuna.db``, or the
    storage its optimization_results.yaml recorded), or a storage URL holding one study
    (``URL#name`` picks one of several). A ValueError says what is missing."""
    url, _, name = str(spec).partition("#")
    where = Path(url)
    if where.is_dir():
        recorded = recorded_results(where)
        name = name or recorded.get("study_name", "")
        url = f"sqlite:///{where / 'optuna.db'}" if (where / "optuna.db").exists() else recorded.get("storage")
        if not url:
            raise ValueError(f"{spec}: that folder holds no optuna.db and no recorded storage")
    elif "://" not in url:
        raise ValueError(f"{spec} is neither a sweep folder nor a storage URL")
    storage = open_readonly(url)
    names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
    name = name or (names[0] if len(names) == 1 else "")
    if name not in names:
        raise ValueError(
            f"{spec}: no study {name or '(none named)'} there (it holds {names}); name one as <url>#<study name>"
        )
    return optuna.load_study(study_name=name, storage=storage)
