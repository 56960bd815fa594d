"""Population training: N students of one architecture trained together as one model.

On a GPU a student's training step is launch-bound: its arithmetic takes far less
time than launching its kernels. A sweep's trials differ only in a few numbers
(seed, loss hyperparameters, optimiser settings), so N of them can share every
kernel of the forward and backward pass: their weights are stacked each step
(``torch.stack`` of each member's own parameters) and one ``vmap``-ed
``functional_call`` runs all N students on their own batches in one pass.

Nothing else is written twice. The loss is the single-run method with one
hyperparameter value per member (:func:`kd.losses.for_members`); the step is
:func:`kd.engine.train_step`; each member keeps its own model, torch optimiser and
schedule (built as its single run builds them), its own initialisation, batch order,
augmentation draws and dropout masks (:class:`kd.models.SeededDropout`, handed in as
buffers), and is stopped alone if its loss diverges or its trial is pruned. So each
member ends with the weights its single run would have (up to float rounding).

Which jobs can share a population is decided by :func:`population_key`: everything
but :data:`MEMBER_KEYS` and the loss's hyperparameters must be equal, and the loss
must have no trainable parts of its own.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from hydra.utils import get_class
from torch import nn
from torch.func import functional_call, stack_module_state, vmap
from tqdm import tqdm

from kd.batches import BatchStream
from kd.devices import autocast_requested
from kd.engine import FitResult, train_step
from kd.errors import Diverged
from kd.losses import DistillationLoss, Progress, for_members
from kd.models import SeededDropout
from kd.models.features import with_features
from kd.plan import RunPlan
from kd.progress import Pace, eta
from kd.recipes import (
    Context,
    Recipe,
    TeacherSource,
    Trained,
    new_model,
    new_optimizer,
)
from kd.views import CachedViews, RandomViews, apply_views

log = logging.getLogger(__name__)

# Keys in which the members of one population may differ, besides the loss's own
# hyperparameters (``loss.<name>`` for each of its ``hparam_names``). Each member has
# its own optimiser and schedule, so any of their settings may differ.
MEMBER_KEYS = ("seed", "trial.seeds", "optim", "schedule")


def population_key(plan: RunPlan) -> str | None:
    """What a job must share with the others of its population; None if the job can
    only run alone (a loss with trainable parts, torch.compile or amp)."""
    loss_class = get_class(str(plan.loss._target_))
    alone = plan.trainer.compile or autocast_requested(plan.student.amp)
    if alone or any(True for _ in plan.new_loss().parameters()):
        return None
    hparams = tuple(f"loss.{name}" for name in getattr(loss_class, "hparam_names", ()))
    return repr(sorted(plan.result_settings(exclude=(*MEMBER_KEYS, *hparams)).items()))


@dataclass
class Member:
    """One student of a population: its recipe, its loss and what sees its epochs."""

    recipe: Recipe
    loss: DistillationLoss
    on_epoch: Callable[[dict], None] | None = None
    desc: str = "member"
    job: object = None  # members of one job (its seeds) stop together when one is stopped


class _Features(nn.Module):
    """A model whose forward also returns the named features a feature loss reads."""

    def __init__(self, model: nn.Module, names: tuple[str, ...]) -> None:
        super().__init__()
        self.model = model
        self.forward_with_layers = with_features(model, names)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.forward_with_layers(x)


def _dropout_calls(template: nn.Module, sample: torch.Tensor) -> list[tuple[str, torch.Size]]:
    """Each dropout of ``template`` in the order a forward pass calls it, with the shape
    of one example's input to it (found by one eval-mode pass, which draws nothing)."""
    names = {module: name for name, module in template.named_modules() if isinstance(module, SeededDropout)}
    calls: list[tuple[str, torch.Size]] = []
    hooks = [m.register_forward_pre_hook(lambda m, args: calls.append((names[m], args[0].shape[1:]))) for m in names]
    was_training = template.training
    template.eval()
    with torch.no_grad():
        template(sample)
    template.train(was_training)
    for hook in hooks:
        hook.remove()
    if len({name for name, _ in calls}) != len(calls):
        raise ValueError("a population needs each dropout module called once per forward pass")
    return calls


class Population:
    """The members still training, stacked: their models, optimisers and shared loss."""

    def __init__(self, members: list[Member], ctx: Context, teacher: TeacherSource | None) -> None:
        self.members, self.ctx, self.teacher = members, ctx, teacher
        first = members[0].recipe
        self.epochs, self.batch_size, self.augment = first.epochs, first.batch_size, first.augment
        data = ctx.data
        self.streams = [
            BatchStream(ctx.train_images, ctx.train_labels, data.train_idx, self.batch_size, m.recipe.seed)
            for m in members
        ]
        self.steps_per_epoch = len(self.streams[0])
        self.models = [new_model(m.recipe, ctx) for m in members]
        features = tuple(members[0].loss.student_features)
        self.wrapped = [_Features(m, features) if features else m for m in self.models]
        self.template = self.wrapped[0]
        total = self.epochs * self.steps_per_epoch
        pairs = zip(members, self.models, strict=True)
        built = [new_optimizer(m.recipe, ctx, list(model.parameters()), total) for m, model in pairs]
        self.optimizers, self.schedulers = [o for o, _ in built], [s for _, s in built]
        self.augments = [self._augmentation(m.recipe.seed) for m in members]
        sample = ctx.preprocess(ctx.train_images[:1])
        self.dropouts = _dropout_calls(self.template, sample)
        self.buffers = stack_module_state(self.wrapped)[1]
        self.alive = list(range(len(members)))  # member numbers still training, in row order
        self.loss = for_members([m.loss for m in members], ctx.device)
        self.train_forward = vmap(self._call, in_dims=(0, 0, 0), randomness="different")
        self.eval_forward = vmap(self._call, in_dims=(0, 0, None))

    def _augmentation(self, seed: int) -> CachedViews | RandomViews | None:
        if not self.augment:
            return None
        views = self.teacher.views if self.teacher is not None else None
        return CachedViews(views, seed) if views is not None else RandomViews(seed)

    def _call(self, params: dict, buffers: dict, x: torch.Tensor):
        out = functional_call(self.template, (params, buffers), (x,))
        return out if isinstance(out, tuple) else (out, {})

    def stacked_params(self) -> dict[str, torch.Tensor]:
        """The alive members' parameters stacked ``[N, ...]``, differentiable to each."""
        params = [dict(self.wrapped[n].named_parameters()) for n in self.alive]
        return {name: torch.stack([p[name] for p in params]) for name in params[0]}

    def masks(self, batch_size: int) -> dict[str, torch.Tensor]:
        """This step's dropout masks ``[N, B, ...]``, each member's from its own generator
        in the order its single run draws them."""
        masks = {}
        for name, shape in self.dropouts:
            modules = [self.wrapped[n].get_submodule(name) for n in self.alive]
            masks[f"{name}.mask"] = torch.stack([m.draw((batch_size, *shape), self.ctx.device) for m in modules])
        return masks

    def batch(self, orders: dict[int, torch.Tensor], step: int):
        """Step ``step``'s inputs ``[N, B, ...]``, labels ``[N, B]`` and teacher outputs."""
        span = slice((step - 1) * self.batch_size, step * self.batch_size)
        flat = torch.cat([orders[n][span] for n in self.alive])  # each member's own batch
        images, slots = self.ctx.train_images[flat], None
        if self.augment:
            drawn = [self.augments[n].draw(orders[n][span]) for n in self.alive]
            images = apply_views(images, torch.cat([v.to(images.device) for v, _ in drawn]))
            if drawn[0][1] is not None:
                slots = torch.cat([s.to(images.device) for _, s in drawn])
        inputs = self.ctx.preprocess(images).contiguous()
        shape = (len(self.alive), -1)
        teacher_logits, teacher_features = None, {}
        if self.teacher is not None:
            teacher_logits, teacher_features = self.teacher.signal(flat, inputs, slots)
            teacher_logits = teacher_logits.float().view(*shape, teacher_logits.shape[-1])
            teacher_features = {k: v.view(*shape, *v.shape[1:]) for k, v in teacher_features.items()}
        labels = self.ctx.train_labels[flat].view(shape)
        return inputs.view(*shape, *inputs.shape[1:]), labels, (teacher_logits, teacher_features)

    def step(self, orders: dict[int, torch.Tensor], progress: Progress) -> tuple[dict, list[float]]:
        """One :func:`kd.engine.train_step` of every alive member."""
        inputs, labels, teacher_outputs = self.batch(orders, progress.step)
        params, buffers = self.stacked_params(), {**self.buffers, **self.masks(labels.shape[1])}

        def forward(x: torch.Tensor):
            return self.train_forward(params, buffers, x)

        optimizers = [self.optimizers[n] for n in self.alive]
        schedulers = [self.schedulers[n] for n in self.alive]
        return train_step(forward, self.loss, optimizers, schedulers, inputs, labels, teacher_outputs, progress)

    def drop(self, stopped: dict[int, BaseException]) -> list[int]:
        """Stop the members in ``stopped``; returns the rows of those that go on."""
        for number, err in stopped.items():
            log.info("%s stopped: %s", self.members[number].desc, err)
        rows = [row for row, n in enumerate(self.alive) if n not in stopped]
        self.alive = [self.alive[row] for row in rows]
        index = torch.tensor(rows, dtype=torch.long, device=self.ctx.device)
        self.buffers = {k: v[index] for k, v in self.buffers.items()}
        if self.alive:
            self.loss = for_members([self.members[n].loss for n in self.alive], self.ctx.device)
        return rows

    @torch.no_grad()
    def accuracies(self, images: torch.Tensor, labels: torch.Tensor) -> list[float]:
        """Each alive member's top-1 accuracy (percent) in eval mode."""
        if len(labels) == 0:
            return [float("nan")] * len(self.alive)
        params = {k: v.detach() for k, v in self.stacked_params().items()}
        self.template.eval()
        correct = torch.zeros(len(self.alive), device=self.ctx.device)
        chunk = max(16, min(1024, 65536 // len(self.alive)))  # about 64k member-images per pass
        for i in range(0, len(images), chunk):
            logits, _ = self.eval_forward(params, self.buffers, self.ctx.preprocess(images[i : i + chunk]).contiguous())
            correct += (logits.argmax(-1) == labels[i : i + chunk]).sum(1)
        self.template.train()
        return (100.0 * correct / len(labels)).tolist()

    def trained(self, number: int, row: int, history: list[dict], train_seconds: float, test_acc: float) -> Trained:
        """Member ``number``'s result (its buffers copied back from the stack)."""
        with torch.no_grad():
            for name, buffer in self.buffers.items():
                self.wrapped[number].get_buffer(name).copy_(buffer[row])
        val_acc = history[-1].get("val_acc", float("nan")) if history else float("nan")
        return Trained(self.models[number], FitResult(history, train_seconds), val_acc, test_acc)


class _EpochSums:
    """An epoch's per-member running sums of the loss and its terms (rows = alive)."""

    def __init__(self, size: int, device: torch.device) -> None:
        self.loss = torch.zeros(size, device=device)
        self.terms: dict[str, torch.Tensor] = {}
        self.lrs: list[float] = []

    def add(self, terms: dict[str, torch.Tensor], lrs: list[float]) -> None:
        self.loss += terms["loss"]
        for name, value in terms.items():
            if name != "loss":
                self.terms[name] = self.terms.get(name, 0) + value
        self.lrs = lrs

    def keep(self, rows: list[int]) -> None:
        self.loss = self.loss[rows]
        self.terms = {k: v[rows] for k, v in self.terms.items()}
        self.lrs = [self.lrs[r] for r in rows] if self.lrs else []


def _train_epoch(pop: Population, epoch: int, progress_bar: bool, check_every: int, pace: Pace) -> tuple:
    """One epoch of every alive member; returns its running sums, the members it
    stopped (diverged) and the seconds it took. ``pace`` spans the whole population's training."""
    device = pop.ctx.device
    start = time.perf_counter()
    batch_size = pop.batch_size
    orders = {n: pop.streams[n].order(epoch) for n in pop.alive}
    sums, diverged = _EpochSums(len(pop.alive), device), {}
    steps = pop.steps_per_epoch
    desc = f"population of {len(pop.alive)} epoch {epoch}/{pop.epochs}"
    for step in tqdm(range(1, steps + 1), desc=desc, disable=not progress_bar, leave=False):
        sums.add(*pop.step(orders, Progress(epoch, pop.epochs, step, steps)))
        pace.advance(batch_size * len(pop.alive))  # every member's images: the population's throughput
        if step % check_every and step != steps:
            continue
        means = (sums.loss / step).tolist()
        rows = [(pop.alive[r], m) for r, m in enumerate(means) if not math.isfinite(m)]
        bad = {n: Diverged(epoch, step, m, phase=pop.members[n].desc) for n, m in rows}
        if bad:
            sums.keep(pop.drop(bad))
            diverged.update(bad)
            if not pop.alive:
                break
        if not progress_bar and pace.due():
            log.info("population epoch %d/%d: step %d/%d, %d members, %s", epoch, pop.epochs, step, steps,
                     len(pop.alive), pace.line())  # fmt: skip
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return sums, diverged, time.perf_counter() - start


def _epoch_entries(pop: Population, epoch: int, sums: _EpochSums, seconds: float, val: list | None) -> list[dict]:
    """Each alive member's history entry for ``epoch``, as a single run writes it."""
    steps = pop.steps_per_epoch
    means = (sums.loss / steps).tolist()
    terms = {name: (value / steps).tolist() for name, value in sums.terms.items()}
    entries = []
    for row in range(len(pop.alive)):
        entry = {"epoch": epoch, "train_loss": means[row], "seconds": seconds, "population": len(pop.alive)}
        entry["lr"] = sums.lrs[row]  # of the epoch's last step, as a single run records
        entry.update({f"loss_{name}": values[row] for name, values in terms.items()})
        if val is not None:
            entry["val_acc"] = val[row]
        entries.append(entry)
    return entries


def _see_epoch(members: list[Member], number: int, entry: dict, stopped: dict[int, BaseException]) -> None:
    """Hand member ``number`` its epoch. What its ``on_epoch`` raises (a pruned trial, a
    failing reporter) stops it and the other members of its job, which are not asked."""
    member = members[number]
    peers = [n for n, peer in enumerate(members) if member.job is not None and peer.job == member.job]
    job_stop = next((stopped[n] for n in peers if n in stopped), None)
    if job_stop is not None:
        stopped[number] = job_stop
        return
    try:
        if member.on_epoch is not None:
            member.on_epoch(entry)
    except Exception as err:
        stopped[number] = err
        for other in peers:
            stopped.setdefault(other, err)


def train_population(
    members: list[Member],
    ctx: Context,
    teacher: TeacherSource | None = None,
    progress: bool = False,
    log_every_s: float = 30.0,
) -> list[Trained | BaseException]:
    """Train ``members`` together; returns per member a :class:`kd.recipes.Trained`, or
    the exception that stopped it (:class:`Diverged`, or what its ``on_epoch`` raised,
    e.g. :class:`kd.errors.Pruned`). Members must share model, epochs, batch size and
    augmentation (see :func:`population_key`)."""
    pop = Population(members, ctx, teacher)
    outcomes: list = [None] * len(members)
    histories: list[list[dict]] = [[] for _ in members]
    val_idx = ctx.data.val_idx.to(ctx.device)
    train_seconds, pace = 0.0, Pace(pop.epochs * pop.steps_per_epoch, every_s=log_every_s)
    for epoch in range(1, pop.epochs + 1):
        if not pop.alive:  # every member stopped (pruned, diverged) before the last epoch
            break
        sums, stopped, seconds = _train_epoch(pop, epoch, progress, ctx.plan.trainer.check_every, pace)
        train_seconds += seconds
        if not pop.alive:
            outcomes = [outcome if outcome is not None else stopped.get(n) for n, outcome in enumerate(outcomes)]
            break
        val = pop.accuracies(ctx.train_images[val_idx], ctx.train_labels[val_idx]) if len(val_idx) else None
        for number, entry in zip(pop.alive, _epoch_entries(pop, epoch, sums, seconds, val), strict=True):
            histories[number].append(entry)
            _see_epoch(members, number, entry, stopped)
        log.info("population epoch %d/%d: %d members, %.1fs; population ETA %s", epoch, pop.epochs,
                 len(pop.alive), seconds, eta(pace.left_s()))  # fmt: skip
        pop.drop({n: err for n, err in stopped.items() if n in pop.alive})
        outcomes = [outcome if outcome is not None else stopped.get(n) for n, outcome in enumerate(outcomes)]
    if pop.alive:
        test = pop.accuracies(ctx.test_images, ctx.test_labels)
        for row, number in enumerate(pop.alive):
            outcomes[number] = pop.trained(number, row, histories[number], train_seconds, test[row])
    return outcomes
