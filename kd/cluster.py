"""What kd does about SLURM: which node ran a job, and quiet scheduler polls.

A trial launched through hydra-submitit-launcher (``hydra/launcher=slurm`` or
``slurm_cpu``) records its job id, node and restart count in metrics.json
(:func:`slurm_job`). On a cluster that keeps no accounting, submitit's every poll of
the job states warns "Bypassing sacct error" (three lines); :class:`QuietAccountingPolls`
says once what it means and drops the rest. (sacct's own "Slurm accounting storage is
disabled" goes straight to the terminal from its process, past any logger.)
"""

from __future__ import annotations

import logging
import os
import platform
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

SACCT_WARNING = "Bypassing sacct error"


def slurm_job(env: dict[str, str] | None = None) -> dict[str, Any]:
    """``{"slurm": {job_id, node, restart_count}}`` inside a SLURM job, else ``{}``: which
    node ran a trial (several nodes may share a host name) and whether it was requeued."""
    env = dict(os.environ) if env is None else env
    if "SLURM_JOB_ID" not in env:
        return {}
    job = {"job_id": env["SLURM_JOB_ID"], "node": env.get("SLURMD_NODENAME", platform.node())}
    return {"slurm": {**job, "restart_count": int(env.get("SLURM_RESTART_COUNT", 0))}}


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
