"""Each kernel of otmdr.optim.functional against the formula written out on flat vectors, on
both the fused (foreach) and the per-tensor path."""

from __future__ import annotations

import pytest
import torch

from otmdr.optim import functional as F

SHAPES = [(3, 4), (5,), (2, 3, 2)]


def tensors(seed: int, dtype: torch.dtype = torch.float64) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g, dtype=dtype) for shape in SHAPES]


def flat(ts: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in ts])


@pytest.fixture(params=[True, False], ids=["foreach", "per-tensor"])
def foreach(request):
    return request.param


def test_global_norm_and_distance(foreach):
    a, b = tensors(0), tensors(1)
    assert torch.allclose(F.global_norm(a, foreach=foreach), flat(a).norm())
    assert torch.allclose(F.distance(a, b, foreach=foreach), (flat(a) - flat(b)).norm())
    half = [t.half() for t in a]  # reduced in float32: no overflow at 65504
    big = [t * 300 for t in half]
    assert torch.isfinite(F.global_norm(big, foreach=foreach))


def test_copy_add_zero_merge(foreach):
    a, b = tensors(0), tensors(1)
    dst = [torch.empty_like(t) for t in a]
    F.copy_(dst, a, foreach=foreach)
    assert torch.equal(flat(dst), flat(a))
    F.add_(dst, b, alpha=-2.0, foreach=foreach)
    assert torch.allclose(flat(dst), flat(a) - 2 * flat(b))
    F.merge_(dst, b, first=True, foreach=foreach)
    assert torch.equal(flat(dst), flat(b))
    F.merge_(dst, a, first=False, foreach=foreach)
    assert torch.allclose(flat(dst), flat(a) + flat(b))
    F.zero_(dst, foreach=foreach)
    assert not flat(dst).any()


def test_adaptive_scaling_and_ascent_norm(foreach):
    params, source, extra = tensors(0), tensors(1), tensors(2)[:1]
    scaling = F.adaptive_scaling(params, 0.1, foreach=foreach)
    assert torch.allclose(flat(scaling), flat(params).abs() + 0.1)
    norm = F.ascent_norm(source, scaling=scaling, extra=extra, foreach=foreach)
    expected = torch.sqrt(((flat(scaling) * flat(source)) ** 2).sum() + (flat(extra) ** 2).sum())
    assert torch.allclose(norm, expected)
    assert torch.allclose(F.ascent_norm(source, foreach=foreach), flat(source).norm())


def test_step_scale_is_zero_when_not_finite():
    norm = torch.tensor(4.0, dtype=torch.float64)
    assert float(F.step_scale(0.2, 0.5, norm, 1e-12)) == pytest.approx(0.1 / 4.0)
    for bad in (float("nan"), float("inf")):
        assert float(F.step_scale(0.2, 1.0, torch.tensor(bad), 1e-12)) == 0.0
    assert float(F.step_scale(0.2, 1.0, torch.tensor(0.0), 1e-12)) == pytest.approx(0.2 / 1e-12)


def test_move_builds_the_move_in_the_scratch_buffers(foreach):
    params, directions, scaling = tensors(0), tensors(1), [t.abs() + 0.1 for t in tensors(2)]
    start = flat(params).clone()
    moves = [torch.zeros_like(p) for p in params]
    scale = torch.tensor(0.3, dtype=torch.float64)
    F.move_(params, moves, scale, directions=directions, scaling=scaling, rho_scales=[1.0, 2.0, 0.5],
            foreach=foreach)
    factors = torch.cat([torch.full((t.numel(),), f, dtype=torch.float64) for t, f in zip(moves, [1.0, 2.0, 0.5])])
    expected_move = 0.3 * flat(scaling) ** 2 * flat(directions) * factors
    assert torch.allclose(flat(moves), expected_move)
    assert torch.allclose(flat(params), start + expected_move)


@pytest.mark.parametrize("normalize", ["step", "merged"])
@pytest.mark.parametrize("adaptive", [False, True])
def test_ascent_move_composes_the_kernels(foreach, normalize, adaptive):
    """Two merged ascent steps (reduce "mean") against the formula of method.md section 2."""
    params = tensors(0)
    theta = flat(params).clone()
    directions = [torch.empty_like(p) for p in params]
    total = torch.zeros_like(theta)
    for i, rho in enumerate((0.05, 0.1)):
        grads = tensors(10 + i)
        g = flat(grads).clone()
        total += g
        weight = 1.0 / (i + 1)
        d = weight * total
        t = theta.abs() + 0.01 if adaptive else torch.ones_like(theta)
        source = total if normalize == "merged" else g
        norm = (t * source).norm() * (weight if normalize == "merged" else 1.0)
        theta = theta + rho * t * t * d / (norm + 1e-12)
        got = F.ascent_move_(params, grads, directions, first=i == 0, rho=rho, weight=weight, normalize=normalize,
                             adaptive=adaptive, adaptive_eta=0.01, foreach=foreach)
        assert torch.allclose(got, norm)
        assert torch.allclose(flat(params), theta)


def test_add_noise_is_the_same_draw_on_both_paths():
    a, b = tensors(0), tensors(0)
    F.add_noise_(a, 0.1, torch.Generator().manual_seed(3), foreach=True)
    F.add_noise_(b, 0.1, torch.Generator().manual_seed(3), foreach=False)
    assert torch.equal(flat(a), flat(b))
    expected = flat(tensors(0)) + 0.1 * torch.randn(flat(a).numel(), generator=torch.Generator().manual_seed(3),
                                                    dtype=torch.float64)
    assert torch.allclose(flat(a), expected)
