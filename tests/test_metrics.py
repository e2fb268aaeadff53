"""Metrics on hand-made inputs and cross-checked against torchmetrics."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import optimize  # the train extra's: a required test dependency

from otmdr.eval import brier, classification_metrics, ece, fit_temperature, nll, reliability
from conftest import require_oracle


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


def test_a_zero_probability_costs_the_clamped_log_not_infinity():
    # the probability is clamped at 1e-12 before the log; the other samples keep their exact terms
    probs = torch.tensor([[1.0, 0.0], [0.25, 0.75]], dtype=torch.float64)
    assert nll(probs[:1], torch.tensor([1])) == pytest.approx(-math.log(1e-12), rel=1e-12)
    assert nll(probs, torch.tensor([1, 1])) == pytest.approx((-math.log(1e-12) - math.log(0.75)) / 2, rel=1e-12)
    assert nll(probs.float(), torch.tensor([1, 0])) == pytest.approx((-math.log(1e-12) - math.log(0.25)) / 2, rel=1e-6)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), classes=st.integers(2, 12), n_bins=st.sampled_from([5, 10, 15, 20]))
def test_ece_matches_torchmetrics(seed, classes, n_bins):
    torchmetrics = require_oracle("torchmetrics", "the independent calibration-error reference")
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(3 * torch.randn(300, classes, generator=g, dtype=torch.float64), dim=1)
    labels = torch.randint(0, classes, (300,), generator=g)
    metric = torchmetrics.classification.MulticlassCalibrationError(num_classes=classes, n_bins=n_bins, norm="l1")
    assert ece(probs, labels, n_bins) == pytest.approx(float(metric(probs, labels)), abs=1e-6)


def test_temperature_scaling_recovers_the_generating_temperature():
    g = torch.Generator().manual_seed(0)
    true_logits = 2 * torch.randn(4000, 5, generator=g)
    labels = torch.multinomial(torch.softmax(true_logits, dim=1), 1, generator=g).squeeze(1)
    logits = true_logits * 3.0  # over-confident by a factor 3
    t = fit_temperature(logits, labels)
    assert t == pytest.approx(3.0, rel=0.1)  # the generating temperature, up to sampling noise
    # and the NLL minimiser: a bounded scalar search over log T in float64 (scipy) as the reference.
    # L-BFGS in float32 stops where the float32 loss no longer changes (here T 0.16% short of the
    # minimiser, 8e-7 above its NLL); a temperature 1% off costs about 3e-5 in NLL
    def loss(log_t: float) -> float:
        return float(F.cross_entropy(logits.double() / math.exp(log_t), labels))

    best = optimize.minimize_scalar(loss, bounds=(-3.0, 3.0), method="bounded", options={"xatol": 1e-9})
    assert loss(math.log(t)) - best.fun < 1e-5
    assert t == pytest.approx(math.exp(best.x), rel=0.005)
