"""Sharpness measures on losses whose Hessian is known."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from otmdr.eval.sharpness import average_sharpness, hessian_trace, top_hessian_eigenvalue, worst_case_sharpness


class Quadratic(nn.Module):
    """loss = 0.5 * theta^T A theta, written as a 'model' whose output is the loss itself."""

    def __init__(self, eigenvalues):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        q, _ = torch.linalg.qr(torch.randn(len(eigenvalues), len(eigenvalues), generator=g, dtype=torch.float64))
        self.register_buffer("a", q @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ q.T)
        self.theta = nn.Parameter(torch.randn(len(eigenvalues), generator=g, dtype=torch.float64))

    def forward(self, x):
        return 0.5 * self.theta @ self.a @ self.theta * torch.ones(len(x), dtype=torch.float64)


def loss_fn(output, _):
    return output.mean()


BATCHES = [(torch.zeros(4, 1), torch.zeros(4))]
EIGENVALUES = [5.0, 2.0, 1.0, 0.5, 0.1]


def test_power_iteration_recovers_the_top_eigenvalue():
    top = top_hessian_eigenvalue(Quadratic(EIGENVALUES), BATCHES, loss_fn, iterations=500, tol=1e-10)
    assert top == pytest.approx(5.0, rel=1e-6)


class OneSharpDirection(nn.Module):
    """loss = 0.5 * 5 * theta_0^2 over a million parameters: the Hessian is diag(5, 0, ..., 0), so
    a random start's Rayleigh quotient is about 5e-6, far below any absolute tolerance."""

    def __init__(self, size: int = 1_000_000):
        super().__init__()
        self.theta = nn.Parameter(torch.ones(size))

    def forward(self, x):
        return 2.5 * self.theta[0] ** 2 * torch.ones(len(x))


def test_power_iteration_does_not_stop_at_a_random_starts_tiny_quotient():
    # with the default tolerance: the first quotient (about 5e-6) must not be taken for converged
    assert top_hessian_eigenvalue(OneSharpDirection(), BATCHES, loss_fn) == pytest.approx(5.0, rel=1e-4)


def test_hutchinson_trace_is_unbiased():
    trace = hessian_trace(Quadratic(EIGENVALUES), BATCHES, loss_fn, probes=400)
    assert trace == pytest.approx(sum(EIGENVALUES), rel=0.1)


def test_worst_case_and_average_sharpness_of_a_quadratic():
    model = Quadratic(EIGENVALUES)
    theta = model.theta.detach().clone()
    a = model.a
    g = a @ theta
    e = 0.05 * g / g.norm()
    expected = float(e @ a @ theta + 0.5 * e @ a @ e)  # exact loss increase along the gradient
    assert worst_case_sharpness(model, BATCHES, loss_fn, rho=0.05) == pytest.approx(expected, rel=1e-9)
    assert torch.equal(model.theta.detach(), theta)  # the weights are put back
    # at the minimum, random unit directions give 0.5 rho^2 u^T A u with E[u^T A u] = tr(A)/d
    with torch.no_grad():
        model.theta.zero_()
    mean = average_sharpness(model, BATCHES, loss_fn, rho=0.05, directions=4000)
    assert mean == pytest.approx(0.5 * 0.05**2 * sum(EIGENVALUES) / len(EIGENVALUES), rel=0.05)
