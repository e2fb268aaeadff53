"""Step equivalences: base optimizer, hand-written SAM, pytorch-optimizer's SAM/ASAM, and the
OT-MDR chain of method.md for every combination of its options."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F

from otmdr import ASAM, OTMDR, SAM
from conftest import ce, data, grad_at, norm, reference_final_gradient, require_oracle, tiny_mlp


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("make", [
    lambda m: OTMDR(m, torch.optim.SGD, rho=(0.0, 0.0), lr=0.1, momentum=0.9, weight_decay=5e-4),
    lambda m: SAM(m, torch.optim.SGD, rho=0.0, lr=0.1, momentum=0.9, weight_decay=5e-4),
])
@pytest.mark.parametrize("foreach", [True, False])
def test_rho_zero_is_the_base_optimizer_bit_for_bit(make, foreach):
    model, twin = tiny_mlp(dtype=torch.float32), tiny_mlp(dtype=torch.float32)
    opt = make(model)
    opt.foreach = foreach
    base = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    for step in range(5):
        x, y = data(32, seed=step, dtype=torch.float32)
        opt.step(ce(model), batch=(x, y))
        base.zero_grad()
        F.cross_entropy(twin(x), y).backward()
        base.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_sam_equals_hand_written_step_and_pytorch_optimizer():
    from pytorch_optimizer import SAM as OracleSAM

    ours, hand, oracle = tiny_mlp(), tiny_mlp(), tiny_mlp()
    opt = SAM(ours, torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    oracle_opt = OracleSAM(oracle.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    hand_opt = torch.optim.SGD(hand.parameters(), lr=0.1, momentum=0.9)
    for step in range(6):
        x, y = data(24, seed=step)
        result = opt.step(ce(ours), batch=(x, y))

        F.cross_entropy(oracle(x), y).backward()
        oracle_opt.first_step(zero_grad=True)
        F.cross_entropy(oracle(x), y).backward()
        oracle_opt.second_step(zero_grad=True)

        theta0 = _params(hand)
        g = grad_at(hand, theta0, x, y)
        e = [0.05 * t / (norm(g) + 1e-12) for t in g]
        g_perturbed = grad_at(hand, [a + b for a, b in zip(theta0, e)], x, y)
        for p, gp in zip(hand.parameters(), g_perturbed):
            p.grad = gp
        hand_opt.step()
        torch.testing.assert_close(result.perturbation_norm, torch.tensor(0.05, dtype=torch.float64), rtol=1e-9, atol=0)

    for a, b, c in zip(ours.parameters(), hand.parameters(), oracle.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        # pytorch-optimizer accumulates the gradient norm in float32: float32 tolerance
        torch.testing.assert_close(a, c, rtol=1e-6, atol=1e-8)


def test_asam_equals_pytorch_optimizer_adaptive_sam():
    from pytorch_optimizer import SAM as OracleSAM

    ours, oracle = tiny_mlp(), tiny_mlp()
    opt = ASAM(ours, torch.optim.SGD, rho=0.5, adaptive_eta=0.0, lr=0.05)
    oracle_opt = OracleSAM(oracle.parameters(), torch.optim.SGD, rho=0.5, adaptive=True, lr=0.05)
    for step in range(6):
        x, y = data(24, seed=step)
        opt.step(ce(ours), batch=(x, y))
        F.cross_entropy(oracle(x), y).backward()
        oracle_opt.first_step(zero_grad=True)
        F.cross_entropy(oracle(x), y).backward()
        oracle_opt.second_step(zero_grad=True)
    for a, c in zip(ours.parameters(), oracle.parameters()):  # |T|^2 vs T*T: rounding only
        torch.testing.assert_close(a, c, rtol=1e-8, atol=1e-10)


def test_asam_eta_scaling_matches_hand_written_formula():
    model, hand = tiny_mlp(), tiny_mlp()
    opt = ASAM(model, torch.optim.SGD, rho=0.5, adaptive_eta=0.01, lr=0.05)
    x, y = data(24)
    opt.step(ce(model), batch=(x, y))
    theta0 = _params(hand)
    g = grad_at(hand, theta0, x, y)
    t = [p.abs() + 0.01 for p in theta0]
    scale = 0.5 / (norm([a * b for a, b in zip(t, g)]) + 1e-12)
    theta = [p + scale * a * a * b for p, a, b in zip(theta0, t, g)]
    g_final = grad_at(hand, theta, x, y)
    for p, p0, gf in zip(model.parameters(), theta0, g_final):
        torch.testing.assert_close(p, p0 - 0.05 * gf, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("merge,normalize,reduce",
                         list(itertools.product([True, False], ["step", "merged"], ["sum", "mean"])))
def test_two_step_chain_equals_method_md_pseudo_code(merge, normalize, reduce):
    model, hand = tiny_mlp(), tiny_mlp()
    rho = (0.05, 0.1)
    opt = OTMDR(model, torch.optim.SGD, rho=rho, merge=merge, normalize=normalize, reduce=reduce, lr=0.1)
    for step in range(4):
        x, y = data(18, seed=step)
        opt.step(ce(model), batch=(x, y))
        theta0 = _params(hand)
        g = reference_final_gradient(hand, theta0, x, y, rho=rho, merge=merge, normalize=normalize, reduce=reduce)
        with torch.no_grad():
            for p, gp in zip(hand.parameters(), g):
                p.sub_(0.1 * gp)
    for a, b in zip(model.parameters(), hand.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_three_ascent_steps_with_custom_split():
    """Any number of steps, each with its own radius and fraction (here 1/4, 1/4, 1/2)."""
    model, hand = tiny_mlp(), tiny_mlp()
    opt = OTMDR(model, torch.optim.SGD, rho=(0.02, 0.05, 0.1), split=(0.25, 0.25, 0.5), preset="release", lr=0.1)
    x, y = data(16)
    opt.step(ce(model), batch=(x, y))
    theta = _params(hand)
    d = None
    for r, (lo, hi) in zip((0.02, 0.05, 0.1), ((0, 4), (4, 8), (8, 16))):
        g = grad_at(hand, theta, x[lo:hi], y[lo:hi])
        d = g if d is None else [a + b for a, b in zip(d, g)]
        theta = [t + r * u / (norm(g) + 1e-12) for t, u in zip(theta, d)]
    g = grad_at(hand, theta, x, y)
    for p, p0, gp in zip(model.parameters(), _params(hand), g):
        torch.testing.assert_close(p, p0 - 0.1 * gp, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("reduce", ["sum", "mean"])
def test_two_particles_equal_reference_with_the_same_random_split(reduce):
    model, hand = tiny_mlp(), tiny_mlp()
    opt = OTMDR(model, torch.optim.SGD, rho=(0.05, 0.1), particles=2, reduce=reduce, seed=123, preset="release",
                lr=0.1)
    generator = torch.Generator().manual_seed(123)
    for step in range(3):
        x, y = data(16, seed=step)
        opt.step(ce(model), batch=(x, y))
        perm = torch.randperm(16, generator=generator)
        g = reference_final_gradient(hand, _params(hand), x, y, rho=(0.05, 0.1), reduce=reduce,
                                     particles_perms=(None, perm))
        with torch.no_grad():
            for p, gp in zip(hand.parameters(), g):
                p.sub_(0.1 * gp)
    for a, b in zip(model.parameters(), hand.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_one_particle_step_equals_the_primitives_loop():
    model, manual = tiny_mlp(), tiny_mlp()
    opt = OTMDR(model, torch.optim.SGD, rho=(0.05, 0.1), particles=1, lr=0.1, momentum=0.9)
    opt_manual = OTMDR(manual, torch.optim.SGD, rho=(0.05, 0.1), lr=0.1, momentum=0.9)
    for step in range(4):
        x, y = data(16, seed=step)
        result = opt.step(ce(model), batch=(x, y))
        opt_manual.zero_grad()
        F.cross_entropy(manual(x[:8]), y[:8]).backward()
        opt_manual.perturb()
        F.cross_entropy(manual(x[8:]), y[8:]).backward()
        opt_manual.perturb()
        F.cross_entropy(manual(x), y).backward()
        opt_manual.descend()
        assert 0.0 < float(result.perturbation_norm) <= 0.05 + 2 * 0.1 + 1e-9
    for a, b in zip(model.parameters(), manual.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("options", [
    {}, {"merge": False}, {"normalize": "merged", "reduce": "mean"}, {"adaptive": True, "adaptive_eta": 0.01},
    {"noise_std": 0.01}, {"particles": 2}, {"ascent_weight_decay": True, "weight_decay": 0.1},
])
def test_foreach_and_single_tensor_paths_agree(options):
    a, b = tiny_mlp(), tiny_mlp()
    opt_a = OTMDR(a, torch.optim.SGD, lr=0.1, seed=5, foreach=True, **options)
    opt_b = OTMDR(b, torch.optim.SGD, lr=0.1, seed=5, foreach=False, **options)
    for step in range(3):
        x, y = data(16, seed=step)
        ra = opt_a.step(ce(a), batch=(x, y))
        rb = opt_b.step(ce(b), batch=(x, y))
        torch.testing.assert_close(ra.perturbation_norm, rb.perturbation_norm)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def test_measured_radius_matches_the_geometry():
    model = tiny_mlp()
    x, y = data(16)
    merged = OTMDR(copy.deepcopy(model), torch.optim.SGD, rho=(0.05, 0.1), normalize="merged", lr=0.0)
    released = OTMDR(copy.deepcopy(model), torch.optim.SGD, preset="release", lr=0.0)
    r_merged = merged.step(ce(merged.model), batch=(x, y)).perturbation_norm
    r_released = released.step(ce(released.model), batch=(x, y)).perturbation_norm
    assert float(r_merged) <= 0.15 + 1e-9           # each step has length rho_i exactly
    assert float(r_released) <= 0.05 + 2 * 0.1 + 1e-9  # step 2 may reach 2 * rho2
    assert float(r_released) > float(r_merged)


def test_weight_decay_enters_the_ascent_only_when_asked():
    x, y = data(16)
    results = {}
    for flag in (False, True):
        model = tiny_mlp()
        opt = SAM(model, torch.optim.SGD, rho=0.05, lr=0.1, weight_decay=0.5, ascent_weight_decay=flag)
        opt.step(ce(model), batch=(x, y))
        results[flag] = _params(model)
    hand = tiny_mlp()
    theta0 = _params(hand)
    g = grad_at(hand, theta0, x, y)
    g = [t + 0.5 * p for t, p in zip(g, theta0)]
    theta = [p + 0.05 * t / (norm(g) + 1e-12) for p, t in zip(theta0, g)]
    g_final = grad_at(hand, theta, x, y)
    expected = [p - 0.1 * (gf + 0.5 * p) for p, gf in zip(theta0, g_final)]
    for got, want in zip(results[True], expected):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert any(not torch.allclose(a, b) for a, b in zip(results[False], results[True]))


def test_first_and_second_step_follow_davda54_semantics():
    """The API most SAM code uses (davda54/sam, also pytorch-optimizer's SAM): backward,
    first_step, backward at the neighbour, second_step; checked against pytorch-optimizer."""
    pytorch_optimizer = require_oracle("pytorch_optimizer", "the davda54-style SAM reference")
    ours, theirs = tiny_mlp(dtype=torch.float32), tiny_mlp(dtype=torch.float32)
    opt = SAM(ours.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    ref = pytorch_optimizer.SAM(theirs.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    for step in range(4):
        x, y = data(16, seed=step, dtype=torch.float32)
        for model, optimizer in ((ours, opt), (theirs, ref)):
            F.cross_entropy(model(x), y).backward()
            optimizer.first_step(zero_grad=True)
            F.cross_entropy(model(x), y).backward()
            optimizer.second_step(zero_grad=True)
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert all(p.grad is None or not p.grad.any() for p in ours.parameters())


def test_first_step_without_zero_grad_keeps_the_ascent_gradient_like_davda54():
    model = tiny_mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    x, y = data(16)
    F.cross_entropy(model(x), y).backward()
    before = [p.grad.clone() for p in model.parameters()]
    opt.first_step(zero_grad=False)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), before))


def test_a_backward_before_step_closure_is_reported():
    model = tiny_mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    x, y = data(16)

    def closure():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step(closure)  # the closure pattern alone: fine
        opt.step(closure)  # the final gradient our own step left behind does not count
    closure()  # the davda54 pattern: backward, then step(closure)
    with pytest.warns(UserWarning, match="found gradients computed before the call"):
        opt.step(closure)


@pytest.mark.parametrize("make", [
    lambda m: SAM(m, torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9),
    lambda m: OTMDR(m, torch.optim.SGD, rho=(0.05, 0.1), lr=0.1, momentum=0.9),
    lambda m: OTMDR(m, torch.optim.SGD, rho=(0.05, 0.1), particles=2, seed=3, lr=0.1),
])
@pytest.mark.parametrize("n, k", [(16, 2), (15, 2), (16, 3)])
def test_micro_batches_accumulate_to_one_step_on_their_union(make, n, k):
    whole, accumulated = tiny_mlp(), tiny_mlp()
    a, b = make(whole), make(accumulated)
    for step in range(3):
        x, y = data(n, seed=step)
        ra = a.step(ce(whole), batch=(x, y))
        rb = b.step(ce(accumulated), batch=(x, y), micro_batches=k)
        torch.testing.assert_close(ra.loss, rb.loss)
    for p, q in zip(whole.parameters(), accumulated.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def test_micro_batches_keep_the_extra_outputs_and_refuse_bad_values():
    model = tiny_mlp()
    opt = OTMDR(model, torch.optim.SGD, lr=0.1)
    x, y = data(16)

    def loss_fn(b):
        logits = model(b[0])
        return F.cross_entropy(logits, b[1]), logits

    assert opt.step(loss_fn, batch=(x, y), micro_batches=4).outputs.shape == (8, 4)  # the first half, whole
    with pytest.raises(ValueError, match="micro_batches must be an integer"):
        opt.step(loss_fn, batch=(x, y), micro_batches=0)
    with pytest.raises(ValueError, match="one-call form"):
        opt.step(lambda: loss_fn((x, y))[0], micro_batches=2)
