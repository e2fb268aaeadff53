"""Loss-landscape slices of a quadratic are the quadratic."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from otmdr.eval.landscape import (filter_normalized_direction, interpolation, landscape_evaluation, loss_slice_1d,
                                  loss_surface_2d)


class Quadratic(nn.Module):
    """Output = 0.5 * theta^T A theta for every input row (the 'loss' is the mean output)."""

    def __init__(self):
        super().__init__()
        self.theta = nn.Parameter(torch.tensor([[1.0, -2.0], [0.5, 3.0]], dtype=torch.float64))
        self.register_buffer("a", torch.tensor([[2.0, 0.3], [0.3, 1.0]], dtype=torch.float64))

    def forward(self, x):
        t = self.theta.flatten()
        a4 = torch.block_diag(self.a, self.a)
        return 0.5 * (t @ a4 @ t) * torch.ones(len(x), dtype=torch.float64)


def loss_fn(output, _):
    return output.mean()


BATCHES = [(torch.zeros(3, 1), torch.zeros(3))]


def q(model, t):
    t = t.detach()
    return float(0.5 * t.flatten() @ torch.block_diag(model.a, model.a) @ t.flatten())


def test_1d_and_2d_slices_of_a_quadratic_are_the_quadratic():
    model = Quadratic()
    theta = model.theta.detach().clone()
    d1 = [torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)]
    d2 = [torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)]
    alphas = [-1.0, -0.5, 0.0, 0.5, 1.0]
    line = loss_slice_1d(model, BATCHES, loss_fn, alphas, direction=d1)
    assert line == pytest.approx([q(model, theta + a * d1[0]) for a in alphas])
    surface = loss_surface_2d(model, BATCHES, loss_fn, alphas, alphas, directions=(d1, d2))
    for i, a in enumerate(alphas):
        for j, b in enumerate(alphas):
            assert float(surface[i, j]) == pytest.approx(q(model, theta + a * d1[0] + b * d2[0]))
    assert torch.equal(model.theta.detach(), theta)  # the weights are put back


def test_interpolation_between_two_weight_sets():
    model = Quadratic()
    theta = model.theta.detach().clone()
    start = {"theta": torch.zeros(2, 2, dtype=torch.float64), "a": model.a.clone()}
    end = {"theta": theta.clone(), "a": model.a.clone()}
    values = interpolation(model, BATCHES, loss_fn, start, end, [0.0, 0.5, 1.0])
    assert values == pytest.approx([0.0, 0.25 * q(model, theta), q(model, theta)])
    assert torch.equal(model.theta.detach(), theta)


def test_interpolation_endpoints_are_the_two_models_batch_norm_statistics_included():
    torch.manual_seed(0)
    x, y = torch.randn(32, 3, 6, 6), torch.randint(0, 4, (32,))

    def net():
        return nn.Sequential(nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5), nn.ReLU(), nn.Flatten(), nn.Linear(80, 4))

    a, b = net(), net()
    for model, shift in ((a, 0.0), (b, 3.0)):  # different running statistics in each
        model.train()
        with torch.no_grad():
            for _ in range(5):
                model(x + shift)
        model.eval()
    ce = nn.functional.cross_entropy
    with torch.no_grad():
        expected = [float(ce(a(x), y)), float(ce(b(x), y))]
    start = {k: v.clone() for k, v in a.state_dict().items()}
    values = interpolation(a, [(x, y)], ce, start, b.state_dict(), [0.0, 0.5, 1.0])
    assert values[0] == pytest.approx(expected[0]) and values[2] == pytest.approx(expected[1])
    assert all(torch.equal(v, start[k]) for k, v in a.state_dict().items())  # a is put back


def test_filter_normalisation_matches_each_filter_norm_and_skips_1d_parameters():
    layer = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    direction = filter_normalized_direction(layer, torch.Generator().manual_seed(0))
    weight = layer[0].weight.detach()
    torch.testing.assert_close(direction[0].flatten(1).norm(dim=1), weight.flatten(1).norm(dim=1))
    assert all(float(d.abs().sum()) == 0.0 for d in direction[1:])  # conv bias, BN weight and bias


def test_landscape_evaluation_centres_on_the_model_and_ends_its_line_at_the_other():
    torch.manual_seed(0)
    model, other = Quadratic(), Quadratic()
    with torch.no_grad():
        other.theta.mul_(-0.5)
    result = landscape_evaluation(model, BATCHES, loss_fn, points=5, span=1.0, other=other)
    assert result["alphas"] == [-1.0, -0.5, 0.0, 0.5, 1.0]
    assert result["slice_1d"][2] == pytest.approx(q(model, model.theta))  # alpha 0 is the model itself
    assert result["surface_2d"][2][2] == pytest.approx(q(model, model.theta))
    assert len(result["surface_2d"]) == 5 and all(len(row) == 5 for row in result["surface_2d"])
    line = dict(zip(result["interpolation"]["alphas"], result["interpolation"]["loss"]))
    assert line[0.5] == pytest.approx(q(model, 0.25 * model.theta))  # halfway to -theta/2
    assert "interpolation" not in landscape_evaluation(model, BATCHES, loss_fn, points=3, span=1.0)
