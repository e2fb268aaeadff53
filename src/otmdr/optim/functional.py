"""Functional core of the perturbation optimizers: one ascent move, noise, norms.

These functions hold all the arithmetic of SAM / ASAM / OT-MDR so that the Optimizer classes stay
thin (the same split as ``torch.optim``). Each function has a ``foreach`` path (one fused kernel
per operation over all tensors) and a single-tensor path (a plain loop, kept as a readable
reference and a cross-check in the tests). Neither path synchronises with the host: norms and
scales stay on the device as 0-dim tensors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["global_norm", "ascent_move_", "add_noise_", "distance"]


def global_norm(tensors: Sequence[Tensor], *, foreach: bool = True) -> Tensor:
    """L2 norm of all tensors taken as one vector, as a 0-dim tensor (no host sync).

    Half-precision inputs are reduced in float32 (an fp16 norm overflows at 65504).
    """
    if not tensors:
        return torch.zeros((), dtype=torch.float32)
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    if foreach:
        norms = torch._foreach_norm(list(tensors), 2, dtype=dtype)
    else:
        norms = [torch.linalg.vector_norm(t, dtype=dtype) for t in tensors]
    device = norms[0].device
    if any(n.device != device for n in norms):  # parameters spread over devices
        norms = [n.to(device) for n in norms]
    return torch.linalg.vector_norm(torch.stack(norms))


def distance(params: Sequence[Tensor], centre: Sequence[Tensor], *, foreach: bool = True) -> Tensor:
    """||params - centre|| over all tensors: the measured perturbation radius."""
    if not params:
        return torch.zeros((), dtype=torch.float32)
    if foreach:
        diffs = torch._foreach_sub(list(params), list(centre))
    else:
        diffs = [p - c for p, c in zip(params, centre)]
    return global_norm(diffs, foreach=foreach)


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
    rho_scales: list[float] | None = None,
    norm_extra: list[Tensor] | None = None,
    eps: float = 1e-12,
    foreach: bool = True,
) -> Tensor:
    """Move ``params`` by one normalised ascent step; returns the norm used (0-dim float32).

    ``grads`` is the ascent gradient at the current point. It is consumed: on return it holds the
    move that was added to ``params`` (callers treat it as scratch and zero it).

    ``directions`` is the merge buffer (None: no merge). It keeps the running sum of the ascent
    gradients, ``first`` resets it. The move is along ``weight * directions`` (``weight`` = 1 for
    the release's sum, 1/(i+1) for the mean) or along ``grads`` when there is no merge.

    ``normalize="step"`` divides by the norm of this step's own gradient (the release: step 2
    moves along g1 + g2 but divides by ||g2||); ``"merged"`` divides by the norm of the merged
    direction, so every step has length ``rho`` exactly.

    ``adaptive`` is ASAM's element-wise scaling with T = |theta| + eta: the move is
    ``rho * T^2 d / ||T n||``. ``rho_scales`` multiplies the move per tensor (per-group rho).

    A non-finite norm gives a zero scale (the caller reports it); the norm is returned so that
    the caller can check it without a sync here.
    """
    if directions is not None:
        if foreach:
            (torch._foreach_copy_ if first else torch._foreach_add_)(directions, grads)
        else:
            for d, g in zip(directions, grads):
                (d.copy_ if first else d.add_)(g)
    merged = directions is not None and normalize == "merged"
    norm_source = directions if merged else grads

    scaling = None
    if adaptive:
        if foreach:
            scaling = torch._foreach_abs(params)
            torch._foreach_add_(scaling, adaptive_eta)
            norm = global_norm(torch._foreach_mul(scaling, norm_source), foreach=True)
        else:
            scaling = [p.abs().add_(adaptive_eta) for p in params]
            norm = global_norm([t * n for t, n in zip(scaling, norm_source)], foreach=False)
    else:
        norm = global_norm(norm_source, foreach=foreach)
    if norm_extra:
        extra = global_norm(norm_extra, foreach=foreach).to(norm)
        norm = torch.sqrt(norm * norm + extra * extra)
    if merged:
        norm = norm * weight
    scale = (rho * weight / (norm + eps)).nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)

    # The move is built in the gradient buffers (scratch from here on): no extra allocation.
    if foreach:
        if directions is not None:
            torch._foreach_copy_(grads, directions)
        if scaling is not None:
            torch._foreach_mul_(grads, scaling)
            torch._foreach_mul_(grads, scaling)
        torch._foreach_mul_(grads, scale.to(grads[0].device))
        if rho_scales is not None:
            torch._foreach_mul_(grads, rho_scales)
        torch._foreach_add_(params, grads)
    else:
        for i, (p, g) in enumerate(zip(params, grads)):
            if directions is not None:
                g.copy_(directions[i])
            if scaling is not None:
                g.mul_(scaling[i]).mul_(scaling[i])
            g.mul_(scale.to(g.device))
            if rho_scales is not None:
                g.mul_(rho_scales[i])
            p.add_(g)
    return norm


def add_noise_(params: list[Tensor], std: float, generator: torch.Generator, *, foreach: bool = True) -> None:
    """Add N(0, std^2) noise to every tensor (Langevin term), drawn in one call from ``generator``.

    The noise is drawn as one flat vector in parameter order, so the foreach and single-tensor
    paths (and a reference written by hand) see the same numbers for the same generator state.
    """
    if std == 0.0 or not params:
        return
    dtype = params[0].dtype if all(p.dtype == params[0].dtype for p in params) else torch.float32
    total = sum(p.numel() for p in params)
    flat = torch.randn(total, generator=generator, device=generator.device, dtype=dtype)
    chunks = torch.split(flat, [p.numel() for p in params])
    noise = [c.view(p.shape).to(p.device) for c, p in zip(chunks, params)]
    if foreach:
        torch._foreach_add_(params, noise, alpha=std)
    else:
        for p, n in zip(params, noise):
            p.add_(n, alpha=std)
