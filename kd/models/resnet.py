"""CIFAR ResNets (He et al. 2016, section 4.2): 3 stages of 16, 32 and 64 channels, n
basic blocks each (depth 6n + 2), parameter-free shortcuts (option A: stride-2
subsampling and zero-padded channels), global average pooling and one linear layer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kd.models.tutorial import FeatureNet, scaled


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.stride, self.pad = stride, channels - in_channels

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1 and self.pad == 0:
            return x
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(FeatureNet):
    """ResNet-``depth`` for 32-px images; ``depth`` = 6n + 2 (8, 14, 20, 32, 44, 56, 110).
    ``width`` multiplies the channels of every stage (16, 32, 64 at 1.0)."""

    def __init__(self, depth: int = 20, num_classes: int = 10, width: float = 1.0) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"a CIFAR ResNet's depth is 6n + 2 (8, 14, 20, 32, 56, 110), got {depth}")
        blocks = (depth - 2) // 6
        stages = [scaled(channels, width) for channels in (16, 32, 64)]
        layers: list[nn.Module] = [
            nn.Conv2d(3, stages[0], 3, padding=1, bias=False),
            nn.BatchNorm2d(stages[0]),
            nn.ReLU(),
        ]
        in_channels = stages[0]
        for stage, channels in enumerate(stages):
            for block in range(blocks):
                stride = 2 if stage > 0 and block == 0 else 1
                layers.append(BasicBlock(in_channels, channels, stride))
                in_channels = channels
        self.features = nn.Sequential(*layers)  # "conv": the last stage's feature map
        self.classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(stages[-1], num_classes))
        for module in self.modules():
            if isinstance(module, nn.Conv2d | nn.Linear):
                nn.init.kaiming_normal_(module.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))

    def forward_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        conv = self.features(x)
        return self.classifier(conv), {"conv": conv}
