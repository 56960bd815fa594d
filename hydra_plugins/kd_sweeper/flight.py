"""Trials in flight: with ``n_jobs = k`` the sweeper keeps k trials running, and asks and
starts the next one as soon as any ends (complete, pruned or failed), instead of waiting
for the slowest trial of a batch.

Each trial is one launcher call (``launch([its overrides], initial_job_idx=its number)``)
made from its own thread, so any launcher whose jobs run outside the sweeper's process
(joblib, submitit's local and SLURM executors, ...) runs them side by side. Only the
sweeper's thread asks, tells and reads the study; a launch thread only waits for its job.
Launchers that run jobs inside the sweeper's process (basic, population) cannot overlap
two jobs and keep Hydra's batches.

The threads are daemons: Ctrl-C (or any error) in the sweeper marks every trial still in
flight FAIL, so none is left RUNNING, and the process exits without waiting for them.
"""

from __future__ import annotations

import logging
import sys
import threading
from concurrent.futures import FIRST_COMPLETED, Future, wait
from typing import Any

import joblib
import optuna
from omegaconf import OmegaConf

from hydra_plugins.kd_sweeper.config import available_cores
from hydra_plugins.kd_sweeper.refusals import interrupted
from hydra_plugins.kd_sweeper.study import ERROR, INTERRUPTED, counted_trials, fail_stale_trials

# Launchers that run a job in the sweeper's own process: one job at a time, in batches.
IN_PROCESS = ("BasicLauncher", "PopulationLauncher")
log = logging.getLogger(__name__)


def joblib_in_process(launcher: Any) -> str | None:
    """Why a joblib launcher would run its jobs in the sweeper's own process (None: it
    runs them in worker processes). Two such jobs at once would share one process's
    environment, Hydra config and logging: each would read the other's trial."""
    joblib_cfg = getattr(launcher, "joblib", None)
    if type(launcher).__name__ != "JoblibLauncher" or joblib_cfg is None:
        return None
    backend = joblib_cfg.get("backend") or "loky"
    if backend == "multiprocessing":
        return None  # Hydra keeps at least two worker processes
    if backend != "loky" or joblib_cfg.get("prefer") == "threads" or joblib_cfg.get("require") == "sharedmem":
        return f"hydra.launcher.backend={backend} runs jobs in threads"
    n_jobs = joblib_cfg.get("n_jobs", -1)
    if joblib.effective_n_jobs(n_jobs) == 1:  # joblib then runs the job in the calling thread
        return f"hydra.launcher.n_jobs={n_jobs} is one worker on the {available_cores()} core(s) here"
    return None


def runs_in_flight(launcher: Any, asynchronous: bool) -> bool:
    """Whether trials run in flight (asynchronously) with this launcher."""
    if not asynchronous or type(launcher).__name__ in IN_PROCESS:
        return False
    why = joblib_in_process(launcher)
    if why is not None:
        log.warning("trials run in batches, not in flight: %s; set hydra.launcher.n_jobs to hydra.sweeper.n_jobs "
                    "(at least 2) to run them in worker processes", why)  # fmt: skip
        return False
    return True


def job_number(ret: Any) -> int | None:
    """The job number (``hydra.job.num``) a launcher's JobReturn ran as; a trial's job
    runs as its trial number. None where the launcher does not say."""
    hydra_cfg = getattr(ret, "hydra_cfg", None)
    number = OmegaConf.select(hydra_cfg, "hydra.job.num", default=None) if hydra_cfg is not None else None
    return number if isinstance(number, int) else None


def _launch_in_thread(launcher: Any, overrides: tuple[str, ...], job_idx: int, name: str) -> Future:
    """One job, launched from a daemon thread; its JobReturn (or the launcher's error) in the future."""
    future: Future = Future()

    def launch() -> None:
        try:
            (ret,) = launcher.launch([list(overrides)], initial_job_idx=job_idx)
            future.set_result(ret)
        except BaseException as err:  # the launcher failed: the sweeper's thread decides
            future.set_exception(err)

    threading.Thread(target=launch, name=name, daemon=True).start()
    return future


def stop_local_workers() -> None:
    """Stop the worker processes joblib keeps on this machine. They ignore Ctrl-C: joblib
    stops them from the call that launched their jobs, which here is a launch thread that
    never sees the interrupt (without this, exit waits for every job in flight)."""
    reusable = sys.modules.get("joblib.externals.loky.reusable_executor")
    executor = getattr(reusable, "_executor", None)
    if executor is not None:
        executor.shutdown(wait=False, kill_workers=True)


class Flight:
    """Runs a sweep's trials in flight for
    :class:`~hydra_plugins.kd_sweeper.kd_sweeper.KDOptunaSweeperImpl`."""

    def __init__(self, sweeper: Any, study: optuna.Study, space: tuple, heartbeat: Any, silent: Any) -> None:
        self.sweeper, self.study, self.space = sweeper, study, space
        self.heartbeat, self.silent = heartbeat, silent
        self.in_flight: dict[Future, optuna.Trial] = {}
        self.failures: list[str] = []

    def _to_go(self) -> int:
        study = self.study
        return self.sweeper.n_trials - len(counted_trials(study)) + self.sweeper._waiting_count(study)

    def _start(self) -> bool:
        """Ask one trial and launch it; False when the target is reached (or filled by others)."""
        if self._to_go() <= 0:
            return False
        trial = self.sweeper._ask_counted(self.study, self.heartbeat)
        if trial is None:
            return False
        try:
            (params,) = self.sweeper._configure_trials([trial], *self.space)
        except Exception as err:  # e.g. a custom search space that raised: nothing left RUNNING
            self.sweeper._fail(self.study, trial, f"{ERROR}: {err}", self.heartbeat)
            raise
        overrides = (*params, *self.sweeper._job_overrides(self.study, trial))
        future = _launch_in_thread(self.sweeper.launcher, overrides, trial.number, f"kd_optuna-trial-{trial.number}")
        self.in_flight[future] = trial
        return True

    def run(self, allowed: int) -> list[str]:
        """Keep ``n_jobs`` trials in flight until the target is reached; past ``allowed``
        failures no trial starts and those in flight finish. Returns the failure reasons."""
        width = self.sweeper.n_jobs
        poll = self.heartbeat.interval or None  # wake to retire other workers' stale trials
        try:
            while True:
                if len(self.failures) <= allowed:
                    while len(self.in_flight) < width and self._start():
                        pass
                if not self.in_flight:
                    if len(self.failures) > allowed or not self.sweeper._wait_for_others(self.study, self.heartbeat):
                        return self.failures
                    self._retire()
                    continue
                done, _ = wait(list(self.in_flight), timeout=poll, return_when=FIRST_COMPLETED)
                for future in done:
                    self._settle(future)
                self._retire()
        except BaseException:
            self._abandon()
            raise

    def _retire(self) -> None:
        fail_stale_trials(self.study)
        self.silent.retire(self.study)

    def _settle(self, future: Future) -> None:
        trial = self.in_flight.pop(future)
        error = future.exception()
        if error is not None:  # the launcher itself failed: the trial never ran
            self.sweeper._fail(self.study, trial, None, self.heartbeat)
            if interrupted(error):
                raise KeyboardInterrupt from error
            raise error
        ret = future.result()
        number = job_number(ret)
        if number is not None and number != trial.number:  # never trust another trial's outcome
            reason = f"{ERROR}: the launcher returned the job of trial {number} for trial {trial.number}"
            log.warning("trial %d failed: %s", trial.number, reason)
            self.sweeper._fail(self.study, trial, reason, self.heartbeat)
            self.failures.append(reason)
            return
        reason = self.sweeper.settle(self.study, trial, ret, self.heartbeat)
        if reason is not None:
            self.failures.append(reason)

    def _abandon(self) -> None:
        """The sweep stops with trials in flight: each becomes FAIL (interrupted), so a
        rerun retries them and none is left RUNNING."""
        for trial in list(self.in_flight.values()):
            self.sweeper._fail(self.study, trial, INTERRUPTED, self.heartbeat)
        if self.in_flight:
            log.warning("stopped with trials %s in flight: marked failed (interrupted)",
                        sorted(t.number for t in self.in_flight.values()))  # fmt: skip
        self.in_flight.clear()
        stop_local_workers()
