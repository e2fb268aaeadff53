"""Splitting batches into the ascent parts."""

from __future__ import annotations

from collections import namedtuple

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from otmdr.optim.batching import batch_size, split_bounds, take


@given(n=st.integers(2, 500), cuts=st.lists(st.floats(0.05, 1.0), min_size=1, max_size=4))
def test_split_bounds_are_disjoint_consecutive_and_sized(n, cuts):
    total = sum(cuts)
    fractions = [c / max(total, 1.0) for c in cuts]
    try:
        bounds = split_bounds(n, fractions)
    except ValueError as error:
        assert "too small" in str(error)
        assert any(round(f * n) <= 1 for f in fractions) or n < len(fractions) * 2
        return
    assert bounds[0][0] == 0
    for (_, b), (c, _) in zip(bounds, bounds[1:]):
        assert b == c
    for (lo, hi), f in zip(bounds, fractions):
        assert hi > lo and abs((hi - lo) - f * n) <= 1.0 + 1e-9
    if abs(sum(fractions) - 1.0) < 1e-12:
        assert bounds[-1][1] == n  # nothing dropped


def test_take_keeps_structure_and_non_tensor_leaves():
    Pair = namedtuple("Pair", "x y")
    batch = {"a": Pair(torch.arange(6), torch.arange(6) * 2), "b": [torch.ones(6, 2)], "name": "keep"}
    assert batch_size(batch) == 6
    part = take(batch, slice(2, 4))
    assert isinstance(part["a"], Pair) and part["a"].x.tolist() == [2, 3] and part["a"].y.tolist() == [4, 6]
    assert part["b"][0].shape == (2, 2) and part["name"] == "keep"
    assert part["a"].x.data_ptr() == batch["a"].x.data_ptr() + 2 * 8  # a view, no copy
    shuffled = take(batch, torch.tensor([5, 0]))
    assert shuffled["a"].y.tolist() == [10, 0]


def test_batch_without_tensors_is_an_error():
    with pytest.raises(TypeError, match="holds no tensor"):
        batch_size({"name": "x"})
