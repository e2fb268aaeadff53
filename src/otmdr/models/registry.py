"""Model registry: ``create_model(name, num_classes=..., in_channels=...)`` (timm-style).

Models know nothing about optimizers or datasets; each builder takes ``num_classes`` and
``in_channels`` (and ``input_size`` where the architecture needs it) plus its own options.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["register_model", "create_model", "list_models", "count_parameters", "describe_models", "is_known_model"]

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
# "<model>-x<m>": an ensemble of m independently initialised copies of a registered model
_REPEATED = re.compile(r"^(?P<base>.+)-x(?P<members>[1-9][0-9]*)$")


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    def decorator(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        _REGISTRY[name] = builder
        return builder

    return decorator


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def _repeated(key: str) -> tuple[str, int] | None:
    """``(model, m)`` for a key ``<model>-x<m>`` whose model is registered, else None."""
    match = _REPEATED.match(key)
    if match is None or match["base"] not in _REGISTRY:
        return None
    return match["base"], int(match["members"])


def is_known_model(name: str) -> bool:
    """True for a registered name and for ``<model>-x<m>`` with a registered model."""
    key = name.lower().replace("_", "-")
    return key in _REGISTRY or _repeated(key) is not None


def create_model(name: str, num_classes: int = 10, in_channels: int = 3, **kwargs: Any) -> nn.Module:
    """Build a registered model; an unknown name is an error that lists the known ones.

    A name ``<model>-x<m>`` that is not registered itself (e.g. ``wrn16-4-x2``) builds an ensemble
    of ``m`` copies of the registered ``<model>``, each initialised separately, with ``kwargs``
    passed to every member (see ``otmdr.models.ensemble``).
    """
    key = name.lower().replace("_", "-")
    if key not in _REGISTRY:
        repeated = _repeated(key)
        if repeated is None:
            raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models())} "
                             f"(and <model>-x<m> for an ensemble of m of them)")
        from .ensemble import create_ensemble  # here, not at the top: ensemble.py imports this module

        base, members = repeated
        return create_ensemble([base] * members, num_classes=num_classes, in_channels=in_channels, **kwargs)
    return _REGISTRY[key](num_classes=num_classes, in_channels=in_channels, **kwargs)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def describe_model(name: str) -> str:
    """The first line of the builder's docstring (empty where it has none)."""
    key = name.lower().replace("_", "-")
    if key not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    doc = (_REGISTRY[key].__doc__ or "").strip()
    return doc.splitlines()[0].strip() if doc else ""


def describe_models() -> list[tuple[str, int, str]]:
    """``(name, parameters, description)`` for every registered model, sorted by name.

    Counts are for 10 classes and 3 input channels with each builder's defaults. They are computed
    on each call; models are built on the ``meta`` device (no memory, no initialisation cost),
    falling back to the CPU for a builder that cannot build there.
    """
    rows = []
    for name in list_models():
        try:
            with torch.device("meta"):
                model = create_model(name, num_classes=10, in_channels=3)
        except Exception:  # noqa: BLE001 - a builder that needs real tensors: count on the CPU
            model = create_model(name, num_classes=10, in_channels=3)
        rows.append((name, count_parameters(model), describe_model(name)))
    return rows
