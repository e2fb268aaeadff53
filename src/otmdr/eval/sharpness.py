"""Sharpness of a trained model on a fixed evaluation subset (batch norm in eval mode).

- top Hessian eigenvalue: power iteration on Hessian-vector products (double backward);
- Hessian trace: Hutchinson's estimator with Rademacher probes;
- worst-case sharpness: loss increase after one SAM-style normalised ascent step of radius rho;
- average sharpness: mean loss increase over random directions of norm rho.

The loss is the mean over the given batches of ``loss_fn(model(x), y)``; every quantity is for
that fixed subset, so compare models on the same subset.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import cast

import torch
from torch import Tensor, nn

from ._mode import eval_mode

__all__ = ["top_hessian_eigenvalue", "hessian_trace", "worst_case_sharpness", "average_sharpness"]

LossFn = Callable[[Tensor, Tensor], Tensor]
Batches = Sequence[tuple[Tensor, Tensor]]


def _params(model: nn.Module) -> list[Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def _loss(model: nn.Module, batches: Batches, loss_fn: LossFn) -> Tensor:
    total = cast(Tensor, sum(loss_fn(model(x), y) * len(y) for x, y in batches))  # a Tensor: batches are not empty
    return total / sum(len(y) for _, y in batches)


def _dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    return cast(Tensor, sum((x * y).sum() for x, y in zip(a, b)))  # a Tensor: a and b are not empty


def _hvp(model: nn.Module, batches: Batches, loss_fn: LossFn, vector: Sequence[Tensor]) -> list[Tensor]:
    params = _params(model)
    grads = torch.autograd.grad(_loss(model, batches, loss_fn), params, create_graph=True)
    return [h.detach() for h in torch.autograd.grad(grads, params, grad_outputs=list(vector))]


def top_hessian_eigenvalue(model: nn.Module, batches: Batches, loss_fn: LossFn, *, iterations: int = 50,
                           tol: float = 1e-4, seed: int = 0) -> float:
    """Largest-magnitude eigenvalue of the Hessian of the loss (power iteration).

    Stops when two successive Rayleigh quotients agree to ``tol`` relative to their size. The
    tolerance is relative only: the first quotient of a random start is about trace / dimension
    (1e-5 for a 2M-parameter network), so an absolute floor would stop there, at no eigenvalue."""
    generator = torch.Generator().manual_seed(seed)
    with eval_mode(model):
        params = _params(model)
        v = [torch.randn(p.shape, generator=generator).to(p) for p in params]
        norm = torch.sqrt(_dot(v, v))
        v = [t / norm for t in v]
        eigenvalue, new = None, 0.0
        for _ in range(iterations):
            hv = _hvp(model, batches, loss_fn, v)
            new = float(_dot(hv, v))
            norm = torch.sqrt(_dot(hv, hv))
            if float(norm) == 0.0:
                return 0.0
            v = [t / norm for t in hv]
            if eigenvalue is not None and abs(new - eigenvalue) <= tol * abs(new):
                return new
            eigenvalue = new
        return new


def hessian_trace(model: nn.Module, batches: Batches, loss_fn: LossFn, *, probes: int = 20, seed: int = 0) -> float:
    """Hutchinson estimate E[v^T H v] with Rademacher v."""
    generator = torch.Generator().manual_seed(seed)
    with eval_mode(model):
        params = _params(model)
        estimates = []
        for _ in range(probes):
            v = [(torch.randint(0, 2, p.shape, generator=generator) * 2 - 1).to(p) for p in params]
            estimates.append(float(_dot(_hvp(model, batches, loss_fn, v), v)))
    return sum(estimates) / len(estimates)


@contextlib.contextmanager
def _shifted(params: Sequence[Tensor], shift: Sequence[Tensor]) -> Iterator[None]:
    with torch.no_grad():
        for p, s in zip(params, shift):
            p.add_(s)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, s in zip(params, shift):
                p.sub_(s)


def worst_case_sharpness(model: nn.Module, batches: Batches, loss_fn: LossFn, rho: float = 0.05) -> float:
    """L(theta + rho g/||g||) - L(theta): the first-order worst case in the rho-ball (SAM's)."""
    with eval_mode(model):
        params = _params(model)
        loss = _loss(model, batches, loss_fn)
        grads = torch.autograd.grad(loss, params)
        norm = torch.sqrt(_dot(grads, grads)) + 1e-12
        with _shifted(params, [rho * g / norm for g in grads]), torch.no_grad():
            return float(_loss(model, batches, loss_fn) - loss.detach())


def average_sharpness(model: nn.Module, batches: Batches, loss_fn: LossFn, rho: float = 0.05, *,
                      directions: int = 10, seed: int = 0) -> float:
    """Mean of L(theta + rho u) - L(theta) over random directions u with ||u|| = 1."""
    generator = torch.Generator().manual_seed(seed)
    with eval_mode(model), torch.no_grad():
        params = _params(model)
        base = float(_loss(model, batches, loss_fn))
        increases = []
        for _ in range(directions):
            u = [torch.randn(p.shape, generator=generator).to(p) for p in params]
            norm = torch.sqrt(_dot(u, u))
            with _shifted(params, [rho * t / norm for t in u]):
                increases.append(float(_loss(model, batches, loss_fn)) - base)
    return sum(increases) / len(increases)
