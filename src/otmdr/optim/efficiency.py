"""Cheaper sharpness-aware steps: which steps perturb, and what the skipped ones reuse.

Every option here trades some of the ascent passes for plain base-optimizer steps (one pass).
The optimizer asks :func:`scheduled_kind` before a step's first pass; the adaptive trigger
decides after it (:class:`Trigger`); :func:`orthogonal_component_` and :func:`reuse_scale` are
LookSAM's arithmetic; :func:`momentum_buffers` finds the direction MSAM ascends along. All of it
is pure bookkeeping over tensors the optimizer already has: no extra pass.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import functional as F
from .config import PerturbationConfig

__all__ = ["FULL", "PLAIN", "REUSE", "scheduled_kind", "Trigger", "orthogonal_component_", "reuse_scale",
           "momentum_buffers", "check_momentum_base"]

FULL, PLAIN, REUSE = "full", "plain", "reuse"


def scheduled_kind(cfg: PerturbationConfig, step: int, total_steps: int | None) -> str:
    """What step ``step`` (0-based) is before any pass: ``PLAIN`` before the late phase and
    between interval steps (``REUSE`` there with ``reuse``), else ``FULL`` (which the trigger may
    still turn into a plain step after the first pass)."""
    if cfg.phase_start > 0 and step < math.ceil(cfg.phase_start * _total(total_steps, "phase_start")):
        return PLAIN
    if step % cfg.ascent_interval != 0:
        return REUSE if cfg.reuse else PLAIN
    return FULL


def _total(total_steps: int | None, option: str) -> int:
    if total_steps is None or total_steps < 1:
        raise ValueError(f"{option} needs the length of training: set opt.total_steps (e.g. epochs * len(loader)) "
                         "before the first step; `otmdr train` sets it")
    return total_steps


class Trigger:
    """AE-SAM's rule: running mean ``mean`` and variance ``var`` of the squared gradient norm
    (updated with the current one first, decay ``delta``); perturb when the current value is at
    least ``mean + c * sqrt(var)``. Python floats: the decision needs the host anyway, and they
    save and resume exactly."""

    def __init__(self, thresholds: Sequence[float], decay: float) -> None:
        self.thresholds = tuple(thresholds)
        self.decay = decay
        self.mean = 0.0
        self.var = 0.0

    def threshold(self, step: int, total_steps: int | None) -> float:
        """c at ``step``: constant, or linear from the first to the last step."""
        first, last = self.thresholds[0], self.thresholds[-1]
        if first == last:
            return first
        total = _total(total_steps, "trigger with two thresholds")
        return first + (last - first) * min(1.0, step / max(1, total - 1))

    def observe(self, squared_norm: float, c: float) -> bool:
        """Update the statistics with this step's squared gradient norm; whether to perturb. A
        non-finite norm leaves them unchanged and takes the plain step (its check reports it)."""
        if not math.isfinite(squared_norm):
            return False
        d = self.decay
        self.mean = d * self.mean + (1 - d) * squared_norm
        self.var = d * self.var + (1 - d) * (squared_norm - self.mean) ** 2
        return squared_norm >= self.mean + c * math.sqrt(self.var)

    def state_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "var": self.var}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mean, self.var = float(state["mean"]), float(state["var"])


@torch.no_grad()
def orthogonal_component_(clean: list[Tensor], perturbed: Sequence[Tensor], *, foreach: bool = True,
                          shard_sum: F.ShardSum | None = None) -> None:
    """LookSAM's g_v, written over ``clean`` (the first pass's gradient, spent by then, so that
    storing g_v allocates nothing): ``perturbed - (<perturbed, clean> / ||clean||^2) clean``, the
    part of the perturbed gradient that the clean gradient does not explain (``shard_sum``: the
    tensors are one rank's shards, the dot product and the norm are summed over the ranks)."""
    dot = sum((a.double() * b.double()).sum() for a, b in zip(perturbed, clean))
    if shard_sum is not None:
        dot = shard_sum(torch.as_tensor(dot, dtype=torch.float64))
    squared = F.global_norm(clean, foreach=foreach, shard_sum=shard_sum).double() ** 2
    coefficient = torch.nan_to_num(dot / squared, nan=0.0, posinf=0.0, neginf=0.0)
    F.mul_(clean, -float(coefficient), foreach=foreach)
    F.add_(clean, perturbed, foreach=foreach)


def reuse_scale(grads: Sequence[Tensor], component: Sequence[Tensor], alpha: float, eps: float, *,
                foreach: bool = True, shard_sum: F.ShardSum | None = None) -> Tensor:
    """``alpha * ||g|| / ||g_v||``: the stored component is added at the plain gradient's scale
    (0 while none is stored, or if either norm is not finite)."""
    norm = F.global_norm(component, foreach=foreach, shard_sum=shard_sum)
    return F.step_scale(alpha, 1.0, norm, eps) * F.global_norm(grads, foreach=foreach, shard_sum=shard_sum).to(norm)


#: base-optimizer state keys that hold a momentum (SGD; the Adam family's first moment)
MOMENTUM_KEYS = ("momentum_buffer", "exp_avg")


def momentum_buffers(base: Optimizer, params: Sequence[Tensor]) -> list[Tensor] | None:
    """Each parameter's momentum in ``base``'s state (zeros for one without); None when no
    parameter has one yet (before the first base step). Only the direction matters: SGD's buffer
    sums about 1 / (1 - momentum) gradients, Adam's first moment averages them."""
    found = [next((state[k] for k in MOMENTUM_KEYS if (state := base.state.get(p, {})).get(k) is not None), None)
             for p in params]
    if all(b is None for b in found):
        return None
    return [torch.zeros_like(p) if b is None else b for p, b in zip(params, found)]


def check_momentum_base(base: Optimizer) -> None:
    """MSAM needs a momentum: refuse SGD without one at construction (other bases are checked at
    the first step that finds no buffer)."""
    if isinstance(base, torch.optim.SGD) and any(g.get("momentum", 0) == 0 for g in base.param_groups):
        raise ValueError("momentum_ascent moves along the base optimizer's momentum, but SGD has momentum=0: "
                         "give SGD momentum (e.g. 0.9) or use momentum_ascent='none'")
