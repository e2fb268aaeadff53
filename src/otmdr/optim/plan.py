"""Which tensors an ascent step moves, grouped for the kernels, and the buffers it reuses.

Walking the param groups and looking buffers up tensor by tensor on every step costs more than
the arithmetic on small models, so both are done once: :func:`build_plan` turns the param groups
into flat tensor lists (each norm group a contiguous slice), cached while the groups, their
options and the set of parameters holding a gradient stay the same; :class:`Scratch` allocates
each parameter-sized buffer once and hands back the same tensors every step.

Sharded parameters (DTensors, FSDP2): the plan also holds each moved parameter's local shard,
which the kernels move, and every buffer is the size of the local shard (:mod:`.sharding`).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .sharding import NoiseLayout, Sharding, local

__all__ = ["AscentPlan", "Scratch", "plan_key", "build_plan"]


class AscentPlan(NamedTuple):
    """The tensors of one ascent, fixed while the param groups do not change."""

    key: Hashable  #: what the plan was built for (see :func:`plan_key`)
    params: list[Tensor]  #: the parameters that move, each norm group a contiguous slice
    parts: list[slice]  #: one slice of ``params`` per norm group
    norm_only: list[list[Tensor]]  #: per norm group: ``in_norm`` parameters that do not move
    rho_scales: list[float] | None  #: per-tensor radius factors (None: all 1)
    centre: list[Tensor]  #: the saved centre, one buffer per moved tensor
    directions: list[Tensor] | None  #: the merge buffer (None without a merge)
    #: what the kernels move: ``params`` itself, or with sharded parameters their local shards
    tensors: list[Tensor]
    #: sharded parameters: each one's global shape and local index, for the noise (None: unsharded)
    layout: NoiseLayout | None = None

    @property
    def single_norm(self) -> bool:
        """One norm over every moved tensor and nothing else: the kernels need no slicing."""
        return len(self.parts) == 1 and not self.norm_only[0]


class Scratch:
    """Persistent parameter-sized buffers by name, allocated once and reused every step."""

    def __init__(self) -> None:
        self._stores: dict[str, dict[Tensor, Tensor]] = {}

    def get(self, name: str, params: Sequence[Tensor]) -> list[Tensor]:
        store = self._stores.setdefault(name, {})
        out = []
        for p in params:
            buffer = store.get(p)
            t = local(p)  # a sharded parameter's buffer is the size of its local shard
            if buffer is None or buffer.shape != t.shape or buffer.device != t.device:
                buffer = store[p] = torch.empty_like(t, memory_format=torch.preserve_format)
            out.append(buffer)
        return out

    def trade(self, name: str, params: Sequence[Tensor], kept: dict[Tensor, Tensor]) -> None:
        """Swap each parameter's ``name`` buffer with its tensor in ``kept``: the buffer's content
        is kept, the old kept tensor becomes the buffer (allocated anew at the next :meth:`get`
        when there was none)."""
        store = self._stores.setdefault(name, {})
        for p in params:
            old = kept.get(p)
            kept[p] = store.pop(p)
            if old is not None:
                store[p] = old

    def tensors(self) -> Iterator[Tensor]:
        """Every buffer held (what the optimizer costs in memory beyond the base optimizer)."""
        for store in self._stores.values():
            yield from store.values()


def plan_key(config: Hashable, param_groups: Sequence[dict[str, Any]], *, sharded: bool = False) -> Hashable:
    """Everything a plan depends on: the config, each group's options and device/dtype, and the
    ids of its parameters that hold a gradient (``sharded``: and of their local shards, which
    FSDP may replace, e.g. after ``model.to(...)``)."""
    key = (config, *(
        (group["perturb"], group["in_norm"], group["norm_group"], group["rho_scale"],
         tuple(id(p) for p in group["params"] if p.grad is not None),
         (group["params"][0].device, group["params"][0].dtype) if group["params"] else None)
        for group in param_groups
    ))
    if sharded:
        key += (tuple(id(local(p)) for group in param_groups for p in group["params"]),)
    return key


def build_plan(key: Hashable, param_groups: Sequence[dict[str, Any]], scratch: Scratch, *,
               merge_buffer: bool, sharding: Sharding | None = None, noise: bool = False) -> AscentPlan:
    """The plan for ``param_groups``: moved tensors (``perturb`` groups holding a gradient) by
    norm group, with their radius factors, the ``in_norm`` tensors of each norm group, and the
    centre (and merge) buffers from ``scratch``; with a ``sharding``, the local shards too (and
    where they lie, for the ``noise``)."""
    by_norm_group: dict[Any, tuple[list[Tensor], list[float], list[Tensor]]] = {}
    for group in param_groups:
        if group["perturb"] or group["in_norm"]:
            chosen = [p for p in group["params"] if p.grad is not None]
            params_of, scales_of, norm_only = by_norm_group.setdefault(group["norm_group"], ([], [], []))
            if group["perturb"]:
                params_of += chosen
                scales_of += [float(group["rho_scale"])] * len(chosen)
            else:
                norm_only += chosen
    moved: list[Tensor] = []
    scales: list[float] = []
    parts: list[slice] = []
    norm_only_parts: list[list[Tensor]] = []
    for params_of, scales_of, norm_only in by_norm_group.values():
        if params_of:
            parts.append(slice(len(moved), len(moved) + len(params_of)))
            moved += params_of
            scales += scales_of
            norm_only_parts.append(norm_only)
    if not moved:
        raise RuntimeError(
            "perturb() found no gradient on any perturbed parameter: run backward() on the "
            "ascent loss first (and check that some param group has perturb=True)"
        )
    return AscentPlan(
        key=key, params=moved, parts=parts, norm_only=norm_only_parts,
        rho_scales=None if all(x == 1.0 for x in scales) else scales,
        centre=scratch.get("centre", moved),
        directions=scratch.get("direction", moved) if merge_buffer else None,
        tensors=moved if sharding is None else [local(p) for p in moved],
        layout=None if sharding is None or not noise else sharding.noise_layout(moved),
    )
