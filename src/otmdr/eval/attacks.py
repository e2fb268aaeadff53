"""White-box attacks on inputs in [0, 1]: FGSM and PGD (L-infinity and L2), with expectation over
transformation (gradients averaged over several forward passes) for stochastic models such as
Bayesian networks.

The attacked model must take [0, 1] images, i.e. include its input normalisation: wrap a trained
model with :class:`Normalized`. Attacks run with the model in eval mode (batch norm uses its
running statistics) and restore its mode afterwards.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._mode import eval_mode

__all__ = ["Normalized", "fgsm", "pgd", "robust_accuracy", "robust_accuracies", "format_epsilon"]

LossFn = Callable[[Tensor, Tensor], Tensor]


def format_epsilon(eps: float) -> str:
    """An attack radius as users write it: 8/255 rather than 0.0313725 (when it is a whole
    number of 255ths), else 3 significant digits."""
    if eps == 0:
        return "0"
    k = eps * 255
    return f"{round(k)}/255" if abs(k - round(k)) < 1e-6 else f"{eps:.3g}"


class Normalized(nn.Module):
    """``model((x - mean) / std)`` for x in [0, 1]: the normalisation inside the attacked model."""

    mean: Tensor
    std: Tensor

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.model((x - self.mean.to(x)) / self.std.to(x))


def _per_sample_norm(t: Tensor) -> Tensor:
    return t.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (t.dim() - 1)))


def _input_gradient(model: nn.Module, x: Tensor, y: Tensor, loss_fn: LossFn, samples: int) -> Tensor:
    """Gradient of the loss w.r.t. the input, averaged over ``samples`` forward passes (EOT)."""
    x = x.detach().requires_grad_(True)
    total = cast(Tensor, sum(loss_fn(model(x), y) for _ in range(samples))) / samples  # samples >= 1
    return torch.autograd.grad(total, x)[0].detach()


def fgsm(model: nn.Module, x: Tensor, y: Tensor, eps: float, *, loss_fn: LossFn = F.cross_entropy,
         eot_samples: int = 1) -> Tensor:
    """One signed-gradient step of size ``eps`` (L-infinity), clipped to [0, 1]."""
    with eval_mode(model):
        grad = _input_gradient(model, x, y, loss_fn, eot_samples)
    return (x + eps * grad.sign()).clamp(0.0, 1.0).detach()


def _project(delta: Tensor, eps: float, norm: str) -> Tensor:
    if norm == "linf":
        return delta.clamp(-eps, eps)
    return delta * (eps / _per_sample_norm(delta)).clamp(max=1.0)


def pgd(model: nn.Module, x: Tensor, y: Tensor, eps: float, *, norm: str = "linf", steps: int = 10,
        step_size: float | None = None, random_start: bool = True, eot_samples: int = 1,
        loss_fn: LossFn = F.cross_entropy, generator: torch.Generator | None = None) -> Tensor:
    """Projected gradient ascent on the loss within the ``norm`` ball of radius ``eps`` around
    ``x`` and the [0, 1] box. ``step_size`` defaults to 2.5 * eps / steps (Madry et al.)."""
    if norm not in ("linf", "l2"):
        raise ValueError(f"unknown norm {norm!r}: choose linf or l2")
    if eps < 0 or steps < 1:
        raise ValueError(f"need eps >= 0 and steps >= 1, got eps={eps}, steps={steps}")
    step_size = 2.5 * eps / steps if step_size is None else step_size
    x = x.detach()
    delta = torch.zeros_like(x)
    if random_start and eps > 0:
        noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) * 2 - 1
        delta = _project(noise * eps if norm == "linf" else noise, eps, norm)
    delta = ((x + delta).clamp(0.0, 1.0) - x)
    with eval_mode(model):
        for _ in range(steps):
            grad = _input_gradient(model, x + delta, y, loss_fn, eot_samples)
            step = grad.sign() if norm == "linf" else grad / _per_sample_norm(grad)
            delta = _project(delta + step_size * step, eps, norm)
            delta = (x + delta).clamp(0.0, 1.0) - x
    return (x + delta).detach()


def _mean_right(probs: list[Tensor], y: Tensor) -> Tensor:
    return (cast(Tensor, sum(probs)) / len(probs)).argmax(dim=1) == y  # len(probs) >= 1


@torch.no_grad()
def _correct(model: nn.Module, x: Tensor, y: Tensor, samples: int) -> tuple[Tensor, Tensor | None]:
    """Whether the predictive (the mean over ``samples`` draws) is right on each image, and with
    ``samples`` >= 2 whether that of each half of the draws is: (N,) and (2, N) or None."""
    probs = [torch.softmax(model(x), dim=1) for _ in range(samples)]
    halves = None if samples < 2 else torch.stack([_mean_right(probs[:samples // 2], y),
                                                   _mean_right(probs[samples // 2:], y)])
    return _mean_right(probs, y), halves


def robust_accuracies(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]],
                      attack: Callable[[nn.Module, Tensor, Tensor], Tensor], *,
                      samples: int = 1) -> tuple[float, list[float] | None]:
    """Accuracy on ``attack(model, x, y)`` for every batch (x in [0, 1]); ``samples`` > 1 averages
    the predictive of a stochastic model, and then the accuracy of each half of the draws on its
    own comes second (a split-half check of the Monte-Carlo error; None for one draw)."""
    correct = total = 0
    half_correct = torch.zeros(2, dtype=torch.long)
    with eval_mode(model):
        for x, y in batches:
            right, halves = _correct(model, attack(model, x, y), y, samples)
            correct += int(right.sum())
            if halves is not None:
                half_correct += halves.sum(dim=1).cpu()
            total += len(y)
    total = max(total, 1)
    return correct / total, None if samples < 2 else [int(c) / total for c in half_correct]


def robust_accuracy(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]],
                    attack: Callable[[nn.Module, Tensor, Tensor], Tensor], *, samples: int = 1) -> float:
    """Accuracy on ``attack(model, x, y)`` for every batch (x in [0, 1]); ``samples`` > 1 averages
    the predictive of a stochastic model."""
    return robust_accuracies(model, batches, attack, samples=samples)[0]
