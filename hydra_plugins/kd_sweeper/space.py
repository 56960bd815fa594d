"""A study's identity: its search space, its fixed parameters and the app's settings,
recorded with the study so that a resume with another space is refused; and the seed
each trial is sampled with."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from optuna.distributions import BaseDistribution, distribution_to_json

SPACE = "kd_optuna:space"  # study user attributes: the search space ...


FIXED = "kd_optuna:fixed"  # ... the fixed parameters ...


SETTINGS = "kd:settings"  # ... and what the app's validate hook returned


BASE_SEED = "kd:base_seed"


def trial_seed(base_seed: int, trial_number: int) -> int:
    """The seed trial ``trial_number`` is sampled with: the same on any machine and in any
    process, and unrelated between neighbouring trials."""
    digest = hashlib.sha256(f"{base_seed}:{trial_number}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def plain(value: Any) -> Any:
    """``value`` as plain JSON types (anything else as its string), for YAML and JSON files."""
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
    """A recorded value as one short line: a distribution by its attributes, long text cut."""
    if isinstance(value, str) and value.startswith("{"):
        try:  # a distribution's JSON: show its attributes, not its escaping
            parsed = json.loads(value)
            return f"{parsed['name']}{parsed['attributes']}"
        except (ValueError, KeyError):
            pass
    text = str(value)
    return text if len(text) <= 60 else text[:57] + "..."
