"""One trial's round trip, for :class:`~hydra_plugins.kd_sweeper.kd_sweeper.KDOptunaSweeperImpl`
and the loops that run its trials (batches, :mod:`.flight`, :mod:`.race_loop`): ask a trial
(seeded, owned, beaten for; FAIL as surplus past the target), tell the job it runs which
trial it is, turn the job's return into the trial's outcome, and record it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import time
from typing import Any

import optuna
from optuna.trial import TrialState

from hydra_plugins.kd_sweeper import _compat, constraints
from hydra_plugins.kd_sweeper.constraints import returned_metrics
from hydra_plugins.kd_sweeper.job import ARTIFACTS_ENV, REPLICATE_ENV, STORAGE_ENV, STUDY_ENV, TRIAL_ENV
from hydra_plugins.kd_sweeper.liveness import OWNER, Heartbeat, SilentTrials, this_process
from hydra_plugins.kd_sweeper.refusals import Interrupts, interrupted
from hydra_plugins.kd_sweeper.space import trial_seed
from hydra_plugins.kd_sweeper.study import (
    DIVERGED,
    ERROR,
    FAIL_REASON,
    SURPLUS,
    RetryStale,
    counted_trials,
)

log = logging.getLogger(__name__)


class TrialRunner:
    """Asks, launches, settles and records trials; mixed into the sweeper, whose settings
    (``n_trials``, ``launcher``, ``storage``, ``sweep_dir``, the sampler) it reads."""

    interrupts: Interrupts  # the sweeper's own, installed while it sweeps
    bounds: tuple[constraints.Bound, ...] = ()  # hydra.sweeper.constraints
    artifacts: str | None = None  # hydra.sweeper.artifacts, as jobs see it

    def _silent_trials(self, heartbeat: Heartbeat) -> SilentTrials:
        """The judge of RUNNING trials no heartbeat covers: with heartbeats on, one whose
        owner cannot be checked is retired after the grace period; with them off, only
        those whose owner is known dead."""
        interval, grace = self.heartbeat
        bound = (grace or 2 * heartbeat.interval) if heartbeat.interval else None
        return SilentTrials(bound, RetryStale(max_retry=1))

    @staticmethod
    def _waiting_count(study: optuna.Study) -> int:
        """Trials queued to run again (a dead worker's, retried): they count, but this
        worker still has to ask them (``ask`` takes them first)."""
        return len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))

    def _wait_for_others(self, study: optuna.Study, heartbeat: Heartbeat) -> bool:
        """The target is reached, counting trials that other workers run. Whether to wait
        for them: with heartbeats, a trial whose worker died becomes FAIL after the grace
        period and is queued again, and then this worker runs it."""
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if not running:
            return False
        if not heartbeat.interval:
            log.warning(
                "trials %s are still RUNNING elsewhere (or were killed); without heartbeats this worker "
                "cannot tell which: it stops here",
                [t.number for t in running],
            )
            return False
        if not getattr(self, "_waiting", False):
            log.info(
                "waiting for trials %s of other (or killed) workers: a dead worker's trial is retried after %s s "
                "without a heartbeat",
                [t.number for t in running],
                self.heartbeat[1] or 2 * heartbeat.interval,
            )
            self._waiting = True
        time.sleep(min(heartbeat.interval, 2))
        return True

    def _ask(self, study: optuna.Study) -> optuna.Trial:
        """Ask the next trial with a sampler seeded from (seed, its number), built first."""
        if self.grid is not None:  # the grid's order is shuffled by its seed: one seed for every trial
            study.sampler = self._sampler(self.base_seed, self.grid)
            return _compat.ask(study)
        predicted = len(study.get_trials(deepcopy=False))
        study.sampler = self._sampler(trial_seed(self.base_seed, predicted), self.grid)
        trial = _compat.ask(study)
        if trial.number != predicted:  # another worker asked meanwhile: seed by the real number
            study.sampler = self._sampler(trial_seed(self.base_seed, trial.number), self.grid)
        return trial

    def _ask_counted(self, study: optuna.Study, heartbeat: Heartbeat) -> optuna.Trial | None:
        """Ask a trial, beat for it and record this process as its owner; None (the trial
        FAIL as surplus) when another worker filled the study meanwhile."""
        self.interrupts.check()  # a Ctrl-C that Python dropped still stops the sweep here
        trial = self._ask(study)
        heartbeat.add(trial)
        _compat.study_storage(study).set_trial_system_attr(
            _compat.trial_id(trial), OWNER, this_process(beats=bool(heartbeat.interval))
        )
        rank = sum(1 for t in counted_trials(study) if t.number < trial.number)
        if rank >= self.n_trials:
            self._fail(study, trial, SURPLUS, heartbeat)
            return None
        return trial

    def _run_batch(self, study: optuna.Study, size: int, space: tuple, heartbeat: Heartbeat) -> list[str]:
        """Ask, launch and tell up to ``size`` trials; returns this batch's failure reasons."""
        trials, overrides = [], []
        for _ in range(size):
            trial = self._ask_counted(study, heartbeat)
            if trial is None:
                continue
            try:
                (params,) = self._configure_trials([trial], *space)
            except Exception as err:  # e.g. a custom search space that raised: nothing left RUNNING
                self._fail(study, trial, f"{ERROR}: {err}", heartbeat)
                raise
            trials.append(trial)
            overrides.append((*params, *self._job_overrides(study, trial)))
        if not trials:
            return []
        try:
            returns = self.launcher.launch(overrides, initial_job_idx=trials[0].number)
        except BaseException as err:
            for trial in trials:  # the launcher itself failed: these trials never ran
                self._fail(study, trial, None, heartbeat)
            if interrupted(err) and not isinstance(err, KeyboardInterrupt):
                raise KeyboardInterrupt from err  # Ctrl-C reached a worker first (refusals.interrupted)
            raise
        reasons = [self.settle(study, trial, ret, heartbeat) for trial, ret in zip(trials, returns, strict=True)]
        return [r for r in reasons if r is not None]

    def settle(self, study: optuna.Study, trial: optuna.Trial, ret: Any, heartbeat: Heartbeat) -> str | None:
        """Tell the study a trial's outcome from its job's return; its failure reason, if it failed."""
        state, values, reason = self.outcome(ret, len(study.directions))
        if state == TrialState.COMPLETE and self.bounds:
            returned = returned_metrics(ret.return_value)[1]
            reason = constraints.apply(self.bounds, study, trial, returned)
            state = TrialState.FAIL if reason else state
        if state == TrialState.FAIL:
            log.warning("trial %d failed: %s (its log has the details)", trial.number, reason)
            self._fail(study, trial, reason, heartbeat)
            self.log_progress(study)
            return reason
        if state == TrialState.PRUNED:
            log.info("trial %d pruned", trial.number)
        self._tell(study, trial, heartbeat, state=state, values=values)
        self.log_progress(study)
        return None

    def log_progress(self, study: optuna.Study) -> None:
        """``k of n trials done`` and the time left at this run's pace (a resumed sweep's
        earlier trials took none of this run's time)."""
        done = finished_count(study)
        started, before = getattr(self, "progress_start", (time.monotonic(), done))
        elapsed, ran = time.monotonic() - started, done - before
        left = max(self.n_trials - done, 0) * elapsed / ran if ran > 0 else None
        log.info("%d of %d trials done; ETA %s", min(done, self.n_trials), self.n_trials, duration(left))

    def _job_overrides(
        self, study: optuna.Study, trial: Any, seed: int | None = None, reports: bool = True
    ) -> tuple[str, ...]:
        """What a job needs to find its trial: Hydra sets ``hydra.job.env_set`` around it.
        A racing seed-run also gets its replicate (``seed``) and its own folder; only one
        that ``reports`` (a trial's first) is told its trial, for pruning."""
        env: dict[str, Any] = {STUDY_ENV: study.study_name}
        if reports:
            env[TRIAL_ENV] = trial.number
        if isinstance(self.storage, str):
            env[STORAGE_ENV] = self.storage
        if seed is not None:
            env[REPLICATE_ENV] = seed
        if self.artifacts:
            env[ARTIFACTS_ENV] = self.artifacts
        return (
            *(f"++hydra.job.env_set.{key}={quoted(value)}" for key, value in env.items()),
            # A job's sweep dir may be interpolated from values this sweep varies: pin it.
            f"hydra.sweep.dir={quoted(self.sweep_dir)}",
            f"hydra.sweep.subdir={trial.number if seed is None else f'{trial.number}/seed_{seed}'}",
        )

    @staticmethod
    def outcome(ret: Any, n_objectives: int) -> tuple[TrialState, list[float] | None, str]:
        """A job's return as (state, values, failure reason)."""
        error = _compat.job_exception(ret)
        if isinstance(error, optuna.TrialPruned):
            return TrialState.PRUNED, None, ""
        if error is not None:
            first_line = str(error).splitlines()[0] if str(error) else ""
            return TrialState.FAIL, None, f"{ERROR}: {type(error).__name__}: {first_line}".rstrip(": ")
        value = returned_metrics(ret.return_value)[0]  # {"objective": v, <metrics>}: v
        raw = [value] if n_objectives == 1 else value
        try:
            values = [float(v) for v in raw]
        except (TypeError, ValueError):
            return TrialState.FAIL, None, f"{ERROR}: the job returned {value!r}, not {n_objectives} number(s)"
        if len(values) != n_objectives:
            return (
                TrialState.FAIL,
                None,
                f"{ERROR}: the job returned {len(values)} values for {n_objectives} objectives",
            )
        if not all(math.isfinite(v) for v in values):
            return TrialState.FAIL, None, f"{DIVERGED}: objective {values if n_objectives > 1 else values[0]}"
        return TrialState.COMPLETE, values, ""

    def _fail(self, study: optuna.Study, trial: optuna.Trial, reason: str | None, heartbeat: Heartbeat) -> None:
        if reason is not None:
            with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
                trial.set_user_attr(FAIL_REASON, reason[:500])
        self._tell(study, trial, heartbeat, state=TrialState.FAIL)

    def _tell(self, study: optuna.Study, trial: optuna.Trial, heartbeat: Heartbeat, **kwargs: Any) -> None:
        """``study.tell`` that a busy database cannot turn into the end of the sweep."""
        heartbeat.remove(trial)
        for attempt in range(5):
            try:
                study.tell(trial, **kwargs)
                return
            except optuna.exceptions.UpdateFinishedTrialError:
                return  # failed meanwhile as stale by another worker
            except RuntimeError as err:
                if "Study.stop" in str(err):  # the grid sampler says the grid is done: recorded all the same
                    return
                raise
            except Exception as err:
                if attempt == 4:
                    log.warning("could not record trial %d (%s); a rerun redoes it", trial.number, err)
                    return
                time.sleep(0.5 * (attempt + 1))


def quoted(value: Any) -> str:
    """``value`` as a quoted Hydra override value."""
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


def finished_count(study: optuna.Study) -> int:
    """The counted trials that have an outcome (what ``k of n trials done`` counts)."""
    return sum(1 for t in counted_trials(study) if t.state.is_finished())


def duration(seconds: float | None) -> str:
    """``41s``, ``3m05s``, ``1h02m``; ``?`` when unknown."""
    if seconds is None or not seconds >= 0 or seconds == float("inf"):
        return "?"
    whole = int(round(seconds))
    if whole < 3600:
        return f"{whole}s" if whole < 60 else f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


class HideJobEnv(logging.Filter):
    """Drops the ``++hydra.job.env_set.KD_OPTUNA_*`` overrides from a launcher's
    ``#N : ...`` line: they are how a job finds its trial, not what the user swept, and
    Hydra's own filter hides only overrides that begin with ``hydra.``."""

    PATTERN = re.compile(r" ?\+\+hydra\.job\.env_set\.KD_OPTUNA_\w+=(?:'(?:[^'\\]|\\.)*'|\S+)")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "++hydra.job.env_set.KD_OPTUNA_" in message:
            record.msg, record.args = self.PATTERN.sub("", message), ()
        return True

    @classmethod
    def install(cls, launcher: Any) -> None:
        """On the loggers that write the lines, once: those of ``launcher``'s module and of
        its package's ``_core`` (joblib's), as a logger's filter outlives the logging
        set-up Hydra redoes at each launch and a parent's filter does not reach them."""
        module = type(launcher).__module__
        for name in (module, f"{module.rpartition('.')[0]}._core"):
            logger = logging.getLogger(name)
            if not any(isinstance(f, cls) for f in logger.filters):
                logger.addFilter(cls())
