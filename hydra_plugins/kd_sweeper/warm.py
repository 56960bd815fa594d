"""Warm starts: ``hydra.sweeper.warm_start=<sweep dir or storage URL>``.

A new study begins with an earlier study's answer: its best trial (the best feasible one
under constraints) or its Pareto front, queued as the first trials and mapped onto the
new search space. A parameter the new space lacks is dropped; a number outside its new
range is clipped to it; a choice the new space does not offer is dropped (the sampler
then picks it). Each such change is logged. The queued trials carry their origin
(user attribute ``warm_start``: study and trial), and the study records where it came
from, so a resumed sweep does not queue them twice.
"""

from __future__ import annotations

import logging
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState

from hydra_plugins.kd_sweeper.study import find_study, shown

log = logging.getLogger(__name__)

WARM_START = "warm_start"  # a queued trial's origin; the study's source


def answer(source: optuna.Study) -> list[FrozenTrial]:
    """The source study's answer: its best (feasible) trial, or its Pareto front."""
    if not any(t.state == TrialState.COMPLETE for t in source.get_trials(deepcopy=False)):
        return []
    if len(source.directions) > 1:
        return sorted(source.best_trials, key=lambda t: t.number)
    try:
        return [source.best_trial]
    except ValueError:  # no trial met its constraints
        return []


def fit(params: dict[str, Any], space: dict[str, BaseDistribution]) -> tuple[dict[str, Any], list[str]]:
    """``params`` mapped onto ``space``, and what had to change (one note each)."""
    fitted, notes = {}, []
    for name, value in params.items():
        dist = space.get(name)
        if dist is None:
            notes.append(f"{name}={value} dropped (not in this search space)")
        elif isinstance(dist, CategoricalDistribution):
            if value in dist.choices:
                fitted[name] = value
            else:
                notes.append(f"{name}={value} dropped (not one of {list(dist.choices)})")
        elif isinstance(dist, (FloatDistribution, IntDistribution)):
            clipped = min(max(value, dist.low), dist.high)
            if isinstance(dist, IntDistribution):
                clipped = int(round(clipped))
            if clipped != value:
                notes.append(f"{name}={value} clipped to {clipped} ([{dist.low}, {dist.high}])")
            fitted[name] = clipped
    return fitted, notes


def warm_start(study: optuna.Study, spec: Any, space: dict[str, BaseDistribution]) -> None:
    """Queue ``spec``'s answer as ``study``'s first trials, once per study."""
    if not spec or WARM_START in study.user_attrs:
        return
    try:
        source = find_study(str(spec))
    except ValueError as err:
        raise ValueError(f"hydra.sweeper.warm_start={err}") from None
    picked = answer(source)
    queued = []
    for trial in picked:
        params, notes = fit(trial.params, space)
        origin = {"study": source.study_name, "trial": trial.number}
        study.enqueue_trial(params, user_attrs={WARM_START: origin}, skip_if_exists=True)
        queued.append(trial.number)
        log.info("warm start: trial %d of %s queued first%s", trial.number, source.study_name,
                 f" ({'; '.join(notes)})" if notes else "")  # fmt: skip
    if not picked:
        log.warning("warm start: %s has no completed (feasible) trial to start from", source.study_name)
    url, _, name = str(spec).partition("#")
    where = (shown(url) if "://" in url else url) + (f"#{name}" if name else "")
    study.set_user_attr(WARM_START, {"from": where, "study": source.study_name, "trials": queued})
