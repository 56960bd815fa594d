"""The sweeper's configuration: ``hydra/sweeper=kd_optuna`` and its pruner presets
(registered in Hydra's ConfigStore), and the checks on the values a user sets."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

import optuna
from hydra.core.config_store import ConfigStore
from hydra.utils import instantiate
from hydra_plugins.hydra_optuna_sweeper.config import OptunaSweeperConf

from hydra_plugins.kd_sweeper.refusals import refuse

SAMPLERS = ("hydra_plugins.hydra_optuna_sweeper.*", "optuna.samplers.*")


MAX_FAILURE_RATE = 0.25  # the one default, here and in every YAML that sets it


@dataclass
class KDOptunaSweeperConf(OptunaSweeperConf):
    _target_: str = "hydra_plugins.kd_sweeper.kd_sweeper.KDOptunaSweeper"
    # An app picks a pruner with `override hydra/sweeper/pruner: median` (none by default).
    defaults: list[Any] = field(default_factory=lambda: ["_self_", {"sampler": "tpe"}, {"pruner": None}])
    max_failure_rate: float = MAX_FAILURE_RATE
    pruner: Any = None
    validate: str | None = None  # dotted path of the app's check, e.g. kd.tuning.validate
    heartbeat_interval: int | None = 10  # seconds; null: no heartbeats
    grace_period: int | None = None  # seconds without a beat before a trial is stale (2x interval)
    # Seed-paired racing (race_loop.py): {min_seeds, max_seeds, level, tie_level, seeds,
    # reference: {param: value}}; null: every trial runs once.
    racing: Any = None
    confirm_seeds: Any = None  # fresh seeds the race's incumbent (and the reference) run on at the end
    # n_jobs trials in flight, the next started as soon as one ends (flight.py); false:
    # Hydra's batches of n_jobs, each waiting for its slowest trial
    asynchronous: bool = True
    # Bounds on recorded metrics, e.g. ['flops<=1e6']: the answer is the best trial that
    # meets them all (constraints.py); null: none
    constraints: Any = None
    # An earlier sweep (its folder, or a storage URL[#study]) whose best trial(s) run first (warm.py)
    warm_start: Any = None
    # Where trials keep files (job.upload): a folder, s3://bucket or gs://bucket (artifacts.py); null: none
    artifacts: Any = None


@dataclass
class MedianPrunerConf:
    _target_: str = "optuna.pruners.MedianPruner"
    n_startup_trials: int = 4  # trials that finish before any is pruned
    n_warmup_steps: int = 2  # steps a trial always runs
    interval_steps: int = 1


@dataclass
class PercentilePrunerConf:
    _target_: str = "optuna.pruners.PercentilePruner"
    percentile: float = 25.0
    n_startup_trials: int = 4
    n_warmup_steps: int = 2
    interval_steps: int = 1


@dataclass
class SuccessiveHalvingPrunerConf:
    _target_: str = "optuna.pruners.SuccessiveHalvingPruner"
    min_resource: Any = "auto"
    reduction_factor: int = 4
    min_early_stopping_rate: int = 0


@dataclass
class HyperbandPrunerConf:
    _target_: str = "optuna.pruners.HyperbandPruner"
    min_resource: int = 1
    max_resource: Any = "auto"
    reduction_factor: int = 3


def build_pruner(pruner_cfg: Any) -> optuna.pruners.BasePruner | None:
    """The sweeper's ``pruner`` config as an Optuna pruner (only optuna.pruners.* may be
    named), built the same way by the sweeper and by each job; None when unset."""
    if not pruner_cfg:
        return None
    return instantiate(pruner_cfg, _execution_whitelist_="optuna.pruners.*")


def failure_allowance(max_failure_rate: float, n_trials: int) -> int:
    """How many trials may fail in one invocation: ``max_failure_rate`` of ``n_trials``,
    rounded up (0.25 of 3 allows one; a rate of 0 allows none)."""
    return math.ceil(round(max_failure_rate * n_trials, 9))


def check_sweeper_values(n_trials: Any, n_jobs: Any, max_failure_rate: Any, heartbeat: tuple) -> None:
    def integer(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if not integer(n_trials) or n_trials < 1:
        refuse(f"hydra.sweeper.n_trials must be an integer >= 1, got {n_trials!r}")
    if not integer(n_jobs) or n_jobs == 0:
        refuse(
            f"hydra.sweeper.n_jobs must be an integer >= 1 (trials launched together; -1: one per core), got {n_jobs!r}"
        )
    if isinstance(max_failure_rate, bool) or not isinstance(max_failure_rate, (int, float)):
        refuse(f"hydra.sweeper.max_failure_rate must be a number in [0, 1], got {max_failure_rate!r}")
    if not 0.0 <= max_failure_rate <= 1.0:
        refuse(f"hydra.sweeper.max_failure_rate must be in [0, 1], got {max_failure_rate!r}")
    for name, value in zip(("heartbeat_interval", "grace_period"), heartbeat, strict=True):
        if value is not None and (not integer(value) or value < 1):
            refuse(f"hydra.sweeper.{name} must be an integer >= 1 (seconds) or null, got {value!r}")


def available_cores() -> int:
    """The cores this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


_store = ConfigStore.instance()
_store.store(group="hydra/sweeper", name="kd_optuna", node=KDOptunaSweeperConf, provider="kd_optuna")
for _name, _node in [
    ("median", MedianPrunerConf),
    ("percentile", PercentilePrunerConf),
    ("successive_halving", SuccessiveHalvingPrunerConf),
    ("asha", SuccessiveHalvingPrunerConf),  # Optuna's successive halving is asynchronous (ASHA)
    ("hyperband", HyperbandPrunerConf),
]:
    _store.store(group="hydra/sweeper/pruner", name=_name, node=_node, provider="kd_optuna")
