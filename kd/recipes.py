"""Recipes: what one training is and how it runs.

A model is trained from a :class:`~kd.plan.Recipe` (model, optimiser, epochs, batch size,
seed, augmentation, amp) in a :class:`Context` (the run's plan, the device and the data
on it): :func:`new_model` and :func:`new_optimizer` build what the recipe names, and
:func:`train_model` trains and evaluates it. The teacher has a recipe of its own
(``teacher.*``, :class:`kd.plan.TeacherPlan`), so a run's seed, optimiser and loss never
change which teacher it uses. Nothing here reads the config (:func:`kd.plan.resolve`
did). Single runs (:mod:`kd.pipeline`) and populations (:mod:`kd.population`) both
build from here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from kd import identity
from kd.batches import BatchStream, Preprocess, batches_per_epoch
from kd.data import Dataset
from kd.devices import uses_bf16
from kd.engine import FitResult, TeacherSignal, accuracy, fit
from kd.errors import ConfigError
from kd.models import dropout_generator, seed_dropout
from kd.plan import Recipe, RunPlan
from kd.resume import ResumeFile
from kd.views import CachedViews, RandomViews


@dataclass
class Context:
    """What every training in one run shares: its plan, the device and the data on it."""

    plan: RunPlan
    device: torch.device
    data: Dataset
    preprocess: Preprocess
    train_images: torch.Tensor  # on the device
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.plan.trainer.channels_last else torch.contiguous_format


@dataclass
class Trained:
    model: nn.Module
    fit: FitResult
    val_acc: float
    test_acc: float


def model_target(model: DictConfig) -> str:
    return str(model._target_)


def data_identity(data: Dataset) -> dict:
    return {
        "contents": data.fingerprint,
        "held_out": identity.held_out_digest(data.val_idx),
        "val_size": len(data.val_idx),
        "mean": list(data.mean),
        "std": list(data.std),
    }


def recipe_spec(recipe: Recipe, ctx: Context) -> dict:
    """Everything that changes a CE-trained model's weights, and nothing else: its store
    address. Left out on purpose: device, threads, channels_last, compile, progress and
    check_every (speed and logging only), and every key of the student or its loss."""
    spec = {
        "model": OmegaConf.to_container(recipe.model, resolve=True),
        "model_source": identity.source_digest(model_target(recipe.model)),
        "data": data_identity(ctx.data),
        "optim": OmegaConf.to_container(recipe.optim, resolve=True),
        "epochs": recipe.epochs,
        "batch_size": recipe.batch_size,
        "seed": recipe.seed,
        "augment": recipe.augment,
        "amp": uses_bf16(recipe.amp, ctx.device),  # whether autocast ran, not the setting
    }
    if recipe.schedule is not None:  # absent for a constant lr: older addresses stay valid
        spec["schedule"] = OmegaConf.to_container(recipe.schedule, resolve=True)
    return spec


def new_model(recipe: Recipe, ctx: Context) -> nn.Module:
    """``recipe``'s model as its training starts: initialised from its seed, on the
    device, its dropout masks drawn from a generator of its own (same in a population)."""
    torch.manual_seed(recipe.seed)
    model = ctx.plan.build(recipe.model, num_classes=ctx.data.num_classes)
    model = model.to(ctx.device, memory_format=ctx.memory_format)
    _check_input_size(model, ctx)
    seed_dropout(model, dropout_generator(recipe.seed, ctx.device))
    return model


def _check_input_size(model: nn.Module, ctx: Context) -> None:
    """One forward pass on one blank image: a model that cannot take the data's image
    size (LightNN's fixed linear layer at 64 px) is refused in one line, not mid-epoch."""
    shape = image_shape(ctx)
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, *shape, device=ctx.device))
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(
            f"{type(model).__name__} cannot take the data's {'x'.join(map(str, shape))} images ({first}): "
            "choose a model with global pooling (resnet20, wrn_16_2, torchvision) or set data.image_size=32"
        ) from None
    finally:
        model.train(was_training)


def new_optimizer(
    recipe: Recipe, ctx: Context, params: list[torch.Tensor], total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler | None]:
    """``recipe``'s torch optimiser over ``params`` and its per-step schedule (or None)."""
    optimizer = ctx.plan.build(recipe.optim)(params)
    if recipe.schedule is None:
        return optimizer, None
    check_phases(recipe.schedule, total_steps)
    return optimizer, ctx.plan.build(recipe.schedule)(optimizer, total_steps=total_steps)


def check_phases(schedule: DictConfig, total_steps: int) -> None:
    """A one-cycle schedule whose warm-up ends exactly at step 0 (``pct_start x steps =
    1``) divides by zero on its first steps in torch: refuse it in one line."""
    pct_start = OmegaConf.select(schedule, "pct_start", default=None)
    if pct_start is None or not str(schedule._target_).endswith("OneCycleLR"):
        return
    if float(pct_start) * total_steps - 1 == 0:
        raise ConfigError(
            f"schedule=onecycle over {total_steps} optimiser steps with pct_start={pct_start} leaves its warm-up "
            "no step; train more steps (trainer.epochs, a smaller trainer.batch_size) or change schedule.pct_start"
        )


def check_steps(recipe: Recipe, ctx: Context) -> None:
    """Refuse a recipe whose schedule cannot run over its optimiser steps before any
    teacher, view or logit work: it needs the training split's size and nothing else."""
    if recipe.schedule is not None:
        check_phases(recipe.schedule, recipe.epochs * batches_per_epoch(len(ctx.data.train_idx), recipe.batch_size))


def train_model(
    recipe: Recipe,
    loss_fn: nn.Module,
    ctx: Context,
    teacher: TeacherSource | None = None,
    desc: str = "train",
    on_epoch: Callable[[dict], None] | None = None,
    resume: ResumeFile | None = None,
) -> Trained:
    options, data, device = ctx.plan.trainer, ctx.data, ctx.device
    model = new_model(recipe, ctx)
    loss_fn = loss_fn.to(device)
    batches = BatchStream(ctx.train_images, ctx.train_labels, data.train_idx, recipe.batch_size, seed=recipe.seed)
    # A loss's own trainable parts (a regressor) learn with the student, but are not
    # part of it: not counted in its parameters, not saved in its checkpoint.
    params = [*model.parameters(), *loss_fn.parameters()]
    optimizer, scheduler = new_optimizer(recipe, ctx, params, total_steps=recipe.epochs * len(batches))
    runner = torch.compile(model) if options.compile else model
    val_images = ctx.train_images[data.val_idx.to(device)]
    val_labels = ctx.train_labels[data.val_idx.to(device)]

    def validate_now() -> float:
        return accuracy(model, val_images, val_labels, ctx.preprocess)

    result = fit(
        runner,
        loss_fn,
        optimizer,
        batches,
        ctx.preprocess,
        recipe.epochs,
        teacher=teacher.signal if teacher is not None else None,
        scheduler=scheduler,
        augment=_augmentation(recipe, teacher),
        validate=validate_now if len(data.val_idx) else None,
        amp=uses_bf16(recipe.amp, device),
        check_every=options.check_every,
        progress=options.progress,
        desc=desc,
        on_epoch=on_epoch,
        resume=resume,
    )
    # The last epoch's validation already evaluated this very model (eval mode, no dropout).
    val_acc = result.history[-1]["val_acc"] if len(data.val_idx) else float("nan")
    test_acc = accuracy(model, ctx.test_images, ctx.test_labels, ctx.preprocess)
    return Trained(model, result, val_acc, test_acc)


def resume_file(ctx: Context, key: str) -> ResumeFile:
    """Where the training addressed by ``key`` keeps its resumable state (trainer.resume,
    trainer.checkpoint_every_s)."""
    options = ctx.plan.trainer
    return ResumeFile(
        Path(ctx.plan.store_dir) / "resume" / f"{key}.pt",
        every_s=options.checkpoint_every_s,
        enabled=options.resume,
    )


def run_model_key(ctx: Context, seed: int) -> str:
    """What a run's own model training computes: every result-deciding setting, its data
    and its seed (the same key in any run directory)."""
    settings = ctx.plan.result_settings(exclude=("seed", "trial.seeds"))
    return identity.key("run", settings=settings, data=data_identity(ctx.data), seed=seed)


def _augmentation(recipe: Recipe, teacher: TeacherSource | None) -> CachedViews | RandomViews | None:
    if not recipe.augment:
        return None
    if teacher is not None and teacher.views is not None:
        return CachedViews(teacher.views, seed=recipe.seed)  # the views the teacher's logits are cached for
    return RandomViews(seed=recipe.seed)


@dataclass
class TeacherSource:
    """Where a KD run's teacher outputs come from, and what it records about them."""

    signal: TeacherSignal
    info: dict[str, Any]
    # Augmented KD from cached views: each training image's K view ids [N, K] (on the
    # device); the student then trains on these views only. None: any view, or none.
    views: torch.Tensor | None = None


def make_context(plan: RunPlan, device: torch.device) -> Context:
    """Load the planned data once and put it on ``device`` (the whole set; it is small)."""
    data: Dataset = plan.build(plan.data).load()
    return Context(
        plan=plan,
        device=device,
        data=data,
        preprocess=Preprocess(data.mean, data.std, device, channels_last=plan.trainer.channels_last),
        train_images=data.train.images.to(device),
        train_labels=data.train.labels.to(device),
        test_images=data.test.images.to(device),
        test_labels=data.test.labels.to(device),
    )


def image_shape(ctx: Context) -> tuple[int, ...]:
    """One input image's shape (channels, height, width)."""
    return tuple(ctx.train_images.shape[1:])
