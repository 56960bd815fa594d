"""Intermediate features of any model, by layer name, for the feature-based losses.

A model may declare named features of its own (``feature_layers``, returned by its
``forward_with_features``: the built-in networks' ``conv``, their last feature map); any
other name is a submodule path of the model (``layer3``, ``features.4``), read with a
forward hook, so torchvision, timm and torchdistill models work unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from kd.errors import ConfigError

# A forward pass that also returns named features: inputs -> (logits, {name: tensor}).
FeatureForward = Callable[[torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]]
STUDENT_LAYER, TEACHER_LAYER = "loss.student_layer", "loss.teacher_layer"  # the keys that name them


def own_features(model: nn.Module) -> tuple[str, ...]:
    """The named features ``model`` returns from its ``forward_with_features`` (none without one)."""
    return tuple(getattr(model, "feature_layers", ())) if hasattr(model, "forward_with_features") else ()


def layer_names(model: nn.Module, depth: int = 2) -> list[str]:
    """The names a feature loss may read: the features the model declares, then its
    submodules down to ``depth`` dots deep."""
    own = list(own_features(model))
    return own + [name for name, _ in model.named_modules() if name and name.count(".") < depth]


def check_layers(model: nn.Module, names: tuple[str, ...], key: str) -> None:
    """Refuse, in one line listing the model's layers, a name ``model`` does not have."""
    if not names:
        return
    known = set(layer_names(model, depth=99))
    for name in names:
        if name not in known:
            listed = layer_names(model)
            more = f", ... ({len(listed) - 24} more)" if len(listed) > 24 else ""
            raise ConfigError(
                f"{key}={name!r} is not a layer of {type(model).__name__}; its layers: {', '.join(listed[:24])}{more}"
            )


def with_features(model: nn.Module, names: tuple[str, ...], key: str = STUDENT_LAYER) -> FeatureForward:
    """``model``'s forward, also returning the outputs of the layers ``names``."""
    check_layers(model, names, key)
    if not names:
        return lambda x: (model(x), {})
    if own_features(model) and set(names) <= set(own_features(model)):
        return model.forward_with_features
    layers = {name: model.get_submodule(name) for name in names}

    def forward(x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        seen: dict[str, torch.Tensor] = {}
        hooks = [layer.register_forward_hook(_keep(seen, name, key)) for name, layer in layers.items()]
        try:
            logits = model(x)
        finally:
            for hook in hooks:
                hook.remove()
        return logits, seen

    return forward


def _keep(seen: dict[str, torch.Tensor], name: str, key: str) -> Callable:
    def hook(_module: nn.Module, _inputs: object, output: object) -> None:
        if not isinstance(output, torch.Tensor):
            raise ConfigError(f"{key}={name!r} returns {type(output).__name__}, not a tensor: name a layer inside it")
        seen[name] = output

    return hook
