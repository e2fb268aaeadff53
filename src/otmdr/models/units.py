"""The units a sharded strategy wraps: ``fully_shard(unit)`` for each, then the whole model.

An FSDP unit is the group of parameters gathered together for its forward and backward, and
freed after them: small units keep less of the model whole at a time, each unit costs one
all-gather per pass and one reduce-scatter per backward. One rule for the zoo (and the user's
models), in :func:`fsdp_units`.
"""

from __future__ import annotations

from torch import nn

from .vit import wrap_units

__all__ = ["fsdp_units"]

#: containers whose children are the layers or blocks (nn.Sequential, ModuleList, ModuleDict)
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _holds_parameters(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def fsdp_units(model: nn.Module) -> list[nn.Module]:
    """The modules to wrap with ``fully_shard`` one by one before the root, in order.

    * A Vision Transformer (or an ensemble of them): its transformer blocks
      (:func:`otmdr.models.vit.wrap_units`).
    * Otherwise each direct child of the model that holds parameters; a child that is a plain
      container (``nn.Sequential``, ``ModuleList``, ``ModuleDict``) is replaced by its own children
      that hold parameters (one level): a ResNet's stack of residual blocks gives its blocks, an
      MLP's ``Sequential`` its layers, an ensemble's members its members.

    Parameters outside every unit (a ViT's class token and position embeddings, a model's own
    parameters) are sharded with the root. Units never nest."""
    blocks = wrap_units(model)
    if blocks:
        return blocks
    units: list[nn.Module] = []
    for child in model.children():
        if not _holds_parameters(child):
            continue
        if isinstance(child, _CONTAINERS):
            units.extend(grandchild for grandchild in child.children() if _holds_parameters(grandchild))
        else:
            units.append(child)
    return units
