"""Synthetic label noise: the regime where flat minima are known to matter.

Noise is drawn once over the whole training file with its own seed (``data.label_noise_seed``),
before the training subset and the validation split are cut, so which images carry a wrong label
does not depend on the model seed: every method and every seed of a comparison sees the same
noisy labels on the images they share.
"""

from __future__ import annotations

import hashlib

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
    # a stream of its own: seeded with ``seed`` itself, the permutation would be the one that
    # train_val_split draws for train.seed == seed, and the validation split would take exactly
    # the first noisy labels (then restored clean), leaving the training split less noisy
    digest = hashlib.blake2b(f"label-noise,{int(seed)}".encode(), digest_size=8).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))
    chosen = torch.randperm(n, generator=generator)[:count]
    out = labels.clone()
    true = labels[chosen].cpu()
    if kind == "symmetric":  # a shift of 1..C-1 classes: uniform over the C-1 wrong ones
        shift = torch.randint(1, num_classes, (count,), generator=generator)
    else:
        shift = torch.ones(count, dtype=torch.long)
    out[chosen.to(labels.device)] = ((true + shift) % num_classes).to(labels.device)
    return out
