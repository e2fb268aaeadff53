"""Options that reproduce the authors' release where it differs from our defaults, each checked
against a literal transcription of the release's pseudo-code for that case (method.md sections 2, 4)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from otmdr import OTMDR
from conftest import ce, data, norm, tiny_mlp


def _grads(model, theta, x, y):
    names = [n for n, _ in model.named_parameters()]
    theta = [t.detach().requires_grad_(True) for t in theta]
    loss = F.cross_entropy(functional_call(model, dict(zip(names, theta)), (x,)), y)
    return [g.detach() for g in torch.autograd.grad(loss, theta)]


def test_multi_particle_mode_1_1_sums_the_chain_and_averages_the_particles():
    """Release, K > 1, mode 1.1: each particle's 2nd ascent step moves along g1 + g2 (divided by
    ||g2||); only the K final gradients are averaged."""
    model, hand = tiny_mlp(), tiny_mlp()
    opt = OTMDR(model, torch.optim.SGD, preset="release", particles=2, reduce="sum", particle_reduce="mean",
                seed=7, lr=0.1)
    generator = torch.Generator().manual_seed(7)
    for step in range(3):
        x, y = data(16, seed=step)
        opt.step(ce(model), batch=(x, y))
        theta0 = [p.detach().clone() for p in hand.parameters()]
        finals = []
        for k in range(2):
            perm = torch.arange(16) if k == 0 else torch.randperm(16, generator=generator)
            xp, yp = x[perm], y[perm]
            g1 = _grads(hand, theta0, xp[:8], yp[:8])
            theta = [t + 0.05 * g / (norm(g1) + 1e-12) for t, g in zip(theta0, g1)]
            g2 = _grads(hand, theta, xp[8:], yp[8:])
            theta = [t + 0.1 * (a + b) / (norm(g2) + 1e-12) for t, a, b in zip(theta, g1, g2)]
            finals.append(_grads(hand, theta, x, y))
        with torch.no_grad():
            for p, t0, a, b in zip(hand.parameters(), theta0, *finals):
                p.copy_(t0 - 0.1 * (a + b) / 2)
    for a, b in zip(model.parameters(), hand.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_reduce_mean_still_halves_both_unless_particles_are_set_apart():
    x, y = data(16)
    moved = {}
    for name, options in {"mean": {"reduce": "mean"}, "mean/mean": {"reduce": "mean", "particle_reduce": "mean"},
                          "sum/mean": {"reduce": "sum", "particle_reduce": "mean"}}.items():
        model = tiny_mlp()
        OTMDR(model, torch.optim.SGD, rho=(0.05, 0.1), particles=2, seed=1, lr=0.1, **options).step(
            ce(model), batch=(x, y))
        moved[name] = [p.detach().clone() for p in model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(moved["mean"], moved["mean/mean"]))
    assert not all(torch.equal(a, b) for a, b in zip(moved["mean"], moved["sum/mean"]))
    with pytest.raises(ValueError, match="particle_reduce"):
        OTMDR(tiny_mlp(), torch.optim.SGD, particle_reduce="max", lr=0.1)


@pytest.mark.parametrize("normalize", ["step", "merged"])
def test_a_trained_unperturbed_group_can_count_in_the_norm(normalize):
    """Release BNN step: the norm scaling each ascent step includes the gradients of the sigma
    parameters (group B here: trained, never moved) while only the means (group A) move."""
    model, hand = tiny_mlp(), tiny_mlp()
    params = list(model.parameters())
    opt = OTMDR([{"params": params[:2]}, {"params": params[2:], "perturb": False, "in_norm": True}],
                torch.optim.SGD, rho=(0.05, 0.1), normalize=normalize, lr=0.1, model=model)
    x, y = data(16)
    opt.step(ce(model), batch=(x, y))
    theta0 = [p.detach().clone() for p in hand.parameters()]
    g1 = _grads(hand, theta0, x[:8], y[:8])
    theta = [t + 0.05 * g / (norm(g1) + 1e-12) if i < 2 else t for i, (t, g) in enumerate(zip(theta0, g1))]
    g2 = _grads(hand, theta, x[8:], y[8:])
    merged = [a + b for a, b in zip(g1, g2)]
    denominator = norm(g2) if normalize == "step" else norm(merged)  # over ALL parameters, A and B
    theta = [t + 0.1 * d / (denominator + 1e-12) if i < 2 else t for i, (t, d) in enumerate(zip(theta, merged))]
    g = _grads(hand, theta, x, y)
    for p, t0, gp in zip(model.parameters(), theta0, g):
        torch.testing.assert_close(p.detach(), t0 - 0.1 * gp, rtol=1e-10, atol=1e-12)
    # the default leaves B out of the norm: a different step
    other = tiny_mlp()
    ps = list(other.parameters())
    OTMDR([{"params": ps[:2]}, {"params": ps[2:], "perturb": False}], torch.optim.SGD, rho=(0.05, 0.1),
          normalize=normalize, lr=0.1, model=other).step(ce(other), batch=(x, y))
    assert not torch.allclose(ps[0], params[0])


def test_paper_bnn_configs_follow_the_release():
    from pathlib import Path

    from otmdr.config import load_config

    paths = sorted((Path(__file__).resolve().parents[1] / "configs").glob("paper-bnn-*.yaml"))
    assert len(paths) == 4
    for path in paths:
        cfg = load_config(path)
        assert cfg.otmdr.bn_policy == "clean" and cfg.bayes.sigma_in_norm
        assert "bn_policy clean" in path.read_text() and "sigma_in_norm" in path.read_text()


def test_sigma_in_norm_reaches_the_optimizer_groups():
    from pathlib import Path

    from otmdr.config import load_config
    from otmdr.data import get_spec
    from otmdr.train.builders import build_model, build_optimizer

    demo = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
    for flag in (False, True):
        cfg = load_config(demo, ["model.name=bayes-mlp", f"bayes.sigma_in_norm={str(flag).lower()}"])
        opt = build_optimizer(cfg, build_model(cfg, get_spec("digits")))
        frozen = [g for g in opt.param_groups if not g["perturb"]]
        assert frozen and all(g["in_norm"] is flag for g in frozen)


def test_an_in_norm_parameter_without_gradient_does_not_shift_the_others():
    """Adaptive scaling pairs each in-norm gradient with its own parameter, also when a tensor of
    the group got no gradient (here one the loss never uses)."""
    x, y = data(16)
    results = []
    for with_unused in (False, True):
        model = tiny_mlp()
        params = list(model.parameters())
        unused = [torch.nn.Parameter(torch.full((3,), 7.0, dtype=params[0].dtype))] if with_unused else []
        frozen = unused + params[2:]
        opt = OTMDR([{"params": params[:2]}, {"params": frozen, "perturb": False, "in_norm": True}],
                    torch.optim.SGD, rho=(0.05, 0.1), adaptive=True, adaptive_eta=0.01, lr=0.1, model=model)
        opt.step(ce(model), batch=(x, y))
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_presets_fill_only_what_is_not_given():
    """The default preset (from the tuned studies) and the release preset differ in exactly rho,
    normalize and bn_policy; an explicit value beats either; SAM has no preset."""
    from otmdr import SAM
    from otmdr.optim import PRESETS

    default = OTMDR(tiny_mlp(), torch.optim.SGD, lr=0.1).config
    release = OTMDR(tiny_mlp(), torch.optim.SGD, preset="release", lr=0.1).config
    assert (default.rho, default.normalize, default.bn_policy) == (
        PRESETS["default"].rho, PRESETS["default"].normalize, PRESETS["default"].bn_policy)
    assert (release.rho, release.normalize, release.bn_policy) == ((0.05, 0.1), "step", "ascent")
    changed = {f for f in default.__dataclass_fields__ if getattr(default, f) != getattr(release, f)}
    assert changed == {"rho", "normalize", "bn_policy"}
    mixed = OTMDR(tiny_mlp(), torch.optim.SGD, preset="release", normalize="merged", rho=(0.05, 0.1), lr=0.1).config
    assert (mixed.rho, mixed.normalize, mixed.bn_policy) == ((0.05, 0.1), "merged", "ascent")
    with pytest.raises(ValueError, match="unknown preset 'paper': choose one of default, release"):
        OTMDR(tiny_mlp(), torch.optim.SGD, preset="paper", lr=0.1)
    with pytest.raises(ValueError, match="preset is an OT-MDR option"):
        SAM(tiny_mlp(), torch.optim.SGD, preset="release", lr=0.1)


def test_default_radius_is_bounded_by_the_sum_of_rho_where_the_release_is_not():
    """Merged normalisation: ||theta~ - theta|| <= rho1 + rho2 on every step, however small the
    second half-batch's gradient; the release's step 2 is divided by ||g2|| and overshoots when the
    second half is fitted (here: the second half repeats one sample the model has memorised)."""
    torch.manual_seed(0)
    model = tiny_mlp()
    x, y = data(16, seed=3)
    x[8:], y[8:] = x[:1], y[:1]
    fit = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(100):  # memorise that sample: its gradient, the second half's, is nearly zero
        fit.zero_grad()
        F.cross_entropy(model(x[:1]), y[:1]).backward()
        fit.step()
    x[:8], y[:8] = data(8, seed=4)  # the first half: fresh samples, a large gradient
    for preset, bounded in (("default", True), ("release", False)):
        opt = OTMDR(copy.deepcopy(model), torch.optim.SGD, rho=(0.05, 0.1), preset=preset, lr=0.0)
        radius = float(opt.step(ce(opt.model), batch=(x, y)).perturbation_norm)
        assert (radius <= 0.15 + 1e-6) == bounded, (preset, radius)


def test_config_preset_is_applied_once_and_written_into_the_saved_values():
    from otmdr.config import comparable_config, config_from_dict, config_to_dict, load_config

    release = load_config(None, ["otmdr.preset=release", "otmdr.bn_policy=clean"])
    assert (release.otmdr.rho, release.otmdr.normalize, release.otmdr.bn_policy) == ([0.05, 0.1], "step", "clean")
    saved = config_to_dict(release)  # what a run folder's config.yaml holds
    reloaded = config_from_dict({**saved, "otmdr": {k: v for k, v in saved["otmdr"].items() if k != "preset"}})
    assert (reloaded.otmdr.preset, reloaded.otmdr.normalize) == ("default", "step")
    assert comparable_config(saved) == comparable_config(config_to_dict(reloaded))  # same run either way
