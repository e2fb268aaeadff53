"""Predictive distributions of single models, ensembles and Bayesian networks on a data split.

Everything is returned as log-probabilities: for an ensemble the log of the members' mean
probability, for a Bayesian network the log of the Monte-Carlo mean over ``samples`` weight
draws. Log-probabilities work wherever logits do (softmax, temperature scaling, cross-entropy).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ._mode import eval_mode

__all__ = ["Prediction", "predict", "predict_logits"]


@dataclass
class Prediction:
    log_probs: Tensor  # (N, C) float64, CPU
    labels: Tensor  # (N,)
    member_probs: Tensor | None = None  # (m, N, C) for ensembles: each member's probabilities
    #: a Bayesian network's predictive from each half of its draws (``halves=True``, ``samples`` >= 2):
    #: two independent estimates at no extra forward, whose disagreement measures the Monte-Carlo error
    halves: tuple[Tensor, Tensor] | None = None


def _members(model: nn.Module):
    return getattr(model, "member_logits", None)


@torch.no_grad()
def predict(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], *,
            autocast_dtype: torch.dtype | None = None, samples: int = 1, halves: bool = False) -> Prediction:
    """Eval-mode predictions; ``samples`` > 1 averages the probabilities of that many forwards
    (a Bayesian network draws new weights on each). ``halves`` (with ``samples`` >= 2) also keeps
    the predictive of each half of the draws (:attr:`Prediction.halves`)."""
    member_logits = _members(model)
    log_probs, labels, members = [], [], []
    parts: tuple[list[Tensor], list[Tensor]] = ([], [])
    with eval_mode(model):
        for x, y in batches:
            ctx = torch.autocast(x.device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
            with ctx:
                if member_logits is not None:
                    per_member = torch.log_softmax(member_logits(x).double(), dim=-1)  # (m, N, C)
                    members.append(per_member.exp().cpu())
                    draws = per_member
                else:
                    draws = torch.stack([torch.log_softmax(model(x).double(), dim=-1) for _ in range(samples)])
                    if halves and samples >= 2:
                        for half, part in zip(parts, (draws[:samples // 2], draws[samples // 2:])):
                            half.append(_log_mean(part).cpu())
            log_probs.append(_log_mean(draws).cpu())
            labels.append(y.cpu())
    return Prediction(torch.cat(log_probs), torch.cat(labels), torch.cat(members, dim=1) if members else None,
                      (torch.cat(parts[0]), torch.cat(parts[1])) if parts[0] else None)


def _log_mean(draws: Tensor) -> Tensor:
    """The log of the mean probability over the first dimension (draws or members)."""
    return torch.logsumexp(draws, dim=0) - math.log(len(draws))


def predict_logits(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], *,
                   autocast_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """Log-probabilities (usable as logits) and labels of one deterministic pass."""
    prediction = predict(model, batches, autocast_dtype=autocast_dtype)
    return prediction.log_probs, prediction.labels
