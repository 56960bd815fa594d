"""A resumable, multi-worker Optuna sweeper with pruning: hydra-optuna-sweeper 1.4 with
a new sweep loop.

The stock sweeper runs ``n_trials`` more trials every time it starts, numbers jobs from
0 over old folders, redraws the same parameters under a fixed sampler seed, leaves
killed trials RUNNING forever and cannot prune. This subclass keeps its config,
search-space parsing and trial set-up, and replaces only ``sweep``:

* ``n_trials`` is the study's target: trials the study already holds count, so
  re-running the same command resumes, and several workers sharing one storage
  stop together at ``n_trials`` (a trial asked past the target in a race is voided);
* trials left RUNNING by a dead process on this host are marked FAIL and voided;
* each trial's job folder is its trial number, unique across resumes and workers;
* each trial is sampled by a fresh sampler seeded from (seed, trial number), so
  resumed runs and parallel workers never redraw the same parameters;
* a failed or non-finite trial is recorded as FAIL and the sweep goes on, until the
  failures of this invocation exceed ``max_failure_rate * n_trials``; a rerun after
  fixing the cause starts a fresh allowance;
* ``pruner`` (``hydra/sweeper/pruner=median`` ...) lets jobs stop early: each job
  reports its validation accuracy per epoch to its own trial and ends PRUNED, which is
  no failure;
* ``storage`` may be ``journal:///path/study.log``: a journal file on a shared file
  system, for workers on several machines without a database server.

Voided trials stay in the study as FAIL and are listed in the study's user attributes
(``kd:void:<number>``); :func:`kd.tuning.counted_trials` gives the others.

A study is one experiment: it records the resolved settings the sweep does not vary
(user attribute ``kd:settings``), and resuming it with other settings is refused, in
one line naming the keys that differ. Before any trial runs, the config is checked
once (ranges, and no selection on a missing validation split).
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import logging
import math
import os
import random
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobStatus
from hydra.utils import instantiate
from hydra_plugins.hydra_optuna_sweeper._impl import OptunaSweeperImpl, create_params_from_overrides
from hydra_plugins.hydra_optuna_sweeper.config import OptunaSweeperConf
from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper
from omegaconf import DictConfig, OmegaConf
from optuna.trial import TrialState

from kd.config import experiment_settings, settings_fingerprint, swept_keys, validate_for_selection
from kd.devices import available_cores
from kd.errors import ConfigError, Pruned
from kd.tuning import VOID_PREFIX, WORKER, build_pruner, counted_trials, open_storage, voided

log = logging.getLogger(__name__)

SETTINGS = "kd:settings"
OWNERLESS_GRACE = datetime.timedelta(minutes=10)
SAMPLERS = ("hydra_plugins.hydra_optuna_sweeper.*", "optuna.samplers.*")


@dataclass
class KDOptunaSweeperConf(OptunaSweeperConf):
    _target_: str = "hydra_plugins.kd_sweeper.kd_sweeper.KDOptunaSweeper"
    pruner: Any = None


@dataclass
class MedianPrunerConf:
    _target_: str = "optuna.pruners.MedianPruner"
    n_startup_trials: int = 4  # trials that finish before any is pruned
    n_warmup_steps: int = 2  # epochs a trial always trains
    interval_steps: int = 1


@dataclass
class PercentilePrunerConf:
    _target_: str = "optuna.pruners.PercentilePruner"
    percentile: float = 25.0
    n_startup_trials: int = 4
    n_warmup_steps: int = 2
    interval_steps: int = 1


@dataclass
class SuccessiveHalvingPrunerConf:
    _target_: str = "optuna.pruners.SuccessiveHalvingPruner"
    min_resource: Any = "auto"
    reduction_factor: int = 4
    min_early_stopping_rate: int = 0


@dataclass
class HyperbandPrunerConf:
    _target_: str = "optuna.pruners.HyperbandPruner"
    min_resource: int = 1
    max_resource: Any = "auto"
    reduction_factor: int = 3


_store = ConfigStore.instance()
_store.store(group="hydra/sweeper", name="kd_optuna", node=KDOptunaSweeperConf, provider="kd")
for _name, _node in [
    ("median", MedianPrunerConf),
    ("percentile", PercentilePrunerConf),
    ("successive_halving", SuccessiveHalvingPrunerConf),
    ("hyperband", HyperbandPrunerConf),
]:
    _store.store(group="hydra/sweeper/pruner", name=_name, node=_node, provider="kd")


def refuse(message: str) -> None:
    """End the sweep before any trial with one line, as run.py does for a single run."""
    print(f"kd: error: {message}", file=sys.stderr)
    sys.exit(2)


def settings_differences(recorded: dict, current: dict) -> list[str]:
    """The keys whose values differ between two flattened settings dicts."""
    return sorted(k for k in set(recorded) | set(current) if recorded.get(k, "<unset>") != current.get(k, "<unset>"))


def _process_start(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot, Linux), to tell a reused PID
    from the process that owned a trial; None where /proc is not there."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22, counted after the command name


def worker_id() -> str:
    pid = os.getpid()
    return f"{socket.gethostname()}:{pid}:{_process_start(pid) or '?'}"


def owner_alive(owner: str) -> bool:
    """Whether the process named by a trial's ``kd:worker`` (on this host) still runs."""
    parts = owner.split(":")
    pid = int(parts[1])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    if len(parts) >= 3 and parts[2] != "?":
        return _process_start(pid) in (parts[2], None)  # same PID, other process: it is gone
    return True


def trial_seed(base_seed: int, trial_number: int) -> int:
    digest = hashlib.sha256(f"{base_seed}:{trial_number}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def _quoted(value: Any) -> str:
    """``value`` as a quoted Hydra override value."""
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


class KDOptunaSweeperImpl(OptunaSweeperImpl):
    sampler_config: Any = None
    pruner: Any = None

    def setup(self, *, hydra_context: Any, task_function: Any, config: Any) -> None:
        super().setup(hydra_context=hydra_context, task_function=task_function, config=config)
        self.configured_seed = OmegaConf.select(config, "hydra.sweeper.sampler.seed", default=None)
        self.base_seed = self.configured_seed or 0

    def _settle_base_seed(self, study: optuna.Study) -> None:
        """``sampler.seed=null`` draws a random base seed once and records it in the study,
        so a resumed or second worker samples on from the same one."""
        recorded = study.user_attrs.get("kd:base_seed")
        if self.configured_seed is None:
            self.base_seed = recorded if recorded is not None else random.SystemRandom().randrange(2**31)
        else:
            self.base_seed = int(self.configured_seed)
        if recorded is None:
            study.set_user_attr("kd:base_seed", self.base_seed)

    def _tell(self, study: optuna.Study, trial: optuna.Trial, **kwargs: Any) -> None:
        """``study.tell`` that a busy database cannot turn into the end of the sweep."""
        for attempt in range(5):
            try:
                study.tell(trial, **kwargs)
                return
            except optuna.exceptions.UpdateFinishedTrialError:
                return  # voided meanwhile by another worker
            except Exception as err:
                if attempt == 4:
                    log.warning("could not record trial %d (%s); a rerun voids and redoes it", trial.number, err)
                    return
                time.sleep(0.5 * (attempt + 1))

    def _void(self, study: optuna.Study, number: int, reason: str, running: bool = False) -> None:
        study.set_user_attr(f"{VOID_PREFIX}{number}", reason)
        if running:
            # Its worker may have finished it meanwhile; it stays voided all the same.
            with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
                study.tell(number, state=TrialState.FAIL)

    def _void_stale_trials(self, study: optuna.Study) -> None:
        """RUNNING trials whose process on this host is gone were killed: void them."""
        host = socket.gethostname()
        now = datetime.datetime.now()
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            owner = trial.user_attrs.get(WORKER)
            if owner is None:
                # Another worker may have asked it a moment ago and not yet signed it.
                if trial.datetime_start and now - trial.datetime_start < OWNERLESS_GRACE:
                    continue
                log.warning("trial %d is RUNNING with no owner (stock sweeper?): voiding it", trial.number)
            else:
                if owner.split(":")[0] != host or owner_alive(owner):
                    continue  # another live worker's trial, or on a host we cannot check
                log.warning("trial %d was interrupted (worker %s is gone): voiding it", trial.number, owner)
            self._void(study, trial.number, "interrupted", running=True)

    def _seeded_sampler(self, seed: int) -> optuna.samplers.BaseSampler | None:
        """A fresh sampler of the configured kind seeded with ``seed`` (None if unseedable)."""
        cfg = self.sampler_config
        if not isinstance(cfg, DictConfig) or "seed" not in cfg:
            return None
        return instantiate(cfg, seed=seed, _execution_whitelist_=SAMPLERS)

    def _launch_batch(self, study: optuna.Study, batch_size: int, space: tuple) -> list[tuple[int, str]]:
        """Ask, launch and tell up to ``batch_size`` trials; returns (number, final state)."""
        trials, overrides = [], []
        # Jobs would resolve a default study name from their own (narrower) overrides:
        # hand them this sweep's directory and study instead.
        pinned = [f"hydra.sweep.dir={_quoted(self.sweep_dir)}", f"trial.study_name={_quoted(self.study_name)}"]
        for _ in range(batch_size):
            trial = study.ask()
            rank = sum(1 for t in counted_trials(study) if t.number < trial.number)
            if rank >= self.n_trials:  # another worker filled the study meanwhile
                self._void(study, trial.number, "surplus", running=True)
                continue
            trial.set_user_attr(WORKER, worker_id())
            sampler = self._seeded_sampler(trial_seed(self.base_seed, trial.number))
            if sampler is not None:
                study.sampler = sampler
            (params,) = self._configure_trials([trial], *space)
            trials.append(trial)
            overrides.append((*params, *pinned, f"trial.number={trial.number}", f"hydra.sweep.subdir={trial.number}"))
        if not trials:
            return []
        returns = self.launcher.launch(overrides, initial_job_idx=trials[0].number)
        outcomes = []
        for trial, ret in zip(trials, returns, strict=True):
            # A pruned job ended by raising Pruned; reading return_value would print it as
            # an error ("Error executing job ..."), so look at the exception directly.
            error = getattr(ret, "_return_value", None) if ret.status == JobStatus.FAILED else None
            try:
                if isinstance(error, Pruned):
                    raise error
                value = float(ret.return_value)  # re-raises the job's exception
                if not math.isfinite(value):
                    raise ValueError(f"objective is {value}")
            except Pruned as pruned:
                log.info("trial %d %s", trial.number, pruned)
                self._tell(study, trial, state=TrialState.PRUNED)
                outcomes.append((trial.number, "pruned"))
            except Exception as err:
                first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
                log.warning("trial %d failed: %s (full traceback in its log)", trial.number, first_line)
                self._tell(study, trial, state=TrialState.FAIL)
                outcomes.append((trial.number, "failed"))
            else:
                self._tell(study, trial, values=value)
                outcomes.append((trial.number, "complete"))
        return outcomes

    def _open_study(self, sampler: optuna.samplers.BaseSampler, direction: str) -> optuna.Study:
        # Workers starting together race to create the schema and the study; the loser
        # of the race sees an integrity error once, and then finds both made.
        for attempt in range(5):
            try:
                return optuna.create_study(
                    study_name=self.study_name,
                    storage=open_storage(self.storage),
                    sampler=sampler,
                    pruner=self.pruner,
                    direction=direction,
                    load_if_exists=True,
                )
            except Exception as err:
                if attempt == 4:
                    raise
                log.info("opening the study failed (%s); retrying", type(err).__name__)
                time.sleep(0.5 + random.random())
        raise AssertionError("unreachable")

    def _check_settings(self, study: optuna.Study, settings: dict) -> None:
        """Record the experiment's settings on a new study; refuse to resume with others."""
        recorded = study.user_attrs.get(SETTINGS)
        if recorded is None:
            if study.get_trials(deepcopy=False):
                log.warning("study %s records no settings (made by an older kd): recording them now", study.study_name)
            study.set_user_attr(SETTINGS, _plain(settings))
            study.set_user_attr("kd:settings_fingerprint", settings_fingerprint(settings))
            return
        differing = settings_differences(recorded, _plain(settings))
        if differing:
            shown = ", ".join(differing[:6]) + (f" and {len(differing) - 6} more" if len(differing) > 6 else "")
            refuse(
                f"study {study.study_name} was run with other settings ({shown} differ); resume it with the "
                "same settings, or start a new study with hydra.sweeper.study_name=NEW (or leave the name "
                "unset: the default is derived from the settings)"
            )

    def sweep(self, arguments: list[str]) -> None:
        try:
            self._sweep(arguments)
        except KeyboardInterrupt:
            print("kd: interrupted; rerun the same command to resume (finished trials are kept)", file=sys.stderr)
            sys.exit(130)

    def _sweep(self, arguments: list[str]) -> None:
        self._process_searchspace_config()
        distributions, fixed, fixed_overrides = create_params_from_overrides(
            self._parse_sweeper_params_config() + list(arguments)
        )
        for name in fixed:
            distributions.pop(name, None)
        try:
            validate_for_selection(self.config, swept=set(distributions) | set(swept_keys(self.config)))
        except ConfigError as err:
            refuse(str(err))
        settings = experiment_settings(self.config)
        for name in distributions:
            settings.pop(name, None)
        directions = self._get_directions()
        if len(directions) != 1:
            refuse("hydra/sweeper=kd_optuna supports one objective; use hydra/sweeper=optuna for several")
        if isinstance(self.storage, str) and self.storage.startswith("sqlite:///"):
            Path(self.storage[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
        if isinstance(self.storage, str) and self.storage.startswith("journal:///"):
            Path(self.storage[len("journal://") :]).parent.mkdir(parents=True, exist_ok=True)
        if not isinstance(self.sampler, optuna.samplers.BaseSampler):
            refuse("hydra/sweeper=kd_optuna needs an instantiated sampler (GridSampler is not supported)")
        study = self._open_study(self.sampler, directions[0])
        wanted = str(directions[0]).lower()
        if study.direction.name.lower() != wanted:
            refuse(
                f"study {study.study_name} was created to {study.direction.name.lower()}, but this sweep would "
                f"{wanted}; use the study's direction or a new hydra.sweeper.study_name"
            )
        self._check_settings(study, settings)
        self._settle_base_seed(study)
        self._void_stale_trials(study)
        allowed_failures = math.floor(self.max_failure_rate * self.n_trials)
        log.info(
            "study %s (%s): %d of %d trials already there; up to %d may fail in this run%s",
            study.study_name,
            self.storage,
            len(counted_trials(study)),
            self.n_trials,
            allowed_failures,
            f"; pruner {type(self.pruner).__name__}" if self.pruner is not None else "",
        )
        failed_now = 0
        space = (distributions, fixed, fixed_overrides)
        while True:
            to_go = self.n_trials - len(counted_trials(study))
            if to_go <= 0:
                break
            outcomes = self._launch_batch(study, min(to_go, self.n_jobs), space)
            failed_now += sum(1 for _, state in outcomes if state == "failed")
            if failed_now > allowed_failures:
                raise RuntimeError(
                    f"{failed_now} of {self.n_trials} trials failed, more than max_failure_rate="
                    f"{self.max_failure_rate} allows; fix the cause, then re-run the same command to resume"
                )

        complete = [t for t in counted_trials(study) if t.state == TrialState.COMPLETE]
        pruned = sum(1 for t in counted_trials(study) if t.state == TrialState.PRUNED)
        # Other workers may still be running their last trials; this worker is done.
        results: dict[str, Any] = {
            "name": "optuna",
            "study_name": study.study_name,
            "n_complete": len(complete),
            "n_pruned": pruned,
            "n_voided": len(voided(study)),
        }
        if complete:
            best = study.best_trial
            results.update(best_params=best.params, best_value=best.value, best_trial=best.number)
            log.info("best trial %d: %s -> %s", best.number, best.params, best.value)
        Path(self.sweep_dir).mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.create(results), f"{self.sweep_dir}/optimization_results.yaml")
        log.info("sweep results: %s (study %s in %s)", self.sweep_dir, study.study_name, self.storage)
        log.info("next: python -m kd.report %s", self.sweep_dir)


def _check_sweeper_values(n_trials: Any, n_jobs: Any, max_failure_rate: Any) -> None:
    def integer(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if not integer(n_trials) or n_trials < 1:
        refuse(f"hydra.sweeper.n_trials must be an integer >= 1, got {n_trials!r}")
    if not integer(n_jobs) or n_jobs == 0:
        refuse(
            f"hydra.sweeper.n_jobs must be an integer >= 1 (trials launched together; -1: one per core), got {n_jobs!r}"
        )
    if isinstance(max_failure_rate, bool) or not isinstance(max_failure_rate, (int, float)):
        refuse(f"hydra.sweeper.max_failure_rate must be a number in [0, 1], got {max_failure_rate!r}")
    if not 0.0 <= max_failure_rate <= 1.0:
        refuse(f"hydra.sweeper.max_failure_rate must be in [0, 1], got {max_failure_rate!r}")


class KDOptunaSweeper(OptunaSweeper):
    """``hydra/sweeper=kd_optuna``: the keys of ``hydra/sweeper=optuna`` plus ``pruner``."""

    def __init__(
        self,
        sampler: Any,
        direction: Any,
        storage: Any,
        study_name: str | None,
        n_trials: int,
        n_jobs: int,
        max_failure_rate: float,
        custom_search_space: str | None,
        params: DictConfig | None,
        pruner: Any = None,
    ) -> None:
        _check_sweeper_values(n_trials, n_jobs, max_failure_rate)
        if n_jobs < 0:  # joblib's convention: -1 is every core, -2 all but one, ...
            n_jobs = max(1, available_cores() + 1 + n_jobs)
        sampler_obj = instantiate(sampler, _execution_whitelist_=SAMPLERS) if OmegaConf.is_config(sampler) else sampler
        impl = KDOptunaSweeperImpl(
            sampler_obj,
            direction,
            storage,
            study_name,
            n_trials,
            n_jobs,
            max_failure_rate,
            custom_search_space,
            params,
        )
        impl.sampler_config = sampler if OmegaConf.is_config(sampler) else None
        impl.pruner = build_pruner(pruner) if OmegaConf.is_config(pruner) else pruner
        self.sweeper = impl
