"""Population training: N students of one architecture trained together as one model.

On a GPU a student's training step is launch-bound: its arithmetic takes far less
time than launching its kernels. A sweep's trials differ only in a few numbers
(seed, temperature, alpha, learning rate), so N of them can share every kernel: their
weights are stacked (``torch.func.stack_module_state``) and one ``vmap``-ed
``functional_call`` runs all N students on their own batches in one pass. Each member
keeps its own initialisation, batch order, augmentation draws and dropout masks,
its own loss hyperparameters and learning rate (as tensors), and is stopped alone if
its loss diverges or its trial is pruned.

Which jobs can share a population is decided by :func:`population_key`: everything
but :data:`MEMBER_KEYS` must be equal, the loss must be CE or Hinton KD and the
optimiser Adam or AdamW. :func:`train_population` returns, per member, the same
:class:`kd.pipeline.Trained` a single run's training gives, so
:func:`kd.pipeline.run` writes the same metrics.json from it.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.func import functional_call, stack_module_state, vmap
from tqdm import tqdm

from kd.config import build, run_settings
from kd.data import BatchStream
from kd.engine import FitResult
from kd.errors import Diverged
from kd.losses import CrossEntropy, HintonKD
from kd.views import CachedViews, RandomViews, apply_views

log = logging.getLogger(__name__)

# Keys in which the members of one population may differ.
MEMBER_KEYS = (
    "seed",
    "trial.seeds",
    "loss.temperature",
    "loss.alpha",
    "optim.lr",
    "schedule.max_lr",  # follows optim.lr by default
)
LOSSES = {"kd.losses.CrossEntropy": CrossEntropy, "kd.losses.HintonKD": HintonKD}
OPTIMISERS = ("torch.optim.Adam", "torch.optim.AdamW")


def population_key(cfg: DictConfig) -> str | None:
    """What a job must share with the others of its population; None if the job can
    only run alone (another loss or optimiser, torch.compile or amp)."""
    loss = str(OmegaConf.select(cfg, "loss._target_", default=""))
    optim = str(OmegaConf.select(cfg, "optim._target_", default=""))
    if loss not in LOSSES or optim not in OPTIMISERS or cfg.trainer.compile or cfg.trainer.amp:
        return None
    if OmegaConf.select(cfg, "optim.amsgrad", default=False):
        return None
    return repr(sorted(run_settings(cfg, exclude=MEMBER_KEYS).items()))


@dataclass
class Member:
    """One student of a population: its recipe, its loss and what sees its epochs."""

    recipe: object  # kd.pipeline.Recipe (not imported: the pipeline imports this module)
    loss: nn.Module
    on_epoch: Callable[[dict], None] | None = None
    desc: str = "member"


def population_terms(
    losses: list[nn.Module], student: torch.Tensor, labels: torch.Tensor, teacher: torch.Tensor | None
) -> dict[str, torch.Tensor]:
    """Each member's loss terms, ``[N]`` each, from ``[N, B, C]`` logits: the same
    arithmetic as :class:`CrossEntropy` and :class:`HintonKD` per member."""
    n, b, c = student.shape
    ce = F.cross_entropy(student.reshape(n * b, c), labels.reshape(n * b), reduction="none").view(n, b).mean(1)
    if not isinstance(losses[0], HintonKD):
        return {"loss": ce, "ce": ce}
    temperature = torch.tensor([loss.temperature for loss in losses], device=student.device).view(n, 1, 1)
    alpha = torch.tensor([loss.alpha for loss in losses], device=student.device)
    student_log = F.log_softmax(student / temperature, dim=2)
    teacher_log = F.log_softmax(teacher.detach() / temperature, dim=2)
    # KL(teacher || student) summed over classes, averaged over the batch (batchmean), times T^2
    kl = (teacher_log.exp() * (teacher_log - student_log)).sum(2).mean(1) * temperature.view(n) ** 2
    loss = torch.where(alpha == 0, ce, alpha * kl + (1.0 - alpha) * ce)  # alpha=0 is exactly CE
    return {"loss": loss, "ce": ce, "kl": kl}


class StackedAdam:
    """Adam (L2 weight decay) or AdamW (decoupled) over stacked parameters ``[N, ...]``
    with one learning rate per member: torch.optim.Adam's arithmetic, row by row.
    torch's optimisers take one lr per parameter group, so N members would need N
    groups and N times the kernel launches that the population exists to save."""

    def __init__(self, params: list[torch.Tensor], optim_cfg: DictConfig) -> None:
        self.params = params
        self.betas = tuple(float(b) for b in OmegaConf.select(optim_cfg, "betas", default=(0.9, 0.999)))
        self.eps = float(OmegaConf.select(optim_cfg, "eps", default=1e-8))
        decoupled = str(optim_cfg._target_) == "torch.optim.AdamW"
        self.weight_decay = float(OmegaConf.select(optim_cfg, "weight_decay", default=0.01 if decoupled else 0.0))
        self.decoupled = decoupled
        self.exp_avg = [torch.zeros_like(p) for p in params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in params]
        self.steps = 0

    @torch.no_grad()
    def step(self, lr: torch.Tensor, beta1: torch.Tensor) -> None:
        """One step; ``lr`` and ``beta1`` per member (a one-cycle schedule cycles beta1)."""
        self.steps += 1
        beta2 = self.betas[1]
        bias1 = 1 - beta1**self.steps
        bias2_sqrt = math.sqrt(1 - beta2**self.steps)
        for param, exp_avg, exp_avg_sq in zip(self.params, self.exp_avg, self.exp_avg_sq, strict=True):
            shape = (-1, *([1] * (param.dim() - 1)))
            member_lr, member_beta1 = lr.view(shape), beta1.view(shape)
            grad = param.grad
            if self.weight_decay and self.decoupled:
                param.mul_(1 - member_lr * self.weight_decay)
            elif self.weight_decay:
                grad = grad.add(param, alpha=self.weight_decay)
            exp_avg.lerp_(grad, 1 - member_beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denom = (exp_avg_sq.sqrt() / bias2_sqrt).add_(self.eps)
            param.sub_(member_lr / bias1.view(shape) * exp_avg / denom)

    def zero_grad(self) -> None:
        for param in self.params:
            param.grad = None

    def keep(self, rows: torch.Tensor, params: list[torch.Tensor]) -> None:
        """Carry on with only ``rows`` of the population (``params`` already cut)."""
        self.params = params
        self.exp_avg = [s[rows] for s in self.exp_avg]
        self.exp_avg_sq = [s[rows] for s in self.exp_avg_sq]


class _MemberRate:
    """A member's learning rate and Adam beta1 at each step, from its own schedule."""

    def __init__(self, recipe, cfg: DictConfig, total_steps: int) -> None:
        betas = tuple(float(b) for b in OmegaConf.select(recipe.optim, "betas", default=(0.9, 0.999)))
        # A one-parameter Adam that only carries what the schedule sets (one-cycle
        # also cycles beta1, as it does on a single run's optimiser).
        self.holder = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=float(recipe.optim.lr), betas=betas)
        self.scheduler = None
        if recipe.schedule is not None:
            self.scheduler = build(recipe.schedule, cfg)(self.holder, total_steps=total_steps)

    def current(self) -> tuple[float, float]:
        group = self.holder.param_groups[0]
        return group["lr"], group["betas"][0]

    def step(self) -> None:
        if self.scheduler is not None:
            self.holder.step()  # a no-op (no gradient); keeps torch's step-order check satisfied
            self.scheduler.step()


def train_population(
    members: list[Member],
    ctx,  # kd.pipeline.Context
    teacher=None,  # kd.pipeline.TeacherSource
    progress: bool = False,
    log_every_s: float = 30.0,
) -> list:
    """Train ``members`` together; returns per member a :class:`kd.pipeline.Trained`, or
    the exception that stopped it (:class:`Diverged`, or what its ``on_epoch`` raised,
    e.g. :class:`kd.errors.Pruned`). Members must share model, epochs, batch size and
    augmentation (see :func:`population_key`)."""
    from kd.pipeline import Trained

    cfg, data, device = ctx.cfg, ctx.data, ctx.device
    first = members[0].recipe
    epochs, batch_size = first.epochs, first.batch_size
    models = []
    for member in members:
        torch.manual_seed(member.recipe.seed)  # the very initialisation a single run of this seed gets
        models.append(build(member.recipe.model, cfg, num_classes=data.num_classes).to(device))
    params, buffers = stack_module_state(models)
    names = list(params)
    template = models[0]

    def forward(p: dict, b: dict, x: torch.Tensor) -> torch.Tensor:
        return functional_call(template, (p, b), (x,))

    train_forward = vmap(forward, in_dims=(0, 0, 0), randomness="different")
    eval_forward = vmap(forward, in_dims=(0, 0, None))
    streams = [
        BatchStream(ctx.train_images, ctx.train_labels, data.train_idx, batch_size, m.recipe.seed) for m in members
    ]
    steps_per_epoch = len(streams[0])
    views = teacher.views if teacher is not None else None
    augments = [
        (CachedViews(views, m.recipe.seed) if views is not None else RandomViews(m.recipe.seed))
        if first.augment
        else None
        for m in members
    ]
    rates = [_MemberRate(m.recipe, cfg, epochs * steps_per_epoch) for m in members]
    optimizer = StackedAdam([params[k] for k in names], first.optim)
    val_images = ctx.train_images[data.val_idx.to(device)]
    val_labels = ctx.train_labels[data.val_idx.to(device)]

    alive = list(range(len(members)))  # member numbers still training, in row order
    outcomes: list = [None] * len(members)
    histories: list[list[dict]] = [[] for _ in members]
    train_seconds = 0.0
    last_lr: dict[int, float] = {}

    def drop(stopped: dict[int, BaseException]) -> None:
        nonlocal params, buffers, alive
        for number, err in stopped.items():
            outcomes[number] = err
            log.info("%s stopped: %s", members[number].desc, err)
        rows = torch.tensor([r for r, n in enumerate(alive) if n not in stopped], dtype=torch.long, device=device)
        alive = [n for n in alive if n not in stopped]
        params = {k: v.detach()[rows].clone().requires_grad_(True) for k, v in params.items()}
        buffers = {k: v[rows] for k, v in buffers.items()}
        optimizer.keep(rows, [params[k] for k in names])

    @torch.no_grad()
    def accuracies(images: torch.Tensor, labels: torch.Tensor) -> list[float]:
        if len(labels) == 0:
            return [float("nan")] * len(alive)
        template.eval()
        correct = torch.zeros(len(alive), device=device)
        chunk = max(16, min(1024, 65536 // len(alive)))  # about 64k member-images per pass
        for i in range(0, len(images), chunk):
            logits = eval_forward(params, buffers, ctx.preprocess(images[i : i + chunk]).contiguous())
            correct += (logits.argmax(2) == labels[i : i + chunk]).sum(1)
        template.train()
        return (100.0 * correct / len(labels)).tolist()

    for epoch in range(1, epochs + 1):
        if not alive:
            break
        start = time.perf_counter()
        orders = {n: streams[n].order(epoch) for n in alive}
        loss_sums = torch.zeros(len(alive), device=device)
        term_sums: dict[str, torch.Tensor] = {}
        bar = tqdm(
            total=steps_per_epoch,
            desc=f"population of {len(alive)} epoch {epoch}/{epochs}",
            disable=not progress,
            leave=False,
        )
        last_line = start
        for step in range(1, steps_per_epoch + 1):
            span = slice((step - 1) * batch_size, step * batch_size)
            idx = torch.stack([orders[n][span] for n in alive])  # [N, B]: each member's own batch
            n_alive, b = idx.shape
            flat = idx.reshape(-1)
            images = ctx.train_images[flat]
            slots = None
            if first.augment:
                drawn = [augments[n].draw(orders[n][span]) for n in alive]
                chosen = torch.cat([v.to(images.device) for v, _ in drawn])
                images = apply_views(images, chosen)
                if drawn[0][1] is not None:
                    slots = torch.cat([s.to(images.device) for _, s in drawn])
            inputs = ctx.preprocess(images).contiguous()
            teacher_logits = None
            if teacher is not None:
                teacher_logits = teacher.signal(flat, inputs, slots)[0].float().view(n_alive, b, -1)
            student_logits = train_forward(params, buffers, inputs.view(n_alive, b, *inputs.shape[1:]))
            labels = ctx.train_labels[flat].view(n_alive, b)
            terms = population_terms([members[n].loss for n in alive], student_logits.float(), labels, teacher_logits)
            optimizer.zero_grad()
            terms["loss"].sum().backward()  # members share no parameters: each gets its own gradient
            rate_list = [rates[n].current() for n in alive]  # (lr, beta1) per member, on the host
            rate_now = torch.tensor(rate_list, device=device)
            optimizer.step(rate_now[:, 0], rate_now[:, 1])
            last_lr.update((n, lr) for n, (lr, _) in zip(alive, rate_list, strict=True))
            for n in alive:
                rates[n].step()
            loss_sums += terms["loss"].detach()
            for name, value in terms.items():
                if name != "loss":
                    term_sums[name] = term_sums.get(name, 0) + value.detach()
            if step % int(cfg.trainer.check_every) == 0 or step == steps_per_epoch:
                means = (loss_sums / step).tolist()
                bad = {
                    alive[r]: Diverged(epoch, step, means[r], phase=members[alive[r]].desc)
                    for r in range(len(alive))
                    if not math.isfinite(means[r])
                }
                if bad:
                    keep = [r for r in range(len(alive)) if alive[r] not in bad]
                    loss_sums = loss_sums[keep]
                    term_sums = {k: v[keep] for k, v in term_sums.items()}
                    drop(bad)
                    if not alive:
                        break
                if not progress and time.perf_counter() - last_line >= log_every_s:
                    last_line = time.perf_counter()
                    log.info(
                        "population epoch %d/%d: step %d/%d, %d members",
                        epoch,
                        epochs,
                        step,
                        steps_per_epoch,
                        len(alive),
                    )
            bar.update(1)
        bar.close()
        if not alive:
            break
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        train_seconds += seconds
        val = accuracies(val_images, val_labels) if len(data.val_idx) else None
        stopped: dict[int, BaseException] = {}
        means = (loss_sums / steps_per_epoch).tolist()
        terms_now = {k: v.tolist() for k, v in term_sums.items()}
        for row, number in enumerate(alive):
            entry = {"epoch": epoch, "train_loss": means[row], "seconds": seconds, "population": len(alive)}
            for name, values in terms_now.items():
                if name == "kl" and members[number].loss.alpha == 0.0:
                    continue  # a single run with alpha=0 never computes the KL term
                entry[f"loss_{name}"] = values[row] / steps_per_epoch
            entry["lr"] = last_lr[number]  # of the epoch's last step, as a single run records
            if val is not None:
                entry["val_acc"] = val[row]
            histories[number].append(entry)
            if members[number].on_epoch is not None:
                try:
                    members[number].on_epoch(entry)
                except Exception as err:  # a pruned trial (or a failing reporter) stops this member only
                    stopped[number] = err
        log.info("population epoch %d/%d: %d members, %.1fs", epoch, epochs, len(alive), seconds)
        if stopped:
            drop(stopped)

    if alive:
        test = accuracies(ctx.test_images, ctx.test_labels)
        for row, number in enumerate(alive):
            model = models[number]
            with torch.no_grad():
                for name, param in model.named_parameters():
                    param.copy_(params[name][row])
            val_acc = histories[number][-1].get("val_acc", float("nan"))
            fit = FitResult(history=histories[number], train_seconds=train_seconds)
            outcomes[number] = Trained(model, fit, val_acc, test[row])
    return outcomes


@dataclass
class JobShare:
    """What one job of a trained population gets: the shared data and teacher, and
    per seed its member's outcome (a trained model, or what stopped it)."""

    context: object  # kd.pipeline.Context
    teacher: object | None  # kd.pipeline.TeacherSource
    outcomes: dict[int, object]


def train_jobs(configs: list[DictConfig], device: str | None = None) -> list[JobShare | None]:
    """Train the seeds of ``configs`` (one population group) as one population.

    A job whose config fails validation gets None: it then runs as usual and reports
    its own error. Each job's trial reporter (``kd_optuna``) sees its members' epochs,
    so pruning works as in single runs.
    """
    from kd.config import trial_seeds, validate
    from kd.devices import select_device, threads_per_job
    from kd.errors import KDError
    from kd.pipeline import make_context, prepare_teacher, run_recipe, show_progress
    from kd.teacher import TeacherStore
    from kd.tuning import epoch_reporter

    valid = []
    for cfg in configs:
        try:
            validate(cfg)
            valid.append(cfg)
        except KDError:
            pass
    shares: list[JobShare | None] = [None] * len(configs)
    if len(valid) < 2:
        return shares
    first = valid[0]
    torch.set_num_threads(int(first.trainer.num_threads or threads_per_job(1)))
    ctx = make_context(first, select_device(device or str(first.trainer.device)))
    needs_teacher = build(first.loss, first).needs_teacher
    teacher = prepare_teacher(ctx, TeacherStore(first.paths.store_dir)) if needs_teacher else None
    members, owners = [], []
    for cfg in valid:
        env = OmegaConf.select(cfg, "hydra.job.env_set", default=None) or {}
        reporter = epoch_reporter({str(k): str(v) for k, v in env.items()})
        for index, seed in enumerate(trial_seeds(cfg)):
            recipe = run_recipe(cfg, seed)

            def on_epoch(entry: dict, offset: int = index * recipe.epochs, report=reporter) -> None:
                if report is not None and "val_acc" in entry:
                    report(offset + entry["epoch"], entry["val_acc"])

            torch.manual_seed(seed)
            members.append(Member(recipe, build(cfg.loss, cfg), on_epoch, desc=f"job {cfg.hydra.job.num} seed {seed}"))
            owners.append(cfg)
    log.info("training a population of %d students (%d jobs) on %s", len(members), len(valid), ctx.device)
    outcomes = train_population(members, ctx, teacher, progress=show_progress(first.trainer.progress))
    by_job: dict[int, JobShare] = {}
    for cfg, member, outcome in zip(owners, members, outcomes, strict=True):
        by_job.setdefault(id(cfg), JobShare(ctx, teacher, {})).outcomes[member.recipe.seed] = outcome
    for position, cfg in enumerate(configs):
        shares[position] = by_job.get(id(cfg))
    return shares
