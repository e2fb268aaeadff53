"""Loss-landscape slices (Li et al., 2018): the loss along filter-normalised random directions
around trained weights, and along the straight line between two trained models.

Batch norm runs in eval mode; the loss is the mean over the given batches. Directions are
"filter-normalised": each filter (row of a weight tensor) of the random direction is rescaled to
the norm of the matching filter of the weights, and directions for 1-D parameters (biases,
batch-norm affine) are zero, as in Li et al., so slices of differently scaled models compare.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from ._mode import eval_mode

__all__ = ["filter_normalized_direction", "loss_slice_1d", "loss_surface_2d", "interpolation", "landscape_evaluation"]

LossFn = Callable[[Tensor, Tensor], Tensor]
Batches = Sequence[tuple[Tensor, Tensor]]


def _params(model: nn.Module) -> list[Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def filter_normalized_direction(model: nn.Module, generator: torch.Generator | None = None) -> list[Tensor]:
    """A Gaussian direction with each filter rescaled to its weight filter's norm."""
    direction = []
    for p in _params(model):
        if p.dim() <= 1:
            direction.append(torch.zeros_like(p))
            continue
        d = torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device)
        d_rows, p_rows = d.flatten(1), p.detach().flatten(1)
        scale = p_rows.norm(dim=1, keepdim=True) / d_rows.norm(dim=1, keepdim=True).clamp_min(1e-12)
        direction.append((d_rows * scale).view_as(p))
    return direction


@contextlib.contextmanager
def _weights(model: nn.Module, values: Sequence[Tensor]) -> Iterator[None]:
    params = _params(model)
    saved = [p.detach().clone() for p in params]
    try:
        with eval_mode(model):
            with torch.no_grad():
                for p, v in zip(params, values):
                    p.copy_(v)
            yield
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)


@torch.no_grad()
def _loss(model: nn.Module, batches: Batches, loss_fn: LossFn) -> float:
    total = sum(float(loss_fn(model(x), y)) * len(y) for x, y in batches)
    return total / sum(len(y) for _, y in batches)


def loss_slice_1d(model: nn.Module, batches: Batches, loss_fn: LossFn, alphas: Sequence[float], *,
                  direction: Sequence[Tensor] | None = None, seed: int = 0) -> list[float]:
    """L(theta + alpha d) for each alpha (d filter-normalised unless given)."""
    theta = [p.detach().clone() for p in _params(model)]
    d = direction or filter_normalized_direction(model, torch.Generator().manual_seed(seed))
    out = []
    for alpha in alphas:
        with _weights(model, [t + alpha * v for t, v in zip(theta, d)]):
            out.append(_loss(model, batches, loss_fn))
    return out


def loss_surface_2d(model: nn.Module, batches: Batches, loss_fn: LossFn, alphas: Sequence[float],
                    betas: Sequence[float], *, directions: tuple[Sequence[Tensor], Sequence[Tensor]] | None = None,
                    seed: int = 0) -> Tensor:
    """L(theta + alpha d1 + beta d2) on the grid, shape (len(alphas), len(betas))."""
    theta = [p.detach().clone() for p in _params(model)]
    if directions is None:
        generator = torch.Generator().manual_seed(seed)
        directions = (filter_normalized_direction(model, generator), filter_normalized_direction(model, generator))
    d1, d2 = directions
    surface = torch.empty(len(alphas), len(betas), dtype=torch.float64)
    for i, a in enumerate(alphas):
        for j, b in enumerate(betas):
            with _weights(model, [t + a * u + b * v for t, u, v in zip(theta, d1, d2)]):
                surface[i, j] = _loss(model, batches, loss_fn)
    return surface


def interpolation(model: nn.Module, batches: Batches, loss_fn: LossFn, start: Mapping[str, Tensor],
                  end: Mapping[str, Tensor], alphas: Sequence[float]) -> list[float]:
    """L at ``(1 - alpha) start + alpha end``: the line between two trained models of one architecture.

    ``start`` and ``end`` are state dicts. Every floating-point entry is interpolated, batch-norm
    running statistics included, so alpha = 0 and 1 are exactly the two trained models (with the
    parameters alone, alpha = 1 would be the end weights with the start's statistics); integer
    entries (``num_batches_tracked``) are taken from ``start``. The model's state is put back.
    """
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out = []
    try:
        with eval_mode(model), torch.no_grad():
            for alpha in alphas:
                model.load_state_dict({k: (1 - alpha) * s + alpha * end[k] if s.is_floating_point() else s
                                       for k, s in start.items()})
                out.append(_loss(model, batches, loss_fn))
    finally:
        model.load_state_dict(saved)
    return out


def landscape_evaluation(model: nn.Module, batches: Batches, loss_fn: LossFn, *, points: int, span: float,
                         other: nn.Module | None = None) -> dict:
    """What ``otmdr landscape`` reports: the 1-D slice and the 2-D surface at ``points`` alphas in
    [-span, span] around the model, and, given a second trained model of the same architecture,
    its own slice and surface (``other``: the same random directions, each filter-normalised to
    that model's weights, on the same batches, so the two surfaces compare side by side) and the
    line from this one (alpha 0) to it (alpha 1) over [-0.25, 1.25]. A Bayesian network is taken
    at its posterior means, since a slice is defined for one set of weights."""
    from ..models.bayes import posterior_mean

    alphas = torch.linspace(-span, span, points, dtype=torch.float64).tolist()
    result: dict = {"alphas": alphas}
    with posterior_mean(model):
        result["slice_1d"] = loss_slice_1d(model, batches, loss_fn, alphas)
        result["surface_2d"] = loss_surface_2d(model, batches, loss_fn, alphas, alphas).tolist()
    if other is not None:
        with posterior_mean(other):
            result["other"] = {"slice_1d": loss_slice_1d(other, batches, loss_fn, alphas),
                               "surface_2d": loss_surface_2d(other, batches, loss_fn, alphas, alphas).tolist()}
        steps = torch.linspace(-0.25, 1.25, points, dtype=torch.float64).tolist()
        start = {k: v.detach().clone() for k, v in model.state_dict().items()}
        with posterior_mean(model):
            result["interpolation"] = {"alphas": steps,
                                       "loss": interpolation(model, batches, loss_fn, start, other.state_dict(), steps)}
    return result
