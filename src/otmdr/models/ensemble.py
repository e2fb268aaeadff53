"""Ensembles: m member networks (same or different architectures) behind one module.

Why ``forward`` returns the *log of the mean of the members' probabilities* (method.md section 3):
the release's ensemble is one module whose output is the average of the members' softmax
probabilities, and its loss is the (label-smoothed) cross-entropy of that average. Returning
``log p_bar`` with ``p_bar = mean_i softmax(f_i(x))`` lets the ensemble stand wherever logits are
expected:

* ``softmax(log p_bar) = p_bar`` because ``p_bar`` sums to one, so prediction, metrics and
  calibration code that apply a softmax see the averaged probability;
* ``cross_entropy(log p_bar, y) = -log p_bar[y]``, the NLL of the averaged probability (the
  release's ensemble loss and the NLL convention of ``otmdr.eval.metrics``); with label smoothing
  it is the smoothed cross-entropy of the average, as in the release;
* temperature scaling of the output scales the log of the averaged probability.

It is computed stably as ``logsumexp_i(log_softmax(f_i(x))) - log m``, which stays finite where
``log(mean(softmax))`` would underflow to ``-inf``.

The members stay reachable one by one: ``member(i)``, ``member_logits(x)`` (m, N, C) and
``member_log_probs(x)``; ``member_param_groups`` makes one optimizer param group per member with a
``norm_group`` id, for the per-member perturbation norm of the paper's formulation.

Registry entries: ``lenet-x3``, ``resnet20-x3``, ``resnet10-x5``, ``resnet18-x3`` and
``mixed-r18-mbn-effb0`` (ResNet-18 + MobileNet + EfficientNet-B0), plus ``<model>-x<m>`` for any
registered model through ``create_model`` (e.g. ``mlp-x3`` with ``input_size``, ``wrn16-4-x2``).
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .registry import create_model, is_registered, register_family, register_model

__all__ = ["Ensemble", "create_ensemble", "member_param_groups"]


class Ensemble(nn.Module):
    """m member networks; ``forward`` returns log of the mean member probability, shape (N, C)."""

    def __init__(self, members: Iterable[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)
        if len(self.members) == 0:
            raise ValueError("an ensemble needs at least one member")

    def __len__(self) -> int:
        return len(self.members)

    def member(self, i: int) -> nn.Module:
        return self.members[i]

    def member_logits(self, x: Tensor) -> Tensor:
        """Each member's logits, stacked: (m, N, C)."""
        outputs = [member(x) for member in self.members]
        shapes = {tuple(out.shape) for out in outputs}
        if len(shapes) != 1:
            raise ValueError(f"ensemble members disagree on the output shape: {[tuple(o.shape) for o in outputs]}")
        return torch.stack(outputs)

    def member_log_probs(self, x: Tensor) -> Tensor:
        """Each member's log-probabilities (log-softmax of its logits): (m, N, C)."""
        return torch.log_softmax(self.member_logits(x), dim=-1)

    def forward(self, x: Tensor) -> Tensor:
        """``log(mean_i softmax(f_i(x)))``, (N, C): usable as logits (see the module docstring)."""
        return torch.logsumexp(self.member_log_probs(x), dim=0) - math.log(len(self.members))


def create_ensemble(names: Sequence[str], num_classes: int = 10, in_channels: int = 3, *,
                    per_member: Sequence[Mapping[str, Any]] | None = None, **member_options: Any) -> Ensemble:
    """An ensemble of registered models, one member per name, each built (and initialised) anew.

    ``member_options`` go to every member (a member whose builder does not take one raises
    ``TypeError``); ``per_member``, one dict per name, adds or overrides options member by member,
    e.g. ``create_ensemble(["lenet", "mlp"], 10, 1, per_member=[{}, {"input_size": 28}])``.
    """
    names = list(names)
    if not names:
        raise ValueError("an ensemble needs at least one member name")
    if per_member is not None and len(per_member) != len(names):
        raise ValueError(f"per_member has {len(per_member)} entries for {len(names)} members")
    members = []
    for i, name in enumerate(names):
        options = {**member_options, **(per_member[i] if per_member is not None else {})}
        members.append(create_model(name, num_classes=num_classes, in_channels=in_channels, **options))
    return Ensemble(members)


def member_param_groups(ensemble: Ensemble, **options: Any) -> list[dict[str, Any]]:
    """One optimizer param group per member: ``{"params": [...], "norm_group": i, **options}``.

    The optimizer computes one perturbation norm per ``norm_group`` (the per-member formulation
    of the paper); ``options`` (lr, weight_decay, ...) are copied into every group. Every
    parameter of the ensemble appears in exactly one group; members that share a parameter, or
    parameters outside the members, are an error.
    """
    for key in ("params", "norm_group"):
        if key in options:
            raise ValueError(f"member_param_groups sets {key!r} itself")
    groups: list[dict[str, Any]] = []
    seen: set[int] = set()
    for i, member in enumerate(ensemble.members):
        params = list(member.parameters())
        shared = [p for p in params if id(p) in seen]
        if shared:
            raise ValueError(f"ensemble member {i} shares parameters with an earlier member")
        seen.update(id(p) for p in params)
        groups.append({"params": params, "norm_group": i, **options})
    outside = [name for name, p in ensemble.named_parameters() if id(p) not in seen]
    if outside:
        raise ValueError(f"parameters outside the ensemble members: {outside}")
    return groups


# "<model>-x<m>": an ensemble of m independently initialised copies of a registered model
_REPEATED = re.compile(r"^(?P<base>.+)-x(?P<members>[1-9][0-9]*)$")


@register_family
def _repeated(key: str):
    """The builder of ``<model>-x<m>`` for a registered ``<model>``, else None."""
    match = _REPEATED.match(key)
    if match is None or not is_registered(match["base"]):
        return None
    return functools.partial(create_ensemble, [match["base"]] * int(match["members"]))


# Registry entries. Builders take (num_classes, in_channels, **options); options go to every member.


@register_model("lenet-x3")
def lenet_x3(num_classes: int = 10, in_channels: int = 3, **options: Any) -> Ensemble:
    """Ensemble of 3 LeNet-style CNNs (output: log of the mean member probability)."""
    return create_ensemble(["lenet"] * 3, num_classes, in_channels, **options)


@register_model("resnet20-x3")
def resnet20_x3(num_classes: int = 10, in_channels: int = 3, **options: Any) -> Ensemble:
    """Ensemble of 3 CIFAR ResNet-20s (output: log of the mean member probability)."""
    return create_ensemble(["resnet20"] * 3, num_classes, in_channels, **options)


@register_model("resnet10-x5")
def resnet10_x5(num_classes: int = 10, in_channels: int = 3, **options: Any) -> Ensemble:
    """Ensemble of 5 ResNet-10s, as in the paper (output: log of the mean member probability)."""
    return create_ensemble(["resnet10"] * 5, num_classes, in_channels, **options)


@register_model("resnet18-x3")
def resnet18_x3(num_classes: int = 10, in_channels: int = 3, **options: Any) -> Ensemble:
    """Ensemble of 3 ResNet-18s, as in the paper (output: log of the mean member probability)."""
    return create_ensemble(["resnet18"] * 3, num_classes, in_channels, **options)


@register_model("mixed-r18-mbn-effb0")
def mixed_r18_mbn_effb0(num_classes: int = 10, in_channels: int = 3,
                        per_member: Sequence[Mapping[str, Any]] | None = None, **options: Any) -> Ensemble:
    """Ensemble of ResNet-18, MobileNet and EfficientNet-B0, as in the paper (log mean probability)."""
    return create_ensemble(["resnet18", "mobilenet", "efficientnet-b0"], num_classes, in_channels,
                           per_member=per_member, **options)
