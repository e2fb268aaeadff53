"""Classification metrics on predicted probabilities (uncertainty-toolbox conventions).

Accuracy is micro-averaged; NLL is -log of the predicted probability of the true class (for an
ensemble or a BNN: of the *mean* probability); Brier is the mean over samples of the sum over
classes of (p - onehot)^2; ECE uses equal-width confidence bins, 15 by default.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["accuracy", "nll", "brier", "ece", "reliability", "Reliability", "classification_metrics"]

_TINY = 1e-12


def accuracy(probs: Tensor, labels: Tensor) -> float:
    return float((probs.argmax(dim=1) == labels).float().mean())


def nll(probs: Tensor, labels: Tensor) -> float:
    picked = probs.gather(1, labels[:, None]).squeeze(1)
    return float(-torch.log(picked.clamp_min(_TINY)).mean())


def brier(probs: Tensor, labels: Tensor) -> float:
    onehot = F.one_hot(labels, probs.shape[1]).to(probs.dtype)
    return float(((probs - onehot) ** 2).sum(dim=1).mean())


@dataclass
class Reliability:
    """Per-bin data of a reliability diagram (bins with no sample have count 0)."""

    edges: list[float]
    count: list[int]
    confidence: list[float]  # mean confidence in the bin
    accuracy: list[float]  # accuracy in the bin
    ece: float


def reliability(probs: Tensor, labels: Tensor, n_bins: int = 15) -> Reliability:
    """Equal-width bins over the top-class confidence; a sample with confidence c falls in the
    bin (lo, hi] (confidence 0 in the first bin), as torchmetrics does."""
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    confidence, predicted = probs.max(dim=1)
    correct = (predicted == labels).to(torch.float64)
    confidence = confidence.to(torch.float64)
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
    index = torch.bucketize(confidence, edges[1:-1], right=False)
    count = torch.bincount(index, minlength=n_bins)
    conf_sum = torch.bincount(index, weights=confidence, minlength=n_bins)
    correct_sum = torch.bincount(index, weights=correct, minlength=n_bins)
    safe = count.clamp_min(1).to(torch.float64)
    mean_conf, mean_acc = conf_sum / safe, correct_sum / safe
    ece_value = float(((mean_conf - mean_acc).abs() * count).sum() / max(len(labels), 1))
    return Reliability(edges.tolist(), count.tolist(), mean_conf.tolist(), mean_acc.tolist(), ece_value)


def ece(probs: Tensor, labels: Tensor, n_bins: int = 15) -> float:
    return reliability(probs, labels, n_bins).ece


def classification_metrics(probs: Tensor, labels: Tensor, n_bins: int = 15) -> dict[str, float]:
    """Accuracy, NLL, Brier and ECE (named with its bin count, e.g. ``ece`` with ``ece_bins``)."""
    probs, labels = probs.detach().cpu(), labels.detach().cpu()
    return {
        "accuracy": accuracy(probs, labels),
        "nll": nll(probs, labels),
        "brier": brier(probs, labels),
        "ece": ece(probs, labels, n_bins),
        "ece_bins": n_bins,
    }
