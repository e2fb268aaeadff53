"""Synthetic label noise: the regime where flat minima are known to matter.

Noise is drawn once over the whole training file with its own seed (``data.label_noise_seed``),
before the training subset and the validation split are cut, so which images carry a wrong label
does not depend on the model seed: every method and every seed of a comparison sees the same
noisy labels on the images they share.
"""

from __future__ import annotations

import torch

__all__ = ["NOISE_KINDS", "noisy_labels"]

#: symmetric: the wrong label is uniform over the other classes; pairflip: class c -> c + 1 (mod C).
NOISE_KINDS = ("symmetric", "pairflip")


def noisy_labels(labels: torch.Tensor, rate: float, kind: str, num_classes: int, seed: int) -> torch.Tensor:
    """A copy of ``labels`` in which exactly ``round(rate * n)`` entries, chosen at random, are
    replaced by a different class (never the true one). Deterministic in ``seed``."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"label-noise rate must be in [0, 1), got {rate!r}")
    if kind not in NOISE_KINDS:
        raise ValueError(f"label-noise kind must be one of {', '.join(NOISE_KINDS)}, got {kind!r}")
    if num_classes < 2:
        raise ValueError(f"label noise needs at least 2 classes, got {num_classes}")
    n = int(labels.shape[0])
    count = int(round(rate * n))
    generator = torch.Generator().manual_seed(int(seed))
    chosen = torch.randperm(n, generator=generator)[:count]
    out = labels.clone()
    true = labels[chosen].cpu()
    if kind == "symmetric":  # a shift of 1..C-1 classes: uniform over the C-1 wrong ones
        shift = torch.randint(1, num_classes, (count,), generator=generator)
    else:
        shift = torch.ones(count, dtype=torch.long)
    out[chosen.to(labels.device)] = ((true + shift) % num_classes).to(labels.device)
    return out
