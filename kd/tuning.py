"""kd's side of an Optuna sweep with ``hydra/sweeper=kd_optuna``.

The sweeper is app-agnostic; kd plugs in twice:

* :func:`validate` is the sweeper's ``validate`` hook (set by ``conf/hydra/sweeper/kd_tpe.yaml``):
  before any trial it checks the config once (ranges, and no selection on a missing
  validation split) and returns the settings that make the study one experiment;
* :func:`epoch_reporter` gives a job the function that reports each epoch's validation
  accuracy to its trial and raises :class:`kd.errors.Pruned` when the pruner says stop.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import optuna
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from hydra_plugins.kd_sweeper import job
from kd.config import (
    COST_OBJECTIVES,
    OBJECTIVES,
    RENAMED_PRESETS,
    experiment_settings,
    loss_class,
    swept_keys,
    validate_for_selection,
)
from kd.errors import ConfigError, Pruned

log = logging.getLogger(__name__)

# Optuna's own handler colours its lines; send them through the run's handlers instead,
# in the one plain format of conf/hydra/*_logging/kd.yaml.
optuna.logging.disable_default_handler()
optuna.logging.enable_propagation()

EpochReport = Callable[[int, float], None]
RACING_AND_SEEDS = "trial.seeds and hydra.sweeper.racing both choose the seeds; drop trial.seeds"


def validate(config: DictConfig, space: Mapping[str, Any], fixed: Mapping[str, Any]) -> dict[str, Any]:
    """The ``kd_optuna`` hook: raise (one line) on a config no trial should run with;
    return every result-deciding setting the sweep does not vary."""
    validate_for_selection(config, swept=set(space) | set(swept_keys(config)))
    check_space_ranges(config, space)
    note_deprecated_preset(OmegaConf.select(config, "hydra.runtime.choices.hparams_search", default=None))
    if OmegaConf.select(config, "hydra.sweeper.racing", default=None) and config.trial.seeds:
        raise ConfigError(RACING_AND_SEEDS)
    settings = experiment_settings(config)
    for name in space:
        settings.pop(name, None)
    return settings


def check_space_ranges(config: DictConfig, space: Mapping[str, Any]) -> None:
    """Refuse, before any trial, a swept loss hyperparameter whose range reaches values
    its method refuses (the loss class's ``ranges``): every trial there would fail."""
    rules = getattr(loss_class(config), "ranges", {})
    for key, distribution in space.items():
        name = key.removeprefix("loss.")
        if not key.startswith("loss.") or name not in rules:
            continue
        test, rule = rules[name]
        values = getattr(distribution, "choices", None)
        if values is None:  # an interval: its ends
            values = (getattr(distribution, "low", None), getattr(distribution, "high", None))
        bad = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool) and not test(v)]
        if bad:
            raise ConfigError(f"{key}: the search space reaches {bad[0]!r}, and {key} must be {rule}; narrow it")


def note_deprecated_preset(choice: str | None) -> str | None:
    """Log (once per sweep) that an old preset name was used; returns the note."""
    if choice not in RENAMED_PRESETS:
        return None
    note = f"hparams_search={choice} is now hparams_search={RENAMED_PRESETS[choice]} (the old name still works)"
    log.warning("%s", note)
    return note


def use_replicate(cfg: DictConfig) -> None:
    """In a racing sweep (``hydra.sweeper.racing``), run as the job's replicate: kd's seed
    is the replicate itself (the sweep's ``racing.seeds`` are kd seeds). A launcher that
    trains jobs in its own process gives each job's environment in ``hydra.job.env_set``."""
    env = OmegaConf.select(cfg, "hydra.job.env_set", default=None) or {}
    seed = job.replicate({str(k): str(v) for k, v in env.items()}) if env else None
    seed = job.replicate() if seed is None else seed
    if seed is None:
        return
    if OmegaConf.select(cfg, "trial.seeds", default=None):
        raise ConfigError(RACING_AND_SEEDS)
    cfg.seed = seed


def epoch_reporter(env: Mapping[str, str] | None = None, pruner: Any = None) -> EpochReport | None:
    """``report(step, val_acc)`` for the job whose environment is ``env`` (this process's
    by default), raising :class:`Pruned` when told to stop; None outside a sweep."""
    if job.current(env, pruner=pruner) is None:
        return None

    def report(step: int, value: float) -> None:
        job.report(value, step, env=env)
        if job.should_prune(env=env):
            raise Pruned(step, value)

    return report


def record_measures(metrics: Mapping[str, Any], env: Mapping[str, str] | None = None) -> None:
    """Record a finished run's accuracies and costs on its trial (``job.record``), where
    ``hydra.sweeper.constraints`` can bound any of them; a no-op outside a sweep."""
    names = (*OBJECTIVES, *COST_OBJECTIVES)
    measured = {k: metrics[k] for k in names if isinstance(metrics.get(k), (int, float))}
    if measured:
        job.record(env, **measured)


def keep_run(output_dir: str | Path, metrics: Mapping[str, Any], env: Mapping[str, str] | None = None) -> None:
    """In a sweep that keeps artifacts (``hydra.sweeper.artifacts``), upload what
    ``python -m kd.export --study`` needs to rebuild the trial's student: its
    checkpoints, metrics.json and config. A no-op otherwise."""
    output_dir = Path(output_dir)
    checkpoints = [Path(r["checkpoint"]) for r in metrics.get("per_seed") or [] if r.get("checkpoint")]
    for path in (*checkpoints, output_dir / "metrics.json", output_dir / ".hydra" / "config.yaml"):
        if path.is_file() and job.upload(path, env) is None:
            return  # not a sweep that keeps artifacts


class ReportHint(Callback):
    """Ends every multirun's log with the command that tables and plots it."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        # Hydra calls this on the way out of an interrupted sweep too: that log ends on the
        # sweeper's line saying how to resume.
        stopping = sys.exc_info()[1]
        if isinstance(stopping, KeyboardInterrupt) or (isinstance(stopping, SystemExit) and stopping.code == 130):
            return
        if Path(str(config.hydra.sweep.dir)).is_dir():  # not for a sweep refused before its first job
            log.info("next: python -m kd.report %s", config.hydra.sweep.dir)
