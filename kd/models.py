"""The teacher and student networks of the PyTorch knowledge-distillation tutorial.

Both expect 3x32x32 inputs. The class count is a constructor argument that the
pipeline fills in from the dataset, so configs never state it twice.
"""

from __future__ import annotations

import torch
from torch import nn

from kd.identity import derived_seed


class FeatureNet(nn.Module):
    """A conv ``features`` stack and a ``classifier``; distillation methods that read
    intermediate features call :meth:`forward_with_features`."""

    features: nn.Module
    classifier: nn.Module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))

    def forward_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Logits and named features: ``conv``, the last conv block's feature map."""
        conv = self.features(x)
        return self.classifier(torch.flatten(conv, 1)), {"conv": conv}


class DeepNN(FeatureNet):
    """Teacher: 4 conv, 2 max-pool, 2 linear, dropout 0.1 (1,186,986 parameters for 10 classes)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 128, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(128, 64, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=2, stride=2),
            nn.Conv2d(64, 64, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(64, 32, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=2, stride=2),
        )
        self.classifier = nn.Sequential(
            nn.Linear(2048, 512),
            nn.ReLU(),
            nn.Dropout(0.1),
            nn.Linear(512, num_classes),
        )


class LightNN(FeatureNet):
    """Student: 2 conv, 2 max-pool, 2 linear, dropout 0.1 (267,738 parameters for 10 classes)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=2, stride=2),
            nn.Conv2d(16, 16, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=2, stride=2),
        )
        self.classifier = nn.Sequential(
            nn.Linear(1024, 256),
            nn.ReLU(),
            nn.Dropout(0.1),
            nn.Linear(256, num_classes),
        )


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


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
