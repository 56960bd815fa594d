"""``hydra/sweeper=kd_optuna``: the Optuna sweeper of hydra-optuna-sweeper 1.4, resumable,
pruning, for any Hydra app.

It takes every key of ``hydra/sweeper=optuna`` and runs the same search spaces,
samplers (grid included) and one or several objectives. What it adds:

* **Resume.** ``n_trials`` is the study's target, not a count per invocation: trials
  the study holds count, so the same command resumes a killed sweep, and workers
  sharing one storage stop together. A trial counts once it has an outcome (COMPLETE,
  PRUNED, or FAIL in its job) or runs or waits; one asked past the target in a race
  is FAIL with reason ``kd:surplus`` and does not count.
* **Heartbeats.** With a storage, the sweeper beats for its running trials every
  ``heartbeat_interval`` seconds; a trial whose worker stopped beating for
  ``grace_period`` seconds becomes FAIL and is queued again with its parameters.
* **One failure rule.** A job that raised, returned a non-finite objective or the wrong
  number of values is FAIL with a reason (``kd:error: ...``, ``kd:diverged``) and counts
  as a trial. Up to ceil(``max_failure_rate`` x ``n_trials``) trials may fail in one
  invocation; one more ends it in one line naming the last failure (a rerun after the
  fix resumes with a fresh allowance). A pruned trial is no failure.
* **Pruning.** ``pruner`` (``hydra/sweeper/pruner=median`` ...) lets jobs stop early:
  a job reports with :mod:`hydra_plugins.kd_sweeper.job` and raises
  ``optuna.TrialPruned`` when told to. Refused for several objectives (Optuna cannot
  prune them).
* **The search space is the study's identity.** The swept keys, their distributions
  and the fixed parameters are stored with the study; resuming with another space is
  refused in one line before any trial is asked.
* **Trials in flight.** With a launcher whose jobs run in other processes (joblib,
  submitit), ``n_jobs`` trials run and the next starts as soon as one ends
  (flight.py); ``asynchronous=false``, and the basic and population launchers, keep
  Hydra's batches.
* **Reproducible, collision-free sampling.** Each trial is sampled by a sampler seeded
  from (seed, trial number), built before the trial is asked; parallel TPE uses
  ``constant_liar``.
* **An app's own checks.** ``validate`` names a function ``(config, space, fixed) ->
  dict | None`` run once before any trial: it raises to refuse the sweep (its message
  is the one line shown) and may return settings that also identify the study.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import random
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from hydra.core.config_store import ConfigStore
from hydra.utils import instantiate
from hydra_plugins.hydra_optuna_sweeper.config import OptunaSweeperConf
from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper
from omegaconf import DictConfig, OmegaConf
from optuna.distributions import BaseDistribution, distribution_to_json
from optuna.trial import TrialState
from sqlalchemy.exc import DatabaseError, IntegrityError, SQLAlchemyError

from hydra_plugins.kd_sweeper import _compat
from hydra_plugins.kd_sweeper.flight import Flight, runs_in_flight
from hydra_plugins.kd_sweeper.job import REPLICATE_ENV, STORAGE_ENV, STUDY_ENV, TRIAL_ENV
from hydra_plugins.kd_sweeper.journal import DamagedStorage
from hydra_plugins.kd_sweeper.liveness import OWNER, SilentTrials, this_process
from hydra_plugins.kd_sweeper.race_loop import (
    REFERENCE,
    RaceLoop,
    check_confirm_seeds,
    load_race,
    racing_config,
    record_settings,
    reference_trial,
)
from hydra_plugins.kd_sweeper.race_loop import summary as race_summary
from hydra_plugins.kd_sweeper.study import (
    DIVERGED,
    ERROR,
    FAIL_REASON,
    SURPLUS,
    RetryStale,
    counted_trials,
    fail_stale_trials,
    open_storage,
    shown,
)

SAMPLERS = ("hydra_plugins.hydra_optuna_sweeper.*", "optuna.samplers.*")
MAX_FAILURE_RATE = 0.25  # the one default, here and in every YAML that sets it
SPACE = "kd_optuna:space"  # study user attributes: the search space ...
FIXED = "kd_optuna:fixed"  # ... the fixed parameters ...
SETTINGS = "kd:settings"  # ... and what the app's validate hook returned
BASE_SEED = "kd:base_seed"


@dataclass
class KDOptunaSweeperConf(OptunaSweeperConf):
    _target_: str = "hydra_plugins.kd_sweeper.kd_sweeper.KDOptunaSweeper"
    # An app picks a pruner with `override hydra/sweeper/pruner: median` (none by default).
    defaults: list[Any] = field(default_factory=lambda: ["_self_", {"sampler": "tpe"}, {"pruner": None}])
    max_failure_rate: float = MAX_FAILURE_RATE
    pruner: Any = None
    validate: str | None = None  # dotted path of the app's check, e.g. kd.tuning.validate
    heartbeat_interval: int | None = 10  # seconds; null: no heartbeats
    grace_period: int | None = None  # seconds without a beat before a trial is stale (2x interval)
    # Seed-paired racing (race_loop.py): {min_seeds, max_seeds, level, tie_level, seeds,
    # reference: {param: value}}; null: every trial runs once.
    racing: Any = None
    confirm_seeds: Any = None  # fresh seeds the race's incumbent (and the reference) run on at the end
    # n_jobs trials in flight, the next started as soon as one ends (flight.py); false:
    # Hydra's batches of n_jobs, each waiting for its slowest trial
    asynchronous: bool = True


@dataclass
class MedianPrunerConf:
    _target_: str = "optuna.pruners.MedianPruner"
    n_startup_trials: int = 4  # trials that finish before any is pruned
    n_warmup_steps: int = 2  # steps a trial always runs
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
_store.store(group="hydra/sweeper", name="kd_optuna", node=KDOptunaSweeperConf, provider="kd_optuna")
for _name, _node in [
    ("median", MedianPrunerConf),
    ("percentile", PercentilePrunerConf),
    ("successive_halving", SuccessiveHalvingPrunerConf),
    ("asha", SuccessiveHalvingPrunerConf),  # Optuna's successive halving is asynchronous (ASHA)
    ("hyperband", HyperbandPrunerConf),
]:
    _store.store(group="hydra/sweeper/pruner", name=_name, node=_node, provider="kd_optuna")


class SweepRefused(Exception):
    """The sweep cannot start (or go on) as configured; ``str`` is the one line shown."""

    code = 2


class StorageRefused(SweepRefused):
    """The study's storage cannot be used as it is (left untouched)."""

    code = 4


def unreadable_storage(url: Any, err: Exception) -> StorageRefused:
    """A storage whose database refused to open or answer, as one line: where, why, and
    how to go on."""
    cause = str(getattr(err, "orig", None) or err).strip().splitlines()
    return StorageRefused(
        f"storage {shown(url)} cannot be used ({cause[0] if cause else type(err).__name__}); nothing was changed: "
        "check the URL and that its server is up, or if the file is damaged move it aside to start a new study "
        "(sqlite3's .recover may save its trials)"
    )


def refuse(message: str, code: int = 2) -> None:
    print(f"kd_optuna: error: {message}", file=sys.stderr)
    sys.exit(code)


# What a database says when retrying cannot help: a file that is no database, a damaged
# one, a server that is not there or refuses us. Anything else (workers racing to create
# one schema: "already exists", "locked", integrity errors) is retried first.
DAMAGE = (
    "not a database",
    "malformed",
    "unable to open",
    "connection refused",
    "could not connect",
    "connection failed",
    "could not translate host",
    "authentication failed",
    "does not exist",
)


def damaged_database(err: Exception) -> bool:
    """A database error that retrying cannot mend."""
    text = str(err).lower()
    return isinstance(err, DatabaseError) and not isinstance(err, IntegrityError) and any(m in text for m in DAMAGE)


def build_pruner(pruner_cfg: Any) -> optuna.pruners.BasePruner | None:
    """The sweeper's ``pruner`` config as an Optuna pruner (only optuna.pruners.* may be
    named), built the same way by the sweeper and by each job; None when unset."""
    if not pruner_cfg:
        return None
    return instantiate(pruner_cfg, _execution_whitelist_="optuna.pruners.*")


def failure_allowance(max_failure_rate: float, n_trials: int) -> int:
    """How many trials may fail in one invocation: ``max_failure_rate`` of ``n_trials``,
    rounded up (0.25 of 3 allows one; a rate of 0 allows none)."""
    return math.ceil(round(max_failure_rate * n_trials, 9))


def trial_seed(base_seed: int, trial_number: int) -> int:

    digest = hashlib.sha256(f"{base_seed}:{trial_number}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def _quoted(value: Any) -> str:
    """``value`` as a quoted Hydra override value."""
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


def _plain(value: Any) -> Any:

    return json.loads(json.dumps(value, default=str))


def space_identity(distributions: dict[str, BaseDistribution], fixed: dict[str, Any], deletions: list[str]) -> dict:
    """What a study records of its search space: swept keys with their distributions,
    and the keys fixed (or deleted) on the command line or in ``params``."""
    return {
        SPACE: {name: distribution_to_json(d) for name, d in sorted(distributions.items())},
        FIXED: {**{name: str(v) for name, v in sorted(fixed.items())}, **{d: "<deleted>" for d in deletions}},
    }


def _location(name: str) -> str:
    """Where an override's key lands in the config: ``+a.b`` -> ``a.b``, a group
    ``model@teacher.model`` -> ``teacher.model``."""
    key = name.lstrip("+~")
    return key.partition("@")[2] or key


def deciding_fixed(fixed: dict[str, Any], settings: dict[str, Any] | None, swept: set[str]) -> dict[str, Any]:
    """The fixed parameters that identify a study. An app whose ``validate`` hook returned
    its result-deciding settings has said which keys matter: a fixed key that lands on
    none of them (a path, a device, a thread count) is left out, so changing it does not
    stop a resume, unless it is a hyperparameter the sweep's ``params`` or the study
    sweeps (``swept``). Without such settings every fixed key counts."""
    if settings is None:
        return fixed
    kept = {}
    for name, value in fixed.items():
        where = _location(name)
        if name in swept or where in settings or any(key.startswith(where + ".") for key in settings):
            kept[name] = value
    return kept


def describe_differences(recorded: dict, current: dict, what: str) -> list[str]:
    """``key: old -> new`` for each key whose value differs between two flat dicts."""
    lines = []
    for key in sorted(set(recorded) | set(current)):
        old, new = recorded.get(key, "<unset>"), current.get(key, "<unset>")
        if old != new:
            lines.append(f"{what} {key}: {_short(old)} -> {_short(new)}")
    return lines


def _short(value: Any) -> str:

    if isinstance(value, str) and value.startswith("{"):
        try:  # a distribution's JSON: show its attributes, not its escaping
            parsed = json.loads(value)
            return f"{parsed['name']}{parsed['attributes']}"
        except (ValueError, KeyError):
            pass
    text = str(value)
    return text if len(text) <= 60 else text[:57] + "..."


class Heartbeat:
    """Beats for the trials this sweeper is running, from a background thread."""

    def __init__(self, study: optuna.Study) -> None:
        storage = _compat.study_storage(study)
        self.interval = storage.get_heartbeat_interval() if isinstance(storage, _compat.BaseHeartbeat) else None
        self.storage, self.trial_ids, self.lock = storage, set(), threading.Lock()
        self.stopped = threading.Event()
        if self.interval:
            threading.Thread(target=self._run, name="kd_optuna-heartbeat", daemon=True).start()

    def add(self, trial: optuna.Trial) -> None:
        if self.interval:
            with self.lock:
                self.trial_ids.add(_compat.trial_id(trial))
            self.storage.record_heartbeat(_compat.trial_id(trial))

    def remove(self, trial: optuna.Trial) -> None:
        with self.lock:
            self.trial_ids.discard(_compat.trial_id(trial))

    def _run(self) -> None:
        while not self.stopped.wait(self.interval):
            with self.lock:
                ids = list(self.trial_ids)
            for trial_id in ids:
                with contextlib.suppress(Exception):  # a busy database: the next beat comes soon
                    self.storage.record_heartbeat(trial_id)

    def stop(self) -> None:
        self.stopped.set()


class KDOptunaSweeperImpl(_compat.OptunaSweeperImpl):
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
        validate: str | None = None,
        heartbeat_interval: int | None = None,
        grace_period: int | None = None,
        racing: Any = None,
        confirm_seeds: Any = None,
        asynchronous: bool = True,
    ) -> None:
        super().__init__(
            sampler,
            direction,
            storage,
            study_name,
            n_trials,
            n_jobs,
            max_failure_rate,
            custom_search_space,
            params,
        )
        self.sampler_config = sampler if OmegaConf.is_config(sampler) else None
        self.pruner = build_pruner(pruner) if OmegaConf.is_config(pruner) else pruner
        self.validate_path = validate
        self.heartbeat = (heartbeat_interval, grace_period)
        self.base_seed = 0
        self.grid: dict[str, Any] | None = None
        try:
            self.racing = racing_config(racing)
            self.confirm_seeds = check_confirm_seeds(confirm_seeds, self.racing)
        except (ValueError, TypeError) as err:
            refuse(str(err))
        self.reference = (racing or {}).get("reference") if self.racing is not None else None
        if not isinstance(asynchronous, bool):
            refuse(f"hydra.sweeper.asynchronous must be true or false, got {asynchronous!r}")
        self.asynchronous = asynchronous

    # ------------------------------------------------------------------ set-up
    def _space(self, arguments: list[str]) -> tuple[dict[str, BaseDistribution], dict[str, Any], list[str]]:
        self._process_searchspace_config()
        distributions, fixed, deletions = _compat.create_params_from_overrides(
            self._parse_sweeper_params_config() + list(arguments)
        )
        for name in fixed:  # a key fixed on the command line is not swept
            distributions.pop(name, None)
        return distributions, fixed, deletions

    def _app_settings(self, distributions: dict, fixed: dict) -> dict | None:
        """Run the app's ``validate`` hook; its return value identifies the study too."""
        if not self.validate_path:
            return None
        try:
            check = instantiate(
                {"_target_": self.validate_path, "_partial_": True}, _execution_whitelist_=[self.validate_path]
            )
            settings = check(self.config, distributions, fixed)
        except Exception as err:
            raise SweepRefused(str(err).splitlines()[0] if str(err) else type(err).__name__) from None
        return _plain(settings) if settings is not None else None

    def _sampler(self, seed: int | None, grid: dict | None) -> optuna.samplers.BaseSampler:
        """The configured sampler, seeded with ``seed`` (where it takes a seed)."""
        cfg = self.sampler_config
        if cfg is None:
            return self.sampler  # given as an object (tests, custom code): used as it is
        kwargs: dict[str, Any] = {}
        if seed is not None and "seed" in cfg:
            kwargs["seed"] = seed
        if self.n_jobs > 1 and "constant_liar" in cfg and str(cfg.get("_target_", "")).endswith("TPESampler"):
            kwargs["constant_liar"] = True  # parallel TPE: don't ask where a running trial already is
        sampler = instantiate(cfg, **kwargs, _execution_whitelist_=SAMPLERS)
        if grid is not None and callable(sampler) and not isinstance(sampler, optuna.samplers.BaseSampler):
            sampler = sampler(grid)
        if not isinstance(sampler, optuna.samplers.BaseSampler):
            raise SweepRefused(f"hydra.sweeper.sampler built {type(sampler).__name__}, not an Optuna sampler")
        return sampler

    def _is_grid(self) -> bool:
        target = str(OmegaConf.select(self.sampler_config, "_target_", default="")) if self.sampler_config else ""
        return target.endswith("GridSampler") or isinstance(self.sampler, optuna.samplers.GridSampler)

    def _open_study(self, directions: list[str], sampler: optuna.samplers.BaseSampler) -> optuna.Study:
        # The folder of a SQLite file or a journal (sqlite:///rel/path, journal:///abs/path).
        for prefix in ("sqlite:///", "journal://"):
            if isinstance(self.storage, str) and self.storage.startswith(prefix):
                Path(self.storage[len(prefix) :]).parent.mkdir(parents=True, exist_ok=True)
        interval, grace = self.heartbeat
        # Workers starting together race to create the schema and the study; the loser
        # sees an integrity error once, and then finds both made.
        for attempt in range(5):
            try:
                return optuna.create_study(
                    study_name=self.study_name,
                    storage=open_storage(self.storage, interval if self.storage else None, grace),
                    sampler=sampler,
                    pruner=self.pruner,
                    directions=directions,
                    load_if_exists=True,
                )
            except DamagedStorage as err:
                raise StorageRefused(str(err)) from None
            except Exception as err:
                if damaged_database(err) or (attempt == 4 and isinstance(err, SQLAlchemyError)):
                    raise unreadable_storage(self.storage, err) from None
                if attempt == 4:
                    raise
                time.sleep(0.5 + random.random())
        raise AssertionError("unreachable")

    def _check_identity(self, study: optuna.Study, identity: dict, directions: list[str]) -> None:
        """Record what makes this study one experiment; refuse to resume it as another."""
        recorded_directions = ",".join(d.name.lower() for d in study.directions)
        wanted = ",".join(str(d).lower() for d in directions)
        if recorded_directions != wanted:
            raise SweepRefused(
                f"study {study.study_name} was created to {recorded_directions}, but this sweep would {wanted}; "
                "keep the study's direction or set a new hydra.sweeper.study_name"
            )
        swept = {*identity[SPACE], *(study.user_attrs.get(SPACE) or {}), *(self.params or {})}
        identity = {**identity, FIXED: deciding_fixed(identity[FIXED], identity.get(SETTINGS), swept)}
        differences = []
        for key, what in ((SPACE, "swept"), (FIXED, "fixed"), (SETTINGS, "setting")):
            if key not in identity:
                continue
            recorded = study.user_attrs.get(key)
            if recorded is None:
                study.set_user_attr(key, identity[key])
            else:  # an older sweep recorded every fixed key: compare those that decide
                recorded = deciding_fixed(recorded, identity.get(SETTINGS), swept) if key == FIXED else recorded
                differences += describe_differences(recorded, identity[key], what)
        if differences:
            shown = "; ".join(differences[:4]) + (f"; and {len(differences) - 4} more" if len(differences) > 4 else "")
            raise SweepRefused(
                f"study {study.study_name} was run with another search space or settings ({shown}); rerun it as it "
                "was, or start a new study with hydra.sweeper.study_name=NEW"
            )

    def _settle_base_seed(self, study: optuna.Study) -> None:
        """``sampler.seed=null`` draws a random base seed once and records it in the study,
        so a resumed or second worker samples on from the same one."""
        configured = OmegaConf.select(self.sampler_config, "seed", default=None) if self.sampler_config else None
        recorded = study.user_attrs.get(BASE_SEED)
        if configured is not None:
            self.base_seed = int(configured)
        else:
            self.base_seed = recorded if recorded is not None else random.SystemRandom().randrange(2**31)
        if recorded is None:
            study.set_user_attr(BASE_SEED, self.base_seed)

    # ------------------------------------------------------------------ the loop
    def sweep(self, arguments: list[str]) -> None:
        try:
            self._sweep(arguments)
        except SweepRefused as err:
            refuse(str(err), code=err.code)
        except (SQLAlchemyError, optuna.exceptions.StorageInternalError) as err:  # the database failed mid-sweep
            refuse(str(unreadable_storage(self.storage, err)), code=StorageRefused.code)
        except KeyboardInterrupt:
            print(
                "kd_optuna: interrupted; rerun the same command to resume (finished trials are kept)", file=sys.stderr
            )
            sys.exit(130)

    def _sweep(self, arguments: list[str]) -> None:
        distributions, fixed, deletions = self._space(arguments)
        directions = self._get_directions()
        if len(directions) > 1 and self.pruner is not None:
            raise SweepRefused(
                f"pruning needs one objective, but direction has {len(directions)}; drop hydra/sweeper/pruner"
            )
        if len(directions) > 1 and self.racing is not None:
            raise SweepRefused(f"racing needs one objective, but direction has {len(directions)}; drop racing")
        identity = space_identity(distributions, fixed, deletions)
        settings = self._app_settings(distributions, fixed)
        if settings is not None:
            identity[SETTINGS] = settings
        grid = None
        if self._is_grid():
            try:
                grid = {name: self._to_grid_sampler_choices(d) for name, d in distributions.items()}
            except (ValueError, AssertionError) as err:
                raise SweepRefused(f"sampler=grid: {err}") from None
            self.n_trials = min(self.n_trials, math.prod(len(v) for v in grid.values()))
        self.grid = grid
        study = self._open_study(directions, self._sampler(None, grid))
        self._check_identity(study, identity, directions)
        self._settle_base_seed(study)
        fail_stale_trials(study)
        allowed = failure_allowance(self.max_failure_rate, self.n_trials)
        log = _log()
        log.info(
            "study %s (%s): %d of %d trials there; up to %d may fail in this run%s",
            study.study_name,
            shown(self.storage),
            len(counted_trials(study)),
            self.n_trials,
            allowed,
            f"; pruner {type(self.pruner).__name__}" if self.pruner is not None else "",
        )
        heartbeat = Heartbeat(study)
        silent = self._silent_trials(heartbeat)
        if self.racing is not None:
            return self._race(study, (distributions, fixed, deletions), heartbeat, allowed, silent, directions)
        space = (distributions, fixed, deletions)
        try:
            if runs_in_flight(self.launcher, self.asynchronous):
                log.info("up to %d trials in flight: the next starts as soon as one ends", self.n_jobs)
                failures = Flight(self, study, space, heartbeat, silent).run(allowed)
            else:
                failures = self._run_batches(study, space, heartbeat, silent, allowed)
        finally:
            heartbeat.stop()
        if len(failures) > allowed:
            self.fail_sweep(failures)
        self._write_results(study, directions)

    def _run_batches(
        self, study: optuna.Study, space: tuple, heartbeat: Heartbeat, silent: SilentTrials, allowed: int
    ) -> list[str]:
        """Hydra's batches: ``n_jobs`` trials launched together, each batch waiting for its
        slowest trial (launchers that run jobs in this process, or ``asynchronous=false``)."""
        failures: list[str] = []
        while len(failures) <= allowed:
            fail_stale_trials(study)
            silent.retire(study)
            to_go = self.n_trials - len(counted_trials(study)) + self._waiting_count(study)
            if to_go <= 0:
                if not self._wait_for_others(study, heartbeat):
                    break
                continue
            failures += self._run_batch(study, min(to_go, self.n_jobs), space, heartbeat)
        return failures

    def fail_sweep(self, failures: list[str]) -> None:
        refuse(
            f"{len(failures)} of {self.n_trials} trials failed, more than max_failure_rate="
            f"{self.max_failure_rate} allows (last: {failures[-1]}); fix the cause, then rerun the same command "
            "to resume",
            code=1,
        )

    def _race(
        self,
        study: optuna.Study,
        space: tuple,
        heartbeat: Heartbeat,
        allowed: int,
        silent: SilentTrials,
        directions: list[str],
    ) -> None:
        """The sweep with ``racing``: trials race for seed-runs (race_loop.py), the
        reference setting first, then the incumbent is confirmed on ``confirm_seeds``."""
        try:
            fail_stale_trials(study)
            silent.retire(study)
            self._race_and_confirm(study, space, heartbeat, allowed)
        finally:
            heartbeat.stop()
        self._write_results(study, directions)

    def _race_and_confirm(self, study: optuna.Study, space: tuple, heartbeat: Heartbeat, allowed: int) -> None:
        assert self.racing is not None
        record_settings(study, self.racing, self.confirm_seeds)
        if self.reference and reference_trial(study) is None:
            study.enqueue_trial(dict(self.reference), user_attrs={REFERENCE: True})
        _log().info(
            "racing: a new trial runs on %d seed(s) of %s; one worse than the incumbent (one-sided p < %g) stops; "
            "the incumbent ends with %d; %d seed-runs so far",
            self.racing.min_seeds,
            list(self.racing.search_seeds),
            self.racing.level,
            self.racing.max_seeds,
            load_race(study, self.racing).seed_runs(),
        )
        loop = RaceLoop(self, study, self.racing, heartbeat, space)
        loop.run(allowed)
        loop.confirm(self.confirm_seeds)

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
            _log().warning(
                "trials %s are still RUNNING elsewhere (or were killed); without heartbeats this worker "
                "cannot tell which: it stops here",
                [t.number for t in running],
            )
            return False
        if not getattr(self, "_waiting", False):
            _log().info(
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
        except BaseException:
            for trial in trials:  # the launcher itself failed: these trials never ran
                self._fail(study, trial, None, heartbeat)
            raise
        reasons = [self.settle(study, trial, ret, heartbeat) for trial, ret in zip(trials, returns, strict=True)]
        return [r for r in reasons if r is not None]

    def settle(self, study: optuna.Study, trial: optuna.Trial, ret: Any, heartbeat: Heartbeat) -> str | None:
        """Tell the study a trial's outcome from its job's return; its failure reason, if it failed."""
        state, values, reason = self.outcome(ret, len(study.directions))
        if state == TrialState.FAIL:
            _log().warning("trial %d failed: %s (its log has the details)", trial.number, reason)
            self._fail(study, trial, reason, heartbeat)
            return reason
        if state == TrialState.PRUNED:
            _log().info("trial %d pruned", trial.number)
        self._tell(study, trial, heartbeat, state=state, values=values)
        return None

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
        return (
            *(f"++hydra.job.env_set.{key}={_quoted(value)}" for key, value in env.items()),
            # A job's sweep dir may be interpolated from values this sweep varies: pin it.
            f"hydra.sweep.dir={_quoted(self.sweep_dir)}",
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
        value = ret.return_value
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
                    _log().warning("could not record trial %d (%s); a rerun redoes it", trial.number, err)
                    return
                time.sleep(0.5 * (attempt + 1))

    def _write_results(self, study: optuna.Study, directions: list[str]) -> None:
        trials = counted_trials(study)
        results: dict[str, Any] = {
            "name": "optuna",
            "study_name": study.study_name,
            "storage": shown(self.storage),  # where kd.report finds the study (a password masked)
            "n_complete": sum(1 for t in trials if t.state == TrialState.COMPLETE),
            "n_pruned": sum(1 for t in trials if t.state == TrialState.PRUNED),
            "n_failed": sum(1 for t in trials if t.state == TrialState.FAIL),
        }
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        if self.racing is not None:
            results["racing"] = race_summary(study, self.racing, self.confirm_seeds)
            _log_race(results["racing"])
            incumbent = results["racing"].get("incumbent")
            if incumbent:
                results.update(
                    best_params=incumbent["params"], best_value=incumbent["mean"], best_trial=incumbent["trial"]
                )
        elif complete and len(directions) == 1:
            best = study.best_trial
            results.update(best_params=best.params, best_value=best.value, best_trial=best.number)
            _log().info("best trial %d: %s -> %s", best.number, best.params, best.value)
        elif complete:
            front = study.best_trials
            results["solutions"] = [{"number": t.number, "params": t.params, "values": t.values} for t in front]
            _log().info("Pareto front: %d trials", len(front))
            for t in front:
                _log().info("    trial %d: values %s, params %s", t.number, t.values, t.params)
        Path(self.sweep_dir).mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.create(_plain(results)), f"{self.sweep_dir}/optimization_results.yaml")
        _log().info("sweep results: %s (study %s in %s)", self.sweep_dir, study.study_name, shown(self.storage))


def _log_race(summary: dict) -> None:
    """The racing sweep's answer, stated with its n and its tied set."""
    incumbent = summary.get("incumbent")
    if not incumbent:
        return
    se = f" ± {incumbent['se']:.3g}" if incumbent["se"] is not None else ""
    _log().info(
        "incumbent: trial %d %s, mean %.4g%s over %d seeds; %d seed-runs in all",
        incumbent["trial"],
        incumbent["params"],
        incumbent["mean"],
        se,
        incumbent["n"],
        summary["seed_runs"],
    )
    tied = ", ".join(f"trial {t['trial']} (n={t['n']})" for t in summary["tied"]) or "none"
    _log().info("not distinguishable from it (paired on common seeds): %s", tied)
    if "reference" in summary:
        ref = summary["reference"]
        _log().info(
            "against the reference trial %d %s: %s on %d common seeds",
            ref["trial"],
            ref["params"],
            "distinguishable" if ref["distinguishable"] else "not distinguishable",
            ref["n"],
        )
    confirmation = summary.get("confirmation")
    if confirmation:
        diff = confirmation.get("incumbent_minus_reference")
        _log().info(
            "confirmed on fresh seeds %s: mean %.4g (n=%d)%s",
            confirmation["seeds"],
            confirmation["incumbent"]["mean"],
            confirmation["incumbent"]["n"],
            f"; minus the reference {diff['mean']:+.3g}, 95% CI {diff['ci95']}" if diff else "",
        )


def _log() -> Any:

    return logging.getLogger(__name__)


def _check_sweeper_values(n_trials: Any, n_jobs: Any, max_failure_rate: Any, heartbeat: tuple) -> None:
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
    for name, value in zip(("heartbeat_interval", "grace_period"), heartbeat, strict=True):
        if value is not None and (not integer(value) or value < 1):
            refuse(f"hydra.sweeper.{name} must be an integer >= 1 (seconds) or null, got {value!r}")


def _available_cores() -> int:

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class KDOptunaSweeper(OptunaSweeper):
    """``hydra/sweeper=kd_optuna``: the keys of ``hydra/sweeper=optuna`` plus ``pruner``,
    ``validate``, ``heartbeat_interval`` and ``grace_period`` (see KDOptunaSweeperConf),
    checked here and handed to :class:`KDOptunaSweeperImpl` by name."""

    def __init__(self, *, n_trials: int, n_jobs: int, max_failure_rate: float, **keys: Any) -> None:
        heartbeat = (keys.get("heartbeat_interval", 10), keys.get("grace_period"))
        _check_sweeper_values(n_trials, n_jobs, max_failure_rate, heartbeat)
        if n_jobs < 0:  # joblib's convention: -1 is every core, -2 all but one, ...
            n_jobs = max(1, _available_cores() + 1 + n_jobs)
        keys.setdefault("heartbeat_interval", 10)
        self.sweeper = KDOptunaSweeperImpl(n_trials=n_trials, n_jobs=n_jobs, max_failure_rate=max_failure_rate, **keys)
