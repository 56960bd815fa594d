"""The loss protocol: what a distillation method declares and returns.

A method is a :class:`DistillationLoss`: it says whether it needs the teacher and which
intermediate features of student and teacher it reads (by name, e.g. ``"conv"``), names
its hyperparameters (for metrics.json, the report and sweeps), and returns a dict of
named terms whose ``"loss"`` entry is optimised; the other terms are logged per epoch.
It may read the training progress (``DKD``'s warm-up does) and may own trainable
parts (a regressor): those are optimised with the student but are not part of it.
Where the teacher's outputs come from (an online teacher, or the cache) is the
caller's concern.

Terms are computed for logits ``[..., B, C]``: one model (scalar terms) or a
population's N members at once (terms ``[N]``, see :func:`for_members`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn


@dataclass
class Progress:
    """Where training is: 1-based epoch, 1-based step within it, and their totals."""

    epoch: int = 1
    epochs: int = 1
    step: int = 1
    steps_per_epoch: int = 1

    @property
    def fraction(self) -> float:
        """Share of training done, in (0, 1]."""
        return ((self.epoch - 1) * self.steps_per_epoch + self.step) / (self.epochs * self.steps_per_epoch)


@dataclass
class LossInputs:
    student_logits: torch.Tensor
    labels: torch.Tensor
    teacher_logits: torch.Tensor | None = None
    student_features: dict[str, torch.Tensor] = field(default_factory=dict)
    teacher_features: dict[str, torch.Tensor] = field(default_factory=dict)
    progress: Progress = field(default_factory=Progress)


# A rule on one hyperparameter: (test, what the test asks for / what the value means).
Rule = tuple[Callable[[float], bool], str]
TEMPERATURE: Rule = (lambda v: 0 < v <= 1e3, "in (0, 1000]")  # past 1e3 softmax(x/T) is uniform in float32
WEIGHT: Rule = (lambda v: 0 <= v <= 1, "in [0, 1]")
NON_NEGATIVE: Rule = (lambda v: v >= 0, ">= 0")
SOFT_TARGET_WARNINGS: tuple[tuple[str, Callable[[float], bool], str], ...] = (
    ("temperature", lambda v: v < 0.05, "below 0.05 the soft targets are one-hot (the teacher's argmax)"),
    ("temperature", lambda v: v > 100, "above 100 the soft targets are nearly uniform: KD carries little"),
)


class DistillationLoss(nn.Module):
    """Base class of every training loss. Subclasses set the class attributes and
    implement :meth:`terms`. What a method knows about itself lives here, so that the
    config checks, the run header and the report name no method: a new method is its
    class and its YAML file."""

    name: str = "loss"
    title: ClassVar[str] = ""  # as tables name the method ("KD"); empty: its name
    needs_teacher: bool = False
    student_features: tuple[str, ...] = ()  # feature names the method reads from the student
    teacher_features: tuple[str, ...] = ()  # ... and from the teacher
    hparam_names: tuple[str, ...] = ()  # constructor arguments reported and swept
    # Each hyperparameter's legal range, checked before any training: name -> Rule.
    ranges: ClassVar[dict[str, Rule]] = {}
    # Legal values that cannot mean what the user wants, warned about at the start of a
    # run: (name, test, why).
    warnings: ClassVar[tuple[tuple[str, Callable[[float], bool], str], ...]] = ()
    # How tables write each hyperparameter (``temperature`` -> ``T``), in this order.
    symbols: ClassVar[dict[str, str]] = {}
    # Hyperparameters metrics.json also carries at its top level, for every method (None
    # where a method has none), so that scripts can read them across methods.
    header_fields: ClassVar[tuple[str, ...]] = ("temperature", "alpha")

    @classmethod
    def display_name(cls) -> str:
        return cls.title or cls.name

    def hparams(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in self.hparam_names}

    def terms(self, inputs: LossInputs) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def forward(self, inputs: LossInputs) -> dict[str, torch.Tensor]:
        if self.needs_teacher and inputs.teacher_logits is None and not inputs.teacher_features:
            raise ValueError(f"{type(self).__name__} needs the teacher's outputs")
        out = self.terms(inputs)
        if "loss" not in out:
            raise KeyError(f"{type(self).__name__}.terms must return a 'loss' entry")
        return out


def for_members(losses: list[DistillationLoss], device: torch.device | str = "cpu") -> DistillationLoss:
    """One loss for N population members: a copy of ``losses[0]`` whose hyperparameters
    are ``[N]`` tensors, member ``i``'s from ``losses[i]``; its terms are ``[N]``.

    The members must share the method; a method with trainable parts of its own (a
    regressor) cannot be shared, as each member would need its own copy of them."""
    first = losses[0]
    kinds = {type(loss).__name__ for loss in losses}
    if len(kinds) > 1:
        raise ValueError(f"population members must share one loss, got {sorted(kinds)}")
    if any(True for _ in first.parameters()):
        raise ValueError(f"{type(first).__name__} has trainable parameters: it trains only in single runs")
    stacked = copy.copy(first)
    for name in first.hparam_names:
        values = [float(getattr(loss, name)) for loss in losses]  # float64: cast to the logits' dtype in use
        setattr(stacked, name, torch.tensor(values, dtype=torch.float64, device=device))
    return stacked


def method_named(name: str) -> type[DistillationLoss] | None:
    """The loss class whose ``name`` is ``name``, among those imported (None if none is)."""
    pending, seen = [DistillationLoss], set()
    while pending:
        cls = pending.pop()
        if cls.name == name and cls is not DistillationLoss:
            return cls
        for sub in cls.__subclasses__():
            if sub not in seen:
                seen.add(sub)
                pending.append(sub)
    return None
