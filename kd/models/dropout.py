"""Dropout whose masks a run draws from its own generator (the same in a population)."""

from __future__ import annotations

import torch
from torch import nn

from kd.identity import derived_seed


class SeededDropout(nn.Dropout):
    """Dropout whose masks come from a generator of the run's own, not the global one.

    A run's masks then depend only on its seed, so a population member (which draws
    its masks from a generator seeded alike and hands them in as the ``mask`` buffer,
    see :mod:`kd.population`) drops exactly the units its single run drops."""

    def __init__(self, p: float, generator: torch.Generator | None = None) -> None:
        super().__init__(p)
        self.generator = generator
        self.register_buffer("mask", None, persistent=False)

    def draw(self, shape: torch.Size, device: torch.device) -> torch.Tensor:
        return torch.empty(shape, device=device).bernoulli_(1.0 - self.p, generator=self.generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        mask = self.mask if self.mask is not None else self.draw(x.shape, x.device)
        return x * mask.to(x.dtype) / (1.0 - self.p)


def dropout_generator(seed: int, device: torch.device | str) -> torch.Generator:
    """The dropout masks' generator of the run with ``seed``: seeded apart from the
    global generator (initialisation) and the augmentation's (which uses ``seed``)."""
    return torch.Generator(device=device).manual_seed(derived_seed("dropout", seed))


def seed_dropout(model: nn.Module, generator: torch.Generator) -> list[SeededDropout]:
    """Replace every ``nn.Dropout`` in ``model`` by a :class:`SeededDropout` drawing from
    ``generator``; returns them in module order (an empty list: no dropout)."""
    replaced = []
    for module in list(model.modules()):
        for name, child in module.named_children():
            if type(child) is nn.Dropout:
                seeded = SeededDropout(child.p, generator)
                setattr(module, name, seeded)
                replaced.append(seeded)
            elif isinstance(child, SeededDropout):
                child.generator = generator
                replaced.append(child)
    return replaced
