"""Checks on a composed config, and the settings that identify a run or a sweep.

Hydra already rejects unknown keys and group options; :func:`validate` checks every
value's declared type (:mod:`kd.schema`) and range, with a one-line message naming the
key, the value and the rule, before any data is read or any model trained.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

from kd import identity, schema
from kd.errors import ConfigError
from kd.views import view_count

OBJECTIVES = ("val_acc", "test_acc")
# Metrics a multi-objective sweep may trade accuracy against (objective=[val_acc,params]).
COST_OBJECTIVES = ("params", "flops", "latency_ms", "throughput", "train_seconds")
TIMED_OBJECTIVES = ("latency_ms", "throughput")  # measured only with cost.timing


def objective_names(cfg: DictConfig) -> list[str]:
    """``objective`` as a list: one metric name, or several for a multi-objective sweep."""
    objective = OmegaConf.select(cfg, "objective", default="val_acc")
    return [str(o) for o in objective] if isinstance(objective, (list, ListConfig)) else [str(objective)]


# Keys that say where or how fast a run goes, not what it computes: left out of a
# run's settings (report grouping) and of a study's identity (resume check, name).
NOT_RESULT_KEYS = (
    "paths",
    "cost",
    "extra_targets",
    "logger",
    "data.root",
    "data.cache_dir",
    "data.download",
    "trainer.device",
    "trainer.num_threads",
    "trainer.flush_denormal",
    "trainer.progress",
    "trainer.check_every",
    "trainer.resume",
    "trainer.checkpoint_every_s",
)


def _number(cfg: DictConfig, key: str, ok: Callable[[float], bool], rule: str, integer: bool = False) -> None:
    value: Any = OmegaConf.select(cfg, key, default=None)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        kind = "an integer" if integer else "a number"
        raise ConfigError(f"{key} must be {kind} {rule}, got {value!r}")
    if not (math.isfinite(value) and ok(value)):
        raise ConfigError(f"{key} must be {rule}, got {value!r}")


SEED_RULE = "in [0, 2**32 - 1]"


def _is_seed(v: float) -> bool:
    return 0 <= v < 2**32


# (key, test, rule, integer): every plain numeric range, checked in this order. A loss's
# hyperparameters are checked by the rules its class declares (``ranges``).
RANGES: tuple[tuple[str, Callable[[float], bool], str, bool], ...] = (
    ("trainer.epochs", lambda v: v >= 1, ">= 1", True),
    ("trainer.batch_size", lambda v: v >= 1, ">= 1", True),
    ("trainer.num_threads", lambda v: v >= 1, ">= 1 (or null for automatic)", True),
    ("optim.lr", lambda v: v > 0, "> 0", False),
    ("model.width", lambda v: v > 0, "> 0", False),
    ("cost.batch_size", lambda v: v >= 1, ">= 1", True),
    ("cost.min_run_time", lambda v: v > 0, "> 0 (seconds)", False),
    ("teacher.model.width", lambda v: v > 0, "> 0", False),
    ("data.val_size", lambda v: v >= 0, ">= 0 and smaller than the training set", True),
    ("data.train_size", lambda v: v >= 1, ">= 1", True),
    ("data.test_size", lambda v: v >= 1, ">= 1", True),
    ("seed", _is_seed, SEED_RULE, True),
    ("data.seed", _is_seed, SEED_RULE, True),
    ("data.split_seed", _is_seed, SEED_RULE, True),
    ("data.num_classes", lambda v: v >= 2, ">= 2", True),
    ("trainer.check_every", lambda v: v >= 1, ">= 1", True),
    ("trainer.checkpoint_every_s", lambda v: v > 0, "> 0 (seconds)", False),
    ("teacher.epochs", lambda v: v >= 1, ">= 1", True),
    ("teacher.batch_size", lambda v: v >= 1, ">= 1", True),
    ("teacher.seed", _is_seed, SEED_RULE, True),
    ("teacher.view_seed", _is_seed, SEED_RULE, True),
    ("teacher.optim.lr", lambda v: v > 0, "> 0", False),
    *(
        (f"{prefix}{key}", test, rule, False)
        for prefix in ("", "teacher.")
        for key, test, rule in (
            ("optim.weight_decay", lambda v: v >= 0, ">= 0"),
            ("optim.momentum", lambda v: 0 <= v < 1, "in [0, 1)"),
            ("optim.dampening", lambda v: 0 <= v <= 1, "in [0, 1]"),
            ("optim.eps", lambda v: v > 0, "> 0"),
            ("schedule.div_factor", lambda v: v > 0, "> 0"),
            ("schedule.final_div_factor", lambda v: v > 0, "> 0"),
            ("schedule.max_lr", lambda v: v > 0, "> 0"),
            ("schedule.pct_start", lambda v: 0 < v < 1, "in (0, 1)"),
            ("schedule.warmup_fraction", lambda v: 0 <= v < 1, "in [0, 1)"),
            ("schedule.final_factor", lambda v: 0 <= v <= 1, "in [0, 1]"),
        )
    ),
)
FLAGS = (
    "trial.baseline",
    "teacher.augment",
    "trainer.compile",
    "trainer.channels_last",
    "data.augment",
    "data.download",
    "data.skip_bad_images",
)
# Keys that take one of a few words: (key, allowed values, as said in the error).
CHOICES: tuple[tuple[str, tuple[Any, ...], str], ...] = (
    ("trainer.resume", ("auto", "never"), "auto or never"),
    ("trainer.progress", ("auto", True, False), "auto, true or false"),
)


def validate(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` for the first setting of ``cfg`` that is undeclared, of
    the wrong type (:mod:`kd.schema`) or out of range (:data:`RANGES` and the checks below)."""
    missing = sorted(key for key in OmegaConf.missing_keys(cfg) if not key.startswith("hydra."))
    if missing:
        raise ConfigError(f"{missing[0]} needs a value (its YAML says ???): add {missing[0]}=... to the command")
    schema.check(cfg, trusted=allowed_targets(cfg))
    for name, (test, rule) in getattr(loss_class(cfg), "ranges", {}).items():
        _number(cfg, f"loss.{name}", test, rule)
    for key, test, rule, integer in RANGES:
        _number(cfg, key, test, rule, integer=integer)
    for key in FLAGS:
        flag = OmegaConf.select(cfg, key, default=None)
        if flag is not None and not isinstance(flag, bool):
            raise ConfigError(f"{key} must be true or false, got {flag!r}")
    for prefix in ("", "teacher."):
        _check_betas(cfg, f"{prefix}optim.betas")
    _check_normalisation(cfg)
    _check_teacher(cfg)
    _check_objective(cfg)
    _check_trial_seeds(cfg)
    _check_choices(cfg)


def _check_betas(cfg: DictConfig, key: str) -> None:
    betas = OmegaConf.select(cfg, key, default=None)
    if betas is None:
        return
    ok = isinstance(betas, (list, ListConfig)) and len(betas) == 2
    ok = ok and all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas)
    if not ok:
        raise ConfigError(f"{key} must be two numbers in [0, 1) (Adam's averaging rates), got {betas!r}")


# Legal settings that cannot mean what their user wants: (key, test, why). Warned
# about at the start of a run, never refused.
DEGENERATE: tuple[tuple[str, Callable[[float], bool], str], ...] = (
    ("optim.lr", lambda v: v > 1, "above 1 training almost always diverges"),
    ("optim.lr", lambda v: v < 1e-7, "below 1e-7 the weights barely move"),
)


def loss_class(cfg: DictConfig) -> type | None:
    """The class ``loss._target_`` names (None where it names none that can be imported:
    building the loss then says why)."""
    target = OmegaConf.select(cfg, "loss._target_", default=None)
    try:
        return get_class(str(target)) if target else None
    except (ImportError, ValueError, AttributeError):
        return None


def _reads_cached_logits(cfg: DictConfig) -> bool:
    """Whether the loss distils the teacher's logits (which per-view caching serves), not features."""
    loss = build(cfg.loss, allowed_targets(cfg)) if loss_class(cfg) is not None else None
    return bool(getattr(loss, "needs_teacher", False)) and not getattr(loss, "teacher_features", ())


def _train_images(cfg: DictConfig) -> int:
    """Training images after the validation split, where the config says (synthetic data); else 0."""
    train = OmegaConf.select(cfg, "data.train_size", default=None)
    return 0 if train is None else int(train) - int(OmegaConf.select(cfg, "data.val_size", default=0) or 0)


# Degenerate combinations of keys: (test on the whole config, what it means).
DEGENERATE_RUNS: tuple[tuple[Callable[[DictConfig], bool], str], ...] = (
    (
        lambda cfg: 0 < _train_images(cfg) <= int(cfg.trainer.batch_size),
        "trainer.batch_size holds the whole training set: one step per epoch",
    ),
    (
        lambda cfg: (
            bool(OmegaConf.select(cfg, "data.augment", default=False))
            and OmegaConf.select(cfg, "teacher.views", default=None) == 1
            and _reads_cached_logits(cfg)
        ),
        "teacher.views=1 with data.augment=true: the student sees one augmented view per image, every epoch",
    ),
)


def degenerate_settings(cfg: DictConfig) -> list[str]:
    """One line per legal but degenerate setting of ``cfg`` (:data:`DEGENERATE`, the
    loss class's ``warnings`` and :data:`DEGENERATE_RUNS`)."""
    found = []
    loss_warnings = [(f"loss.{name}", test, why) for name, test, why in getattr(loss_class(cfg), "warnings", ())]
    for key, test, why in [*loss_warnings, *DEGENERATE]:
        value = OmegaConf.select(cfg, key, default=None)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and test(value):
            found.append(f"{key}={value!r}: {why}")
    return found + [why for test, why in DEGENERATE_RUNS if test(cfg)]


def _check_normalisation(cfg: DictConfig) -> None:
    for key in ("data.mean", "data.std"):
        values = OmegaConf.select(cfg, key, default=None)
        ok = isinstance(values, (list, ListConfig)) and len(values) == 3
        ok = ok and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)
        if not ok or (key == "data.std" and min(values) <= 0):
            rule = "three positive numbers" if key == "data.std" else "three numbers"
            raise ConfigError(f"{key} must be {rule} (one per RGB channel), got {values!r}")


def _check_teacher(cfg: DictConfig) -> None:
    checkpoint = OmegaConf.select(cfg, "teacher.checkpoint", default=None)
    if checkpoint is not None and not isinstance(checkpoint, str):
        raise ConfigError(f"teacher.checkpoint must be a file path (or null for the store), got {checkpoint!r}")
    views = OmegaConf.select(cfg, "teacher.views", default=None)
    if (
        views is not None
        and views not in ("all", "online")
        and (isinstance(views, bool) or not isinstance(views, int) or not 1 <= views <= view_count())
    ):
        raise ConfigError(f"teacher.views must be a view count in [1, {view_count()}], all or online, got {views!r}")


def _check_objective(cfg: DictConfig) -> None:
    objective = OmegaConf.select(cfg, "objective", default="val_acc")
    if isinstance(objective, (list, ListConfig)):
        allowed = (*OBJECTIVES, *COST_OBJECTIVES)
        if not objective or any(o not in allowed for o in objective) or len(set(objective)) != len(objective):
            raise ConfigError(
                f"objective must be a metric or a list of distinct metrics from {', '.join(allowed)}, "
                f"got {list(objective)!r}"
            )
        timed = [o for o in objective if o in TIMED_OBJECTIVES]
        if timed and not OmegaConf.select(cfg, "cost.timing", default=True):
            raise ConfigError(f"objective {timed[0]} is timed, but cost.timing=false; set cost.timing=true")
    elif objective not in OBJECTIVES:
        raise ConfigError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")


def _check_trial_seeds(cfg: DictConfig) -> None:
    seeds = OmegaConf.select(cfg, "trial.seeds", default=None)
    if seeds is None:
        return
    if not isinstance(seeds, (list, ListConfig)) or len(seeds) == 0:
        raise ConfigError(f"trial.seeds must be a non-empty list such as [42,43,44] (or null), got {seeds!r}")
    if any(isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < 2**32 for s in seeds):
        raise ConfigError(f"trial.seeds must hold integers in [0, 2**32 - 1], got {list(seeds)!r}")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"trial.seeds must not repeat a seed, got {list(seeds)!r}")


# trainer.device: auto, or a torch device kd runs on, with an optional index (cuda:1).
DEVICE = re.compile(r"auto|(cpu|cuda|mps)(:[0-9]+)?")


def _check_choices(cfg: DictConfig) -> None:
    for key, allowed, said in CHOICES:
        value = OmegaConf.select(cfg, key, default=allowed[0])
        # bool is an int: 1 == True, so compare types as well as values.
        if not any(value == a and type(value) is type(a) for a in allowed):
            raise ConfigError(f"{key} must be {said}, got {value!r}")
    device = str(cfg.trainer.device)
    if not DEVICE.fullmatch(device):
        raise ConfigError(f"trainer.device must be auto, cpu, cuda, cuda:N or mps, got {device!r}")


def validate_for_selection(cfg: DictConfig, swept: Iterable[str] = ()) -> None:
    """Checks for a sweep that selects on ``objective``: never the test set by accident."""
    validate(cfg)
    if "val_acc" in objective_names(cfg) and "data.val_size" not in swept and int(cfg.data.val_size) == 0:
        raise ConfigError(
            "this sweep selects on objective=val_acc but data.val_size=0 leaves no validation images "
            "(experiment=seed_* sets it): add data.val_size=5000, or objective=test_acc to tune on test knowingly"
        )


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists stay values."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def without_keys(settings: dict[str, Any], exclude: Iterable[str]) -> dict[str, Any]:
    """Flattened ``settings`` without the keys ``exclude`` names, nor their sub-keys."""
    excluded = tuple(exclude)
    return {k: v for k, v in settings.items() if not any(k == e or k.startswith(e + ".") for e in excluded)}


def run_settings(cfg: DictConfig, exclude: Iterable[str] = ()) -> dict[str, Any]:
    """The resolved settings that decide a run's result, flattened, without ``hydra``,
    :data:`NOT_RESULT_KEYS` and ``exclude``."""
    # Node by node: resolving ``hydra`` here would recurse into the study name it may feed.
    tree = {}
    for key in cfg:
        if key != "hydra":
            value = cfg[key]
            tree[str(key)] = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
    return without_keys(dict(sorted(flatten(tree).items())), (*NOT_RESULT_KEYS, *exclude))


def swept_keys(root: DictConfig) -> list[str]:
    """Keys a sweep varies: ``hydra.sweeper.params`` and sweep overrides on the command line."""

    keys = [str(k) for k in (OmegaConf.select(root, "hydra.sweeper.params", default=None) or {})]
    task = [str(t) for t in (OmegaConf.select(root, "hydra.overrides.task", default=None) or [])]
    for override in OverridesParser.create().parse_overrides(task):
        if override.is_sweep_override():
            keys.append(override.key_or_group)
    return sorted(set(keys))


def experiment_settings(root: DictConfig) -> dict[str, Any]:
    """What makes a sweep one experiment: every result-deciding setting it does not vary."""
    return run_settings(root, exclude=swept_keys(root))


# Search-space presets renamed so that none shares the sweeper plugin's name
# (hydra/sweeper=kd_optuna): old name -> new name. The old files still compose, and a
# study keeps its old name, so a sweep started under either name resumes under both.
RENAMED_PRESETS = {f"{method}_optuna": method for method in ("kd", "dkd", "cosine", "kd_std", "regressor")}


def default_study_name(*, _root_: DictConfig) -> str:
    """``${kd_study_name:}``: the experiment's name plus its settings' fingerprint, so two
    different experiments never share a study by accident."""
    choices = OmegaConf.select(_root_, "hydra.runtime.choices", default=None) or {}
    name = choices.get("experiment") or choices.get("hparams_search") or "kd"
    name = {new: old for old, new in RENAMED_PRESETS.items()}.get(name, name)
    return f"{str(name).replace('/', '-')}-{identity.key('study', settings=experiment_settings(_root_))}"


def default_cache_dir() -> str:
    """``${kd_cache_dir:}``: ``$KD_CACHE_DIR``, else ``$XDG_CACHE_HOME/kd``, else
    ``~/.cache/kd``; always absolute, so runs started from any directory share one store."""
    chosen = os.environ.get("KD_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "kd"
    )
    return str(Path(chosen).expanduser().resolve())


_register = getattr(OmegaConf, "register_resolver", None) or OmegaConf.register_new_resolver  # omegaconf < 2.4
for _name, _resolver in (("kd_study_name", default_study_name), ("kd_cache_dir", default_cache_dir)):
    if not OmegaConf.has_resolver(_name):
        _register(_name, _resolver)


# What a config may instantiate: Hydra 1.4 asks every call site for an allow-list, since
# a config-controlled ``_target_`` can run any code. This project's classes and torch's
# optimisers; a model or loss of your own needs its module in ``extra_targets``.
# Hydra 1.4 also checks what a factory returns: kd.models' factories build torchvision,
# timm and torchdistill model classes.
TRUSTED_TARGETS = ("kd.*", "torch.optim.*", "torchvision.models.*", "timm.models.*", "torchdistill.models.*")


def allowed_targets(cfg: DictConfig) -> tuple[str, ...]:
    """What ``cfg``'s nodes may instantiate: :data:`TRUSTED_TARGETS` plus its ``extra_targets``."""
    return (*TRUSTED_TARGETS, *map(str, OmegaConf.select(cfg, "extra_targets", default=None) or []))


def build(node: Any, allowed: Iterable[str] = TRUSTED_TARGETS, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` limited to the targets ``allowed`` (:func:`allowed_targets`)."""
    try:
        return instantiate(node, **kwargs, _execution_whitelist_=list(allowed))
    except (InstantiationException, TypeError) as err:  # a bad key or target: one line, not a traceback
        lines = [line.strip() for line in str(err).splitlines() if line.strip() and "full_key" not in line]
        target = OmegaConf.select(node, "_target_", default="?") if OmegaConf.is_config(node) else "?"
        raise ConfigError(f"cannot build {target}: {lines[-1] if lines else type(err).__name__}") from None
