"""A batch too small for the ascent split (e.g. an epoch's last batch of 1 sample) uses the whole
batch for every ascent step instead of failing, for every method and number of ascent steps."""

from __future__ import annotations

import math

import pytest
import torch

from otmdr.optim import OTMDR, SAM

from conftest import ce, data, grad_at, norm, tiny_mlp


def _release_chain(model, x, y, rho, lr):
    """method.md section 2 (the release's step normalisation), then a plain SGD step. Ascent
    step i uses the i-th of ``len(rho)`` equal consecutive parts of the batch, the boundaries
    rounded half up (4 + 5 of 9); a batch with fewer samples than ascent steps uses the whole
    batch in every ascent step."""
    n, steps = len(x), len(rho)
    edges = [math.floor(i * n / steps + 0.5) for i in range(steps + 1)]
    parts = [(0, n)] * steps if n < steps else list(zip(edges[:-1], edges[1:]))
    theta0 = [p.detach().clone() for p in model.parameters()]
    theta, d = [t.clone() for t in theta0], None
    for r, (lo, hi) in zip(rho, parts):
        g = grad_at(model, theta, x[lo:hi], y[lo:hi])
        d = g if d is None else [a + b for a, b in zip(d, g)]
        theta = [t + r * u / (norm(g) + 1e-12) for t, u in zip(theta, d)]
    g = grad_at(model, theta, x, y)
    return [t - lr * gi for t, gi in zip(theta0, g)]


@pytest.mark.parametrize("rho", [(0.05,), (0.05, 0.1), (0.02, 0.05, 0.1)])
@pytest.mark.parametrize("n", range(1, 7))
def test_every_small_batch_size_steps(rho, n):
    model = tiny_mlp()
    x, y = data(n)
    if len(rho) == 1:  # one ascent step is SAM (OTMDR refuses it)
        opt = SAM(model, torch.optim.SGD, rho=rho[0], bn_policy="ascent", lr=0.1)
    else:
        opt = OTMDR(model, torch.optim.SGD, rho=rho, preset="release", lr=0.1)
    expected = _release_chain(model, x, y, rho, 0.1)
    result = opt.step(ce(model), batch=(x, y))
    assert torch.isfinite(result.perturbation_norm) and float(result.perturbation_norm) > 0
    for p, e in zip(model.parameters(), expected):  # split or not, every case against the reference
        torch.testing.assert_close(p.detach(), e, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("n", range(1, 5))
def test_sam_and_particles_take_a_single_sample(n):
    for opt_factory in (lambda m: SAM(m, torch.optim.SGD, rho=0.05, lr=0.1),
                        lambda m: OTMDR(m, torch.optim.SGD, particles=2, lr=0.1)):
        model = tiny_mlp()
        x, y = data(n)
        before = [p.detach().clone() for p in model.parameters()]
        opt_factory(model).step(ce(model), batch=(x, y))
        assert any(not torch.equal(a, b.detach()) for a, b in zip(before, model.parameters()))


def test_training_with_a_last_batch_of_one_sample(tmp_path):
    """The reported crash: a training set 1 larger than a multiple of the batch size."""
    from pathlib import Path

    from otmdr.config import load_config
    from otmdr.train import prepare_run_dir, train

    demo = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
    # 227 images, 15% validation: 193 training images = 3 batches of 64 + 1
    cfg = load_config(demo, ["data.train_limit=227", "train.epochs=1", "train.progress=false"])
    summary = train(cfg, prepare_run_dir(tmp_path / "run", resume=False), log=lambda _: None)
    assert summary["history"][0]["train_loss"] > 0
