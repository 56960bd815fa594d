"""Turns a composed config into objects, trains, evaluates, writes ``metrics.json``.

This is the one place that reads the config; the engine, losses and models see only
plain objects and tensors.
"""

from __future__ import annotations

import logging
import math
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from kd.config import validate
from kd.data import BatchStream, Dataset, Preprocess
from kd.devices import select_device, threads_per_job
from kd.engine import FitResult, TeacherSignal, accuracy, fit, predict_logits
from kd.errors import Diverged
from kd.losses import CrossEntropy
from kd.models import count_parameters
from kd.storage import file_digest, save_checked, write_json
from kd.teacher import TeacherStore, fingerprint, load_checkpoint, make_checkpoint, restore_model

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


@dataclass
class Trained:
    model: nn.Module
    fit: FitResult
    val_acc: float
    test_acc: float


def _target(model_cfg: DictConfig) -> str:
    return str(model_cfg._target_)


def training_spec(model_cfg: DictConfig, ctx: Context) -> dict:
    """Everything that determines a CE-trained model: its teacher-store address."""
    cfg, data = ctx.cfg, ctx.data
    return {
        "model": OmegaConf.to_container(model_cfg, resolve=True),
        "data": {
            "source": data.name,
            "contents": data.fingerprint,
            "val_size": len(data.val_idx),
            "split_seed": int(cfg.data.split_seed),
            "mean": list(data.mean),
            "std": list(data.std),
            "augment": data.augment,
        },
        "optim": OmegaConf.to_container(cfg.optim, resolve=True),
        "trainer": {"epochs": int(cfg.trainer.epochs), "batch_size": int(cfg.trainer.batch_size)},
        "seed": int(cfg.seed),
    }


def train_model(
    model_cfg: DictConfig,
    loss_fn: nn.Module,
    ctx: Context,
    teacher: TeacherSignal | None = None,
    desc: str = "train",
) -> Trained:
    cfg, data, device = ctx.cfg, ctx.data, ctx.device
    torch.manual_seed(int(cfg.seed))
    model = instantiate(model_cfg, num_classes=data.num_classes).to(device, memory_format=ctx.memory_format)
    optimizer = instantiate(cfg.optim)(model.parameters())
    runner = torch.compile(model) if cfg.trainer.compile else model
    batches = BatchStream(
        ctx.train_images, ctx.train_labels, data.train_idx, int(cfg.trainer.batch_size), seed=int(cfg.seed)
    )
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
        int(cfg.trainer.epochs),
        teacher=teacher,
        augment_seed=int(cfg.seed) if data.augment else None,
        validate=validate_now if len(data.val_idx) else None,
        amp=bool(cfg.trainer.amp) and device.type == "cuda",
        check_every=int(cfg.trainer.check_every),
        progress=bool(cfg.trainer.progress),
        desc=desc,
    )
    # The last epoch's validation already evaluated this very model (eval mode, no dropout).
    val_acc = result.history[-1]["val_acc"] if len(data.val_idx) else float("nan")
    test_acc = accuracy(model, ctx.test_images, ctx.test_labels, ctx.preprocess)
    return Trained(model, result, val_acc, test_acc)


def prepare_teacher(ctx: Context, store: TeacherStore) -> tuple[TeacherSignal, dict]:
    """Load, find or train the teacher; serve its logits from the cache when exact."""
    cfg, data, device = ctx.cfg, ctx.data, ctx.device
    teacher_cfg = cfg.teacher.model
    if cfg.teacher.checkpoint:
        checkpoint = load_checkpoint(cfg.teacher.checkpoint)
        source = "checkpoint"
    else:
        key = fingerprint(training_spec(teacher_cfg, ctx))

        def build() -> dict:
            log.info("no stored teacher %s: training it once", key)
            trained = train_model(teacher_cfg, CrossEntropy(), ctx, desc="teacher")
            return _checkpoint(trained, teacher_cfg, ctx)

        checkpoint, built = store.get_or_build(key, build)
        checkpoint["path"] = str(store.checkpoint_path(key))
        checkpoint["digest"] = file_digest(checkpoint["path"])
        source = "trained" if built else "store"
    teacher = instantiate(teacher_cfg, num_classes=data.num_classes)
    restore_model(checkpoint, teacher, _target(teacher_cfg), data.num_classes)
    teacher = teacher.to(device, memory_format=ctx.memory_format).eval()
    info: dict[str, Any] = {
        "teacher_checkpoint": checkpoint["path"],
        "teacher_source": source,
        "teacher_test_acc": checkpoint.get("test_acc"),
    }
    log.info("teacher: %s (%s)", checkpoint["path"], source)

    if data.augment:
        # Augmented inputs differ every epoch, so cached logits would be wrong.
        log.info("data.augment is on: running the teacher online at every step (no logit cache)")

        @torch.no_grad()
        def online(idx: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
            return teacher(inputs)

        info["teacher_signal"] = "online"
        return online, info

    data_key = f"{data.fingerprint}\0{data.mean}\0{data.std}"
    logits, computed = store.logits(
        checkpoint["digest"], data_key, lambda: predict_logits(teacher, ctx.train_images, ctx.preprocess).cpu()
    )
    logits = logits.to(device)
    log.info("teacher logits: %s", "computed and cached" if computed else "read from cache")
    info["teacher_signal"] = "cache"
    return (lambda idx, inputs: logits[idx]), info


def _checkpoint(trained: Trained, model_cfg: DictConfig, ctx: Context) -> dict:
    return make_checkpoint(
        trained.model,
        _target(model_cfg),
        ctx.data.num_classes,
        params=count_parameters(trained.model),
        val_acc=trained.val_acc,
        test_acc=trained.test_acc,
        train_seconds=trained.fit.train_seconds,
        spec=training_spec(model_cfg, ctx),
    )


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def make_context(cfg: DictConfig, device: torch.device) -> Context:
    """Load the configured data once and put it on ``device`` (the whole set; it is small)."""
    data: Dataset = instantiate(cfg.data).load()
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


def run(cfg: DictConfig, output_dir: str | Path, job_num: int = 0, parallel_jobs: int = 1) -> dict:
    """Train and evaluate the configured model; returns the metrics written to disk."""
    started = time.time()
    validate(cfg)
    output_dir = Path(output_dir)
    device = select_device(str(cfg.trainer.device), job_num)
    threads = cfg.trainer.num_threads or threads_per_job(parallel_jobs)
    torch.set_num_threads(int(threads))
    store = TeacherStore(cfg.paths.store_dir)

    ctx = make_context(cfg, device)
    data = ctx.data
    loss_fn = instantiate(cfg.loss)
    metrics: dict[str, Any] = {
        "model": _target(cfg.model).rsplit(".", 1)[-1],
        "loss": loss_fn.name,
        "temperature": loss_fn.temperature,
        "alpha": loss_fn.alpha,
        "epochs": int(cfg.trainer.epochs),
        "batch_size": int(cfg.trainer.batch_size),
        "lr": float(cfg.optim.lr),
        "seed": int(cfg.seed),
        "dataset": data.name,
        "train_examples": len(data.train_idx),
        "val_examples": len(data.val_idx),
        "test_examples": len(data.test.labels),
        "device": str(device),
        "num_threads": int(threads),
        "host": platform.node(),
    }
    log.info(
        "device %s, %d threads, %s: %d train / %d val / %d test",
        device,
        threads,
        data.name,
        len(data.train_idx),
        len(data.val_idx),
        len(data.test.labels),
    )

    try:
        teacher = None
        if loss_fn.needs_teacher:
            teacher, teacher_info = prepare_teacher(ctx, store)
            metrics.update(teacher_info)
        trained = train_model(cfg.model, loss_fn, ctx, teacher=teacher, desc=metrics["model"])
    except Diverged as err:
        metrics.update(
            status="diverged",
            diverged_phase=err.phase,
            diverged_epoch=err.epoch,
            diverged_step=err.step,
            wall_seconds=time.time() - started,
        )
        write_json(output_dir / "metrics.json", metrics)
        raise

    selecting_on = "val_acc" if len(data.val_idx) else "test_acc"
    if selecting_on == "test_acc":
        log.warning("data.val_size=0: the objective is TEST accuracy; do not tune on it for reporting")
    checkpoint = _checkpoint(trained, cfg.model, ctx)
    save_checked(checkpoint, output_dir / "model.pt")
    if not loss_fn.needs_teacher:
        # A CE-trained model is exactly what the teacher store would build from the
        # same settings: publish it, so a later KD run reuses it instead of retraining.
        key = fingerprint(checkpoint["spec"])
        if store.publish(key, checkpoint):
            log.info("stored as teacher %s", key)
    metrics.update(
        status="completed",
        params=count_parameters(trained.model),
        val_acc=_finite_or_none(trained.val_acc),
        test_acc=trained.test_acc,
        objective=selecting_on,
        objective_value=trained.val_acc if selecting_on == "val_acc" else trained.test_acc,
        train_seconds=trained.fit.train_seconds,
        wall_seconds=time.time() - started,
        history=trained.fit.history,
        checkpoint=str(output_dir / "model.pt"),
    )
    write_json(output_dir / "metrics.json", metrics)
    log.info(
        "%s: val acc %s, test acc %.2f%%, %.1fs training",
        metrics["model"],
        f"{trained.val_acc:.2f}%" if math.isfinite(trained.val_acc) else "n/a",
        trained.test_acc,
        trained.fit.train_seconds,
    )
    return metrics
