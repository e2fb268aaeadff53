"""Attacks on a linear model, whose worst case is known in closed form."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from otmdr.eval.attacks import Normalized, fgsm, pgd, robust_accuracy


def _linear():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 2)).double()
    x = 0.3 + 0.4 * torch.rand(16, 1, 3, 4, dtype=torch.float64)  # away from the [0, 1] box edges
    y = torch.randint(0, 2, (16,))
    return model, x, y


def _worst_direction(model, y):
    """For two classes the loss grows fastest along w_other - w_true (per sample)."""
    w = model[1].weight.detach()
    return (w[1 - y] - w[y]).view(-1, 1, 3, 4)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_reaches_the_closed_form_worst_case_and_stays_in_the_ball(norm):
    model, x, y = _linear()
    eps = 0.05
    x_adv = pgd(model, x, y, eps, norm=norm, steps=50, random_start=False)
    delta = x_adv - x
    direction = _worst_direction(model, y)
    if norm == "linf":
        expected = eps * direction.sign()
        assert float(delta.abs().max()) <= eps + 1e-12
    else:
        expected = eps * direction / direction.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        assert float(delta.flatten(1).norm(dim=1).max()) <= eps + 1e-12
    torch.testing.assert_close(delta, expected, rtol=0, atol=1e-9)
    # from a random start the iterates never leave the ball or the box either
    for seed in range(3):
        x_adv = pgd(model, x, y, eps, norm=norm, steps=7, generator=torch.Generator().manual_seed(seed))
        size = (x_adv - x).abs().flatten(1).max(dim=1).values if norm == "linf" else (x_adv - x).flatten(1).norm(dim=1)
        assert float(size.max()) <= eps + 1e-12
        assert 0.0 <= float(x_adv.min()) and float(x_adv.max()) <= 1.0


def test_fgsm_is_the_linf_worst_case_of_a_linear_model_and_clips_to_the_box():
    model, x, y = _linear()
    delta = fgsm(model, x, y, 0.05) - x
    torch.testing.assert_close(delta, 0.05 * _worst_direction(model, y).sign(), rtol=0, atol=1e-12)
    edge = fgsm(model, torch.ones_like(x), y, 0.5)
    assert float(edge.max()) <= 1.0


def test_robust_accuracy_drops_with_eps_and_normalisation_is_inside_the_model():
    model, x, y = _linear()
    model = Normalized(model, [0.5], [0.25])
    clean = robust_accuracy(model, [(x, y)], lambda m, a, b: a)
    attacked = [robust_accuracy(model, [(x, y)], lambda m, a, b, e=e: pgd(m, a, b, e, steps=20))
                for e in (0.01, 0.1, 0.3)]
    assert clean >= attacked[0] >= attacked[1] >= attacked[2]
    assert attacked[2] < clean


def test_eot_averages_gradients_of_a_stochastic_model():
    class Noisy(nn.Module):
        """A linear model whose weights are redrawn around W at every forward (like a BNN)."""

        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(12, 2).double()

        def forward(self, x):
            w = self.linear.weight + torch.randn_like(self.linear.weight)
            return x.flatten(1) @ w.T + self.linear.bias

    torch.manual_seed(0)
    model = Noisy()
    x, y = torch.full((64, 1, 3, 4), 0.5, dtype=torch.float64), torch.zeros(64, dtype=torch.long)
    # the expected input gradient, estimated independently with many single-sample gradients
    total = torch.zeros_like(x)
    for _ in range(4000):
        inputs = x.clone().requires_grad_(True)
        total += torch.autograd.grad(nn.functional.cross_entropy(model(inputs), y), inputs)[0]
    expected = 0.05 * total.sign()

    def agreement(samples):
        delta = fgsm(model, x, y, 0.05, eot_samples=samples) - x
        return float(torch.isclose(delta, expected).double().mean())

    assert agreement(1) < 0.8 and agreement(400) > 0.9  # averaging recovers the mean gradient's sign
    with pytest.raises(ValueError, match="unknown norm"):
        pgd(model, x, y, 0.1, norm="l1")
