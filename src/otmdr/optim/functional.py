"""Functional core of the perturbation optimizers: pure kernels over lists of tensors.

All the arithmetic of SAM / ASAM / OT-MDR lives here so that the Optimizer classes stay thin
(the split of ``torch.optim``). One ascent step is the composition::

    merge_(directions, grads)                      # running sum of the ascent gradients
    T     = adaptive_scaling(params, eta)          # ASAM only: |theta| + eta
    norm  = ascent_norm(source, T, extra)          # ||T * source||, plus in-norm-only tensors
    scale = step_scale(rho, weight, norm, eps)     # rho * weight / (norm + eps), 0 if not finite
    move_(params, grads, directions, T, scale, rho_scales)  # theta += scale * T^2 * direction

(:func:`ascent_move_` runs exactly that). Each kernel has a ``foreach`` path (one fused kernel per
operation over all tensors) and a per-tensor path (a plain loop: a readable reference and a
cross-check in the tests). No kernel synchronises with the host: norms and scales stay on the
device as 0-dim tensors.

Sharded parameters (FSDP2): the kernels receive each rank's local shards (:mod:`.sharding`); the
elementwise arithmetic is then exact as it stands, and every norm takes ``shard_sum``, which sums a
rank's partial squared norm over the other shards' ranks (None: the tensors are whole).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

#: sums a rank's partial result (a squared norm, a dot product) over the ranks holding the other shards
ShardSum = Callable[[Tensor], Tensor]

__all__ = [
    "global_norm", "distance", "copy_", "add_", "zero_", "merge_", "adaptive_scaling", "ascent_norm",
    "step_scale", "move_", "ascent_move_", "add_noise_",
]


def global_norm(tensors: Sequence[Tensor], *, foreach: bool = True, shard_sum: ShardSum | None = None) -> Tensor:
    """L2 norm of all tensors taken as one vector, as a 0-dim tensor (no host sync).

    Half-precision inputs are reduced in float32 (an fp16 norm overflows at 65504). With
    ``shard_sum`` the tensors are one rank's shards: its squared norm is summed over the ranks (one
    collective), so that every rank returns the norm of the whole vector.
    """
    if not tensors:
        zero = torch.zeros((), dtype=torch.float32)
        return zero if shard_sum is None else shard_sum(zero).sqrt_()  # the other ranks still sum
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    if foreach:
        norms = list(torch._foreach_norm(list(tensors), 2, dtype=dtype))
    else:
        norms = [torch.linalg.vector_norm(t, dtype=dtype) for t in tensors]
    device = norms[0].device
    if any(n.device != device for n in norms):  # parameters spread over devices
        norms = [n.to(device) for n in norms]
    total: Tensor = torch.linalg.vector_norm(torch.stack(norms))
    if shard_sum is not None:
        total = shard_sum(total * total).sqrt_()
    return total


def distance(params: Sequence[Tensor], centre: Sequence[Tensor], *, foreach: bool = True,
             shard_sum: ShardSum | None = None) -> Tensor:
    """||params - centre|| over all tensors: the measured perturbation radius."""
    if not params:
        return global_norm([], shard_sum=shard_sum)
    if foreach:
        diffs = list(torch._foreach_sub(list(params), list(centre)))
    else:
        diffs = [p - c for p, c in zip(params, centre)]
    return global_norm(diffs, foreach=foreach, shard_sum=shard_sum)


def copy_(dst: list[Tensor], src: Sequence[Tensor], *, foreach: bool = True) -> None:
    """``dst[i] = src[i]`` for every tensor."""
    if foreach:
        torch._foreach_copy_(dst, list(src))
    else:
        for d, s in zip(dst, src):
            d.copy_(s)


def add_(dst: list[Tensor], src: Sequence[Tensor], *, alpha: float = 1.0, foreach: bool = True) -> None:
    """``dst[i] += alpha * src[i]`` for every tensor."""
    if foreach:
        torch._foreach_add_(dst, list(src), alpha=alpha)
    else:
        for d, s in zip(dst, src):
            d.add_(s, alpha=alpha)


def mul_(tensors: list[Tensor], factor: float | Tensor, *, foreach: bool = True) -> None:
    """``tensors[i] *= factor`` for every tensor (a tensor factor: one value, no host sync)."""
    if foreach:
        torch._foreach_mul_(tensors, factor)
    else:
        for t in tensors:
            t.mul_(factor)


def zero_(tensors: list[Tensor], *, foreach: bool = True) -> None:
    """Zero every tensor in place (the gradients between passes)."""
    if not tensors:
        return
    if foreach:
        torch._foreach_zero_(tensors)
    else:
        for t in tensors:
            t.zero_()


def merge_(directions: list[Tensor], grads: Sequence[Tensor], *, first: bool, foreach: bool = True) -> None:
    """The merge buffer: ``directions = grads`` at a particle's first ascent step, ``+= grads`` after."""
    (copy_ if first else add_)(directions, grads, foreach=foreach)


def adaptive_scaling(params: Sequence[Tensor], eta: float, *, foreach: bool = True) -> list[Tensor]:
    """ASAM's element-wise scale T = |theta| + eta (new tensors)."""
    if foreach:
        scaling = list(torch._foreach_abs(list(params)))
        torch._foreach_add_(scaling, eta)
        return scaling
    return [p.abs().add_(eta) for p in params]


def ascent_norm(source: Sequence[Tensor], *, scaling: Sequence[Tensor] | None = None,
                extra: Sequence[Tensor] | None = None, foreach: bool = True,
                shard_sum: ShardSum | None = None) -> Tensor:
    """The norm an ascent step divides by: ``||T * source||`` (``||source||`` without ASAM's
    ``scaling`` T), combined in quadrature with ``||extra||`` (gradients of parameters that count
    in the norm but do not move)."""
    if scaling is None:
        norm = global_norm(source, foreach=foreach, shard_sum=shard_sum)
    elif foreach:
        norm = global_norm(torch._foreach_mul(list(scaling), list(source)), foreach=True, shard_sum=shard_sum)
    else:
        norm = global_norm([t * s for t, s in zip(scaling, source)], foreach=False, shard_sum=shard_sum)
    if extra:
        other = global_norm(extra, foreach=foreach, shard_sum=shard_sum).to(norm)
        norm = torch.sqrt(norm * norm + other * other)
    return norm


def step_scale(rho: float, weight: float, norm: Tensor, eps: float) -> Tensor:
    """``rho * weight / (norm + eps)``; a non-finite result becomes 0 (the caller reports the
    norm) so that a bad gradient never writes NaN into the weights."""
    # reciprocal, then multiply: exactly what ``rho * weight / (norm + eps)`` runs, in place
    return (norm + eps).reciprocal_().mul_(rho * weight).nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)


def move_(params: list[Tensor], moves: list[Tensor], scale: Tensor, *, directions: Sequence[Tensor] | None = None,
          scaling: Sequence[Tensor] | None = None, rho_scales: Sequence[float] | None = None,
          foreach: bool = True) -> None:
    """``params += scale * T^2 * d * rho_scale``, with ``d`` = ``directions`` if given, else the
    current content of ``moves``. The move is built in ``moves`` (scratch: the spent gradients),
    so no tensor is allocated, and it stays there afterwards."""
    if foreach:
        if directions is not None:
            torch._foreach_copy_(moves, list(directions))
        if scaling is not None:
            torch._foreach_mul_(moves, list(scaling))
            torch._foreach_mul_(moves, list(scaling))
        torch._foreach_mul_(moves, scale.to(moves[0].device))
        if rho_scales is not None:
            torch._foreach_mul_(moves, list(rho_scales))
        torch._foreach_add_(params, moves)
        return
    for i, (p, m) in enumerate(zip(params, moves)):
        if directions is not None:
            m.copy_(directions[i])
        if scaling is not None:
            m.mul_(scaling[i]).mul_(scaling[i])
        m.mul_(scale.to(m.device))
        if rho_scales is not None:
            m.mul_(rho_scales[i])
        p.add_(m)


def ascent_move_(
    params: list[Tensor],
    grads: list[Tensor],
    directions: list[Tensor] | None,
    *,
    first: bool,
    rho: float,
    weight: float = 1.0,
    normalize: str = "step",
    adaptive: bool = False,
    adaptive_eta: float = 0.0,
    rho_scales: Sequence[float] | None = None,
    norm_extra: Sequence[Tensor] | None = None,
    eps: float = 1e-12,
    foreach: bool = True,
    shard_sum: ShardSum | None = None,
) -> Tensor:
    """One normalised ascent step of ``params``; returns the norm used (0-dim).

    ``grads`` is the ascent gradient at the current point and is consumed: on return it holds
    the move added to ``params``. ``directions`` is the merge buffer (None: no merge; ``first``
    resets it); the move is along ``weight * directions`` (``weight`` 1 for the release's sum,
    1/(i+1) for the mean) or along ``grads`` without a merge. ``normalize="step"`` divides by the
    norm of this step's own gradient (the release: step 2 moves along g1 + g2 divided by ||g2||),
    ``"merged"`` by the norm of the merged direction, so that every step has length ``rho``.
    ``adaptive`` is ASAM's T = |theta| + eta: the move is ``rho * T^2 d / ||T n||``.
    ``shard_sum``: the tensors are one rank's shards (see :func:`global_norm`).
    """
    if directions is not None:
        merge_(directions, grads, first=first, foreach=foreach)
    merged = directions is not None and normalize == "merged"
    scaling = adaptive_scaling(params, adaptive_eta, foreach=foreach) if adaptive else None
    source = directions if merged and directions is not None else grads
    norm = ascent_norm(source, scaling=scaling, extra=norm_extra, foreach=foreach, shard_sum=shard_sum)
    if merged and weight != 1.0:  # x * 1.0 == x: skip the kernel (the release's sum)
        norm = norm * weight
    scale = step_scale(rho, weight, norm, eps)
    move_(params, grads, scale, directions=directions, scaling=scaling, rho_scales=rho_scales, foreach=foreach)
    return norm


def add_noise_(params: list[Tensor], std: float, generator: torch.Generator, *, foreach: bool = True,
               into: list[Tensor] | None = None, first: bool = False,
               layout: Sequence[tuple[torch.Size, tuple[slice, ...]]] | None = None) -> None:
    """Add N(0, std^2) noise to every tensor (the Langevin term), drawn in one call from ``generator``.

    The noise is one flat vector in parameter order, so the foreach and per-tensor paths (and a
    reference written by hand) see the same numbers for the same generator state. ``into`` (one
    buffer per tensor) keeps the noise added so far: set to this draw when ``first``, else added
    to, so that the caller can tell the noise from the ascent move (``params`` get exactly the
    same arithmetic either way).

    ``layout`` (sharded parameters: each tensor's global shape and the index of the local shard
    ``params`` holds) draws the noise of the whole parameters, as one process would, and keeps
    each rank's part: the same noise as unsharded for the same generator state, at the cost of a
    temporary vector of every moved parameter's full size on every rank (freed on return).
    """
    if std == 0.0 or not params:
        return
    dtype = params[0].dtype if all(p.dtype == params[0].dtype for p in params) else torch.float32
    shapes = [p.shape for p in params] if layout is None else [shape for shape, _ in layout]
    sizes = [shape.numel() for shape in shapes]
    flat = torch.randn(sum(sizes), generator=generator, device=generator.device, dtype=dtype)
    chunks = torch.split(flat, sizes)
    if layout is None:
        noise = [c.view(p.shape).to(p.device) for c, p in zip(chunks, params)]
    else:  # the rank's shard of each parameter's noise
        noise = [c.view(shape)[index].to(p.device) for c, (shape, index), p in zip(chunks, layout, params)]
    add_(params, noise, alpha=std, foreach=foreach)
    if into is not None:
        if first:
            copy_(into, noise, foreach=foreach)
            if foreach:
                torch._foreach_mul_(into, std)
            else:
                for t in into:
                    t.mul_(std)
        else:
            add_(into, noise, alpha=std, foreach=foreach)
