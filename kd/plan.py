"""The composed config, resolved once into plain typed objects.

A run's orchestrator (:func:`kd.pipeline.run`, a population's jobs in
:mod:`kd.population_jobs`) checks the config (:func:`kd.config.validate`) and calls
:func:`resolve` once. Everything below it (recipes, the teacher's provisioning, the
population, the engine) reads the :class:`RunPlan`, never the config: each setting is
looked up, converted and defaulted in one place, here.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

from omegaconf import DictConfig, OmegaConf

from kd.config import (
    allowed_targets,
    build,
    degenerate_settings,
    objective_names,
    run_settings,
    validate,
    without_keys,
)
from kd.views import view_count


@dataclass(frozen=True)
class Recipe:
    """How one model is trained (the data and its split come from the context)."""

    model: DictConfig
    optim: DictConfig
    epochs: int
    batch_size: int
    seed: int
    augment: bool
    amp: bool | str  # trainer.amp / teacher.amp as configured: kd.devices.uses_bf16 resolves it
    schedule: DictConfig | None = None  # a per-step lr schedule; None: constant lr


@dataclass(frozen=True)
class TrainerOptions:
    """How training runs (speed, logging, resumption), never what it computes."""

    channels_last: bool
    compile: bool
    check_every: int
    progress: bool  # trainer.progress=auto resolved: bars only on a terminal
    resume: bool  # trainer.resume=auto
    checkpoint_every_s: float


@dataclass(frozen=True)
class TeacherPlan:
    recipe: Recipe  # its own seed, optimiser and epochs: never the run's
    checkpoint: str | None  # teacher.checkpoint; None: the store trains it once
    views: int | None  # cached augmented views per image; None: an online teacher
    view_seed: int


@dataclass(frozen=True)
class CostPlan:
    timing: bool
    batch_size: int
    min_run_time: float


@dataclass(frozen=True)
class RunPlan:
    """One run's config, resolved: what it trains, with what, and how."""

    student: Recipe  # the run's own model at its first seed (:meth:`recipe` for others)
    seeds: tuple[int, ...]
    loss: DictConfig
    teacher: TeacherPlan
    data: DictConfig
    split_seed: int
    trainer: TrainerOptions
    allowed: tuple[str, ...]  # what :meth:`build` may instantiate
    store_dir: str
    device: str
    num_threads: int | None
    flush_denormal: bool
    baseline: bool  # trial.baseline: a KD run trains its CE baseline per seed
    objectives: tuple[str, ...]
    cost: CostPlan
    logger: DictConfig | None
    settings: dict[str, Any]  # every result-deciding setting, flattened (kd.config.run_settings)
    warnings: tuple[str, ...]  # legal settings that cannot mean what they say

    def recipe(self, seed: int) -> Recipe:
        return replace(self.student, seed=seed)

    def build(self, node: Any, **kwargs: Any) -> Any:
        """``node`` instantiated under this run's allow-list."""
        return build(node, self.allowed, **kwargs)

    def new_loss(self) -> Any:
        return self.build(self.loss)

    def result_settings(self, exclude: Iterable[str] = ()) -> dict[str, Any]:
        """:attr:`settings` without the keys ``exclude`` names (and their sub-keys)."""
        return without_keys(self.settings, exclude)


def show_progress(setting: Any) -> bool:
    """``trainer.progress``: auto shows bars only on a terminal (none in redirected logs)."""
    return sys.stderr.isatty() if setting == "auto" else bool(setting)


def _teacher(cfg: DictConfig) -> TeacherPlan:
    t = cfg.teacher
    schedule = OmegaConf.select(t, "schedule", default=None)
    views = OmegaConf.select(t, "views", default="online")
    return TeacherPlan(
        recipe=Recipe(
            t.model, t.optim, int(t.epochs), int(t.batch_size), int(t.seed), bool(t.augment), t.amp, schedule
        ),
        checkpoint=str(t.checkpoint) if t.checkpoint else None,
        views=None if views == "online" else view_count() if views == "all" else int(views),
        view_seed=int(OmegaConf.select(t, "view_seed", default=0)),
    )


def _seeds(cfg: DictConfig) -> tuple[int, ...]:
    """The seeds one run trains its model with: ``trial.seeds``, or just ``seed``."""
    seeds = OmegaConf.select(cfg, "trial.seeds", default=None)
    return tuple(int(s) for s in seeds) if seeds else (int(cfg.seed),)


def resolve(cfg: DictConfig) -> RunPlan:
    """``cfg`` checked (:func:`kd.config.validate`: one line for the first bad value) and
    resolved into a :class:`RunPlan`."""
    validate(cfg)
    seeds = _seeds(cfg)
    trainer = cfg.trainer
    student = Recipe(
        cfg.model,
        cfg.optim,
        int(trainer.epochs),
        int(trainer.batch_size),
        seeds[0],
        bool(cfg.data.augment),
        trainer.amp,
        OmegaConf.select(cfg, "schedule", default=None),
    )
    return RunPlan(
        student=student,
        seeds=seeds,
        loss=cfg.loss,
        teacher=_teacher(cfg),
        data=cfg.data,
        split_seed=int(OmegaConf.select(cfg, "data.split_seed", default=0)),
        trainer=TrainerOptions(
            channels_last=bool(trainer.channels_last),
            compile=bool(trainer.compile),
            check_every=int(trainer.check_every),
            progress=show_progress(trainer.progress),
            resume=trainer.resume != "never",
            checkpoint_every_s=float(trainer.checkpoint_every_s),
        ),
        allowed=allowed_targets(cfg),
        store_dir=str(cfg.paths.store_dir),
        device=str(trainer.device),
        num_threads=int(trainer.num_threads) if trainer.num_threads else None,
        flush_denormal=bool(trainer.flush_denormal),
        baseline=bool(cfg.trial.baseline),
        objectives=tuple(objective_names(cfg)),
        cost=CostPlan(bool(cfg.cost.timing), int(cfg.cost.batch_size), float(cfg.cost.min_run_time)),
        logger=OmegaConf.select(cfg, "logger", default=None) or None,
        settings=run_settings(cfg),
        warnings=tuple(degenerate_settings(cfg)),
    )
