"""Turns a composed config into objects, trains, evaluates, writes ``metrics.json``.

This is the one place that reads the config; the engine, losses and models see only
plain objects and tensors.

A model is trained from a :class:`Recipe` (model, optimiser, epochs, batch size, seed,
augmentation, amp). The teacher has a recipe of its own (``teacher.*``), so the
student's seed, optimiser, epochs and loss never change which teacher is used; a KD
run's CE baseline is the run's own recipe trained with cross-entropy. Both live in
the store, addressed by :func:`recipe_spec`, and are trained at most once.
"""

from __future__ import annotations

import logging
import math
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from tqdm import tqdm

from kd import identity
from kd.cluster import ended_before, slurm_job
from kd.config import build, degenerate_settings, objective_names, run_settings, trial_seeds, validate
from kd.cost import count_parameters, flops_per_image, measure
from kd.data import BatchStream, Dataset, Preprocess, batches_per_epoch
from kd.devices import select_device, threads_per_job, use_cpu, uses_bf16
from kd.engine import FitResult, TeacherSignal, accuracy, fit, predict_features, predict_logits
from kd.errors import CheckpointError, ConfigError, Diverged, Pruned
from kd.losses import CrossEntropy
from kd.models import dropout_generator, seed_dropout
from kd.models.features import TEACHER_LAYER, check_layers, with_features
from kd.resume import ResumeFile
from kd.stats import describe, fmt_difference, fmt_mean_se, paired_difference
from kd.storage import check_writable, dict_fits, file_digest, save_checked, tensor_fits, write_json
from kd.teacher import TeacherStore, load_checkpoint, make_checkpoint, restore_model
from kd.tracking import NullLogger
from kd.views import CachedViews, RandomViews, view_count, view_orders

log = logging.getLogger(__name__)


@dataclass
class Context:
    """What every training in one run shares: config, device and the data on it."""

    cfg: DictConfig
    device: torch.device
    data: Dataset
    preprocess: Preprocess
    train_images: torch.Tensor  # on the device
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.cfg.trainer.channels_last else torch.contiguous_format


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


@dataclass
class Trained:
    model: nn.Module
    fit: FitResult
    val_acc: float
    test_acc: float


def _target(model_cfg: DictConfig) -> str:
    return str(model_cfg._target_)


def teacher_recipe(cfg: DictConfig) -> Recipe:
    t = cfg.teacher
    schedule = OmegaConf.select(t, "schedule", default=None)
    return Recipe(t.model, t.optim, int(t.epochs), int(t.batch_size), int(t.seed), bool(t.augment), t.amp, schedule)


def run_recipe(cfg: DictConfig, seed: int) -> Recipe:
    """This run's own model, trained with the run's optimiser and trainer settings."""
    return Recipe(
        cfg.model,
        cfg.optim,
        int(cfg.trainer.epochs),
        int(cfg.trainer.batch_size),
        seed,
        bool(cfg.data.augment),
        cfg.trainer.amp,
        OmegaConf.select(cfg, "schedule", default=None),
    )


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
        "model_source": identity.source_digest(_target(recipe.model)),
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


def show_progress(setting: Any) -> bool:
    """``trainer.progress``: auto shows bars only on a terminal (none in redirected logs)."""
    return sys.stderr.isatty() if setting == "auto" else bool(setting)


def new_model(recipe: Recipe, ctx: Context) -> nn.Module:
    """``recipe``'s model as its training starts: initialised from its seed, on the
    device, its dropout masks drawn from a generator of its own (same in a population)."""
    torch.manual_seed(recipe.seed)
    model = build(recipe.model, ctx.cfg, num_classes=ctx.data.num_classes)
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
    optimizer = build(recipe.optim, ctx.cfg)(params)
    if recipe.schedule is None:
        return optimizer, None
    check_phases(recipe.schedule, total_steps)
    return optimizer, build(recipe.schedule, ctx.cfg)(optimizer, total_steps=total_steps)


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
    cfg, data, device = ctx.cfg, ctx.data, ctx.device
    model = new_model(recipe, ctx)
    loss_fn = loss_fn.to(device)
    batches = BatchStream(ctx.train_images, ctx.train_labels, data.train_idx, recipe.batch_size, seed=recipe.seed)
    # A loss's own trainable parts (a regressor) learn with the student, but are not
    # part of it: not counted in its parameters, not saved in its checkpoint.
    params = [*model.parameters(), *loss_fn.parameters()]
    optimizer, scheduler = new_optimizer(recipe, ctx, params, total_steps=recipe.epochs * len(batches))
    runner = torch.compile(model) if cfg.trainer.compile else model
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
        check_every=int(cfg.trainer.check_every),
        progress=show_progress(cfg.trainer.progress),
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
    trainer = ctx.cfg.trainer
    return ResumeFile(
        Path(ctx.cfg.paths.store_dir) / "resume" / f"{key}.pt",
        every_s=float(trainer.checkpoint_every_s),
        enabled=trainer.resume != "never",
    )


def run_model_key(cfg: DictConfig, ctx: Context, seed: int) -> str:
    """What a run's own model training computes: every result-deciding setting, its data
    and its seed (the same key in any run directory)."""
    settings = run_settings(cfg, exclude=("seed", "trial.seeds"))
    return identity.key("run", settings=settings, data=data_identity(ctx.data), seed=seed)


def _augmentation(recipe: Recipe, teacher: TeacherSource | None) -> CachedViews | RandomViews | None:
    if not recipe.augment:
        return None
    if teacher is not None and teacher.views is not None:
        return CachedViews(teacher.views, seed=recipe.seed)  # the views the teacher's logits are cached for
    return RandomViews(seed=recipe.seed)


def _checkpoint(trained: Trained, recipe: Recipe, ctx: Context) -> dict:
    return make_checkpoint(
        trained.model,
        _target(recipe.model),
        ctx.data.num_classes,
        params=count_parameters(trained.model),
        flops=flops_per_image(trained.model, image_shape(ctx)),
        val_acc=_finite_or_none(trained.val_acc),
        test_acc=trained.test_acc,
        train_seconds=trained.fit.train_seconds,
        spec=recipe_spec(recipe, ctx),
    )


def stored_ce_model(recipe: Recipe, ctx: Context, store: TeacherStore, desc: str) -> tuple[dict, bool]:
    """The CE-trained model of ``recipe`` from the store, trained once if absent."""
    key = identity.key("model", **recipe_spec(recipe, ctx))

    resume = resume_file(ctx, f"store-{key}")

    def train_once() -> dict:
        log.info("%s %s is not in the store: training it once", desc, key)
        return _checkpoint(train_model(recipe, CrossEntropy(), ctx, desc=desc, resume=resume), recipe, ctx)

    checkpoint, built = store.get_or_build(key, train_once)
    resume.remove()  # stored: nothing left to resume
    checkpoint["path"] = str(store.checkpoint_path(key))
    return checkpoint, built


def check_teacher_split(checkpoint: dict, ctx: Context) -> str | None:
    """Refuse a teacher that trained on this run's validation images; return a warning
    when that cannot be checked (a checkpoint with no record, or other data)."""
    n_val = len(ctx.data.val_idx)
    if n_val == 0:
        return None
    where = checkpoint.get("path", "the teacher checkpoint")
    recorded = (checkpoint.get("spec") or {}).get("data")
    if not isinstance(recorded, dict):
        return (
            f"teacher.checkpoint={where} records no training split: if it saw the {n_val} validation "
            "images, val_acc is inflated"
        )
    ours = data_identity(ctx.data)
    if recorded.get("contents") != ours["contents"]:
        return f"teacher.checkpoint={where} was trained on other data: cannot check it never saw the validation images"
    if "held_out" in recorded:
        same_split = recorded["held_out"] == ours["held_out"]
    else:  # recorded before held_out existed
        same_split = recorded.get("val_size") == n_val and recorded.get("split_seed") == ctx.cfg.data.split_seed
    if not same_split:
        raise CheckpointError(
            f"teacher.checkpoint={where} was trained on this run's validation images "
            f"(it held out {recorded.get('val_size')} images, not these {n_val}); use the store "
            "(teacher.checkpoint=null) or a teacher trained with the same data.val_size and data.split_seed"
        )
    return None


@dataclass
class TeacherSource:
    """Where a KD run's teacher outputs come from, and what it records about them."""

    signal: TeacherSignal
    info: dict[str, Any]
    # Augmented KD from cached views: each training image's K view ids [N, K] (on the
    # device); the student then trains on these views only. None: any view, or none.
    views: torch.Tensor | None = None


def _teacher_views(cfg: DictConfig) -> int | None:
    """``teacher.views`` as a count of cached views; None for an online teacher."""
    setting = OmegaConf.select(cfg, "teacher.views", default="online")
    if setting == "online":
        return None
    return view_count() if setting == "all" else int(setting)


def _load_teacher(ctx: Context, store: TeacherStore) -> tuple[nn.Module, dict, dict]:
    """The teacher in eval mode on the device, its checkpoint, and what metrics.json
    records of it: from ``teacher.checkpoint``, else from the store (trained once)."""
    cfg, data = ctx.cfg, ctx.data
    recipe = teacher_recipe(cfg)
    info: dict[str, Any] = {}
    if cfg.teacher.checkpoint:
        checkpoint = load_checkpoint(cfg.teacher.checkpoint)
        warning = check_teacher_split(checkpoint, ctx)
        if warning:
            log.warning("%s", warning)
            info["teacher_warning"] = warning
        source = "checkpoint"
    else:
        checkpoint, built = stored_ce_model(recipe, ctx, store, desc="teacher")
        checkpoint["digest"] = file_digest(checkpoint["path"])
        source = "trained" if built else "store"
    teacher = build(recipe.model, cfg, num_classes=data.num_classes)
    restore_model(checkpoint, teacher, _target(recipe.model), data.num_classes)
    teacher = teacher.to(ctx.device, memory_format=ctx.memory_format).eval()
    info.update(
        teacher_checkpoint=checkpoint["path"],
        teacher_source=source,
        teacher_val_acc=checkpoint.get("val_acc"),
        teacher_test_acc=checkpoint.get("test_acc"),
        teacher_params=count_parameters(teacher),
        # Stored with kd's own teachers; counted here for one from elsewhere.
        teacher_flops=checkpoint.get("flops") or flops_per_image(teacher, image_shape(ctx)),
    )
    accs = ", ".join(f"{k} {checkpoint[k]:.2f}%" for k in ("val_acc", "test_acc") if checkpoint.get(k) is not None)
    log.info("teacher: %s (%s%s)", checkpoint["path"], source, f"; {accs}" if accs else "")
    return teacher, checkpoint, info


def prepare_teacher(ctx: Context, store: TeacherStore, feature_names: tuple[str, ...] = ()) -> TeacherSource:
    """Load, find or train the teacher; serve its logits (and the named intermediate
    features a loss asks for) from the cache when exact: per view with augmentation."""
    cfg, data, device = ctx.cfg, ctx.data, ctx.device
    if feature_names:  # a wrong layer name is refused before a teacher is trained
        check_layers(build(teacher_recipe(cfg).model, cfg, num_classes=data.num_classes), feature_names, TEACHER_LAYER)
    teacher, checkpoint, info = _load_teacher(ctx, store)
    data_key = f"{data.fingerprint}\0{data.mean}\0{data.std}"

    if data.augment:
        k = _teacher_views(cfg)
        if k is not None and not feature_names:
            return _cached_views(ctx, store, teacher, checkpoint["digest"], data_key, k, info)
        # Fresh random views every step, or features per view (too large to cache).
        why = "teacher.views=online" if k is None else f"loss {cfg.loss._target_} reads teacher features"
        log.info("data.augment with %s: running the teacher online at every step", why)

        forward = with_features(teacher, feature_names, TEACHER_LAYER)

        @torch.no_grad()
        def online(idx: torch.Tensor, inputs: torch.Tensor, slots: torch.Tensor | None) -> tuple:
            return forward(inputs)

        info["teacher_signal"] = "online"
        return TeacherSource(online, info)

    examples, classes = len(ctx.train_images), data.num_classes
    logits, computed = store.logits(
        checkpoint["digest"],
        data_key,
        lambda: predict_logits(teacher, ctx.train_images, ctx.preprocess).cpu(),
        tensor_fits((examples, classes), (torch.float32,)),
    )
    logits = logits.to(device)
    log.info("teacher logits: %s", "computed and cached" if computed else "read from cache")
    features: dict[str, torch.Tensor] = {}
    if feature_names:
        cached, computed = store.logits(
            checkpoint["digest"],
            f"{data_key}\0features:{','.join(feature_names)}",
            lambda: predict_features(teacher, ctx.train_images, ctx.preprocess, feature_names),
            dict_fits(**{name: tensor_fits((examples, ...), (torch.float16,)) for name in feature_names}),
        )
        features = {name: cached[name].to(device) for name in feature_names}  # float16 on the device
        log.info("teacher features %s: %s", feature_names, "computed and cached" if computed else "read from cache")
    info["teacher_signal"] = "cache"

    def cached_signal(idx: torch.Tensor, inputs: torch.Tensor, slots: torch.Tensor | None) -> tuple:
        return logits[idx], {name: values[idx] for name, values in features.items()}

    return TeacherSource(cached_signal, info)


def _cached_views(
    ctx: Context, store: TeacherStore, teacher: nn.Module, digest: str, data_key: str, k: int, info: dict[str, Any]
) -> TeacherSource:
    """The teacher's logits for K fixed views of every training image, from the store
    (computed once, view by view, resumably)."""
    view_seed = int(OmegaConf.select(ctx.cfg, "teacher.view_seed", default=0))
    bar = tqdm(total=k, desc="teacher views", disable=not show_progress(ctx.cfg.trainer.progress), leave=False)
    started = time.perf_counter()

    def on_column(column: int, built: bool) -> None:
        bar.update(1)
        if built:
            log.info(
                "teacher view %d/%d computed and cached (%.0f s so far)", column + 1, k, time.perf_counter() - started
            )

    def column(views: torch.Tensor) -> torch.Tensor:
        return predict_logits(teacher, ctx.train_images, ctx.preprocess, views=views.to(ctx.device)).half().cpu()

    logits, orders = store.view_logits(
        digest,
        data_key,
        view_seed,
        k,
        lambda: view_orders(len(ctx.train_images), view_seed),
        column,
        (len(ctx.train_images), ctx.data.num_classes),
        on_column,
    )
    bar.close()
    logits, orders = logits.to(ctx.device), orders.to(ctx.device)
    log.info("teacher logits for %d view(s) per image ready (%.0f s)", k, time.perf_counter() - started)
    info.update(teacher_signal="views", teacher_views=k, teacher_view_seed=view_seed)

    def view_signal(idx: torch.Tensor, inputs: torch.Tensor, slots: torch.Tensor | None) -> tuple:
        return logits[idx, slots].float(), {}

    return TeacherSource(view_signal, info, views=orders)


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def make_context(cfg: DictConfig, device: torch.device) -> Context:
    """Load the configured data once and put it on ``device`` (the whole set; it is small)."""
    data: Dataset = build(cfg.data, cfg).load()
    return Context(
        cfg=cfg,
        device=device,
        data=data,
        preprocess=Preprocess(data.mean, data.std, device, channels_last=bool(cfg.trainer.channels_last)),
        train_images=data.train.images.to(device),
        train_labels=data.train.labels.to(device),
        test_images=data.test.images.to(device),
        test_labels=data.test.labels.to(device),
    )


def _summarise_seeds(per_seed: list[dict], with_baseline: bool) -> dict[str, Any]:
    """Mean, spread and (for KD) the paired difference to the CE baseline over seeds."""
    out: dict[str, Any] = {}
    for split in ("val_acc", "test_acc"):
        values = [s[split] for s in per_seed if s[split] is not None]
        stats = describe(values)
        out[split], out[f"{split}_std"], out[f"{split}_se"] = stats["mean"], stats["std"], stats["se"]
    if with_baseline:
        out["baseline"] = {}
        out["kd_minus_ce"] = {}
        for split in ("val_acc", "test_acc"):
            pairs = [(s[split], s["baseline"][split]) for s in per_seed if s[split] is not None]
            pairs = [(a, b) for a, b in pairs if b is not None]
            out["baseline"][split] = describe([b for _, b in pairs])["mean"]
            out["kd_minus_ce"][split] = (
                paired_difference([a for a, _ in pairs], [b for _, b in pairs]) if pairs else None
            )
    return out


# Called after each epoch of the run's own model with (step, validation accuracy):
# the sweeper's trial reporter, which may raise Pruned.
EpochReport = Callable[[int, float], None]


def _run_header(cfg: DictConfig, ctx: Context, loss_fn: nn.Module, seeds: list[int], threads: int) -> dict:
    """metrics.json's fields known before training: what runs, on what, where."""
    data, device = ctx.data, ctx.device
    hparams = loss_fn.hparams()
    model_name = _target(cfg.model).rsplit(".", 1)[-1]
    bf16 = uses_bf16(cfg.trainer.amp, device)
    if loss_fn.needs_teacher:  # refused here, not after an hour of student training
        uses_bf16(cfg.teacher.amp, device, key="teacher.amp")
    metrics: dict[str, Any] = {
        "model": model_name,
        "loss": loss_fn.name,
        "loss_hparams": hparams,
        "temperature": hparams.get("temperature"),
        "alpha": hparams.get("alpha"),
        "epochs": int(cfg.trainer.epochs),
        "batch_size": int(cfg.trainer.batch_size),
        "lr": float(cfg.optim.lr),
        "seed": seeds[0],
        "seeds": seeds,
        "dataset": data.name,
        "train_examples": len(data.train_idx),
        "val_examples": len(data.val_idx),
        "test_examples": len(data.test.labels),
        "input_shape": list(image_shape(ctx)),
        "objective": objective_names(cfg)[0] if len(objective_names(cfg)) == 1 else objective_names(cfg),
        "device": str(device),
        "num_threads": int(threads),
        "amp": "bf16" if bf16 else "off",  # trainer.amp as it resolved on this device
        "host": platform.node(),
        **slurm_job(),
        # Every result-deciding setting but the seed: the report's grouping key.
        "settings": run_settings(cfg, exclude=("seed", "trial.seeds")),
    }
    log.info(
        "device %s, %d threads%s, %s: %d train / %d val / %d test; seeds %s",
        device,
        threads,
        f", bf16 autocast (trainer.amp={cfg.trainer.amp})" if bf16 else "",
        data.name,
        len(data.train_idx),
        len(data.val_idx),
        len(data.test.labels),
        seeds,
    )
    return metrics


def _publish(store: TeacherStore, checkpoint: dict) -> None:
    """A CE-trained model is exactly what the store would build from its recipe (as a
    teacher, or as a KD run's baseline): publish it, never losing the run for it."""
    key = identity.key("model", **checkpoint["spec"])
    try:
        if store.publish(key, checkpoint):
            log.info("published to the store as %s (a later KD run reuses it)", key)
    except OSError as err:
        log.warning("could not publish to the store %s (%s); the run's results are kept", store.root, err)


def _baseline(recipe: Recipe, ctx: Context, store: TeacherStore, seed: int) -> dict:
    """The CE student of the same seed and recipe (from the store, trained once)."""
    base, built = stored_ce_model(recipe, ctx, store, desc=f"CE baseline seed {seed}")
    return {
        "val_acc": base.get("val_acc"),
        "test_acc": base.get("test_acc"),
        "checkpoint": base["path"],
        "source": "trained" if built else "store",
    }


def _stop_fields(err: Diverged | Pruned) -> dict:
    """metrics.json's record of where a run stopped early."""
    if isinstance(err, Diverged):
        return {
            "status": "diverged",
            "diverged_phase": err.phase,
            "diverged_epoch": err.epoch,
            "diverged_step": err.step,
            "diverged_loss": err.value,
        }
    # Steps are epochs, counted over the seeds.
    return {"status": "pruned", "pruned_step": err.step, "pruned_val_acc": err.value, "epochs_trained": err.step}


def _ended_job_outcome(output_dir: Path) -> dict | None:
    """What this SLURM job ended with when it ran before (see kd.cluster.ended_before),
    given again without training; None when it has not ended before."""
    earlier = ended_before(output_dir)
    if earlier is None:
        return None
    log.info(
        "SLURM started this job again after it had ended (%s): its results stand, nothing is trained; %s",
        earlier["status"],
        output_dir / "metrics.json",
    )
    return _recorded_outcome(earlier)


def _recorded_outcome(metrics: dict) -> dict:
    """A run's recorded end, given again: its metrics for a completed run, else the
    Pruned / Diverged it stopped with (the inverse of :func:`_stop_fields`)."""
    if metrics["status"] == "pruned":
        raise Pruned(metrics["pruned_step"], metrics["pruned_val_acc"])
    if metrics["status"] == "diverged":
        raise Diverged(
            metrics["diverged_epoch"],
            metrics["diverged_step"],
            metrics.get("diverged_loss", float("nan")),
            metrics["diverged_phase"],
        )
    return metrics


def _log_summary(model_name: str, n_seeds: int, summary: dict, with_baseline: bool) -> None:
    n = f" ({n_seeds} seeds, mean ± SE)" if n_seeds > 1 else ""
    log.info(
        "%s%s: val acc %s, test acc %s",
        model_name,
        n,
        fmt_mean_se({"mean": summary["val_acc"], "se": summary["val_acc_se"]}),
        fmt_mean_se({"mean": summary["test_acc"], "se": summary["test_acc_se"]}),
    )
    if with_baseline:
        split = "val_acc" if summary["val_acc"] is not None else "test_acc"
        log.info("KD - CE (%s, paired over seeds, 95%% CI): %s", split, fmt_difference(summary["kd_minus_ce"][split]))


@dataclass
class SeedJob:
    """What every seed of one run shares."""

    ctx: Context
    store: TeacherStore
    tracker: Any
    report: EpochReport | None
    teacher: TeacherSource | None
    output_dir: Path
    model_name: str
    n_seeds: int
    with_baseline: bool


def _run_seed(
    cfg: DictConfig, job: SeedJob, index: int, seed: int, resume: ResumeFile, outcome: Any = None
) -> tuple[Trained, dict]:
    """Train seed ``seed``'s model (or take the population's ``outcome`` for it), save
    it, and return it with its per-seed record (with its CE baseline for KD)."""
    recipe = run_recipe(cfg, seed)
    desc = f"{job.model_name} seed {seed}" if job.n_seeds > 1 else job.model_name
    offset = index * recipe.epochs  # seed i's epoch e is step i * epochs + e

    def on_epoch(entry: dict) -> None:
        job.tracker.log_epoch(offset + entry["epoch"], {**entry, "seed": seed})
        if job.report is not None and "val_acc" in entry:
            job.report(offset + entry["epoch"], entry["val_acc"])

    torch.manual_seed(seed)
    loss_fn = build(cfg.loss, cfg)
    if outcome is not None:
        if isinstance(outcome, BaseException):
            raise outcome
        trained = outcome
        for entry in trained.fit.history:  # the population already reported to the trial
            job.tracker.log_epoch(offset + entry["epoch"], {**entry, "seed": seed})
    else:
        trained = train_model(
            recipe, loss_fn, job.ctx, teacher=job.teacher, desc=desc, on_epoch=on_epoch, resume=resume
        )
    checkpoint = _checkpoint(trained, recipe, job.ctx)
    path = job.output_dir / ("model.pt" if job.n_seeds == 1 else f"model_seed{seed}.pt")
    save_checked(checkpoint, path)
    record: dict[str, Any] = {
        "seed": seed,
        "val_acc": _finite_or_none(trained.val_acc),
        "test_acc": trained.test_acc,
        "train_seconds": trained.fit.train_seconds,
        "checkpoint": str(path),
        "history": trained.fit.history,
    }
    if not loss_fn.needs_teacher:
        _publish(job.store, checkpoint)
    elif job.with_baseline:
        record["baseline"] = _baseline(recipe, job.ctx, job.store, seed)
    return trained, record


def _write_results(metrics: dict, job: SeedJob, resumes: list[ResumeFile]) -> None:
    """metrics.json, then the resume files go (nothing left to resume), then the tracker."""
    write_json(job.output_dir / "metrics.json", metrics)
    for resume in resumes:
        resume.remove()
    job.tracker.finish(metrics)


def _finish(
    cfg: DictConfig,
    metrics: dict,
    per_seed: list[dict],
    trained: Trained,
    job: SeedJob,
    resumes: list[ResumeFile],
    started: float,
) -> None:
    """Summarise the seeds into ``metrics``, write metrics.json, drop the resume files."""
    summary = _summarise_seeds(per_seed, job.with_baseline)
    metrics.update(
        status="completed",
        **_cost(cfg, trained.model, job.ctx),
        per_seed=per_seed,
        **summary,
        train_seconds=sum(s["train_seconds"] for s in per_seed) / len(per_seed),
        epochs_trained=len(per_seed) * int(cfg.trainer.epochs),
        wall_seconds=time.time() - started,
        history=per_seed[0]["history"],
        checkpoint=per_seed[0]["checkpoint"],
    )
    objective = [metrics[name] for name in objective_names(cfg)]
    metrics["objective_value"] = objective if len(objective) > 1 else objective[0]
    _write_results(metrics, job, resumes)
    _log_summary(job.model_name, job.n_seeds, summary, job.with_baseline)


def _cost(cfg: DictConfig, model: nn.Module, ctx: Context) -> dict[str, Any]:
    """The trained model's params and FLOPs per image, and (``cost.timing``) its latency
    and throughput on this run's device and threads."""
    cost = measure(
        model,
        image_shape(ctx),
        timing=bool(cfg.cost.timing),
        batch_size=int(cfg.cost.batch_size),
        min_run_time=float(cfg.cost.min_run_time),
        memory_format=ctx.memory_format,
    )
    timed = (
        f", {cost['latency_ms']:.3g} ms per image (batch 1), {cost['throughput']:,.0f} images/s "
        f"(batch {cfg.cost.batch_size}) on {cost['cost']['device']} with {cost['cost']['threads']} threads"
        if "latency_ms" in cost
        else ""
    )
    log.info("cost: %s params, %s FLOPs per image%s", f"{cost['params']:,}", f"{cost['flops']:,}", timed)
    return cost


def image_shape(ctx: Context) -> tuple[int, ...]:
    """One input image's shape (channels, height, width)."""
    return tuple(ctx.train_images.shape[1:])


def _preflight(cfg: DictConfig, output_dir: Path) -> None:
    """Before any work: refuse bad values and unwritable destinations in one line, and
    warn about legal settings that cannot mean what they say."""
    validate(cfg)
    check_writable(output_dir, "hydra.run.dir (hydra.sweep.dir in a multirun)")
    check_writable(cfg.paths.store_dir, "paths.store_dir (or KD_STORE_DIR, KD_CACHE_DIR)")
    for warning in degenerate_settings(cfg):
        log.warning("%s", warning)


def _start_tracker(cfg: DictConfig, output_dir: Path, tags: dict[str, Any] | None) -> Any:
    """The run's tracker (``logger``), started: a destination it cannot use stops the run here."""
    logger_cfg = OmegaConf.select(cfg, "logger", default=None)
    tracker = build(logger_cfg, cfg, output_dir=output_dir) if logger_cfg else NullLogger()
    tracker.start(run_settings(cfg), {"run_dir": str(output_dir), **(tags or {})})
    return tracker


def run(
    cfg: DictConfig,
    output_dir: str | Path,
    job_num: int = 0,
    parallel_jobs: int = 1,
    report: EpochReport | None = None,
    tags: dict[str, Any] | None = None,
    context: Context | None = None,
    teacher_source: TeacherSource | None = None,
    pretrained: dict[int, Trained | BaseException] | None = None,
) -> dict:
    """Train and evaluate the configured model once per seed; returns the metrics written.

    ``report`` gets each epoch's validation accuracy (seed i's epoch e is step ``i * epochs
    + e``); ``tags`` (study, trial) go to the tracker. A population launcher passes the
    ``context`` and ``teacher_source`` its jobs share and the population's ``pretrained``
    outcome per seed; everything else is done here as for a model trained here.
    """
    started = time.time()
    output_dir = Path(output_dir)
    _preflight(cfg, output_dir)
    if (earlier := _ended_job_outcome(output_dir)) is not None:  # SLURM ran a finished job again
        return earlier
    device = context.device if context is not None else select_device(str(cfg.trainer.device), job_num)
    threads = cfg.trainer.num_threads or threads_per_job(parallel_jobs)
    flushed = use_cpu(threads, bool(cfg.trainer.flush_denormal))
    store = TeacherStore(cfg.paths.store_dir)
    seeds = trial_seeds(cfg)
    ctx = context or make_context(cfg, device)
    check_steps(run_recipe(cfg, seeds[0]), ctx)  # before any teacher work
    loss_fn = build(cfg.loss, cfg)  # rebuilt per seed below: a loss may hold trainable parts
    with_baseline = bool(loss_fn.needs_teacher and cfg.trial.baseline)
    metrics = {**_run_header(cfg, ctx, loss_fn, seeds, int(threads)), "flush_denormal": flushed}
    if "val_acc" in objective_names(cfg) and not len(ctx.data.val_idx):
        log.warning("data.val_size=0: no validation accuracy; the objective is n/a (test accuracy is reported)")
    tracker = _start_tracker(cfg, output_dir, tags)
    job = SeedJob(ctx, store, tracker, report, teacher_source, output_dir, metrics["model"], len(seeds), with_baseline)
    per_seed: list[dict] = []
    # One resume file per seed's training; kept until this run's results are written.
    resumes = [resume_file(ctx, run_model_key(cfg, ctx, seed)) for seed in seeds]
    try:
        if loss_fn.needs_teacher:
            job.teacher = teacher_source or prepare_teacher(ctx, store, tuple(loss_fn.teacher_features))
            metrics.update(job.teacher.info)
        for index, seed in enumerate(seeds):
            outcome = pretrained.get(seed) if pretrained is not None else None
            trained, entry = _run_seed(cfg, job, index, seed, resumes[index], outcome)
            per_seed.append(entry)
    except (Diverged, Pruned) as err:
        # Stopped early: record where, keep the seeds that finished, and pass it on.
        metrics.update(_stop_fields(err), per_seed=per_seed, wall_seconds=time.time() - started)
        _write_results(metrics, job, resumes)  # a rerun would stop the same way: no resume either
        if isinstance(err, Pruned):
            log.info("%s; results: %s", err, output_dir / "metrics.json")
        raise

    _finish(cfg, metrics, per_seed, trained, job, resumes, started)
    log.info("results: %s", output_dir / "metrics.json")
    return metrics
