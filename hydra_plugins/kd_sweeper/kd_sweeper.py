"""A resumable, multi-worker Optuna sweeper: hydra-optuna-sweeper with a new sweep loop.

The stock sweeper (1.3.0) runs ``n_trials`` more trials every time it starts, numbers
jobs from 0 over old folders, redraws the same parameters under a fixed sampler seed,
leaves killed trials RUNNING forever, crashes on a NaN objective and applies
``max_failure_rate`` per batch. This subclass keeps its config, search-space parsing
and trial set-up, and replaces only ``sweep``:

* ``n_trials`` is the study's target: trials the study already holds count, so
  re-running the same command resumes, and several workers sharing one storage
  stop together at ``n_trials`` (a trial asked past the target in a race is voided);
* trials left RUNNING by a dead process on this host are marked FAIL and voided;
* each trial's job folder is its trial number, unique across resumes and workers;
* the sampler's random state is reseeded per trial from (seed, trial number), so
  resumed runs and parallel workers never redraw the same parameters;
* a failed or non-finite trial is recorded as FAIL and the sweep goes on, until
  failures exceed ``max_failure_rate * n_trials`` over the whole study.

Voided trials stay in the study as FAIL with the system attribute ``kd:void`` and
count for nothing; :func:`counted_trials` gives the others.

A study is one experiment: it records the resolved settings the sweep does not vary
(user attribute ``kd:settings``), and resuming it with other settings is refused, in
one line naming the keys that differ. Before any trial runs, the config is checked
once (ranges, and no selection on a missing validation split).
"""

import hashlib
import json
import logging
import math
import os
import random
import re
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from hydra.core.config_store import ConfigStore
from hydra_plugins.hydra_optuna_sweeper._impl import OptunaSweeperImpl, create_params_from_overrides
from hydra_plugins.hydra_optuna_sweeper.config import OptunaSweeperConf
from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper
from omegaconf import OmegaConf
from optuna.trial import FrozenTrial, TrialState

from kd.config import experiment_settings, settings_fingerprint, swept_keys, validate_for_selection
from kd.errors import ConfigError

log = logging.getLogger(__name__)

VOID = "kd:void"
WORKER = "kd:worker"
SETTINGS = "kd:settings"


def refuse(message: str) -> None:
    """End the sweep before any trial with one line, as run.py does for a single run."""
    print(f"kd: error: {message}", file=sys.stderr)
    sys.exit(2)


def settings_differences(recorded: dict, current: dict) -> list[str]:
    """The keys whose values differ between two flattened settings dicts."""
    return sorted(k for k in set(recorded) | set(current) if recorded.get(k, "<unset>") != current.get(k, "<unset>"))


@dataclass
class KDOptunaSweeperConf(OptunaSweeperConf):
    _target_: str = "hydra_plugins.kd_sweeper.kd_sweeper.KDOptunaSweeper"


ConfigStore.instance().store(group="hydra/sweeper", name="kd_optuna", node=KDOptunaSweeperConf, provider="kd")


def counted_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The study's trials that count towards ``n_trials`` (all but voided ones)."""
    return [t for t in study.get_trials(deepcopy=False) if VOID not in t.system_attrs]


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reseed_sampler(sampler: Any, seed: int) -> None:
    """Give every numpy RandomState inside ``sampler`` (and nested samplers) a new seed."""
    for name, value in vars(sampler).items():
        if isinstance(value, np.random.RandomState):
            setattr(sampler, name, np.random.RandomState(seed))
        elif isinstance(value, optuna.samplers.BaseSampler):
            reseed_sampler(value, seed + 1)


def trial_seed(base_seed: int, trial_number: int) -> int:
    digest = hashlib.sha256(f"{base_seed}:{trial_number}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


class KDOptunaSweeperImpl(OptunaSweeperImpl):
    def setup(self, *, hydra_context: Any, task_function: Any, config: Any) -> None:
        super().setup(hydra_context=hydra_context, task_function=task_function, config=config)
        self.base_seed = OmegaConf.select(config, "hydra.sweeper.sampler.seed", default=None) or 0

    def _void(self, study: optuna.Study, trial: FrozenTrial | optuna.Trial, reason: str) -> None:
        storage = study._storage
        storage.set_trial_system_attr(trial._trial_id, VOID, reason)
        storage.set_trial_state(trial._trial_id, TrialState.FAIL)

    def _void_stale_trials(self, study: optuna.Study) -> None:
        """RUNNING trials whose process on this host is gone were killed: void them."""
        host = socket.gethostname()
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            owner = trial.system_attrs.get(WORKER)
            if owner is None:
                log.warning("trial %d is RUNNING with no owner (stock sweeper?): voiding it", trial.number)
            else:
                owner_host, pid = owner.rsplit(":", 1)
                if owner_host != host or _pid_alive(int(pid)):
                    continue  # another live worker's trial, or on a host we cannot check
                log.warning("trial %d was interrupted (worker %s is gone): voiding it", trial.number, owner)
            self._void(study, trial, "interrupted")

    def _launch_batch(self, study: optuna.Study, batch_size: int, distributions: dict, fixed: dict) -> list:
        trials = []
        # Jobs resolve the study name themselves; pass this one so they cannot differ.
        name_override = (
            [f"hydra.sweeper.study_name={self.study_name}"] if re.fullmatch(r"[\w.\-]+", str(self.study_name)) else []
        )
        for _ in range(batch_size):
            trial = study.ask()
            rank = sum(1 for t in counted_trials(study) if t.number < trial.number)
            if rank >= self.n_trials:  # another worker filled the study meanwhile
                self._void(study, trial, "surplus")
                continue
            study._storage.set_trial_system_attr(trial._trial_id, WORKER, worker_id())
            reseed_sampler(study.sampler, trial_seed(self.base_seed, trial.number))
            trials.append(trial)
        if not trials:
            return []
        overrides = [
            (*params, *name_override, f"hydra.sweep.subdir={trial.number}")
            for trial, params in zip(trials, self._configure_trials(trials, distributions, fixed), strict=True)
        ]
        returns = self.launcher.launch(overrides, initial_job_idx=trials[0].number)
        for trial, ret in zip(trials, returns, strict=True):
            try:
                value = float(ret.return_value)  # re-raises the job's exception
                if not math.isfinite(value):
                    raise ValueError(f"objective is {value}")
            except Exception as err:
                first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
                log.warning("trial %d failed: %s", trial.number, first_line)
                study.tell(trial, state=TrialState.FAIL)
            else:
                study.tell(trial, value)
        return returns

    def _open_study(self, sampler: optuna.samplers.BaseSampler, direction: str) -> optuna.Study:
        # Workers starting together race to create the schema and the study; the loser
        # of the race sees an integrity error once, and then finds both made.
        for attempt in range(5):
            try:
                return optuna.create_study(
                    study_name=self.study_name,
                    storage=self.storage,
                    sampler=sampler,
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
            study.set_user_attr(SETTINGS, json.loads(json.dumps(settings, default=str)))
            study.set_user_attr("kd:settings_fingerprint", settings_fingerprint(settings))
            return
        differing = settings_differences(recorded, json.loads(json.dumps(settings, default=str)))
        if differing:
            shown = ", ".join(differing[:6]) + (f" and {len(differing) - 6} more" if len(differing) > 6 else "")
            refuse(
                f"study {study.study_name} was run with other settings ({shown} differ); resume it with the "
                "same settings, or start a new study with hydra.sweeper.study_name=NEW (or leave the name "
                "unset: the default is derived from the settings)"
            )

    def sweep(self, arguments: list[str]) -> None:
        self._process_searchspace_config()
        distributions, fixed = create_params_from_overrides(self._parse_sweeper_params_config() + list(arguments))
        if self.search_space_distributions:
            distributions = {**self.search_space_distributions, **distributions}
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
            raise ValueError("hydra/sweeper=kd_optuna supports one objective; use hydra/sweeper=optuna for several")
        if isinstance(self.storage, str) and self.storage.startswith("sqlite:///"):
            Path(self.storage[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
        sampler = self.sampler
        if not isinstance(sampler, optuna.samplers.BaseSampler):
            raise ValueError("hydra/sweeper=kd_optuna needs an instantiated sampler (GridSampler is not supported)")
        study = self._open_study(sampler, directions[0])
        self._check_settings(study, settings)
        self._void_stale_trials(study)
        allowed_failures = math.floor(self.max_failure_rate * self.n_trials)
        log.info(
            "study %s (%s): %d of %d trials already there; up to %d may fail",
            study.study_name,
            self.storage,
            len(counted_trials(study)),
            self.n_trials,
            allowed_failures,
        )
        while True:
            counted = counted_trials(study)
            failed = sum(1 for t in counted if t.state == TrialState.FAIL)
            if failed > allowed_failures:
                raise RuntimeError(
                    f"{failed} of {self.n_trials} trials failed, more than max_failure_rate="
                    f"{self.max_failure_rate} allows; fix the cause, then re-run the same command to resume"
                )
            to_go = self.n_trials - len(counted)
            if to_go <= 0:
                break
            self._launch_batch(study, min(to_go, self.n_jobs), distributions, fixed)

        complete = [t for t in counted_trials(study) if t.state == TrialState.COMPLETE]
        # Other workers may still be running their last trials; this worker is done.
        results: dict[str, Any] = {"name": "optuna", "study_name": study.study_name, "n_complete": len(complete)}
        if complete:
            best = study.best_trial
            results.update(best_params=best.params, best_value=best.value, best_trial=best.number)
            log.info("best trial %d: %s -> %s", best.number, best.params, best.value)
        Path(self.sweep_dir).mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.create(results), f"{self.sweep_dir}/optimization_results.yaml")


class KDOptunaSweeper(OptunaSweeper):
    """``hydra/sweeper=kd_optuna``: same keys as ``hydra/sweeper=optuna``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.sweeper = KDOptunaSweeperImpl(*args, **kwargs)
