"""Metrics on hand-made inputs and cross-checked against torchmetrics."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from otmdr.eval import brier, classification_metrics, ece, fit_temperature, nll, reliability


def test_metrics_on_hand_made_predictions():
    probs = torch.tensor([[0.92, 0.08], [0.27, 0.73], [0.64, 0.36], [0.15, 0.85]], dtype=torch.float64)
    labels = torch.tensor([0, 1, 1, 1])
    m = classification_metrics(probs, labels, n_bins=10)
    assert m["accuracy"] == 0.75
    assert m["nll"] == pytest.approx(-(math.log(0.92) + math.log(0.73) + math.log(0.36) + math.log(0.85)) / 4)
    assert brier(probs, labels) == pytest.approx(2 * (0.08**2 + 0.27**2 + 0.64**2 + 0.15**2) / 4)
    # one sample per bin: |confidence - correct| averaged; the 0.64 prediction is wrong
    assert m["ece"] == pytest.approx((0.08 + 0.27 + 0.64 + 0.15) / 4)
    r = reliability(probs, labels, n_bins=10)
    assert sum(r.count) == 4 and r.count[6] == 1 and r.accuracy[6] == 0.0 and r.confidence[6] == pytest.approx(0.64)


def test_nll_is_finite_for_zero_probability():
    assert math.isfinite(nll(torch.tensor([[1.0, 0.0]]), torch.tensor([1])))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), classes=st.integers(2, 12), n_bins=st.sampled_from([5, 10, 15, 20]))
def test_ece_matches_torchmetrics(seed, classes, n_bins):
    torchmetrics = pytest.importorskip("torchmetrics", reason="torchmetrics is not installed")
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(3 * torch.randn(300, classes, generator=g, dtype=torch.float64), dim=1)
    labels = torch.randint(0, classes, (300,), generator=g)
    metric = torchmetrics.classification.MulticlassCalibrationError(num_classes=classes, n_bins=n_bins, norm="l1")
    assert ece(probs, labels, n_bins) == pytest.approx(float(metric(probs, labels)), abs=1e-6)


def test_temperature_scaling_recovers_the_generating_temperature():
    g = torch.Generator().manual_seed(0)
    true_logits = 2 * torch.randn(4000, 5, generator=g)
    labels = torch.multinomial(torch.softmax(true_logits, dim=1), 1, generator=g).squeeze(1)
    t = fit_temperature(true_logits * 3.0, labels)  # over-confident by a factor 3
    assert t == pytest.approx(3.0, rel=0.1)
