"""Diversity of ensemble members, from their predicted probabilities.

Every function takes ``member_probs`` (m, N, C), each member's predicted probabilities (e.g.
``ensemble.member_log_probs(x).exp()`` or ``Prediction.member_probs``), and, where it needs them,
``labels`` (N,). A member's prediction is its top-1 class (``argmax``, the first index on ties, as
in ``otmdr.eval.metrics.accuracy``). The pairwise metrics need at least two members; they average
over the m(m-1)/2 unordered pairs, except ``normalized_disagreement``, whose reference makes it
asymmetric (ordered pairs).

* ``pairwise_disagreement``: fraction of samples on which two members' predictions differ.
* ``normalized_disagreement`` (Fort, Hu & Lakshminarayanan 2019, "Deep Ensembles: A Loss
  Landscape Perspective"): the disagreement of member j with a reference member i divided by the
  reference's error rate ``1 - accuracy_i``, averaged over ordered pairs (i, j), i != j. 0 means
  identical predictions; 1 means j disagrees with i about as often as i is wrong. A pair whose
  reference makes no error has no ratio and is left out of the average (NaN if every member is
  error-free).
* ``double_fault``: fraction of samples that *both* members get wrong (the release counts "at
  least one wrong", which is not the double-fault measure).
* ``error_correlation``: Pearson correlation of the two members' 0/1 error indicators. A member
  whose indicator is constant (no error, or every sample wrong) has no correlation; such a pair
  counts as 0 (uncorrelated), so the result is always finite.
* ``mutual_information``: mean over samples of ``H(mean_i p_i) - mean_i H(p_i)`` in nats, the
  disagreement part of the predictive entropy (0 for identical members).
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import Tensor

__all__ = ["pairwise_disagreement", "normalized_disagreement", "double_fault", "error_correlation",
           "mutual_information", "diversity_metrics"]


def _check(member_probs: Tensor, labels: Tensor | None = None, pairs: bool = True) -> Tensor:
    if member_probs.dim() != 3:
        raise ValueError(f"member_probs must be (members, samples, classes), got shape {tuple(member_probs.shape)}")
    if pairs and member_probs.shape[0] < 2:
        raise ValueError(f"pairwise diversity needs at least two members, got {member_probs.shape[0]}")
    if labels is not None and labels.shape != member_probs.shape[1:2]:
        raise ValueError(f"labels must be ({member_probs.shape[1]},), got shape {tuple(labels.shape)}")
    return member_probs.detach().cpu().to(torch.float64)


def _predictions(member_probs: Tensor) -> Tensor:
    return member_probs.argmax(dim=-1)  # (m, N)


def _errors(member_probs: Tensor, labels: Tensor) -> Tensor:
    return (_predictions(member_probs) != labels.detach().cpu()[None]).to(torch.float64)  # (m, N)


def _pairs(m: int) -> list[tuple[int, int]]:
    return list(itertools.combinations(range(m), 2))


def pairwise_disagreement(member_probs: Tensor) -> float:
    """Mean over member pairs of the fraction of samples where their top-1 predictions differ."""
    preds = _predictions(_check(member_probs))
    pairs = _pairs(len(preds))
    return sum(float((preds[i] != preds[j]).double().mean()) for i, j in pairs) / len(pairs)


def normalized_disagreement(member_probs: Tensor, labels: Tensor) -> float:
    """Disagreement divided by the reference member's error rate, mean over ordered pairs (Fort et
    al. 2019); pairs whose reference is error-free are left out (NaN if all are)."""
    probs = _check(member_probs, labels)
    preds, errors = _predictions(probs), _errors(probs, labels)
    error_rate = errors.mean(dim=1)
    ratios = [float((preds[i] != preds[j]).double().mean() / error_rate[i])
              for i, j in itertools.permutations(range(len(preds)), 2) if error_rate[i] > 0]
    return sum(ratios) / len(ratios) if ratios else math.nan


def double_fault(member_probs: Tensor, labels: Tensor) -> float:
    """Mean over member pairs of the fraction of samples that BOTH members get wrong."""
    errors = _errors(_check(member_probs, labels), labels)
    pairs = _pairs(len(errors))
    return sum(float((errors[i] * errors[j]).mean()) for i, j in pairs) / len(pairs)


def _pearson(a: Tensor, b: Tensor) -> float:
    a, b = a - a.mean(), b - b.mean()
    denominator = math.sqrt(float((a * a).sum()) * float((b * b).sum()))
    return float((a * b).sum()) / denominator if denominator > 0 else 0.0


def error_correlation(member_probs: Tensor, labels: Tensor) -> float:
    """Mean over member pairs of the Pearson correlation of their 0/1 error indicators; a pair with
    a member whose indicator is constant (no error, or all wrong) counts as 0."""
    errors = _errors(_check(member_probs, labels), labels)
    pairs = _pairs(len(errors))
    return sum(_pearson(errors[i], errors[j]) for i, j in pairs) / len(pairs)


def _entropy(probs: Tensor) -> Tensor:
    return -torch.special.xlogy(probs, probs).sum(dim=-1)  # 0 log 0 = 0


def mutual_information(member_probs: Tensor) -> float:
    """Mean over samples of H(mean_i p_i) - mean_i H(p_i), in nats (>= 0; 0 for identical members)."""
    probs = _check(member_probs, pairs=False)
    value = float((_entropy(probs.mean(dim=0)) - _entropy(probs).mean(dim=0)).mean())
    return max(value, 0.0)  # Jensen: never negative; clip rounding error


def diversity_metrics(member_probs: Tensor, labels: Tensor) -> dict[str, float | list[float]]:
    """All diversity metrics above, each member's accuracy (``member_accuracy``, a list) and the
    accuracy of the mean probability (``ensemble_accuracy``)."""
    probs = _check(member_probs, labels)
    labels = labels.detach().cpu()
    errors = _errors(probs, labels)
    return {
        "pairwise_disagreement": pairwise_disagreement(probs),
        "normalized_disagreement": normalized_disagreement(probs, labels),
        "double_fault": double_fault(probs, labels),
        "error_correlation": error_correlation(probs, labels),
        "mutual_information": mutual_information(probs),
        "member_accuracy": (1 - errors.mean(dim=1)).tolist(),
        "ensemble_accuracy": float((probs.mean(dim=0).argmax(dim=-1) == labels).double().mean()),
    }
