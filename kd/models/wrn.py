"""Wide ResNets for CIFAR (Zagoruyko & Komodakis 2016), from torchdistill's model zoo:
WRN-depth-k has 3 stages of 16k, 32k and 64k channels and (depth - 4) / 6 blocks each."""

from __future__ import annotations

from torch import nn
from torchdistill.models.classification.wide_resnet import wide_resnet as _torchdistill_wide_resnet

from kd.errors import ConfigError


def wide_resnet(depth: int = 16, width: int = 2, dropout: float = 0.0, num_classes: int = 10) -> nn.Module:
    """WRN-``depth``-``width`` with ``num_classes`` outputs; ``dropout`` between the two
    convs of each block (0.3 in the paper's best CIFAR runs; its dropout layers become
    seeded ones like any other model's). Built without pretrained weights."""
    if depth < 10 or (depth - 4) % 6:
        raise ConfigError(f"model.depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, 40, ...), got {depth}")
    if width < 1:
        raise ConfigError(f"model.width must be >= 1, got {width}")
    return _torchdistill_wide_resnet(depth, width, dropout, num_classes, False, False)
