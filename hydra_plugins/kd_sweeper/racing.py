"""Seed-paired racing: spend seed-runs on contenders, not on settings already beaten.

One seed's noise can be as large as the differences between settings, so a sweep that
runs every trial once picks noise, and one that runs every trial on the same k seeds
spends as much on a hopeless setting as on a contender. Racing (SMAC's intensification,
irace's F-race) does neither:

* Replicates are common: replicate ``i`` is the same seed for every trial, so any two
  trials are compared on the seeds they share, paired.
* A new trial runs on the first ``min_seeds`` seeds. While it has fewer seeds than the
  incumbent it gets the incumbent's next seed, unless a one-sided paired t-test on their
  common seeds finds it worse at ``level`` (a lenient 0.3 by default: a wrong stop costs
  one contender, a wrong continuation costs seed-runs): then it gets no more. The test's variance is
  pooled over every trial's differences to the incumbent (the settings share one seed
  noise), so that one or two common seeds can already tell a clearly worse trial.
* A trial that catches up with the incumbent and has the better mean on the same seeds
  takes its place. After each race the incumbent gets one more seed, up to
  ``max_seeds``: it is challenged with more.

This module is the bookkeeping and the decisions; the sweeper runs the seed-runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from scipy import stats

MAXIMIZE, MINIMIZE = "maximize", "minimize"


@dataclass(frozen=True)
class RacingConfig:
    min_seeds: int = 1  # seeds a new trial runs on before it is compared
    max_seeds: int = 8  # seeds the incumbent ends with
    level: float = 0.3  # one-sided level at which a trial is "worse" and gets no more seeds
    tie_level: float = 0.05  # two-sided level of the claims "distinguishable from the incumbent"
    seeds: tuple[int, ...] = ()  # the search seeds, replicate i first (default 0 .. max_seeds-1)
    budget: int | None = None  # seed-runs the search may spend (None: as n_trials races need)

    def __post_init__(self) -> None:
        if not 1 <= self.min_seeds <= self.max_seeds:
            raise ValueError(f"racing needs 1 <= min_seeds <= max_seeds, got {self.min_seeds} and {self.max_seeds}")
        for name in ("level", "tie_level"):
            if not 0 < getattr(self, name) < 1:
                raise ValueError(f"racing.{name} must be in (0, 1), got {getattr(self, name)}")
        if self.seeds and len(self.seeds) < self.max_seeds:
            raise ValueError(f"racing.seeds lists {len(self.seeds)} seeds, fewer than max_seeds={self.max_seeds}")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"racing.seeds repeats a seed: {list(self.seeds)}")
        if self.budget is not None and (isinstance(self.budget, bool) or self.budget < 1):
            raise ValueError(f"racing.budget must be a number of seed-runs >= 1 or null, got {self.budget}")

    @property
    def search_seeds(self) -> tuple[int, ...]:
        return self.seeds[: self.max_seeds] if self.seeds else tuple(range(self.max_seeds))


@dataclass(frozen=True)
class Comparison:
    """Trial ``a`` against trial ``b`` on their common seeds: the mean paired difference
    (a - b, signed so that positive is better), its standard error, n, and the two
    one-sided p-values (NaN below two seeds)."""

    n: int
    difference: float
    se: float
    p_worse: float  # evidence that a is worse than b
    p_better: float

    def worse(self, level: float) -> bool:
        return self.p_worse < level  # False for NaN: too few seeds to tell

    def tied(self, level: float) -> bool:
        """Not distinguishable two-sided at ``level`` (always, when it cannot be tested)."""
        return not 2 * min(self.p_worse, self.p_better) < level


def paired_differences(a: dict[int, float], b: dict[int, float], direction: str = MAXIMIZE) -> list[float]:
    """``a - b`` on each seed both have (signed so that positive means ``a`` is better)."""
    sign = 1.0 if direction == MAXIMIZE else -1.0
    return [sign * (a[s] - b[s]) for s in sorted(set(a) & set(b))]


def compare(
    a: dict[int, float], b: dict[int, float], direction: str = MAXIMIZE, pooled: tuple[float, int] | None = None
) -> Comparison:
    """Paired comparison of two trials' per-seed values on the seeds both have. With
    ``pooled`` (the variance of a paired difference and its degrees of freedom, from
    every pair of the race) the test uses it, so that two seeds, or one, can already
    tell; else the pair's own variance (two seeds at least)."""
    diffs = paired_differences(a, b, direction)
    n = len(diffs)
    if n == 0:
        return Comparison(0, math.nan, math.nan, math.nan, math.nan)
    mean = sum(diffs) / n
    if pooled is not None and pooled[1] >= 1 and pooled[0] > 0:
        se = math.sqrt(pooled[0] / n)
        t = mean / se
        return Comparison(n, mean, se, float(stats.t.cdf(t, pooled[1])), float(stats.t.sf(t, pooled[1])))
    if n < 2:
        return Comparison(n, mean, math.nan, math.nan, math.nan)
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    se = sd / math.sqrt(n)
    if se == 0:  # identical differences on every seed: certain in their direction
        worse = 0.0 if mean < 0 else (1.0 if mean > 0 else 0.5)
        return Comparison(n, mean, 0.0, worse, 1.0 - worse if mean != 0 else 0.5)
    t = mean / se
    return Comparison(n, mean, se, float(stats.t.cdf(t, n - 1)), float(stats.t.sf(t, n - 1)))


@dataclass
class Race:
    """The race's state: each trial's per-seed values, the incumbent and the trials that
    stopped getting seeds. Rebuilt from the study on resume (:meth:`record`)."""

    config: RacingConfig
    direction: str = MAXIMIZE
    values: dict[int, dict[int, float]] = field(default_factory=dict)
    stopped: set[int] = field(default_factory=set)
    incumbent: int | None = None

    def record(self, trial: int, seed: int, value: float) -> None:
        self.values.setdefault(trial, {})[seed] = value

    def mean(self, trial: int) -> float:
        values = list(self.values.get(trial, {}).values())
        return sum(values) / len(values) if values else math.nan

    def seeds_of(self, trial: int) -> list[int]:
        """The search seeds ``trial`` has run, in replicate order."""
        have = self.values.get(trial, {})
        return [s for s in self.config.search_seeds if s in have]

    def next_seed(self, trial: int) -> int | None:
        """The first search seed ``trial`` has not run (None: it has them all)."""
        have = self.values.get(trial, {})
        return next((s for s in self.config.search_seeds if s not in have), None)

    def noise(self) -> tuple[float, int] | None:
        """The variance of a paired difference, pooled over every trial's differences to
        the incumbent on their common seeds (settings share one seed noise), with its
        degrees of freedom; None while no trial shares two seeds with the incumbent."""
        if self.incumbent is None:
            return None
        squares, df = 0.0, 0
        for trial, values in self.values.items():
            if trial == self.incumbent:
                continue
            diffs = paired_differences(values, self.values[self.incumbent], self.direction)
            if len(diffs) >= 2:
                mean = sum(diffs) / len(diffs)
                squares += sum((d - mean) ** 2 for d in diffs)
                df += len(diffs) - 1
        return (squares / df, df) if df else None

    def compare_to_incumbent(self, trial: int) -> Comparison:
        return compare(self.values.get(trial, {}), self.values[self.incumbent], self.direction, self.noise())

    def better(self, a: int, b: int) -> bool:
        """Whether ``a`` has the better mean than ``b`` on their common seeds."""
        cmp = compare(self.values.get(a, {}), self.values.get(b, {}), self.direction)
        return cmp.n > 0 and cmp.difference > 0

    def step(self, trial: int) -> list[tuple[int, int]]:
        """The next seed-runs ``(trial, seed)`` that racing ``trial`` needs; empty when its
        race is over (then the incumbent may have changed, and may want more seeds: see
        :meth:`challenge_incumbent`)."""
        if trial in self.stopped:
            return []
        have = len(self.seeds_of(trial))
        if have < self.config.min_seeds:
            return [(trial, self.next_seed(trial))]  # its first seeds, before any comparison
        if self.incumbent is None or self.incumbent == trial:
            self.incumbent = trial
            return []
        incumbent = self.incumbent
        if self.compare_to_incumbent(trial).worse(self.config.level):
            self.stopped.add(trial)
            return []
        if have < len(self.seeds_of(incumbent)):
            return [(trial, self.next_seed(trial))]  # catch up on the incumbent's seeds
        if self.better(trial, incumbent):
            self.incumbent = trial  # beat it on the same seeds: takes its place
        return []

    def challenge_incumbent(self) -> list[tuple[int, int]]:
        """One more seed for the incumbent, up to ``max_seeds`` (empty: it has them all)."""
        if self.incumbent is None:
            return []
        seed = self.next_seed(self.incumbent)
        return [] if seed is None else [(self.incumbent, seed)]

    def tied_with_incumbent(self) -> list[tuple[int, Comparison]]:
        """The trials not distinguishable from the incumbent (two-sided at ``tie_level``
        on their common seeds), each with its comparison; the incumbent is not listed."""
        if self.incumbent is None:
            return []
        tied = []
        for trial in sorted(self.values):
            if trial == self.incumbent:
                continue
            cmp = self.compare_to_incumbent(trial)
            if cmp.tied(self.config.tie_level):
                tied.append((trial, cmp))
        return tied

    def seed_runs(self) -> int:
        return sum(len(v) for v in self.values.values())
