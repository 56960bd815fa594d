"""The racing decisions (hydra_plugins/kd_sweeper/racing.py): paired comparisons on common
seeds, who gets the next seed, who takes the incumbent's place, and the tied set."""

from __future__ import annotations

import math

import pytest
from scipy import stats

from hydra_plugins.kd_sweeper.racing import MINIMIZE, Race, RacingConfig, compare, paired_differences


def test_the_config_refuses_what_cannot_race():
    assert RacingConfig().search_seeds == tuple(range(8))
    assert RacingConfig(max_seeds=3, seeds=(42, 43, 44, 45)).search_seeds == (42, 43, 44)
    for bad, message in [
        ({"min_seeds": 0}, "1 <= min_seeds <= max_seeds"),
        ({"min_seeds": 4, "max_seeds": 3}, "1 <= min_seeds <= max_seeds"),
        ({"level": 0.0}, "racing.level must be in"),
        ({"level": 1.0}, "racing.level must be in"),
        ({"tie_level": 1.5}, "racing.tie_level must be in"),
        ({"max_seeds": 3, "seeds": (1, 2)}, "fewer than max_seeds=3"),
        ({"max_seeds": 2, "seeds": (1, 1)}, "repeats a seed"),
    ]:
        with pytest.raises(ValueError, match=message):
            RacingConfig(**bad)
    RacingConfig(min_seeds=3, max_seeds=3)  # equal is fine


def test_paired_differences_are_on_common_seeds_signed_better_positive():
    a, b = {1: 10.0, 2: 12.0, 3: 11.0}, {2: 11.0, 3: 13.0, 4: 0.0}
    assert paired_differences(a, b) == [1.0, -2.0]
    assert paired_differences(a, b, MINIMIZE) == [-1.0, 2.0]


def test_compare_is_a_paired_t_test_on_common_seeds():
    a, b = {1: 10.0, 2: 12.0, 3: 11.5, 9: 0.0}, {1: 9.0, 2: 11.5, 3: 10.0}
    cmp = compare(a, b)
    diffs = [1.0, 0.5, 1.5]
    reference = stats.ttest_1samp(diffs, 0.0, alternative="greater")
    assert cmp.n == 3 and cmp.difference == pytest.approx(1.0)
    assert cmp.se == pytest.approx(stats.sem(diffs))
    assert cmp.p_better == pytest.approx(reference.pvalue) and cmp.p_worse == pytest.approx(1 - reference.pvalue)
    assert not cmp.worse(0.05) and not cmp.tied(0.1) and cmp.tied(0.05)  # one-sided p = 0.037, two-sided 0.074
    flipped = compare(b, a)
    assert flipped.difference == pytest.approx(-1.0) and flipped.p_worse == pytest.approx(reference.pvalue)
    assert flipped.worse(0.05) and not flipped.worse(0.03)
    assert compare(a, b, MINIMIZE).p_worse == pytest.approx(reference.pvalue)


def test_too_few_seeds_cannot_tell_unless_the_noise_is_pooled():
    one = compare({1: 5.0}, {1: 4.0})
    assert one.n == 1 and one.difference == 1.0 and math.isnan(one.p_worse)
    assert not one.worse(0.5) and one.tied(0.05)
    none = compare({1: 5.0}, {2: 4.0})
    assert none.n == 0 and math.isnan(none.difference) and none.tied(0.05) and not none.worse(0.5)
    pooled = compare({1: 3.0}, {1: 5.0}, pooled=(1.0, 10))  # one seed, with a noise SD of 1 known
    assert pooled.se == 1.0 and pooled.p_worse == pytest.approx(stats.t.sf(2.0, 10)) and pooled.worse(0.05)
    assert compare({1: 3.0}, {1: 5.0}, pooled=(1.0, 0)).se != 1.0  # no degrees of freedom: not pooled
    assert math.isnan(compare({1: 3.0}, {1: 5.0}, pooled=(0.0, 5)).p_worse)  # no variance: not pooled


def test_identical_differences_are_certain_in_their_direction():
    worse = compare({1: 1.0, 2: 2.0}, {1: 2.0, 2: 3.0})
    assert worse.se == 0 and worse.p_worse == 0.0 and worse.p_better == 1.0 and worse.worse(0.01)
    better = compare({1: 3.0, 2: 4.0}, {1: 2.0, 2: 3.0})
    assert better.p_worse == 1.0 and better.p_better == 0.0 and not better.tied(0.05)
    same = compare({1: 2.0, 2: 3.0}, {1: 2.0, 2: 3.0})
    assert same.p_worse == 0.5 and same.p_better == 0.5 and same.tied(0.05)


def _race(**config) -> Race:
    return Race(RacingConfig(**{"min_seeds": 1, "max_seeds": 3, **config}))


def test_a_first_trial_becomes_the_incumbent_after_its_first_seeds():
    race = _race(min_seeds=2)
    assert race.step(0) == [(0, 0)]
    race.record(0, 0, 70.0)
    assert race.step(0) == [(0, 1)] and race.incumbent is None
    race.record(0, 1, 71.0)
    assert race.step(0) == [] and race.incumbent == 0
    assert race.challenge_incumbent() == [(0, 2)]
    race.record(0, 2, 72.0)
    assert race.challenge_incumbent() == [] and race.mean(0) == 71.0 and race.seed_runs() == 3


def test_a_challenger_catches_up_on_the_incumbents_seeds_and_takes_its_place_when_better():
    race = _race()
    for seed, value in enumerate([70.0, 71.0]):
        race.record(0, seed, value)
    race.incumbent = 0
    assert race.step(1) == [(1, 0)]
    race.record(1, 0, 70.5)
    assert race.step(1) == [(1, 1)]  # not worse on seed 0: it gets the incumbent's next seed
    race.record(1, 1, 71.5)
    assert race.step(1) == [] and race.incumbent == 1  # better on both common seeds
    assert race.seeds_of(1) == [0, 1] and race.next_seed(1) == 2


def test_a_challenger_that_catches_up_but_is_not_better_leaves_the_incumbent():
    race = _race()
    race.record(0, 0, 70.0)
    race.incumbent = 0
    race.record(1, 0, 70.0)
    assert race.step(1) == [] and race.incumbent == 0 and 1 not in race.stopped


def test_a_challenger_found_worse_gets_no_more_seeds():
    race = _race(level=0.05)
    for trial, values in {0: [72.0, 73.0, 72.5], 2: [71.9, 72.8, 72.6]}.items():
        for seed, value in enumerate(values):
            race.record(trial, seed, value)
    race.incumbent = 0  # trial 2 gives the pooled noise: differences of SD ~0.15
    race.record(1, 0, 69.0)
    assert race.step(1) == [] and 1 in race.stopped  # three points down on one seed: worse
    assert race.step(1) == []  # and stays stopped
    race.record(3, 0, 71.9)
    assert race.step(3) == [(3, 1)]  # a tenth down: not shown worse, it gets the next seed


def test_minimising_races_the_other_way():
    race = Race(RacingConfig(min_seeds=1, max_seeds=2), direction=MINIMIZE)
    race.record(0, 0, 1.0)
    race.incumbent = 0
    race.record(1, 0, 0.5)
    assert race.step(1) == [] and race.incumbent == 1  # lower is better
    assert race.better(1, 0) and not race.better(0, 1) and not race.better(0, 7)


def test_the_noise_is_pooled_over_the_trials_that_share_two_seeds_with_the_incumbent():
    race = _race()
    assert race.noise() is None
    race.record(0, 0, 10.0)
    race.record(0, 1, 10.0)
    race.incumbent = 0
    race.record(1, 0, 9.0)
    assert race.noise() is None  # one common seed: no spread to pool
    race.record(1, 1, 11.0)  # differences -1, +1: variance 2 on 1 degree of freedom
    race.record(2, 0, 10.0)
    race.record(2, 1, 12.0)  # differences 0, +2: variance 2 on 1 degree of freedom
    assert race.noise() == (2.0, 2)


def test_the_tied_set_holds_the_trials_not_distinguishable_from_the_incumbent():
    race = _race(max_seeds=4, tie_level=0.05)
    base = [70.0, 71.0, 70.5, 70.8]
    for seed, value in enumerate(base):
        race.record(0, seed, value)
        race.record(1, seed, value - 0.05 * (seed % 2))  # a hair below: tied
        race.record(2, seed, value - 2.0 - 0.01 * seed)  # two points below, every seed: not tied
    race.record(3, 0, 69.0)  # one seed only: tested with the pooled noise
    race.incumbent = 0
    tied = dict(race.tied_with_incumbent())
    assert 1 in tied and 2 not in tied and 0 not in tied
    assert tied[1].n == 4
    assert _race().tied_with_incumbent() == []


def test_the_smallest_budget_and_pool_are_accepted_and_used():
    assert RacingConfig(budget=1).budget == 1
    for bad in (0, True):
        with pytest.raises(ValueError, match=f"racing.budget must be a number of seed-runs >= 1 or null, got {bad}"):
            RacingConfig(budget=bad)
    two = compare({1: 3.0, 2: 3.0}, {1: 5.0, 2: 5.0}, pooled=(2.0, 1))  # two seeds, variance 2 on 1 df
    assert two.se == 1.0 and two.difference == -2.0 and two.p_worse == pytest.approx(stats.t.cdf(-2.0, 1))
