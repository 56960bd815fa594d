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
from dataclasses import dataclass, field

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


class DistillationLoss(nn.Module):
    """Base class of every training loss. Subclasses set the class attributes and
    implement :meth:`terms`."""

    name: str = "loss"
    needs_teacher: bool = False
    student_features: tuple[str, ...] = ()  # feature names the method reads from the student
    teacher_features: tuple[str, ...] = ()  # ... and from the teacher
    hparam_names: tuple[str, ...] = ()  # constructor arguments reported and swept

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
