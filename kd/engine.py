"""The training loop and evaluation: plain PyTorch, no config parsing in here."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from kd.data import BatchStream, Preprocess
from kd.errors import Diverged
from kd.losses import LossInputs, Progress
from kd.resume import ResumeFile, rng_state, set_rng_state
from kd.views import apply_views

log = logging.getLogger(__name__)

# Gives the teacher's outputs for a batch: (example indices, preprocessed images, the
# augmentation's view slots or None) -> (logits, named features); features only when
# the loss asks for them.
TeacherSignal = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, dict[str, torch.Tensor]]
]
# Augments a uint8 batch: (example indices, images) -> (augmented images, the view slot
# of each example when the teacher's logits are cached per view, else None).
Augment = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]


@dataclass
class FitResult:
    history: list[dict] = field(default_factory=list)  # one entry per finished epoch
    train_seconds: float = 0.0  # optimisation steps only, validation excluded


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def predict_features(
    model: nn.Module,
    images: torch.Tensor,
    preprocess: Preprocess,
    names: tuple[str, ...],
    batch_size: int = 1024,
) -> dict[str, torch.Tensor]:
    """Named intermediate features of ``model`` (eval mode) for ``images``, as float16
    on the CPU (half the memory; the losses compare them in float32)."""
    was_training = model.training
    model.eval()
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    for i in range(0, len(images), batch_size):
        _, features = model.forward_with_features(preprocess(images[i : i + batch_size]))
        for name in names:
            parts[name].append(features[name].half().cpu())
    model.train(was_training)
    return {name: torch.cat(chunks) for name, chunks in parts.items()}


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    images: torch.Tensor,
    preprocess: Preprocess,
    batch_size: int = 1024,
    views: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logits of ``model`` in eval mode for uint8 ``images`` (or for view ``views[i]``
    of image ``i``, see :func:`kd.views.apply_views`), as float32."""
    was_training = model.training
    model.eval()
    outputs = []
    for i in range(0, len(images), batch_size):
        batch = images[i : i + batch_size]
        if views is not None:
            batch = apply_views(batch, views[i : i + batch_size])
        outputs.append(model(preprocess(batch)).float())
    model.train(was_training)
    return torch.cat(outputs) if outputs else torch.empty(0)


def accuracy(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    preprocess: Preprocess,
    batch_size: int = 1024,
) -> float:
    """Top-1 accuracy in percent (NaN for an empty set)."""
    if len(labels) == 0:
        return float("nan")
    predictions = predict_logits(model, images, preprocess, batch_size).argmax(1)
    return 100.0 * (predictions == labels.to(predictions.device)).float().mean().item()


def fit(
    model: nn.Module,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: BatchStream,
    preprocess: Preprocess,
    epochs: int,
    *,
    teacher: TeacherSignal | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    augment: Augment | None = None,
    validate: Callable[[], float] | None = None,
    amp: bool = False,
    check_every: int = 10,
    progress: bool = True,
    desc: str = "train",
    on_epoch: Callable[[dict], None] | None = None,
    log_every_s: float = 30.0,
    resume: ResumeFile | None = None,
) -> FitResult:
    """Train ``model`` for ``epochs`` epochs; raises :class:`Diverged` on a non-finite loss.

    The loss is read back to the host every ``check_every`` steps (and at the last
    step of each epoch), which bounds the device syncs without letting a NaN run on.
    ``scheduler`` (if any) steps after every optimiser step.
    ``on_epoch`` sees each finished epoch's history entry (it may raise to stop early).
    Without a progress bar (output not a terminal), a plain log line every
    ``log_every_s`` seconds keeps a long epoch from being silent in a log file.
    With ``resume``, the whole training state is saved every ``resume.every_s`` seconds
    and at each epoch's end, and a saved state is continued from (see :mod:`kd.resume`);
    the finished epochs of a resumed run are passed to ``on_epoch`` again.
    """
    device = next(model.parameters()).device
    wants_features = bool(getattr(loss_fn, "student_features", ()))
    result = FitResult()
    # What a resume file holds besides the epoch's running sums (``running``).
    modules = {"model": getattr(model, "_orig_mod", model), "loss_fn": loss_fn, "optimizer": optimizer}
    if scheduler is not None:
        modules["scheduler"] = scheduler
    generator = getattr(augment, "generator", None)  # the augmentation's own random draws

    def snapshot(epoch: int, step: int, running: dict) -> dict:
        state = {name: module.state_dict() for name, module in modules.items()}
        state.update(epoch=epoch, step=step, running=running, rng=rng_state(), history=result.history)
        state.update(train_seconds=result.train_seconds, augment_rng=generator.get_state() if generator else None)
        return state

    first_epoch, first_step, running = 1, 0, None
    saved = resume.load() if resume is not None else None
    if saved is not None:
        for name, module in modules.items():
            module.load_state_dict(saved[name])
        set_rng_state(saved["rng"])
        if generator is not None and saved["augment_rng"] is not None:
            generator.set_state(saved["augment_rng"])
        result.history, result.train_seconds = list(saved["history"]), float(saved["train_seconds"])
        first_epoch, first_step, running = int(saved["epoch"]), int(saved["step"]), saved["running"]
        log.info("%s: resuming from epoch %d, step %d (%s)", desc, first_epoch, first_step, resume.path)
        for entry in result.history:
            if on_epoch is not None:
                on_epoch(entry)
    last_save = time.perf_counter()
    for epoch in range(first_epoch, epochs + 1):
        model.train()
        _synchronize(device)
        start = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        term_sums: dict[str, torch.Tensor] = {}
        seen_sum, skip, done_before = 0.0, 0, 0.0
        if running is not None and epoch == first_epoch:  # resumed mid-epoch: its sums so far
            loss_sum += running["loss_sum"]
            term_sums = {name: value.to(device) for name, value in running["term_sums"].items()}
            seen_sum, skip, done_before = float(running["seen"]), first_step, float(running["seconds"])
        bar = tqdm(total=len(batches), desc=f"{desc} epoch {epoch}/{epochs}", disable=not progress, leave=False)
        bar.update(skip)
        last_line = start
        for step, (idx, images, labels) in enumerate(batches.epoch(epoch, skip=skip), start=skip + 1):
            slots = None
            if augment is not None:
                images, slots = augment(idx, images)
            inputs = preprocess(images)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
                if wants_features:
                    student_logits, student_features = model.forward_with_features(inputs)
                else:
                    student_logits, student_features = model(inputs), {}
                teacher_logits, teacher_features = teacher(idx, inputs, slots) if teacher is not None else (None, {})
                progress_now = Progress(epoch, epochs, step, len(batches))
                terms = loss_fn(
                    LossInputs(
                        student_logits.float(), labels, teacher_logits, student_features, teacher_features, progress_now
                    )
                )
                loss = terms["loss"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            last_lr = optimizer.param_groups[0]["lr"]
            if scheduler is not None:
                scheduler.step()
            loss_sum += loss.detach()
            for name, value in terms.items():
                if name != "loss":
                    term_sums[name] = term_sums.get(name, 0.0) + value.detach()
            if step % check_every == 0 or step == len(batches):
                mean_loss = loss_sum.item() / step
                if not math.isfinite(mean_loss):
                    bar.close()
                    raise Diverged(epoch, step, loss.item(), phase=desc)
                bar.set_postfix(loss=f"{mean_loss:.4f}")
                if not progress and time.perf_counter() - last_line >= log_every_s:
                    last_line = time.perf_counter()
                    log.info(
                        "%s epoch %d/%d: step %d/%d, loss %.4f", desc, epoch, epochs, step, len(batches), mean_loss
                    )
            bar.update(1)
            seen_sum += 1
            if resume is not None and time.perf_counter() - last_save >= resume.every_s and step < len(batches):
                sums = {"loss_sum": loss_sum.detach().cpu(), "seen": seen_sum}
                sums["term_sums"] = {name: value.detach().cpu() for name, value in term_sums.items()}
                sums["seconds"] = done_before + time.perf_counter() - start
                resume.save(snapshot(epoch, step, sums))
                last_save = time.perf_counter()
        bar.close()
        _synchronize(device)
        seconds = done_before + time.perf_counter() - start
        result.train_seconds += seconds
        entry = {"epoch": epoch, "train_loss": loss_sum.item() / max(seen_sum, 1), "seconds": seconds}
        entry["lr"] = last_lr  # of the epoch's last step (a schedule moves it)
        entry.update({f"loss_{name}": float(total) / max(seen_sum, 1) for name, total in term_sums.items()})
        if validate is not None:
            entry["val_acc"] = validate()
        result.history.append(entry)
        log.info(
            "%s epoch %d/%d: loss %.4f%s (%.1fs)",
            desc,
            epoch,
            epochs,
            entry["train_loss"],
            f", val acc {entry['val_acc']:.2f}%" if "val_acc" in entry else "",
            seconds,
        )
        if on_epoch is not None:
            on_epoch(entry)
        if resume is not None:
            resume.save(snapshot(epoch + 1, 0, None))
            last_save = time.perf_counter()
    return result
