"""Checks on a composed config, run before any data is read or any model trained.

Hydra already rejects unknown keys and group options; these checks catch values of
the right type but the wrong range, with a message naming the key and the range.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig, OmegaConf

from kd.errors import ConfigError


def _number(cfg: DictConfig, key: str, ok: Callable[[float], bool], rule: str, integer: bool = False) -> None:
    value: Any = OmegaConf.select(cfg, key, default=None)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        kind = "an integer" if integer else "a number"
        raise ConfigError(f"{key} must be {kind} {rule}, got {value!r}")
    if not (math.isfinite(value) and ok(value)):
        raise ConfigError(f"{key} must be {rule}, got {value!r}")


def validate(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` for the first out-of-range setting in ``cfg``."""
    _number(cfg, "loss.temperature", lambda v: v > 0, "> 0")
    _number(cfg, "loss.alpha", lambda v: 0 <= v <= 1, "in [0, 1]")
    _number(cfg, "trainer.epochs", lambda v: v >= 1, ">= 1", integer=True)
    _number(cfg, "trainer.batch_size", lambda v: v >= 1, ">= 1", integer=True)
    _number(cfg, "trainer.num_threads", lambda v: v >= 1, ">= 1 (or null for automatic)", integer=True)
    _number(cfg, "optim.lr", lambda v: v > 0, "> 0")
    _number(cfg, "data.val_size", lambda v: v >= 0, ">= 0 and smaller than the training set", integer=True)
    _number(cfg, "data.train_size", lambda v: v >= 1, ">= 1", integer=True)
    _number(cfg, "data.test_size", lambda v: v >= 1, ">= 1", integer=True)
    _number(cfg, "seed", lambda v: v >= 0, ">= 0", integer=True)
    device = str(cfg.trainer.device)
    if device != "auto" and device.split(":")[0] not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"trainer.device must be auto, cpu, cuda, cuda:N or mps, got {device!r}")
