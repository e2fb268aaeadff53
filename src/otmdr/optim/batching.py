"""Slicing a batch (tensor, or tuple/list/dict of tensors, nested) along dimension 0.

The one-call step splits the batch into the disjoint parts used by the ascent steps. Contiguous
parts are views (no copy); a particle's random split gathers with one index per tensor.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, cast

from torch import Tensor

__all__ = ["batch_size", "take", "split_bounds"]


def batch_size(batch: Any) -> int:
    """Length along dim 0 of the tensors in ``batch``; they must all agree."""
    sizes: set[int] = set()
    _collect_sizes(batch, sizes)
    if not sizes:
        raise TypeError(
            "the batch holds no tensor: pass a tensor or a tuple/list/dict of tensors "
            "(sliced along dimension 0)"
        )
    if len(sizes) > 1:
        raise ValueError(f"the tensors of the batch disagree on their size along dimension 0: {sorted(sizes)}")
    return sizes.pop()


def _collect_sizes(batch: Any, sizes: set[int]) -> None:
    if isinstance(batch, Tensor):
        if batch.dim() == 0:
            raise ValueError("a 0-dim tensor in the batch cannot be split along dimension 0")
        sizes.add(batch.shape[0])
    elif isinstance(batch, Mapping):
        for value in batch.values():
            _collect_sizes(value, sizes)
    elif isinstance(batch, (tuple, list)):
        for value in batch:
            _collect_sizes(value, sizes)


def take(batch: Any, index: slice | Tensor) -> Any:
    """The same structure as ``batch`` with every tensor indexed along dim 0; other leaves kept."""
    if isinstance(batch, Tensor):
        if isinstance(index, slice):
            return batch[index]
        return batch.index_select(0, index.to(batch.device))
    if isinstance(batch, Mapping):
        return cast(Any, type(batch))((key, take(value, index)) for key, value in batch.items())
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(take(value, index) for value in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(take(value, index) for value in batch)
    return batch


def split_bounds(n: int, fractions: Sequence[float]) -> list[tuple[int, int]]:
    """Disjoint consecutive ``[start, stop)`` ranges covering ``fractions`` of ``n`` samples.

    Boundaries are cumulative fractions rounded half up, so (0.5, 0.5) of 9 gives 4 + 5 samples
    and nothing is dropped when the fractions sum to 1.
    """
    bounds = []
    start = 0
    cumulative = 0.0
    for fraction in fractions:
        cumulative += fraction
        stop = min(n, int(math.floor(cumulative * n + 0.5)))
        if stop <= start:
            raise ValueError(
                f"a batch of {n} samples is too small for the ascent split {tuple(fractions)}: "
                "a part would be empty; use a larger batch or larger split fractions"
            )
        bounds.append((start, stop))
        start = stop
    return bounds
