"""The teacher and student networks of the PyTorch knowledge-distillation tutorial.

Both expect 3x32x32 inputs. The class count is a constructor argument that the
pipeline fills in from the dataset, so configs never state it twice.
"""

from __future__ import annotations

import torch
from torch import nn


class FeatureNet(nn.Module):
    """A conv ``features`` stack and a ``classifier``; distillation methods that read
    intermediate features call :meth:`forward_with_features`."""

    features: nn.Module
    classifier: nn.Module
    # The features forward_with_features returns, by name: what a feature loss may read
    # besides any submodule (``loss.student_layer=conv``).
    feature_layers: tuple[str, ...] = ("conv",)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))

    def forward_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Logits and named features: ``conv``, the last conv block's feature map."""
        conv = self.features(x)
        return self.classifier(torch.flatten(conv, 1)), {"conv": conv}


class DeepNN(FeatureNet):
    """Teacher: 4 conv, 2 max-pool, 2 linear, dropout 0.1 (1,186,986 parameters for 10 classes)."""

    title = "Teacher"  # as report tables name it

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
    """Student: 2 conv, 2 max-pool, 2 linear, dropout 0.1 (267,738 parameters for 10 classes).

    ``width`` multiplies every layer's channels and hidden units (16 and 256 at 1.0), a
    knob that moves the student along the cost axis."""

    title = "Student"

    def __init__(self, num_classes: int = 10, width: float = 1.0) -> None:
        super().__init__()
        channels, hidden = scaled(16, width), scaled(256, width)
        self.features = nn.Sequential(
            nn.Conv2d(3, channels, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=2, stride=2),
            nn.Conv2d(channels, channels, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=2, stride=2),
        )
        self.classifier = nn.Sequential(
            nn.Linear(channels * 8 * 8, hidden),
            nn.ReLU(),
            nn.Dropout(0.1),
            nn.Linear(hidden, num_classes),
        )


def scaled(channels: int, width: float) -> int:
    """``channels`` times a width multiplier, rounded, at least 1."""
    if not width > 0:
        raise ValueError(f"model.width must be > 0, got {width}")
    return max(1, round(channels * width))
