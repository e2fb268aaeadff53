"""Model registry: ``create_model(name, num_classes=..., in_channels=...)`` (timm-style).

Models know nothing about optimizers or datasets; each builder takes ``num_classes`` and
``in_channels`` (and ``input_size`` where the architecture needs it) plus its own options.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["register_model", "register_family", "create_model", "list_models", "count_parameters",
           "describe_models", "is_known_model", "is_registered", "check_model_options"]

Builder = Callable[..., nn.Module]
_REGISTRY: dict[str, Builder] = {}
#: resolvers of names that are not registered one by one (``<model>-x<m>``, see ensemble.py)
_FAMILIES: list[Callable[[str], Builder | None]] = []


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    def decorator(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        _REGISTRY[name] = builder
        return builder

    return decorator


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def register_family(resolve: Callable[[str], Builder | None]) -> Callable[[str], Builder | None]:
    """Register a family of names: ``resolve(key)`` returns the builder of a name it recognises
    (``key`` lower-case, ``-`` for ``_``), else None. The registry asks it for any name not
    registered on its own; a family defined elsewhere (ensembles of registered models) so
    registers itself without this module importing it."""
    _FAMILIES.append(resolve)
    return resolve


def _builder(key: str) -> Builder | None:
    if key in _REGISTRY:
        return _REGISTRY[key]
    return next((b for b in (resolve(key) for resolve in _FAMILIES) if b is not None), None)


def is_known_model(name: str) -> bool:
    """True for a registered name and for a name of a registered family (``<model>-x<m>``)."""
    return _builder(name.lower().replace("_", "-")) is not None


def is_registered(key: str) -> bool:
    """True for a name registered on its own (not through a family)."""
    return key in _REGISTRY


def create_model(name: str, num_classes: int = 10, in_channels: int = 3, **kwargs: Any) -> nn.Module:
    """Build a registered model; an unknown name is an error that lists the known ones.

    A name ``<model>-x<m>`` that is not registered itself (e.g. ``wrn16-4-x2``) builds an ensemble
    of ``m`` copies of the registered ``<model>``, each initialised separately, with ``kwargs``
    passed to every member (see ``otmdr.models.ensemble``).
    """
    builder = _builder(name.lower().replace("_", "-"))
    if builder is None:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models())} "
                         f"(and <model>-x<m> for an ensemble of m of them)")
    return builder(num_classes=num_classes, in_channels=in_channels, **kwargs)


def check_model_options(name: str, options: dict[str, Any], num_classes: int = 10, in_channels: int = 3) -> None:
    """Build the model with ``options`` on the meta device (no memory, no initialisation cost), so
    an option the builder does not take (TypeError) or a size it refuses (ValueError, e.g.
    ``hidden[0] must be ...``) is found when a config is read, before a run folder exists. A
    builder that cannot build on the meta device is left to the real build."""
    if _builder(name.lower().replace("_", "-")) is None:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    key = repr((name, sorted(options.items(), key=lambda item: str(item[0])), num_classes, in_channels))
    if key in _CHECKED:  # a config is read many times (a study's runs, resume): a deep net takes a second
        return
    try:
        with torch.device("meta"):
            model = create_model(name, num_classes=num_classes, in_channels=in_channels, **options)
    except (TypeError, ValueError):
        raise
    except Exception:  # noqa: BLE001 - not an option's fault: the real build reports what it is
        return
    size = count_parameters(model)
    if size > MAX_PARAMETERS:
        raise ValueError(f"with {options} has {size:,} parameters, more than {MAX_PARAMETERS:,} (8 GiB of float32 "
                         "weights before gradients and the optimizer's buffers): choose smaller sizes")
    _CHECKED.add(key)


_CHECKED: set[str] = set()
#: The most parameters a model built from options may have: 60 times the largest registered net
#: (WRN-28-10, 36M), so only a typo in a size (a width of 10**9) reaches it.
MAX_PARAMETERS = 2**31


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
