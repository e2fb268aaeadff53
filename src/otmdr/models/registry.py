"""Model registry: ``create_model(name, num_classes=..., in_channels=...)`` (timm-style).

Models know nothing about optimizers or datasets; each builder takes ``num_classes`` and
``in_channels`` (and ``input_size`` where the architecture needs it) plus its own options.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["register_model", "register_family", "create_model", "list_models", "count_parameters",
           "describe_models", "is_known_model", "is_registered", "check_model_options", "model_from_factory"]

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


#: what otmdr passes a model factory itself, from the data (each only if the factory names it)
FACTORY_ARGUMENTS = ("num_classes", "in_channels", "image_size")


def model_from_factory(factory: Callable[..., Any], name: str, *, num_classes: int, in_channels: int,
                       image_size: int, options: dict[str, Any] | None = None) -> nn.Module:
    """Build a model with a user's factory (``model.factory``) and check what it returned.

    ``factory`` gets those of ``num_classes``, ``in_channels`` and ``image_size`` its signature
    names (all three if it takes ``**kwargs``) and ``options`` as keywords. It must return an
    ``nn.Module`` with trainable parameters that maps a float batch ``(N, in_channels,
    image_size, image_size)`` to logits ``(N, num_classes)``: checked on a batch of 2 zeros, in
    eval mode, without gradients. Raises TypeError or ValueError with a one-line message naming
    ``name`` (the factory's path) and what was expected.
    """
    options = dict(options or {})
    given = {"num_classes": num_classes, "in_channels": in_channels, "image_size": image_size}
    try:
        parameters = inspect.signature(factory).parameters
        open_ended = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
        given = {k: v for k, v in given.items() if open_ended or k in parameters}
    except (TypeError, ValueError):  # no signature to read (a builtin): pass everything
        pass
    model = factory(**given, **options)
    if not isinstance(model, nn.Module):
        raise TypeError(f"{name} returned {type(model).__name__}, expected a torch.nn.Module (the model itself, "
                        "built for the given num_classes and in_channels)")
    weights = [p for p in model.parameters() if p.requires_grad]
    if not weights:
        raise ValueError(f"{name} returned a {type(model).__name__} without trainable parameters: nothing to train")
    x = torch.zeros(2, in_channels, image_size, image_size, dtype=weights[0].dtype, device=weights[0].device)
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as error:  # noqa: BLE001 - a shape mismatch, typically: one line naming the input
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ValueError(f"{name}: the model fails on a batch of shape {tuple(x.shape)} (N, channels, height, "
                         f"width) of the data: {type(error).__name__}: {first[:300]}") from None
    finally:
        model.train(training)
    if not isinstance(out, torch.Tensor) or not out.is_floating_point() or tuple(out.shape) != (2, num_classes):
        shown = (f"a {out.dtype} tensor of shape {tuple(out.shape)}" if isinstance(out, torch.Tensor)
                 else f"a {type(out).__name__}")
        raise ValueError(f"{name}: the model maps a batch of shape {tuple(x.shape)} to {shown}, expected float logits "
                         f"of shape (2, {num_classes}): one score per class ({num_classes} classes in the data)")
    return model
