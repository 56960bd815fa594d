"""The job side of a ``kd_optuna`` sweep: report progress to your trial, ask whether to stop.

Call these from any Hydra app's training loop; outside a ``kd_optuna`` sweep they do
nothing (``should_prune()`` is False)::

    from hydra_plugins.kd_sweeper import job

    for epoch in range(cfg.epochs):
        ...
        job.report(val_loss, step=epoch)
        if job.should_prune():
            raise optuna.TrialPruned()  # the sweeper records the trial as PRUNED
    job.record(flops=model_flops)  # what hydra.sweeper.constraints may bound

The sweeper tells each job which trial it is through ``hydra.job.env_set`` (Hydra sets
those variables around the job, in whatever process or machine the launcher runs it):
no key is added to your app's config, and it works with the basic, joblib and submitit
launchers alike.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import optuna
from hydra.core.hydra_config import HydraConfig

from hydra_plugins.kd_sweeper import artifacts
from hydra_plugins.kd_sweeper._compat import live_trial
from hydra_plugins.kd_sweeper.config import build_pruner
from hydra_plugins.kd_sweeper.constraints import METRICS
from hydra_plugins.kd_sweeper.study import open_storage

STORAGE_ENV = "KD_OPTUNA_STORAGE"
STUDY_ENV = "KD_OPTUNA_STUDY"
TRIAL_ENV = "KD_OPTUNA_TRIAL"
REPLICATE_ENV = "KD_OPTUNA_REPLICATE"
ARTIFACTS_ENV = "KD_OPTUNA_ARTIFACTS"

_open: dict[tuple[str, str, int], optuna.Trial] = {}


def trial_number(env: Mapping[str, str] | None = None) -> int | None:
    """This job's trial number in its study, or None outside a ``kd_optuna`` sweep."""
    value = (os.environ if env is None else env).get(TRIAL_ENV)
    return int(value) if value not in (None, "") else None


def replicate(env: Mapping[str, str] | None = None) -> int | None:
    """This job's replicate in a racing sweep (``hydra.sweeper.racing``): the seed every
    trial runs as its i-th replicate, so that trials compare paired. Seed your run with it;
    None outside a racing sweep."""
    value = (os.environ if env is None else env).get(REPLICATE_ENV)
    return int(value) if value not in (None, "") else None


def study_name(env: Mapping[str, str] | None = None) -> str | None:
    """The name of the study this job's trial belongs to, or None outside a sweep."""
    return (os.environ if env is None else env).get(STUDY_ENV) or None


def _pruner() -> optuna.pruners.BasePruner:
    """The sweep's pruner, as configured in ``hydra.sweeper.pruner`` of this job's config."""
    pruner_cfg = HydraConfig.get().sweeper.get("pruner") if HydraConfig.initialized() else None
    return build_pruner(pruner_cfg) or optuna.pruners.NopPruner()


def current(env: Mapping[str, str] | None = None, pruner: Any = None) -> optuna.Trial | None:
    """This job's live :class:`optuna.Trial` (None outside a sweep). ``env`` and ``pruner``
    default to this process's environment and the sweep's configured pruner; a launcher
    that trains several jobs in one process passes each job's own."""
    env = os.environ if env is None else env
    number, name, storage = trial_number(env), study_name(env), env.get(STORAGE_ENV)
    if number is None or name is None or not storage:
        return None
    key = (storage, name, number)
    if key not in _open:
        study = optuna.load_study(
            study_name=name, storage=open_storage(storage), pruner=pruner if pruner is not None else _pruner()
        )
        _open[key] = live_trial(study, number)
    return _open[key]


def report(value: float, step: int, env: Mapping[str, str] | None = None) -> None:
    """Report an intermediate objective value at ``step`` (e.g. the epoch) to this job's
    trial, for pruning and for the dashboard's curves. A no-op outside a sweep and in
    multi-objective studies (Optuna takes no intermediate values there)."""
    trial = current(env)
    if trial is not None and len(trial.study.directions) == 1:
        trial.report(float(value), int(step))


def should_prune(env: Mapping[str, str] | None = None) -> bool:
    """Whether the sweep's pruner says this trial should stop now (raise
    ``optuna.TrialPruned`` then). Always False outside a sweep or without a pruner."""
    trial = current(env)
    if trial is None or len(trial.study.directions) != 1:
        return False
    return bool(trial.should_prune())


def record(env: Mapping[str, str] | None = None, **metrics: float) -> None:
    """Record what this job measured (``record(flops=8.1e5, latency_ms=0.04)``) on its
    trial: what the sweep's ``constraints`` bound, and what kd.report shows. Later
    calls add to earlier ones. A no-op outside a ``kd_optuna`` sweep."""
    trial = current(env)
    if trial is None:
        return
    known = dict(trial.user_attrs.get(METRICS) or {})
    trial.set_user_attr(METRICS, {**known, **{str(k): float(v) for k, v in metrics.items()}})


def upload(path: str | os.PathLike, env: Mapping[str, str] | None = None) -> str | None:
    """Keep the file ``path`` in the sweep's artifact store (``hydra.sweeper.artifacts``),
    linked from this job's trial; returns its artifact id. None (nothing kept) outside a
    sweep or when the sweep keeps no artifacts."""
    env = os.environ if env is None else env
    location, trial = env.get(ARTIFACTS_ENV), current(env)
    if not location or trial is None:
        return None
    return optuna.artifacts.upload_artifact(
        artifact_store=artifacts.store(location), file_path=str(path), study_or_trial=trial
    )
