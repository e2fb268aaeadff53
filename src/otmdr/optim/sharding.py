"""Parameters sharded as DTensors (FSDP2's ``fully_shard``): local shards for the kernels, one
collective for each norm.

Every operation of an ascent step is elementwise except its norms (and LookSAM's dot product), so
the kernels of :mod:`.functional` run unchanged on each rank's local shard (``DTensor`` has no
sharding strategy for ``_foreach_copy_`` and several other foreach kernels, and going through
DTensor dispatch would cost more than the arithmetic anyway): :func:`local` maps a parameter,
gradient or optimizer buffer to its local tensor, and :class:`Sharding` sums a rank's partial
squared norm over the ranks that hold the other shards, so that every rank sees the global norm.
Only shard-sized tensors are ever allocated; no parameter is gathered.

Nothing here imports ``torch.distributed.tensor`` (0.7 s): a DTensor cannot exist before its
module is loaded, so an unsharded model never pays for it.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["Sharding", "NoiseLayout", "local", "like", "is_sharded", "find_sharding"]

#: per moved tensor: its global shape and the index of the local shard in it (noise draws)
NoiseLayout = list[tuple[torch.Size, tuple[slice, ...]]]


def _dtensor_type() -> type | None:
    module = sys.modules.get("torch.distributed.tensor")
    return None if module is None else getattr(module, "DTensor", None)


def is_sharded(t: Tensor) -> bool:
    """Whether ``t`` is a DTensor."""
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(t, dtensor)


def local(t: Tensor) -> Tensor:
    """The rank's local shard of a DTensor (the tensor itself, not a copy: in-place arithmetic on
    it changes the DTensor), or ``t`` itself for an ordinary tensor."""
    dtensor = _dtensor_type()
    if dtensor is not None and isinstance(t, dtensor):
        shard: Tensor = t._local_tensor  # type: ignore[attr-defined]
        return shard
    return t


def like(param: Tensor, shard: Tensor) -> Tensor:
    """``shard`` (a local tensor shaped as ``param``'s local shard) as a DTensor laid out as
    ``param``, or ``shard`` itself when ``param`` is an ordinary tensor (no communication)."""
    if not is_sharded(param):
        return shard
    dtensor: Any = _dtensor_type()
    whole: Tensor = dtensor.from_local(shard, param.device_mesh, param.placements,  # type: ignore[attr-defined]
                                       run_check=False, shape=param.shape, stride=param.stride())
    return whole


class Sharding:
    """How the optimizer's DTensor parameters are laid out over their device mesh: which mesh
    dimensions shard them (a partial sum over the local shard is summed over those), and the
    whole mesh (non-finite flags are OR-ed over it)."""

    def __init__(self, mesh: Any, shard_dims: tuple[int, ...]) -> None:
        self.mesh = mesh
        self.shard_dims = shard_dims
        self.size = int(mesh.size())  #: processes in the mesh
        self.device = torch.device(mesh.device_type)

    def _groups(self, dims: Sequence[int]) -> list[Any]:
        return [self.mesh.get_group(d) for d in dims if self.mesh.size(d) > 1]

    def sum(self, value: Tensor) -> Tensor:
        """``value`` (a rank's partial sum, e.g. its shards' squared norm) summed over the ranks
        that hold the other shards: the same total on every rank. In place where it can."""
        import torch.distributed as dist

        out = value.to(self.device)
        for group in self._groups(self.shard_dims):
            dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    def any(self, flags: Tensor) -> Tensor:
        """Boolean ``flags`` OR-ed over the whole mesh (a one-byte all-reduce per mesh dimension)."""
        import torch.distributed as dist

        agreed = flags.to(device=self.device, dtype=torch.uint8)
        for group in self._groups(range(self.mesh.ndim)):
            dist.all_reduce(agreed, op=dist.ReduceOp.MAX, group=group)
        return agreed.bool().to(flags.device)

    def noise_layout(self, params: Sequence[Tensor]) -> NoiseLayout:
        """Each parameter's global shape and where its local shard lies in it, so that noise drawn
        for the whole parameter vector (as in one process) can be cut to this rank's shards."""
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        layout: NoiseLayout = []
        for p in params:
            shape, offset = compute_local_shape_and_global_offset(
                p.shape, p.device_mesh, p.placements)  # type: ignore[attr-defined]
            if tuple(shape) != tuple(local(p).shape):
                raise NotImplementedError(
                    f"a DTensor parameter of shape {tuple(p.shape)} holds a local shard of shape "
                    f"{tuple(local(p).shape)} where its placements {p.placements} give {tuple(shape)}: "  # type: ignore[attr-defined]
                    "this sharding is not supported by the noise draw (noise_std > 0)")
            layout.append((p.shape, tuple(slice(o, o + n) for o, n in zip(offset, shape))))
        return layout


def find_sharding(params: Sequence[Tensor]) -> Sharding | None:
    """The :class:`Sharding` of ``params`` when they are DTensors (FSDP2), None when none is.

    Refused: a mix of DTensors and ordinary tensors (the ordinary ones would be updated with this
    rank's gradient only: apply ``fully_shard`` to the root module too), DTensors on different
    meshes, or sharded over different mesh dimensions (tensor parallelism mixed in), and
    ``Partial`` placements: none of them is FSDP's layout, and the norms would be wrong.
    """
    sharded = [is_sharded(p) for p in params]
    if not any(sharded):
        return None
    if not all(sharded):
        raise ValueError(
            f"{sum(sharded)} of the {len(params)} parameters are DTensors (FSDP2's fully_shard) and the others "
            "are not: apply fully_shard to the root module too (after its blocks), then build the optimizer")
    mesh = params[0].device_mesh  # type: ignore[attr-defined]
    layouts = set()
    for p in params:
        if p.device_mesh != mesh:  # type: ignore[attr-defined]
            raise NotImplementedError("DTensor parameters on different device meshes are not supported")
        if any(placement.is_partial() for placement in p.placements):  # type: ignore[attr-defined]
            raise NotImplementedError(f"a DTensor parameter with placements {p.placements} (Partial) is not "  # type: ignore[attr-defined]
                                      "supported: FSDP shards parameters, it does not split them into partial sums")
        layouts.add(tuple(d for d, placement in enumerate(p.placements) if placement.is_shard()))  # type: ignore[attr-defined]
    if len(layouts) > 1:
        raise NotImplementedError(
            f"DTensor parameters sharded over different mesh dimensions {sorted(layouts)} (e.g. tensor parallelism "
            "mixed with FSDP) are not supported: the ascent norm needs one reduction for all of them")
    return Sharding(mesh, layouts.pop())
