"""What kd does about SLURM: which node ran a job, a job run again, a launcher that
cannot work, quiet scheduler polls.

A trial launched through hydra-submitit-launcher (``hydra/launcher=slurm`` or
``slurm_cpu``) records its job id, node and restart count in metrics.json
(:func:`slurm_job`). A preempted or timed-out job is requeued by submitit and resumes
from its training checkpoints (kd.resume); a job that SLURM runs again after it ended
(``scontrol requeue``) finds its own metrics.json (:func:`ended_before`) and trains
nothing. :class:`CheckSlurmLauncher` refuses, before submitting, a partition the
cluster lacks or a time limit shorter than SLURM's warning. On a cluster that keeps no
accounting, submitit's every poll of the job states warns "Bypassing sacct error"
(three lines); :class:`QuietAccountingPolls` says once what it means and drops the
rest. (sacct's own "Slurm accounting storage is disabled" goes straight to the
terminal from its process, past any logger.)
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from kd.errors import ConfigError

SACCT_WARNING = "Bypassing sacct error"
ENDED = ("completed", "pruned", "diverged")  # a run's final statuses in metrics.json
# slurmctld checks time limits every 30 s and sends a job's --signal when no more than
# signal_delay_s + 30 s are left, so a requeued job may be signalled as it starts.
SLURM_POLL_S = 30
MIN_RUN_S = 60  # what a job must have to train before that signal


def slurm_job(env: dict[str, str] | None = None) -> dict[str, Any]:
    """``{"slurm": {job_id, node, restart_count}}`` inside a SLURM job, else ``{}``: which
    node ran a trial (several nodes may share a host name) and whether it was requeued."""
    env = dict(os.environ) if env is None else env
    if "SLURM_JOB_ID" not in env:
        return {}
    job = {"job_id": env["SLURM_JOB_ID"], "node": env.get("SLURMD_NODENAME", platform.node())}
    return {"slurm": {**job, "restart_count": int(env.get("SLURM_RESTART_COUNT", 0))}}


def ended_before(output_dir: str | os.PathLike, env: dict[str, str] | None = None) -> dict | None:
    """The metrics.json this very SLURM job wrote when it ran to an end (completed, pruned
    or diverged) before SLURM started it again, else None.

    SLURM runs a requeued job from the top, and a hard ``scontrol requeue`` can catch a
    job that has already finished: the second run must neither train again nor write
    over the first one's results. Only a restarted job (SLURM_RESTART_COUNT > 0) with
    the same job id in its run directory's metrics.json counts; another sweep's leftover
    file in a reused directory does not."""
    job = slurm_job(env).get("slurm")
    if not job or not job["restart_count"]:
        return None
    try:
        metrics = json.loads((Path(output_dir) / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(metrics, dict) or metrics.get("status") not in ENDED:
        return None
    recorded = metrics.get("slurm")
    return metrics if isinstance(recorded, dict) and recorded.get("job_id") == job["job_id"] else None


def partitions() -> list[str] | None:
    """The cluster's partitions as sinfo names them (the default one ends in ``*``), or
    None when sinfo cannot tell (no SLURM client here, or no controller answering)."""
    if shutil.which("sinfo") is None:
        return None
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return sorted(set(out.stdout.split())) if out.returncode == 0 else None


def launcher_problem(launcher: DictConfig | dict, known: list[str] | None) -> str | None:
    """What in a SLURM launcher config cannot work, as one line with its fix; None if
    nothing. ``known`` is :func:`partitions` (None: not checked)."""
    partition = launcher.get("partition")
    if known is not None:
        names = [name.rstrip("*") for name in known]
        if partition is None and not any(name.endswith("*") for name in known):
            return (
                f"hydra.launcher.partition is not set and this cluster has no default partition; "
                f"set it to one of: {', '.join(names)}"
            )
        if partition is not None and any(p not in names for p in str(partition).split(",")):
            return (
                f"hydra.launcher.partition={partition}: no such partition on this cluster; "
                f"sinfo lists: {', '.join(names) or 'none'}"
            )
    timeout_s = 60 * float(launcher.get("timeout_min") or 0)
    delay_s = float(launcher.get("signal_delay_s") or 0)
    if timeout_s - delay_s - SLURM_POLL_S < MIN_RUN_S:
        return (
            f"hydra.launcher.timeout_min={launcher.get('timeout_min')} leaves under {MIN_RUN_S} s to train: SLURM "
            f"signals a job up to signal_delay_s + {SLURM_POLL_S} s ({delay_s:.0f} + {SLURM_POLL_S} s) before its time "
            "limit, and a requeued job would be stopped again as it starts; raise timeout_min or lower signal_delay_s"
        )
    return None


class CheckSlurmLauncher(Callback):
    """A Hydra callback: a SLURM sweep whose launcher cannot work on this cluster (a
    partition it lacks, a time limit shorter than SLURM's warning) stops in one line
    before any job is submitted, instead of with sbatch's traceback or a job that is
    signalled, requeued and signalled again."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        launcher = config.hydra.launcher
        if not str(launcher.get("_target_", "")).endswith(".SlurmLauncher"):
            return
        problem = launcher_problem(launcher, partitions())
        if problem:
            # Hydra turns a callback's exception into a warning and goes on: stop here.
            print(f"kd: error: {problem}", file=sys.stderr)
            sys.exit(ConfigError.exit_code)


class _OncePerSweep(logging.Filter):
    def __init__(self) -> None:
        super().__init__()
        self.seen = False

    def filter(self, record: logging.LogRecord) -> bool:
        if SACCT_WARNING not in record.getMessage():
            return True
        if self.seen:
            return False
        self.seen = True
        record.msg = (
            "SLURM keeps no accounting here (sacct fails): submitit reads job states from squeue "
            "instead, which works; this is said once per sweep"
        )
        record.args = ()
        return True


class QuietAccountingPolls(Callback):
    """A Hydra callback: one line, not three per poll, when the cluster has no sacct.

    submitit prints each of its records twice through handlers of its own (stdout and
    stderr) besides passing it on to the run's; in the launching process they go
    through the run's handlers alone, in kd's one log format."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:  # submitit installs its handlers when imported: import it first, then take them off
            import submitit  # noqa: F401
        except ImportError:  # no submitit launcher installed: nothing to quiet
            return
        logger = logging.getLogger("submitit")
        for handler in [h for h in logger.handlers if isinstance(h, logging.StreamHandler)]:
            logger.removeHandler(handler)
        logger.propagate = True
        for old in [f for f in logger.filters if isinstance(f, _OncePerSweep)]:
            logger.removeFilter(old)
        logger.addFilter(_OncePerSweep())
