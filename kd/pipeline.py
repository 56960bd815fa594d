"""One run, start to end: from the composed config to ``metrics.json``.

:func:`run` checks the config and resolves it once (:func:`kd.plan.resolve`), picks the
device, loads the data (:func:`kd.recipes.make_context`), finds the teacher (:mod:`kd.provision`), trains the
run's model on each of its seeds (:func:`kd.recipes.train_model`), with the CE baseline
a KD run is compared with, and writes the summary over seeds. A rerun reads back what
an earlier one finished; a crashed or pruned seed is recorded as such.
"""

from __future__ import annotations

import logging
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from kd.cluster import ended_before, slurm_job
from kd.cost import measure
from kd.devices import select_device, threads_per_job, use_cpu, uses_bf16
from kd.errors import Diverged, Pruned
from kd.plan import RunPlan, resolve
from kd.provision import ce_baseline, checkpoint_of, finite_or_none, prepare_teacher, publish
from kd.recipes import (
    Context,
    TeacherSource,
    Trained,
    check_steps,
    image_shape,
    make_context,
    model_target,
    resume_file,
    run_model_key,
    train_model,
)
from kd.resume import ResumeFile
from kd.stats import describe, fmt_difference, fmt_mean_se, paired_difference
from kd.storage import check_writable, save_checked, write_json
from kd.teacher import TeacherStore
from kd.tracking import NullLogger

log = logging.getLogger(__name__)


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


def _run_header(plan: RunPlan, ctx: Context, loss_fn: nn.Module, threads: int) -> dict:
    """metrics.json's fields known before training: what runs, on what, where."""
    data, device, student, seeds = ctx.data, ctx.device, plan.student, list(plan.seeds)
    hparams = loss_fn.hparams()
    model_name = model_target(student.model).rsplit(".", 1)[-1]
    bf16 = uses_bf16(student.amp, device)
    if loss_fn.needs_teacher:  # refused here, not after an hour of student training
        uses_bf16(plan.teacher.recipe.amp, device, key="teacher.amp")
    metrics: dict[str, Any] = {
        "model": model_name,
        "loss": loss_fn.name,
        "loss_title": loss_fn.display_name(),
        "loss_symbols": [[name, symbol] for name, symbol in loss_fn.symbols.items()],  # in the method's order
        "loss_hparams": hparams,
        **{name: hparams.get(name) for name in loss_fn.header_fields},
        "epochs": student.epochs,
        "batch_size": student.batch_size,
        "lr": float(student.optim.lr),
        "seed": seeds[0],
        "seeds": seeds,
        "dataset": data.name,
        "train_examples": len(data.train_idx),
        "val_examples": len(data.val_idx),
        "test_examples": len(data.test.labels),
        "input_shape": list(image_shape(ctx)),
        "objective": plan.objectives[0] if len(plan.objectives) == 1 else list(plan.objectives),
        "device": str(device),
        "num_threads": int(threads),
        "amp": "bf16" if bf16 else "off",  # trainer.amp as it resolved on this device
        "host": platform.node(),
        **slurm_job(),
        # Every result-deciding setting but the seed: the report's grouping key.
        "settings": plan.result_settings(exclude=("seed", "trial.seeds")),
    }
    log.info(
        "device %s, %d threads%s, %s: %d train / %d val / %d test; seeds %s",
        device,
        threads,
        f", bf16 autocast (trainer.amp={student.amp})" if bf16 else "",
        data.name,
        len(data.train_idx),
        len(data.val_idx),
        len(data.test.labels),
        seeds,
    )
    return metrics


def _phases(plan: RunPlan, ctx: Context, loss_fn: nn.Module, model_name: str, baseline: bool) -> str:
    """The phases this run goes through, in order: said before the first of them starts."""

    def epochs(n: int) -> str:
        return f"{n} epoch{'s' if n != 1 else ''}"

    seeds = plan.seeds
    each = epochs(plan.student.epochs) + (f" x {len(seeds)} seeds" if len(seeds) > 1 else "")
    phases = []
    if loss_fn.needs_teacher:
        teacher = plan.teacher
        phases.append(
            "teacher from teacher.checkpoint" if teacher.checkpoint else f"teacher ({epochs(teacher.recipe.epochs)})"
        )
        if ctx.data.augment:
            phases.append("teacher on the training views (online, or once per view)")
        else:
            phases.append("teacher logits over the training set")
    phases.append(f"{model_name} ({each})")
    if baseline:
        phases.append(f"CE baseline ({each})")
    return " -> ".join(phases) + (
        "; stored teachers, outputs and baselines are reused" if loss_fn.needs_teacher else ""
    )


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
    with_baseline: bool


def _run_seed(job: SeedJob, index: int, seed: int, resume: ResumeFile, outcome: Any = None) -> tuple[Trained, dict]:
    """Train seed ``seed``'s model (or take the population's ``outcome`` for it), save
    it, and return it with its per-seed record (with its CE baseline for KD)."""
    recipe = job.ctx.plan.recipe(seed)
    desc = f"{job.model_name} seed {seed}" if len(job.ctx.plan.seeds) > 1 else job.model_name
    offset = index * recipe.epochs  # seed i's epoch e is step i * epochs + e

    def on_epoch(entry: dict) -> None:
        job.tracker.log_epoch(offset + entry["epoch"], {**entry, "seed": seed})
        if job.report is not None and "val_acc" in entry:
            job.report(offset + entry["epoch"], entry["val_acc"])

    torch.manual_seed(seed)
    loss_fn = job.ctx.plan.new_loss()
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
    checkpoint = checkpoint_of(trained, recipe, job.ctx)
    path = job.output_dir / ("model.pt" if len(job.ctx.plan.seeds) == 1 else f"model_seed{seed}.pt")
    save_checked(checkpoint, path)
    record: dict[str, Any] = {
        "seed": seed,
        "val_acc": finite_or_none(trained.val_acc),
        "test_acc": trained.test_acc,
        "train_seconds": trained.fit.train_seconds,
        "checkpoint": str(path),
        "history": trained.fit.history,
    }
    if not loss_fn.needs_teacher:
        publish(job.store, checkpoint)
    elif job.with_baseline:
        record["baseline"] = ce_baseline(recipe, job.ctx, job.store, seed)
    return trained, record


def _write_results(metrics: dict, job: SeedJob, resumes: list[ResumeFile]) -> None:
    """metrics.json, then the resume files go (nothing left to resume), then the tracker."""
    write_json(job.output_dir / "metrics.json", metrics)
    for resume in resumes:
        resume.remove()
    job.tracker.finish(metrics)


def _finish(
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
        **_cost(trained.model, job.ctx),
        per_seed=per_seed,
        **summary,
        train_seconds=sum(s["train_seconds"] for s in per_seed) / len(per_seed),
        epochs_trained=len(per_seed) * job.ctx.plan.student.epochs,
        wall_seconds=time.time() - started,
        history=per_seed[0]["history"],
        checkpoint=per_seed[0]["checkpoint"],
    )
    objective = [metrics[name] for name in job.ctx.plan.objectives]
    metrics["objective_value"] = objective if len(objective) > 1 else objective[0]
    _write_results(metrics, job, resumes)
    _log_summary(job.model_name, len(job.ctx.plan.seeds), summary, job.with_baseline)


def _cost(model: nn.Module, ctx: Context) -> dict[str, Any]:
    """The trained model's params and FLOPs per image, and (``cost.timing``) its latency
    and throughput on this run's device and threads."""
    planned = ctx.plan.cost
    cost = measure(
        model,
        image_shape(ctx),
        timing=planned.timing,
        batch_size=planned.batch_size,
        min_run_time=planned.min_run_time,
        memory_format=ctx.memory_format,
    )
    timed = (
        f", {cost['latency_ms']:.3g} ms per image (batch 1), {cost['throughput']:,.0f} images/s "
        f"(batch {planned.batch_size}) on {cost['cost']['device']} with {cost['cost']['threads']} threads"
        if "latency_ms" in cost
        else ""
    )
    log.info("cost: %s params, %s FLOPs per image%s", f"{cost['params']:,}", f"{cost['flops']:,}", timed)
    return cost


def _preflight(cfg: DictConfig, output_dir: Path) -> RunPlan:
    """Before any work: refuse bad values and unwritable destinations in one line, warn
    about legal settings that cannot mean what they say, and resolve the config once."""
    plan = resolve(cfg)
    check_writable(output_dir, "hydra.run.dir (hydra.sweep.dir in a multirun)")
    check_writable(plan.store_dir, "paths.store_dir (or KD_STORE_DIR, KD_CACHE_DIR)")
    for warning in plan.warnings:
        log.warning("%s", warning)
    return plan


def _start_tracker(plan: RunPlan, output_dir: Path, tags: dict[str, Any] | None) -> Any:
    """The run's tracker (``logger``), started: a destination it cannot use stops the run here."""
    tracker = plan.build(plan.logger, output_dir=output_dir) if plan.logger else NullLogger()
    tracker.start(plan.settings, {"run_dir": str(output_dir), **(tags or {})})
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
    plan = _preflight(cfg, output_dir)
    if (earlier := _ended_job_outcome(output_dir)) is not None:  # SLURM ran a finished job again
        return earlier
    device = context.device if context is not None else select_device(plan.device, job_num)
    threads = plan.num_threads or threads_per_job(parallel_jobs)
    flushed = use_cpu(threads, plan.flush_denormal)
    store = TeacherStore(plan.store_dir)
    # A population's jobs share its context (data, device); each job keeps its own plan.
    ctx = replace(context, plan=plan) if context is not None else make_context(plan, device)
    check_steps(plan.student, ctx)  # before any teacher work
    loss_fn = plan.new_loss()  # rebuilt per seed below: a loss may hold trainable parts
    with_baseline = bool(loss_fn.needs_teacher and plan.baseline)
    metrics = {**_run_header(plan, ctx, loss_fn, int(threads)), "flush_denormal": flushed}
    log.info("phases: %s", _phases(plan, ctx, loss_fn, metrics["model"], with_baseline))
    if "val_acc" in plan.objectives and not len(ctx.data.val_idx):
        log.warning("data.val_size=0: no validation accuracy; the objective is n/a (test accuracy is reported)")
    tracker = _start_tracker(plan, output_dir, tags)
    job = SeedJob(ctx, store, tracker, report, teacher_source, output_dir, metrics["model"], with_baseline)
    per_seed: list[dict] = []
    # One resume file per seed's training; kept until this run's results are written.
    resumes = [resume_file(ctx, run_model_key(ctx, seed)) for seed in plan.seeds]
    try:
        if loss_fn.needs_teacher:
            job.teacher = teacher_source or prepare_teacher(ctx, store, tuple(loss_fn.teacher_features))
            metrics.update(job.teacher.info)
        for index, seed in enumerate(plan.seeds):
            outcome = pretrained.get(seed) if pretrained is not None else None
            trained, entry = _run_seed(job, index, seed, resumes[index], outcome)
            per_seed.append(entry)
    except (Diverged, Pruned) as err:
        # Stopped early: record where, keep the seeds that finished, and pass it on.
        metrics.update(_stop_fields(err), per_seed=per_seed, wall_seconds=time.time() - started)
        _write_results(metrics, job, resumes)  # a rerun would stop the same way: no resume either
        if isinstance(err, Pruned):
            log.info("%s; results: %s", err, output_dir / "metrics.json")
        raise

    _finish(metrics, per_seed, trained, job, resumes, started)
    log.info("results: %s", output_dir / "metrics.json")
    return metrics
