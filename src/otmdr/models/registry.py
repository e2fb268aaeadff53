"""Model registry: ``create_model(name, num_classes=..., in_channels=...)`` (timm-style).

Models know nothing about optimizers or datasets; each builder takes ``num_classes`` and
``in_channels`` (and ``input_size`` where the architecture needs it) plus its own options.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

__all__ = ["register_model", "create_model", "list_models", "count_parameters"]

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    def decorator(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        _REGISTRY[name] = builder
        return builder

    return decorator


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def create_model(name: str, num_classes: int = 10, in_channels: int = 3, **kwargs: Any) -> nn.Module:
    """Build a registered model; an unknown name is an error that lists the known ones."""
    key = name.lower().replace("_", "-")
    if key not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    return _REGISTRY[key](num_classes=num_classes, in_channels=in_channels, **kwargs)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
