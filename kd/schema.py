"""The declared type of every config key, checked before any work starts.

Two sources, so that nothing is declared twice:

- A node with a ``_target_`` (model, loss, optim, schedule, data, logger and the
  teacher's model, optim and schedule) takes the types of the callable it builds: its
  keys must be parameters of that callable and match their annotations. A new model or
  loss declares its settings once, in its signature.
- Every other key is a field of one of the dataclasses below.

:func:`check` refuses the first key that is undeclared or of the wrong type, in one
line that names the key, the value, the declared type and the fix. Ranges within a type
are :data:`kd.config.RANGES`.
"""

from __future__ import annotations

import collections.abc
import fnmatch
import inspect
import os
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal, Union

from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf

from kd.errors import ConfigError


@dataclass
class RunSettings:
    seed: int
    objective: str | list[str]  # one metric, or several for a multi-objective sweep
    extra_targets: list[str]


@dataclass
class TrainerSettings:
    epochs: int
    batch_size: int
    device: str
    num_threads: int | None
    channels_last: bool
    compile: bool
    amp: bool | Literal["auto", "bf16", "off"]  # bf16 autocast (kd.devices.uses_bf16)
    flush_denormal: bool
    check_every: int
    progress: bool | Literal["auto"]
    resume: Literal["auto", "never"]
    checkpoint_every_s: float


@dataclass
class TeacherSettings:  # model, optim and schedule are typed by what they build
    checkpoint: str | None
    epochs: int
    batch_size: int
    seed: int
    augment: bool
    amp: bool | Literal["auto", "bf16", "off"]  # bf16 autocast (kd.devices.uses_bf16)
    views: int | Literal["all", "online"]
    view_seed: int


@dataclass
class TrialSettings:
    seeds: list[int] | None
    baseline: bool


@dataclass
class CostSettings:
    timing: bool
    batch_size: int
    min_run_time: float


@dataclass
class PathSettings:
    data_dir: str
    cache_dir: str
    store_dir: str


# Config node -> the dataclass declaring its plain keys ("" is the top level).
SECTIONS: dict[str, type] = {
    "": RunSettings,
    "trainer": TrainerSettings,
    "teacher": TeacherSettings,
    "trial": TrialSettings,
    "paths": PathSettings,
    "cost": CostSettings,
}
# Keys Hydra's instantiate reads itself.
HYDRA_KEYS = ("_target_", "_partial_", "_recursive_", "_convert_", "_args_")


def check(cfg: DictConfig, trusted: tuple[str, ...] = ()) -> None:
    """Raise :class:`ConfigError` for the first key of ``cfg`` that has no declared type
    or a value of another type. ``trusted``: patterns of targets whose signatures may be
    read (reading one imports its module, so an untrusted target is left to the
    allow-list check in :func:`kd.config.build`)."""
    _check_node(_resolved(cfg), "", trusted)


def _resolved(node: DictConfig) -> dict:
    """``node`` as plain values, resolved key by key. A missing value (???) or an
    interpolation that resolves only inside a job (``${hydra.job.num}`` in a sweeper)
    is left out: the pipeline names the first, the job checks the second."""
    plain: dict = {}
    for key in node:
        if key == "hydra":  # Hydra's own node: not kd's to check
            continue
        try:
            value = node[key]
            if isinstance(value, DictConfig):
                value = _resolved(value)
            elif OmegaConf.is_config(value):
                value = OmegaConf.to_container(value, resolve=True)
        except Exception:  # omegaconf's MissingMandatoryValue and InterpolationResolutionError
            continue
        plain[str(key)] = value
    return plain


def _check_node(node: dict, prefix: str, trusted: tuple[str, ...]) -> None:
    if "_target_" in node:
        _check_target(node, prefix, trusted)
        return
    declared = _dataclass_types(SECTIONS.get(prefix))
    for key, value in node.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and key not in declared:
            _check_node(value, path, trusted)
        elif key not in declared:
            raise ConfigError(f"{path} is not a kd setting: remove it, or check its spelling in docs/configuration.md")
        else:
            _check_value(path, value, declared[key], "")


def _check_target(node: dict, prefix: str, trusted: tuple[str, ...]) -> None:
    target = str(node["_target_"])
    if not any(fnmatch.fnmatchcase(target, pattern) for pattern in trusted):
        return  # not imported before the allow-list has accepted it
    try:
        parameters, open_ended = signature_types(get_object(target))
    except Exception:  # an import error: kd.config.build says it in one line
        return
    for key, value in node.items():
        path = f"{prefix}.{key}"
        if key in HYDRA_KEYS:
            continue
        if key not in parameters:
            if open_ended:
                continue
            takes = ", ".join(parameters) or "no settings"
            raise ConfigError(f"{path} is not a parameter of {target} (it takes {takes}): remove it or fix its name")
        _check_value(path, value, parameters[key], f" ({target})")


def _check_value(path: str, value: Any, hint: Any, where: str) -> None:
    if conforms(value, hint):
        return
    raise ConfigError(f"{path} must be {describe(hint)}{where}, got {value!r}: set {path}=<{describe(hint)}>")


def _dataclass_types(cls: type | None) -> dict[str, Any]:
    if cls is None:
        return {}
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


def signature_types(target: Any) -> tuple[dict[str, Any], bool]:
    """``target``'s parameters -> annotations, and whether it also takes any keyword.
    A class whose ``__init__`` passes ``**kwargs`` on is followed up its bases."""
    parameters: dict[str, Any] = {}
    callables = [c.__init__ for c in inspect.getmro(target)] if inspect.isclass(target) else [target]
    for fn in callables:
        if fn is object.__init__:
            return parameters, False
        signature = inspect.signature(fn)
        try:
            hints = typing.get_type_hints(fn)
        except Exception:  # annotations this Python cannot evaluate: names only
            hints = {}
        rest = False
        for name, p in signature.parameters.items():
            if p.kind is p.VAR_KEYWORD:
                rest = True
            elif name != "self" and p.kind is not p.VAR_POSITIONAL:
                parameters.setdefault(name, hints.get(name, Any))
        if not rest:
            return parameters, False
        if not inspect.isclass(target):
            return parameters, True
    return parameters, True


def conforms(value: Any, hint: Any) -> bool:
    """Whether a config value (after resolution) fits the annotation ``hint``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any or hint is inspect.Parameter.empty:
        return True
    if origin in (Union, types.UnionType):
        return any(conforms(value, a) for a in args)
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if hint is None or hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str or hint in (Path, os.PathLike) or origin is os.PathLike:
        return isinstance(value, str)
    if origin in (list, tuple, collections.abc.Sequence, collections.abc.Iterable):
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(conforms(v, a) for v, a in zip(value, args, strict=True))
        return all(conforms(v, args[0] if args else Any) for v in value)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True  # an annotation this check does not read: trusted


def describe(hint: Any) -> str:
    """``hint`` in words: ``int | None`` -> ``an integer or null``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        words = [describe(a) for a in args if not (isinstance(a, type) and a.__module__.startswith("torch"))]
        return " or ".join(dict.fromkeys(words))
    if origin is Literal:
        return " or ".join(str(a).lower() if isinstance(a, bool) else str(a) for a in args)
    if origin in (list, tuple, collections.abc.Sequence, collections.abc.Iterable):
        if origin is tuple and args and args[-1] is not Ellipsis:
            return f"a list of {len(args)} ({', '.join(describe(a) for a in args)})"
        return f"a list of ({describe(args[0]) if args else 'values'})"
    words = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null"}
    if hint in words:
        return words[hint]
    if hint in (Path, os.PathLike) or origin is os.PathLike:
        return "a path"
    return getattr(hint, "__name__", str(hint))
