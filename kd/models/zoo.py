"""Any torchvision classification model, by name (``model=torchvision model.name=...``)."""

from __future__ import annotations

import difflib
import os

from torch import nn

from kd.errors import ConfigError


def torchvision_model(
    name: str, num_classes: int = 10, small_input: bool = False, weights: str | os.PathLike | None = None
) -> nn.Module:
    """torchvision's ``name`` with ``num_classes`` outputs. ``small_input`` adapts a
    ResNet-style stem to 32-px images (3x3 stride-1 first conv, no max-pool), as CIFAR
    ResNet-18s do. ``weights``: a local file (a state_dict, or a dict holding one under
    ``state_dict`` or ``model``), loaded with ``weights_only=True``; nothing is downloaded."""
    # Imported here: torchvision adds about a second to every job's start.
    from torchvision.models import get_model, list_models

    names = list_models()
    if name not in names:
        near = difflib.get_close_matches(name, names, n=3)
        hint = f"did you mean {', '.join(near)}?" if near else f"one of {len(names)} names in torchvision.models"
        raise ConfigError(f"model.name={name!r} is not a torchvision model; {hint}")
    model = get_model(name, num_classes=num_classes)
    if small_input:
        _small_stem(model, name)
    if weights is not None:
        _load_weights(model, weights, name)
    return model


def _small_stem(model: nn.Module, name: str) -> None:
    """Keep 32-px inputs large enough for the later stages, as CIFAR versions of these
    families do (kuangliu/pytorch-cifar): ResNet-style stems become one 3x3 stride-1 conv
    without max-pool; ShuffleNetV2 keeps its 3x3 conv at stride 1 and drops the max-pool;
    MobileNetV2 takes its first conv and its first stride-2 block at stride 1."""
    from torchvision.models import MobileNetV2

    conv1 = getattr(model, "conv1", None)
    if isinstance(conv1, nn.Conv2d) and hasattr(model, "maxpool"):  # ResNet, ResNeXt, Wide ResNet
        model.conv1 = nn.Conv2d(3, conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif isinstance(conv1, nn.Sequential) and isinstance(conv1[0], nn.Conv2d) and hasattr(model, "maxpool"):
        conv1[0].stride = (1, 1)  # ShuffleNetV2: its stem conv is already 3x3
        model.maxpool = nn.Identity()
    elif isinstance(model, MobileNetV2):
        model.features[0][0].stride = (1, 1)
        model.features[2].conv[1][0].stride = (1, 1)  # the depthwise conv of the first stride-2 block
    else:
        raise ConfigError(
            f"model.small_input=true adapts ResNet, ShuffleNetV2 and MobileNetV2 stems; {name} has none of them"
        )


def timm_model(name: str, num_classes: int = 10, weights: str | os.PathLike | None = None) -> nn.Module:
    """timm's ``name`` with ``num_classes`` outputs (``pip install -e .[timm]``); built
    without pretrained weights, ``weights`` loads a local file as for torchvision."""
    try:
        import timm  # optional: the timm extra
    except ImportError:
        raise ConfigError("model=timm needs the timm package: pip install -e '.[timm]'") from None
    if not timm.is_model(name):
        near = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f"did you mean {', '.join(near)}?" if near else "see timm.list_models()"
        raise ConfigError(f"model.name={name!r} is not a timm model; {hint}")
    model = timm.create_model(name, pretrained=False, num_classes=num_classes)
    if weights is not None:
        _load_weights(model, weights, name)
    return model


def _load_weights(model: nn.Module, path: str | os.PathLike, name: str) -> None:
    # Imported here: kd.teacher imports the store, which the model zoo otherwise never needs.
    from kd.teacher import load_checkpoint, restore_model

    restore_model(load_checkpoint(path, key="model.weights"), model, name, None, key="model.name")
