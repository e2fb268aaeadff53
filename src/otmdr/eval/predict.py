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


def _members(model: nn.Module):
    return getattr(model, "member_logits", None)


@torch.no_grad()
def predict(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], *,
            autocast_dtype: torch.dtype | None = None, samples: int = 1) -> Prediction:
    """Eval-mode predictions; ``samples`` > 1 averages the probabilities of that many forwards
    (a Bayesian network draws new weights on each)."""
    member_logits = _members(model)
    log_probs, labels, members = [], [], []
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
            log_probs.append((torch.logsumexp(draws, dim=0) - math.log(len(draws))).cpu())
            labels.append(y.cpu())
    return Prediction(torch.cat(log_probs), torch.cat(labels), torch.cat(members, dim=1) if members else None)


def predict_logits(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], *,
                   autocast_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """Log-probabilities (usable as logits) and labels of one deterministic pass."""
    prediction = predict(model, batches, autocast_dtype=autocast_dtype)
    return prediction.log_probs, prediction.labels
