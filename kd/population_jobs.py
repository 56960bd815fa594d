"""A population launcher's jobs: each job's members (one per seed of the job), how a
job's trial hears of each epoch, and training every job of one population together
(:func:`train_jobs`, called by ``hydra/launcher=population``)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from omegaconf import DictConfig, OmegaConf

from kd.devices import select_device, threads_per_job, use_cpu
from kd.errors import KDError
from kd.plan import RunPlan, resolve
from kd.population import Member, train_population
from kd.provision import prepare_teacher
from kd.recipes import (
    Context,
    TeacherSource,
    Trained,
    check_steps,
    make_context,
)
from kd.teacher import TeacherStore
from kd.tuning import epoch_reporter, use_replicate

log = logging.getLogger(__name__)


@dataclass
class JobShare:
    """What one job of a trained population gets: the shared data and teacher, and
    per seed its member's outcome (a trained model, or what stopped it)."""

    context: Context
    teacher: TeacherSource | None
    outcomes: dict[int, Trained | BaseException]


def _job_members(cfg: DictConfig, plan: RunPlan) -> list[Member]:
    """A job's members, one per seed, each reporting its epochs to the job's trial."""
    env = OmegaConf.select(cfg, "hydra.job.env_set", default=None) or {}
    reporter = epoch_reporter({str(k): str(v) for k, v in env.items()})
    members = []
    for index, seed in enumerate(plan.seeds):
        recipe = plan.recipe(seed)
        desc = f"job {cfg.hydra.job.num} seed {seed}"
        members.append(Member(recipe, plan.new_loss(), seed_reporter(reporter, index, recipe.epochs), desc, id(cfg)))
    return members


def seed_reporter(reporter: Callable | None, index: int, epochs: int) -> Callable[[dict], None]:
    """Report seed ``index``'s epochs as a single run does: step ``index x epochs +
    epoch``, in step order. The seeds of a population train side by side, so a later
    seed's epochs are held back until the seeds before it have reported all theirs (at
    its last epoch, which the population hands over after theirs)."""
    held: list[dict] = []

    def on_epoch(entry: dict) -> None:
        if reporter is None or "val_acc" not in entry:
            return
        held.append(entry)
        if index == 0 or entry["epoch"] == epochs:
            for seen in held:
                reporter(index * epochs + seen["epoch"], seen["val_acc"])
            held.clear()

    return on_epoch


def _steps_fit(plan: RunPlan, ctx: Context) -> bool:
    """Whether a job's schedule can run over its steps; one that cannot runs alone, and
    is refused there before its teacher is prepared."""
    try:
        check_steps(plan.student, ctx)
    except KDError:
        return False
    return True


def _plans(configs: list[DictConfig]) -> dict[int, RunPlan]:
    """Each valid job's plan, by its index; a job kd refuses runs alone and says why."""
    plans = {}
    for index, cfg in enumerate(configs):
        try:
            use_replicate(cfg)  # a racing sweep's seed-run trains its replicate's seed
            plans[index] = resolve(cfg)
        except KDError:
            continue
    return plans


def train_jobs(configs: list[DictConfig], device: str | None = None) -> list[JobShare | None]:
    """Train the seeds of ``configs`` (one population group) as one population.

    A job whose config fails validation gets None: it then runs as usual and reports
    its own error. Each job's trial reporter (``kd_optuna``) sees its members' epochs,
    so pruning works as in single runs.
    """
    plans = _plans(configs)
    if len(plans) < 2:
        return [None] * len(configs)
    first = next(iter(plans.values()))
    use_cpu(first.num_threads or threads_per_job(1), first.flush_denormal)
    ctx = make_context(first, select_device(device or first.device))
    plans = {i: plan for i, plan in plans.items() if _steps_fit(plan, ctx)}  # before any teacher work
    if len(plans) < 2:
        return [None] * len(configs)
    first = next(iter(plans.values()))
    loss = first.new_loss()
    teacher = (
        prepare_teacher(ctx, TeacherStore(first.store_dir), tuple(loss.teacher_features))
        if loss.needs_teacher
        else None
    )
    jobs = [(i, member) for i, plan in plans.items() for member in _job_members(configs[i], plan)]
    log.info("training a population of %d students (%d jobs) on %s", len(jobs), len(plans), ctx.device)
    outcomes = train_population([m for _, m in jobs], ctx, teacher, progress=first.trainer.progress)
    by_job: dict[int, JobShare] = {}
    for (index, member), outcome in zip(jobs, outcomes, strict=True):
        by_job.setdefault(index, JobShare(ctx, teacher, {})).outcomes[member.recipe.seed] = outcome
    return [by_job.get(index) for index in range(len(configs))]
