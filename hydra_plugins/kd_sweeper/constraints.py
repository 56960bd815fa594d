"""Bounds on what a trial measured: ``hydra.sweeper.constraints=['flops<=1e6']``.

A job records the metrics its sweep's bounds name: the app returns them with its
objective (``return {"objective": 0.91, "flops": 8.1e5}``) or records them with
:func:`hydra_plugins.kd_sweeper.job.record`. When the trial ends, each bound becomes one
Optuna constraint on it (``trial.set_constraint``: ``value - limit`` for ``<=``,
``limit - value`` for ``>=``; feasible when every one is <= 0). Optuna's samplers (TPE,
NSGA-II, GP) steer towards feasible settings from these, and ``study.best_trial`` is
the best feasible trial.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from hydra_plugins.kd_sweeper import _compat

METRICS = "metrics"  # a trial's user attribute: what its job recorded, by name
_BOUND = re.compile(r"^\s*([A-Za-z_][\w.]*)\s*(<=|>=)\s*(\S+)\s*$")


@dataclass(frozen=True)
class Bound:
    metric: str
    op: str  # "<=" or ">="
    limit: float

    @property
    def name(self) -> str:
        return f"{self.metric}{self.op}{self.limit:g}"

    def violation(self, value: float) -> float:
        """How far ``value`` is past the bound: <= 0 where it holds."""
        return value - self.limit if self.op == "<=" else self.limit - value


def parse(spec: Any) -> tuple[Bound, ...]:
    """``hydra.sweeper.constraints`` (a list of ``metric<=number`` / ``metric>=number``,
    or null) as bounds; a ValueError naming the first one that is not."""
    if spec is None:
        return ()
    items = [spec] if isinstance(spec, str) else list(spec) if isinstance(spec, Sequence) else None
    if items is None:
        raise ValueError(f"hydra.sweeper.constraints must be a list like ['flops<=1e6'], got {spec!r}")
    bounds = []
    for item in items:
        match = _BOUND.match(str(item))
        limit = _number(match.group(3)) if match else None
        if match is None or limit is None:
            raise ValueError(
                f"hydra.sweeper.constraints: {item!r} is not metric<=number or metric>=number "
                "(e.g. 'flops<=1e6', 'val_acc>=70')"
            )
        bounds.append(Bound(match.group(1), match.group(2), limit))
    return tuple(bounds)


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def returned_metrics(value: Any) -> tuple[Any, dict[str, float]]:
    """A job's return split into its objective and the metrics it returned with it:
    ``{"objective": v, "flops": f}`` -> ``(v, {"flops": f})``; anything else is the
    objective alone."""
    if not isinstance(value, Mapping) or "objective" not in value:
        return value, {}
    metrics = {str(k): v for k, v in value.items() if k != "objective"}
    return value["objective"], metrics


def apply(bounds: Sequence[Bound], study: optuna.Study, trial: optuna.Trial, returned: Mapping[str, Any]) -> str | None:
    """Record the trial's metrics (returned, and those its job recorded) and set one
    constraint per bound. Returns why it cannot be judged (a bound's metric missing or
    not a number), or None."""
    stored = _compat.study_storage(study).get_trial(_compat.trial_id(trial))
    recorded = dict(stored.user_attrs.get(METRICS) or {})
    metrics = {**recorded, **returned}
    if returned:
        trial.set_user_attr(METRICS, metrics)
    for bound in bounds:
        value = metrics.get(bound.metric)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            known = ", ".join(sorted(metrics)) or "none"
            return (
                f"kd_optuna:constraint: the job recorded no number for {bound.metric} (bound {bound.name}; "
                f"it recorded: {known}): return it with the objective or call job.record({bound.metric}=...)"
            )
        trial.set_constraint(bound.name, bound.violation(float(value)))
    return None


def feasible(trial: FrozenTrial) -> bool:
    """Whether every constraint of ``trial`` holds (True when it has none)."""
    return all(v <= 0.0 for v in trial.constraints.values())


def summary(trials: Sequence[FrozenTrial], bounds: Sequence[Bound]) -> dict[str, Any]:
    """How many finished trials met every bound, for optimization_results.yaml."""
    judged = [t for t in trials if t.state == TrialState.COMPLETE and t.constraints]
    return {
        "bounds": [b.name for b in bounds],
        "n_judged": len(judged),
        "n_feasible": sum(1 for t in judged if feasible(t)),
    }
