"""The training loop and evaluation: plain PyTorch, no config parsing in here."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from kd.batches import BatchStream, Preprocess
from kd.errors import Diverged
from kd.losses import LossInputs, Progress
from kd.models import SeededDropout
from kd.models.features import STUDENT_LAYER, TEACHER_LAYER, with_features
from kd.progress import Pace, chunks_with_progress, eta
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


def _passes(size: int, batch_size: int, desc: str | None, bar: bool) -> Iterable[int]:
    starts = range(0, size, batch_size)
    return starts if desc is None else chunks_with_progress(starts, size, desc, bar)


@torch.no_grad()
def predict_features(
    model: nn.Module,
    images: torch.Tensor,
    preprocess: Preprocess,
    names: tuple[str, ...],
    batch_size: int = 1024,
    desc: str | None = None,
    bar: bool = False,
) -> dict[str, torch.Tensor]:
    """Named intermediate features of ``model`` (eval mode) for ``images``, as float16
    on the CPU (half the memory; the losses compare them in float32). With ``desc``,
    the pass shows its progress (a bar, or piped-log lines)."""
    was_training = model.training
    model.eval()
    forward = with_features(model, names, TEACHER_LAYER)
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    for i in _passes(len(images), batch_size, desc, bar):
        _, features = forward(preprocess(images[i : i + batch_size]))
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
    desc: str | None = None,
    bar: bool = False,
) -> torch.Tensor:
    """Logits of ``model`` in eval mode for uint8 ``images`` (or for view ``views[i]``
    of image ``i``, see :func:`kd.views.apply_views`), as float32. With ``desc``, the
    pass shows its progress (a bar, or piped-log lines)."""
    was_training = model.training
    model.eval()
    outputs = []
    for i in _passes(len(images), batch_size, desc, bar):
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


# A student's forward pass: preprocessed inputs -> (logits, named features).
StudentForward = Callable[[torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]]


def student_forward(model: nn.Module, feature_names: tuple[str, ...] = ()) -> StudentForward:
    """``model``'s forward as a :data:`StudentForward`, with the named features a loss reads."""
    return with_features(model, feature_names, STUDENT_LAYER)


def train_step(
    forward: StudentForward,
    loss_fn: nn.Module,
    optimizers: list[torch.optim.Optimizer],
    schedulers: list[torch.optim.lr_scheduler.LRScheduler | None],
    inputs: torch.Tensor,
    labels: torch.Tensor,
    teacher_outputs: tuple[torch.Tensor | None, dict[str, torch.Tensor]],
    progress: Progress,
    amp: bool = False,
) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Forward, loss, backward and each optimiser's (and schedule's) step: the one
    training step of single runs (one optimiser, scalar terms) and populations (one
    optimiser per member, terms ``[N]``; members share no parameters, so the summed
    loss gives each its own gradient). Returns the detached terms and the learning
    rate each optimiser stepped with. ``amp``: forward and loss under bf16 autocast."""
    with torch.autocast(device_type=inputs.device.type, dtype=torch.bfloat16, enabled=amp):
        student_logits, student_features = forward(inputs)
        teacher_logits, teacher_features = teacher_outputs
        terms = loss_fn(
            LossInputs(student_logits.float(), labels, teacher_logits, student_features, teacher_features, progress)
        )
    for optimizer in optimizers:
        optimizer.zero_grad(set_to_none=True)
    terms["loss"].sum().backward()
    lrs = [optimizer.param_groups[0]["lr"] for optimizer in optimizers]
    for optimizer, scheduler in zip(optimizers, schedulers, strict=True):
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
    return {name: value.detach() for name, value in terms.items()}, lrs


@dataclass
class Step:
    """What one model's training step needs besides the batch: the same for every step."""

    model: nn.Module
    loss_fn: nn.Module
    optimizer: torch.optim.Optimizer
    preprocess: Preprocess
    teacher: TeacherSignal | None = None
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    augment: Augment | None = None
    amp: bool = False
    forward: StudentForward = field(init=False, repr=False)

    def __post_init__(self) -> None:
        # Built once, not per step: naming a feature loss's layers walks the model's modules.
        self.forward = student_forward(self.model, tuple(getattr(self.loss_fn, "student_features", ())))

    def __call__(self, idx: torch.Tensor, images: torch.Tensor, labels: torch.Tensor, progress: Progress) -> dict:
        """One :func:`train_step` on a batch; returns the loss's named terms and the
        learning rate the step used (``lr``)."""
        slots = None
        if self.augment is not None:
            images, slots = self.augment(idx, images)
        inputs = self.preprocess(images)
        with torch.autocast(device_type=inputs.device.type, dtype=torch.bfloat16, enabled=self.amp):
            teacher_outputs = self.teacher(idx, inputs, slots) if self.teacher is not None else (None, {})
        optimizers, schedulers = [self.optimizer], [self.scheduler]
        terms, (lr,) = train_step(
            self.forward, self.loss_fn, optimizers, schedulers, inputs, labels, teacher_outputs, progress, self.amp
        )
        return {"lr": lr, **terms}


@dataclass
class EpochSums:
    """An epoch's running sums, kept across a mid-epoch resume."""

    loss: torch.Tensor
    terms: dict[str, torch.Tensor] = field(default_factory=dict)
    seen: float = 0.0
    seconds_before: float = 0.0  # training time of this epoch before a resume
    skip: int = 0  # batches already done before a resume

    def add(self, terms: dict) -> None:
        self.loss += terms["loss"]
        for name, value in terms.items():
            if name not in ("loss", "lr"):
                self.terms[name] = self.terms.get(name, 0.0) + value
        self.seen += 1

    def saved(self, seconds: float) -> dict:
        terms = {name: value.cpu() for name, value in self.terms.items()}
        return {"loss_sum": self.loss.cpu(), "term_sums": terms, "seen": self.seen, "seconds": seconds}

    @classmethod
    def restored(cls, running: dict | None, step: int, device: torch.device) -> EpochSums:
        sums = cls(torch.zeros((), device=device))
        if running is not None:
            sums.loss += running["loss_sum"].to(device)
            sums.terms = {name: value.to(device) for name, value in running["term_sums"].items()}
            sums.seen, sums.seconds_before, sums.skip = float(running["seen"]), float(running["seconds"]), step
        return sums


class TrainingState:
    """Everything a resume file holds: the modules' states, every random state, and
    where in the run training stands (see :mod:`kd.resume`)."""

    def __init__(self, step: Step, result: FitResult) -> None:
        self.modules = {"model": getattr(step.model, "_orig_mod", step.model), "loss_fn": step.loss_fn}
        self.modules["optimizer"] = step.optimizer
        if step.scheduler is not None:
            self.modules["scheduler"] = step.scheduler
        self.generator = getattr(step.augment, "generator", None)  # the augmentation's own draws
        dropouts = [m for m in self.modules["model"].modules() if isinstance(m, SeededDropout)]
        self.dropout = dropouts[0].generator if dropouts else None  # the dropout masks' own draws
        self.result = result

    def snapshot(self, epoch: int, step: int, running: dict | None) -> dict:
        state = {name: module.state_dict() for name, module in self.modules.items()}
        state.update(epoch=epoch, step=step, running=running, rng=rng_state(), history=self.result.history)
        state.update(train_seconds=self.result.train_seconds)
        state["augment_rng"] = self.generator.get_state() if self.generator is not None else None
        state["dropout_rng"] = self.dropout.get_state() if self.dropout is not None else None
        return state

    def restore(self, saved: dict) -> tuple[int, int, dict | None]:
        """Load a snapshot; returns (epoch, step within it, the epoch's running sums)."""
        for name, module in self.modules.items():
            module.load_state_dict(saved[name])
        set_rng_state(saved["rng"])
        if self.generator is not None and saved["augment_rng"] is not None:
            self.generator.set_state(saved["augment_rng"])
        if self.dropout is not None and saved.get("dropout_rng") is not None:
            self.dropout.set_state(saved["dropout_rng"])
        self.result.history, self.result.train_seconds = list(saved["history"]), float(saved["train_seconds"])
        return int(saved["epoch"]), int(saved["step"]), saved["running"]


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
    Without a bar (output not a terminal), a line with throughput and ETA every
    ``log_every_s`` seconds keeps a long epoch from being silent in a log file. With
    ``resume``, the whole training state is saved every ``resume.every_s`` seconds and
    at each epoch's end, and a saved state is continued from (see :mod:`kd.resume`);
    the finished epochs of a resumed run are passed to ``on_epoch`` again.
    """
    step = Step(model, loss_fn, optimizer, preprocess, teacher, scheduler, augment, amp)
    result = FitResult()
    state = TrainingState(step, result)
    first_epoch, first_step, running = 1, 0, None
    saved = resume.load() if resume is not None else None
    if saved is not None:
        first_epoch, first_step, running = state.restore(saved)
        log.info("%s: resuming from epoch %d, step %d (%s)", desc, first_epoch, first_step, resume.path)
        for entry in result.history if on_epoch is not None else ():
            on_epoch(entry)
    device = next(model.parameters()).device
    save = _periodic_saver(state, resume)
    pace = Pace(epochs * len(batches), (first_epoch - 1) * len(batches) + first_step, log_every_s)
    for epoch in range(first_epoch, epochs + 1):
        sums = EpochSums.restored(running if epoch == first_epoch else None, first_step, device)
        entry = _train_epoch(step, batches, sums, epoch, epochs, desc, progress, check_every, pace, save)
        result.train_seconds += entry["seconds"]
        if validate is not None:
            entry["val_acc"] = validate()
        result.history.append(entry)
        _log_epoch(desc, epoch, epochs, entry, pace)
        if on_epoch is not None:
            on_epoch(entry)
        save(epoch + 1, 0, None, force=True)
    return result


def _log_epoch(desc: str, epoch: int, epochs: int, entry: dict, pace: Pace) -> None:
    """An epoch's line: its loss, validation accuracy, time and what its phase has left."""
    val = f", val acc {entry['val_acc']:.2f}%" if "val_acc" in entry else ""
    left = f"; {desc} ETA {eta(pace.left_s())}" if epoch < epochs else ""
    log.info(
        "%s epoch %d/%d: loss %.4f%s (%.1fs)%s", desc, epoch, epochs, entry["train_loss"], val, entry["seconds"], left
    )


def _periodic_saver(state: TrainingState, resume: ResumeFile | None) -> Callable[..., None]:
    """``save(epoch, step, running, force=False)``: a snapshot to ``resume`` when forced
    (an epoch's end) or when ``resume.every_s`` has passed since the last one."""
    last = [time.perf_counter()]

    def save(epoch: int, step: int, running: dict | None, force: bool = False) -> None:
        if resume is None or not (force or time.perf_counter() - last[0] >= resume.every_s):
            return
        resume.save(state.snapshot(epoch, step, running))
        last[0] = time.perf_counter()

    return save


def _train_epoch(
    step: Step,
    batches: BatchStream,
    sums: EpochSums,
    epoch: int,
    epochs: int,
    desc: str,
    progress: bool,
    check_every: int,
    pace: Pace,
    save: Callable[..., None],
) -> dict:
    """One epoch (from ``sums.skip`` on); returns its history entry, without validation."""
    step.model.train()
    device = sums.loss.device
    _synchronize(device)
    start = time.perf_counter()
    bar = tqdm(total=len(batches), desc=f"{desc} epoch {epoch}/{epochs}", disable=not progress, leave=False)
    bar.update(sums.skip)
    lr = float("nan")
    for number, (idx, images, labels) in enumerate(batches.epoch(epoch, skip=sums.skip), start=sums.skip + 1):
        terms = step(idx, images, labels, Progress(epoch, epochs, number, len(batches)))
        lr = terms["lr"]
        sums.add(terms)
        pace.advance(len(labels))
        if number % check_every == 0 or number == len(batches):
            mean_loss = sums.loss.item() / number
            if not math.isfinite(mean_loss):
                bar.close()
                raise Diverged(epoch, number, terms["loss"].item(), phase=desc)
            bar.set_postfix(loss=f"{mean_loss:.4f}")
            if not progress and pace.due():
                log.info(
                    "%s epoch %d/%d: step %d/%d, loss %.4f, %s",
                    *(desc, epoch, epochs, number, len(batches), mean_loss, pace.line()),
                )
        bar.update(1)
        if number < len(batches):
            save(epoch, number, sums.saved(sums.seconds_before + time.perf_counter() - start))
    bar.close()
    _synchronize(device)
    entry = {"epoch": epoch, "train_loss": sums.loss.item() / max(sums.seen, 1)}
    entry["seconds"] = sums.seconds_before + time.perf_counter() - start
    entry["lr"] = lr  # of the epoch's last step (a schedule moves it)
    entry.update({f"loss_{name}": float(total) / max(sums.seen, 1) for name, total in sums.terms.items()})
    return entry
