"""Every private name of Hydra and Optuna that the sweeper uses, in one place.

Written against hydra-core / hydra-optuna-sweeper 1.4.0rc3 and Optuna 5.1. When one of
them changes, this module is the one to fix.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import optuna
from hydra.core.utils import JobReturn, JobStatus

# The stock sweeper's implementation, whose search-space parsing, trial set-up and
# config dataclasses ours extends (the module is private to hydra-optuna-sweeper).
from hydra_plugins.hydra_optuna_sweeper._impl import (  # noqa: F401
    OptunaSweeperImpl,
    create_params_from_overrides,
)

# Optuna's interface for storages that take heartbeats (RDBStorage implements it).
from optuna.storages._heartbeat import BaseHeartbeat  # noqa: F401


@contextlib.contextmanager
def quiet_experimental() -> Iterator[None]:
    """Optuna marks heartbeats and their retry callback as experimental and warns on each
    use; upstream tests run with warnings as errors."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


def ask(study: optuna.Study) -> optuna.Trial:
    """``study.ask()`` without Optuna's warning that heartbeats belong to ``Study.optimize``:
    this sweeper beats for its trials itself (:class:`~hydra_plugins.kd_sweeper.kd_sweeper.Heartbeat`)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
        return study.ask()


def live_trial(study: optuna.Study, number: int) -> optuna.Trial:
    """The running trial ``number`` of ``study`` as a :class:`optuna.Trial`, for a job in
    another process to report to. Optuna has no public lookup by number; the trial id
    is the handle its ``Trial`` takes."""
    trial_id = study._storage.get_trial_id_from_study_id_trial_number(study._study_id, number)
    return optuna.Trial(study, trial_id)


def trial_id(trial: optuna.Trial | optuna.trial.FrozenTrial) -> int:
    return trial._trial_id


def study_storage(study: optuna.Study) -> Any:
    return study._storage


def job_exception(ret: JobReturn) -> BaseException | None:
    """The exception a failed job raised, without ``JobReturn.return_value`` re-raising
    it (which logs "Error executing job" with a traceback)."""
    if ret.status != JobStatus.FAILED:
        return None
    return ret._return_value


def rdb_storage(storage: Any) -> Any | None:
    """The RDB storage behind a study's storage (Optuna wraps it in a private cache), or
    None for any other kind."""
    backend = getattr(storage, "_backend", storage)
    return backend if isinstance(backend, optuna.storages.RDBStorage) else None


def rdb_has_heartbeat(storage: Any, trial_id: int) -> bool:
    """Whether an RDB storage holds any heartbeat for the trial (Optuna keeps them in a
    table of its own, with no public reader)."""
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session

    with _create_scoped_session(storage.scoped_session) as session:
        return models.TrialHeartbeatModel.where_trial_id(trial_id, session) is not None
