"""``hydra/sweeper=kd_optuna``: the Optuna sweeper of hydra-optuna-sweeper 1.4, resumable,
pruning, for any Hydra app.

It takes every key of ``hydra/sweeper=optuna`` and runs the same search spaces,
samplers (grid included) and one or several objectives. What it adds:

* **Resume.** ``n_trials`` is the study's target, not a count per invocation: trials
  the study holds count, so the same command resumes a killed sweep, and workers
  sharing one storage stop together. A trial counts once it has an outcome (COMPLETE,
  PRUNED, or FAIL in its job) or runs or waits; one asked past the target in a race
  is FAIL with reason ``kd_optuna:surplus`` and does not count.
* **Heartbeats.** With a storage, the sweeper beats for its running trials every
  ``heartbeat_interval`` seconds; a trial whose worker stopped beating for
  ``grace_period`` seconds becomes FAIL and is queued again with its parameters.
* **One failure rule.** A job that raised, returned a non-finite objective or the wrong
  number of values is FAIL with a reason (``kd_optuna:error: ...``, ``kd_optuna:diverged``) and counts
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

import logging
import math
import random
import sys
import time
from pathlib import Path
from typing import Any

import optuna
from hydra.utils import instantiate
from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper
from omegaconf import DictConfig, OmegaConf
from optuna.distributions import BaseDistribution
from sqlalchemy.exc import SQLAlchemyError

from hydra_plugins.kd_sweeper import _compat
from hydra_plugins.kd_sweeper.artifacts import ARTIFACTS
from hydra_plugins.kd_sweeper.artifacts import where as artifact_location
from hydra_plugins.kd_sweeper.config import (
    SAMPLERS,
    available_cores,
    build_pruner,
    check_sweeper_values,
    failure_allowance,
)
from hydra_plugins.kd_sweeper.constraints import parse as parse_bounds
from hydra_plugins.kd_sweeper.flight import Flight, runs_in_flight
from hydra_plugins.kd_sweeper.journal import DamagedStorage
from hydra_plugins.kd_sweeper.liveness import Heartbeat, SilentTrials
from hydra_plugins.kd_sweeper.race_loop import (
    REFERENCE,
    RaceLoop,
    check_confirm_seeds,
    load_race,
    racing_config,
    record_settings,
    reference_trial,
)
from hydra_plugins.kd_sweeper.refusals import (
    Interrupts,
    StorageRefused,
    SweepRefused,
    damaged_database,
    refuse,
    unreadable_storage,
)
from hydra_plugins.kd_sweeper.results import write_results
from hydra_plugins.kd_sweeper.space import (
    BASE_SEED,
    FIXED,
    SETTINGS,
    SPACE,
    deciding_fixed,
    describe_differences,
    plain,
    space_identity,
)
from hydra_plugins.kd_sweeper.study import (
    counted_trials,
    fail_stale_trials,
    open_storage,
    shown,
    why_not_resumable,
)
from hydra_plugins.kd_sweeper.trials import HideJobEnv, TrialRunner, finished_count
from hydra_plugins.kd_sweeper.warm import warm_start

log = logging.getLogger(__name__)


class KDOptunaSweeperImpl(TrialRunner, _compat.OptunaSweeperImpl):
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
        constraints: Any = None,
        warm_start: Any = None,
        artifacts: Any = None,
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
        self.heartbeat, self.interrupts = (heartbeat_interval, grace_period), Interrupts()
        self.base_seed = 0
        self.grid: dict[str, Any] | None = None
        try:
            self.racing = racing_config(racing)
            self.confirm_seeds = check_confirm_seeds(confirm_seeds, self.racing)
            self.bounds = parse_bounds(constraints)
        except (ValueError, TypeError) as err:
            refuse(str(err))
        if self.bounds and self.racing is not None:
            refuse("hydra.sweeper.constraints and racing cannot be combined yet: drop one of them")
        self.reference = (racing or {}).get("reference") if self.racing is not None else None
        if not isinstance(asynchronous, bool):
            refuse(f"hydra.sweeper.asynchronous must be true or false, got {asynchronous!r}")
        self.asynchronous = asynchronous
        self.warm_start = warm_start
        self.artifacts = artifact_location(artifacts)

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
        return plain(settings) if settings is not None else None

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
            with self.interrupts:
                self._sweep(arguments)
        except SweepRefused as err:
            refuse(str(err), code=err.code)
        except (SQLAlchemyError, optuna.exceptions.StorageInternalError) as err:  # the database failed mid-sweep
            refuse(str(unreadable_storage(self.storage, err)), code=StorageRefused.code)
        except KeyboardInterrupt:
            why = self._unresumable()
            then = f"it cannot be resumed: {why}" if why else "rerun the same command to resume"
            print(f"kd_optuna: interrupted; {then} (finished trials are kept)", file=sys.stderr)
            sys.exit(130)

    def _unresumable(self) -> str | None:
        """Why a rerun of this command would start another study (None: it resumes this one)."""
        raw_dir = OmegaConf.to_container(self.config.hydra.sweep, resolve=False).get("dir", "")
        return why_not_resumable(self.storage, self.study_name, str(self.sweep_dir), str(raw_dir))

    def _sweep(self, arguments: list[str]) -> None:
        HideJobEnv.install(self.launcher)
        if why := self._unresumable():  # said first, before anything runs
            log.warning("kd_optuna: a rerun of this command will not resume this sweep: %s", why)
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
        if self.bounds:  # a constrained study is another question (absent otherwise: older studies match)
            identity["constraints"] = [b.name for b in self.bounds]
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
        if self.artifacts and study.user_attrs.get(ARTIFACTS) != self.artifacts:
            study.set_user_attr(ARTIFACTS, self.artifacts)  # where kd.export --study finds the files
        try:
            warm_start(study, self.warm_start, distributions)
        except (ValueError, OSError, DamagedStorage, SQLAlchemyError) as err:
            raise SweepRefused(str(err).splitlines()[0]) from None
        allowed = failure_allowance(self.max_failure_rate, self.n_trials)
        pruner = f"; pruner {type(self.pruner).__name__}" if self.pruner is not None else ""
        log.info("study %s (%s): %d of %d trials there; up to %d may fail in this run%s", study.study_name,
                 shown(self.storage), len(counted_trials(study)), self.n_trials, allowed, pruner)  # fmt: skip
        self.progress_start = (time.monotonic(), finished_count(study))
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
            f"{self.max_failure_rate} allows (last: {failures[-1]}); fix the cause, then "
            + ("start it again" if self._unresumable() else "rerun the same command to resume"),
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
        log.info(
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

    def _write_results(self, study: optuna.Study, directions: list[str]) -> None:
        write_results(self, study, directions)


class KDOptunaSweeper(OptunaSweeper):
    """``hydra/sweeper=kd_optuna``: the keys of ``hydra/sweeper=optuna`` plus ``pruner``,
    ``validate``, ``heartbeat_interval`` and ``grace_period`` (see KDOptunaSweeperConf),
    checked here and handed to :class:`KDOptunaSweeperImpl` by name."""

    def __init__(self, *, n_trials: int, n_jobs: int, max_failure_rate: float, **keys: Any) -> None:
        heartbeat = (keys.get("heartbeat_interval", 10), keys.get("grace_period"))
        check_sweeper_values(n_trials, n_jobs, max_failure_rate, heartbeat)
        if n_jobs < 0:  # joblib's convention: -1 is every core, -2 all but one, ...
            n_jobs = max(1, available_cores() + 1 + n_jobs)
        keys.setdefault("heartbeat_interval", 10)
        self.sweeper = KDOptunaSweeperImpl(n_trials=n_trials, n_jobs=n_jobs, max_failure_rate=max_failure_rate, **keys)
