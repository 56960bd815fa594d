"""The sweep loop with ``hydra.sweeper.racing``: trials race for seed-runs, then the
incumbent is confirmed on fresh seeds.

Each seed-run is one launcher job: the trial's parameters plus ``KD_OPTUNA_REPLICATE``
(its seed), which an app reads with :func:`hydra_plugins.kd_sweeper.job.replicate`. Only
a trial's first seed-run gets ``KD_OPTUNA_TRIAL``, so pruning judges a trial on its first
seed and nothing is reported twice to one step. Every finished seed-run is written to the
study at once (user attribute ``kd_optuna:race:<trial>:<seed>``), with the incumbent and
the stopped trials, so a killed sweep resumes mid-race and runs no seed-run twice (a
stale trial's retry inherits its seeds). Up to ``n_jobs`` trials race at a time; their
seed-runs are launched together.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import optuna
from optuna.trial import TrialState

from hydra_plugins.kd_sweeper.racing import MAXIMIZE, MINIMIZE, Race, RacingConfig, compare
from hydra_plugins.kd_sweeper.study import counted_trials

RUN = "kd_optuna:race:"  # study user attribute per seed-run: RUN<trial>:<seed> -> value
CONFIRM = "kd_optuna:confirm:"  # ... per confirmation seed-run: CONFIRM<trial>:<seed> -> value
INCUMBENT = "kd_optuna:race_incumbent"
STOPPED = "kd_optuna:race_stopped:"  # ... STOPPED<trial> -> true
REFERENCE = "kd_optuna:reference"  # user attribute of the reference setting's trial (enqueued)
SETTINGS = "kd_optuna:racing"  # the race's settings and confirm_seeds, so kd.report judges as the sweep did
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SeedRun:
    trial: optuna.trial.FrozenTrial | optuna.Trial
    seed: int
    first: bool  # the trial's first seed-run: it reports to the trial (pruning)
    confirm: bool = False


def racing_config(cfg: Any) -> RacingConfig | None:
    """``hydra.sweeper.racing`` as a :class:`RacingConfig` (None: off); a bad value is a
    ValueError whose message is the one line shown."""
    if not cfg:
        return None
    keys = dict(cfg)
    unknown = set(keys) - {f.name for f in fields(RacingConfig)} - {"reference"}
    if unknown:
        raise ValueError(f"hydra.sweeper.racing has no key {sorted(unknown)[0]!r}")
    keys.pop("reference", None)
    if keys.get("seeds") is not None:
        keys["seeds"] = tuple(int(s) for s in keys["seeds"])
    else:
        keys.pop("seeds", None)
    return RacingConfig(**keys)


def check_confirm_seeds(confirm: Any, config: RacingConfig | None) -> tuple[int, ...]:
    """``confirm_seeds`` as a tuple; overlap with the search seeds is refused (ValueError)."""
    if not confirm:
        return ()
    seeds = tuple(int(s) for s in confirm)
    if config is None:
        raise ValueError("hydra.sweeper.confirm_seeds needs hydra.sweeper.racing (the race's incumbent is confirmed)")
    overlap = sorted(set(seeds) & set(config.search_seeds))
    if overlap:
        raise ValueError(
            f"hydra.sweeper.confirm_seeds {list(seeds)} overlap the search seeds {list(config.search_seeds)} "
            f"(both hold {overlap}); confirmation needs fresh seeds"
        )
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"hydra.sweeper.confirm_seeds repeats a seed: {list(seeds)}")
    return seeds


def record_settings(study: optuna.Study, config: RacingConfig, confirm_seeds: tuple[int, ...]) -> None:
    """Keep the race's settings in the study (kd.report reads them back)."""
    settings = {**asdict(config), "seeds": list(config.search_seeds), "confirm_seeds": list(confirm_seeds)}
    if study.user_attrs.get(SETTINGS) != settings:
        study.set_user_attr(SETTINGS, settings)


def recorded_settings(study: optuna.Study) -> tuple[RacingConfig, tuple[int, ...]] | None:
    """The race's settings and confirm_seeds as the sweep recorded them (None: not recorded)."""
    settings = dict(study.user_attrs.get(SETTINGS) or {})
    if not settings:
        return None
    confirm = tuple(settings.pop("confirm_seeds", ()))
    settings["seeds"] = tuple(settings.get("seeds", ()))
    return RacingConfig(**settings), confirm


def _key_value(attrs: dict, prefix: str) -> dict[int, dict[int, float]]:
    values: dict[int, dict[int, float]] = {}
    for key, value in attrs.items():
        if key.startswith(prefix):
            trial, seed = key[len(prefix) :].split(":")
            values.setdefault(int(trial), {})[int(seed)] = float(value)
    return values


def load_race(study: optuna.Study, config: RacingConfig) -> Race:
    """The race as the study recorded it; a retried trial takes over its failed original's seeds."""
    direction = MAXIMIZE if study.direction == optuna.study.StudyDirection.MAXIMIZE else MINIMIZE
    attrs = study.user_attrs
    race = Race(config, direction, values=_key_value(attrs, RUN))
    race.incumbent = attrs.get(INCUMBENT)
    race.stopped = {int(k[len(STOPPED) :]) for k in attrs if k.startswith(STOPPED)}
    for trial in study.get_trials(deepcopy=False):
        original = trial.system_attrs.get("failed_trial")
        if original is not None and original in race.values and trial.number not in race.values:
            race.values[trial.number] = race.values.pop(original)
    return race


class RaceLoop:
    """Runs a racing sweep for :class:`~hydra_plugins.kd_sweeper.kd_sweeper.KDOptunaSweeperImpl`."""

    def __init__(self, sweeper: Any, study: optuna.Study, config: RacingConfig, heartbeat: Any, space: tuple) -> None:
        self.sweeper, self.study, self.config, self.heartbeat, self.space = sweeper, study, config, heartbeat, space
        self.race = load_race(study, config)
        self.failures: list[str] = []
        self.active: dict[int, optuna.Trial] = {}
        self.overrides: dict[int, tuple[str, ...]] = {}

    # ---------------------------------------------------------------- recording
    def _record(self, run: SeedRun, value: float) -> None:
        prefix = CONFIRM if run.confirm else RUN
        self.study.set_user_attr(f"{prefix}{run.trial.number}:{run.seed}", value)
        if not run.confirm:
            self.race.record(run.trial.number, run.seed, value)

    def _save_decisions(self) -> None:
        recorded = self.study.user_attrs  # one read of the storage, not one per stopped trial
        if self.race.incumbent is not None and recorded.get(INCUMBENT) != self.race.incumbent:
            self.study.set_user_attr(INCUMBENT, self.race.incumbent)
        for trial in self.race.stopped:
            if f"{STOPPED}{trial}" not in recorded:
                self.study.set_user_attr(f"{STOPPED}{trial}", True)

    # ---------------------------------------------------------------- launching
    def _params(self, trial: Any) -> tuple[str, ...]:
        """The trial's parameters and fixed keys as overrides, as upstream formats them."""
        if trial.number not in self.overrides:
            distributions, fixed, deletions = self.space
            if isinstance(trial, optuna.Trial):
                (params,) = self.sweeper._configure_trials([trial], distributions, fixed, deletions)
            else:  # a trial of an earlier invocation (the incumbent, the reference)
                params = (*(f"{k}={v}" for k, v in {**trial.params, **fixed}.items()), *deletions)
            self.overrides[trial.number] = tuple(params)
        return self.overrides[trial.number]

    def _launch(self, runs: list[SeedRun]) -> list[tuple[SeedRun, TrialState, float | None, str]]:
        overrides = [
            (*self._params(r.trial), *self.sweeper._job_overrides(self.study, r.trial, r.seed, r.first)) for r in runs
        ]
        done = self.race.seed_runs() + sum(len(v) for v in _key_value(self.study.user_attrs, CONFIRM).values())
        returns = self.sweeper.launcher.launch(overrides, initial_job_idx=done)
        outcomes = []
        for run, ret in zip(runs, returns, strict=True):
            state, values, reason = self.sweeper.outcome(ret, 1)
            outcomes.append((run, state, values[0] if values else None, reason))
        return outcomes

    # ---------------------------------------------------------------- the race
    def run(self, allowed: int) -> None:
        """Race until ``n_trials`` trials have raced, then give the incumbent its
        remaining seeds; ``allowed`` failures end the sweep one past it."""
        while True:
            self._fill()
            runs = self._next_runs()
            if not runs and not self.active:
                if self._to_go() > 0:
                    continue  # the raced trials are told: ask the next ones
                runs = [self._incumbent_run(seed) for _, seed in self.race.challenge_incumbent()]
                if not runs:
                    break
                log.info("the target is reached: trial %d runs its remaining seeds", self.race.incumbent)
            if runs and self._left() < len(runs):  # the budget ends mid-race: those races end here
                runs = runs[: max(0, int(self._left()))]
                if not runs:  # spent: the races in flight end where they are
                    for trial in list(self.active.values()):
                        self._finish(trial)
                    break
            if runs:
                self._run(runs)
            if len(self.failures) > allowed:
                self.sweeper.fail_sweep(self.failures)

    def _left(self) -> float:
        """Seed-runs the search may still spend (``racing.budget``)."""
        budget = self.config.budget
        return math.inf if budget is None else budget - self.race.seed_runs()

    def _to_go(self) -> int:
        if self._left() <= 0:
            return 0
        return self.sweeper.n_trials - len(counted_trials(self.study)) + self.sweeper._waiting_count(self.study)

    def _fill(self) -> None:
        """Ask new trials until ``n_jobs`` race or the target is reached."""
        while len(self.active) < self.sweeper.n_jobs and self._to_go() > 0:
            trial = self.sweeper._ask_counted(self.study, self.heartbeat)
            if trial is None:
                return
            original = self.study._storage.get_trial_system_attrs(trial._trial_id).get("failed_trial")
            if original is not None and original in self.race.values:  # a stale trial's retry keeps its seeds
                self.race.values.setdefault(trial.number, self.race.values.pop(original))
            self.active[trial.number] = trial

    def _next_runs(self) -> list[SeedRun]:
        """Each racing trial's next seed-runs; a trial whose race is over is told, and the
        incumbent it challenged gets one more seed (up to max_seeds)."""
        runs: list[SeedRun] = []
        for number, trial in list(self.active.items()):
            steps = self.race.step(number)
            if steps:
                first = not self.race.values.get(number)
                runs += [SeedRun(trial, seed, first=first and i == 0) for i, (_, seed) in enumerate(steps)]
                continue
            self._finish(trial)
            incumbent = self.race.incumbent
            if incumbent not in self.active and not any(r.trial.number == incumbent for r in runs):
                runs += [self._incumbent_run(seed) for _, seed in self.race.challenge_incumbent()]
        self._save_decisions()
        return runs

    def _incumbent_run(self, seed: int) -> SeedRun:
        return SeedRun(self.study.trials[self.race.incumbent], seed, first=False)

    def _run(self, runs: list[SeedRun]) -> None:
        for run, state, value, reason in self._launch(runs):
            number = run.trial.number
            if state == TrialState.COMPLETE:
                self._record(run, value)
            elif number in self.active:  # a racing trial failed or was pruned on a seed: it stops
                self.race.stopped.add(number)
                trial = self.active.pop(number)
                if state == TrialState.PRUNED:
                    log.info("trial %d pruned on seed %d", number, run.seed)
                    self.sweeper._tell(self.study, trial, self.heartbeat, state=TrialState.PRUNED)
                else:
                    self.failures.append(reason)
                    log.warning("trial %d failed on seed %d: %s (its log has the details)", number, run.seed, reason)
                    self.sweeper._fail(self.study, trial, reason, self.heartbeat)
            else:
                log.warning("seed %d of trial %d failed: %s; left out of the race", run.seed, number, reason)
        self._save_decisions()

    def _finish(self, trial: optuna.Trial) -> None:
        """Its race is over: it is told its mean over the seeds it ran."""
        self.active.pop(trial.number, None)
        values = self.race.values.get(trial.number)
        if values:
            mean = self.race.mean(trial.number)
            self.sweeper._tell(self.study, trial, self.heartbeat, state=TrialState.COMPLETE, values=[mean])
        else:
            self.sweeper._fail(self.study, trial, None, self.heartbeat)
        log.info(
            "trial %d: %d seed(s), mean %.4g%s; incumbent: trial %s; %d seed-runs so far",
            trial.number,
            len(values or {}),
            self.race.mean(trial.number),
            " (stopped: worse than the incumbent)" if trial.number in self.race.stopped else "",
            self.race.incumbent,
            self.race.seed_runs(),
        )

    # ---------------------------------------------------------------- confirmation
    def confirm(self, seeds: tuple[int, ...]) -> None:
        """Run the incumbent, and the reference setting paired with it, on ``seeds``."""
        if not seeds or self.race.incumbent is None:
            return
        reference = reference_trial(self.study)
        done = _key_value(self.study.user_attrs, CONFIRM)
        todo = [
            SeedRun(self.study.trials[number], seed, first=False, confirm=True)
            for number in dict.fromkeys(n for n in (self.race.incumbent, reference) if n is not None)
            for seed in seeds
            if seed not in done.get(number, {})
        ]
        if todo:
            log.info("confirming trial %d on fresh seeds %s: %d seed-runs", self.race.incumbent, list(seeds), len(todo))
        size = max(1, self.sweeper.n_jobs)
        for start in range(0, len(todo), size):
            for run, state, value, reason in self._launch(todo[start : start + size]):
                if state == TrialState.COMPLETE:
                    self._record(run, value)
                else:
                    log.warning("confirmation seed %d of trial %d failed: %s", run.seed, run.trial.number, reason)


def reference_trial(study: optuna.Study) -> int | None:
    """The number of the reference setting's trial (enqueued first), or None."""
    return next((t.number for t in study.get_trials(deepcopy=False) if t.user_attrs.get(REFERENCE)), None)


def summary(study: optuna.Study, config: RacingConfig, confirm_seeds: tuple[int, ...]) -> dict:
    """What a racing sweep concludes, for optimization_results.yaml and the log."""
    race = load_race(study, config)
    result: dict[str, Any] = {"seed_runs": race.seed_runs()}
    if race.incumbent is None:
        return result
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    inc = race.incumbent

    def described(values: dict[int, float]) -> dict:
        data = list(values.values())
        n = len(data)
        mean = sum(data) / n if n else math.nan
        se = math.sqrt(sum((v - mean) ** 2 for v in data) / (n - 1) / n) if n > 1 else None
        return {"n": n, "mean": mean, "se": se, "seeds": sorted(values)}

    result["incumbent"] = {"trial": inc, "params": trials[inc].params, **described(race.values[inc])}
    result["tied"] = [
        {"trial": t, "params": trials[t].params, "n": cmp.n, "difference": cmp.difference}
        for t, cmp in race.tied_with_incumbent()
    ]
    reference = reference_trial(study)
    if reference is not None and reference in race.values and reference != inc:
        cmp = race.compare_to_incumbent(reference)
        result["reference"] = {
            "trial": reference,
            "params": trials[reference].params,
            "n": cmp.n,
            "incumbent_minus_reference": -cmp.difference if cmp.n else None,
            "distinguishable": not cmp.tied(config.tie_level),
        }
    confirmed = _key_value(study.user_attrs, CONFIRM)
    if confirm_seeds and inc in confirmed:
        block: dict[str, Any] = {"seeds": list(confirm_seeds), "incumbent": described(confirmed[inc])}
        if reference is not None and reference in confirmed and reference != inc:
            block["reference"] = described(confirmed[reference])
            cmp = compare(confirmed[inc], confirmed[reference], race.direction)
            half = 0.0 if not cmp.se else cmp.se * _t95(cmp.n - 1)
            block["incumbent_minus_reference"] = {
                "n": cmp.n,
                "mean": cmp.difference,
                "ci95": [cmp.difference - half, cmp.difference + half] if cmp.n > 1 else None,
            }
        result["confirmation"] = block
    return result


def _t95(df: int) -> float:
    from scipy import stats

    return float(stats.t.ppf(0.975, df)) if df >= 1 else math.nan


def log_race(summary: dict) -> None:
    """The racing sweep's answer, stated with its n and its tied set."""
    incumbent = summary.get("incumbent")
    if not incumbent:
        return
    se = f" ± {incumbent['se']:.3g}" if incumbent["se"] is not None else ""
    log.info(
        "incumbent: trial %d %s, mean %.4g%s over %d seeds; %d seed-runs in all",
        incumbent["trial"],
        incumbent["params"],
        incumbent["mean"],
        se,
        incumbent["n"],
        summary["seed_runs"],
    )
    tied = ", ".join(f"trial {t['trial']} (n={t['n']})" for t in summary["tied"]) or "none"
    log.info("not distinguishable from it (paired on common seeds): %s", tied)
    if "reference" in summary:
        ref = summary["reference"]
        log.info(
            "against the reference trial %d %s: %s on %d common seeds",
            ref["trial"],
            ref["params"],
            "distinguishable" if ref["distinguishable"] else "not distinguishable",
            ref["n"],
        )
    confirmation = summary.get("confirmation")
    if confirmation:
        diff = confirmation.get("incumbent_minus_reference")
        log.info(
            "confirmed on fresh seeds %s: mean %.4g (n=%d)%s",
            confirmation["seeds"],
            confirmation["incumbent"]["mean"],
            confirmation["incumbent"]["n"],
            f"; minus the reference {diff['mean']:+.3g}, 95% CI {diff['ci95']}" if diff else "",
        )
