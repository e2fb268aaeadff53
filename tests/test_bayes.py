"""Mean-field Gaussian Bayesian layers and models (method.md section 4)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Normal

from otmdr.models import count_parameters, create_model
from otmdr.models.bayes import (
    BayesConv2d,
    BayesLayer,
    BayesLinear,
    bayes_layers,
    bayes_param_groups,
    bayesianize,
    fixed_sample,
    is_bayesian,
    kl_divergence,
    mean_weights,
    negative_elbo,
    posterior_mean,
    resample,
    set_sample_mode,
)

BAYES_MODELS = ["bayes-mlp", "bayes-lenet", "bayes-resnet20", "bayes-resnet10", "bayes-resnet18"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _small_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(BayesConv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Softplus(), nn.Flatten(),
                         BayesLinear(3 * 5 * 5, 4))


# ------------------------------------------------------------------------------------------ KL
@pytest.mark.parametrize("prior_std", [0.1, 0.5])
def test_closed_form_kl_matches_a_monte_carlo_estimate(prior_std):
    torch.manual_seed(0)
    layer = BayesLinear(3, 2, prior_std=prior_std, rho_init_mean=-2.0, rho_init_std=0.5).double()
    closed = layer.kl_divergence().item()
    pairs = [(layer.weight_mu, layer.weight_rho), (layer.bias_mu, layer.bias_rho)]
    prior = Normal(torch.tensor(0.0, dtype=torch.float64), torch.tensor(prior_std, dtype=torch.float64))
    samples = 200_000
    total = torch.zeros(samples, dtype=torch.float64)
    with torch.no_grad():
        for mu, rho in pairs:
            q = Normal(mu.flatten(), F.softplus(rho).flatten())
            w = q.sample((samples,))
            total += (q.log_prob(w) - prior.log_prob(w)).sum(1)
    mc, stderr = total.mean().item(), total.std().item() / math.sqrt(samples)
    assert abs(mc - closed) < 4 * stderr, (mc, closed, stderr)
    # and torch.distributions' closed form agrees to rounding
    reference = sum(torch.distributions.kl_divergence(Normal(mu, F.softplus(rho)), prior).sum()
                    for mu, rho in pairs)
    assert closed == pytest.approx(reference.item(), rel=1e-10)


def test_kl_stays_finite_where_softplus_underflows():
    layer = BayesLinear(2, 2, mu_init_std=0.0, rho_init_mean=-200.0, rho_init_std=0.0)
    kl = layer.kl_divergence()
    kl.backward()
    assert torch.isfinite(kl) and torch.isfinite(layer.weight_rho.grad).all()
    # per element log(p / sigma) with log sigma = rho: about 200 + log(0.1) for each of the 6 numbers
    assert kl.item() == pytest.approx(6 * (200 + math.log(0.1) - 0.5), rel=1e-4)


def test_model_kl_is_the_sum_over_layers_and_zero_without_bayesian_layers():
    model = create_model("bayes-lenet", in_channels=1)
    layers = list(bayes_layers(model))
    assert len(layers) == 4
    torch.testing.assert_close(kl_divergence(model), sum(layer.kl_divergence() for layer in layers))
    assert kl_divergence(nn.Linear(3, 2)).item() == 0.0 and not is_bayesian(nn.Linear(3, 2))
    assert is_bayesian(model)
    nll = torch.tensor(1.5)
    torch.testing.assert_close(negative_elbo(nll, model, kl_weight=1e-3), nll + 1e-3 * kl_divergence(model))


# ------------------------------------------------------------------------- layers and sampling
def test_zero_sigma_layers_equal_their_deterministic_counterparts():
    torch.manual_seed(0)
    x = torch.randn(5, 4, 9, 9)
    for bayes, det in [
        (BayesLinear(9, 6, rho_init_mean=-30.0), nn.Linear(9, 6)),
        (BayesConv2d(4, 6, 3, stride=2, padding=1, rho_init_mean=-30.0), nn.Conv2d(4, 6, 3, stride=2, padding=1)),
        (BayesConv2d(4, 6, (3, 1), bias=False, dilation=2, groups=2, rho_init_mean=-30.0),
         nn.Conv2d(4, 6, (3, 1), bias=False, dilation=2, groups=2)),
    ]:
        with torch.no_grad():
            det.weight.copy_(bayes.weight_mu)
            if det.bias is not None:
                det.bias.copy_(bayes.bias_mu)
        torch.testing.assert_close(bayes(x), det(x), atol=1e-6, rtol=1e-5)
        with mean_weights(bayes):
            assert torch.equal(bayes(x), det(x))


def test_each_forward_samples_afresh_and_fixed_sample_reuses_one_eps():
    model = _small_net()
    x = torch.randn(3, 2, 5, 5)
    model.eval()  # batch norm out of the way: the only randomness is the weight noise
    a, b = model(x), model(x)
    assert not torch.allclose(a, b)
    with fixed_sample(model):
        c, d = model(x), model(x)
        torch.testing.assert_close(c, d, rtol=0, atol=0)
        assert all(layer.sample_mode == "fixed" for layer in bayes_layers(model))
    assert all(layer.sample_mode == "sample" for layer in bayes_layers(model))
    assert not torch.allclose(c, model(x))
    # one sample is shared by the whole batch: a sample's output does not depend on its batch-mates
    with fixed_sample(model):
        torch.testing.assert_close(model(x)[:1], model(x[:1]))
    # new_sample=False reuses the eps of the last forward (OT-MDR's final pass); resample() redraws
    e = model(x)
    with fixed_sample(model, new_sample=False):
        torch.testing.assert_close(model(x), e, rtol=0, atol=0)
        resample(model)
        assert not torch.allclose(model(x), e)
    # fixed mode on a fresh layer draws an eps on first use
    layer = BayesLinear(3, 2)
    set_sample_mode(layer, "fixed")
    z = torch.randn(4, 3)
    torch.testing.assert_close(layer(z), layer(z), rtol=0, atol=0)
    with pytest.raises(ValueError, match="sample mode"):
        set_sample_mode(layer, "bogus")


def test_mean_weights_context_is_deterministic_and_restores_modes():
    model = _small_net().eval()
    x = torch.randn(3, 2, 5, 5)
    set_sample_mode(model, "fixed")
    with mean_weights(model):
        torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)
        reference = model(x)
    assert all(layer.sample_mode == "fixed" for layer in bayes_layers(model))
    for layer in bayes_layers(model):
        with torch.no_grad():
            layer.weight_rho.fill_(-30.0)
            layer.bias_rho.fill_(-30.0)
    torch.testing.assert_close(model(x), reference)


def test_posterior_mean_freezes_the_scales_for_sharpness_and_restores_them():
    from otmdr.eval.sharpness import top_hessian_eigenvalue

    model = _small_net().eval()
    x, y = torch.randn(6, 2, 5, 5), torch.randint(0, 4, (6,))
    scales = [p for n, p in model.named_parameters() if n.endswith("_rho")]
    model[4].bias_rho.requires_grad_(False)  # a user's own frozen scale stays frozen afterwards
    with posterior_mean(model):
        assert not any(p.requires_grad for p in scales)
        torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)
        with mean_weights(model):
            reference = model(x)
        torch.testing.assert_close(model(x), reference, rtol=0, atol=0)
        assert top_hessian_eigenvalue(model, [(x, y)], F.cross_entropy, iterations=5) > 0
    assert [p.requires_grad for p in scales] == [True, True, True, False]
    assert all(layer.sample_mode == "sample" for layer in bayes_layers(model))
    assert not torch.equal(model(x), model(x))  # sampling again


def test_gradients_reach_means_and_scales_and_eps_follows_the_module():
    model = _small_net()
    x = torch.randn(3, 2, 5, 5)
    loss = F.cross_entropy(model(x), torch.tensor([0, 1, 2])) + 1e-3 * kl_divergence(model)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    model.double()
    layer = next(bayes_layers(model))
    assert layer.weight_eps.dtype == torch.float64 and layer.weight_mu.dtype == torch.float64
    with fixed_sample(model, new_sample=False):
        assert model(x.double()).dtype == torch.float64
    # eps is not state: checkpoints hold the four parameters per layer (and batch norm) only
    assert not any(k.endswith("_eps") for k in model.state_dict())
    clone = copy.deepcopy(model)
    assert torch.equal(next(bayes_layers(clone)).weight_eps, layer.weight_eps)


def test_release_initialisation_statistics():
    torch.manual_seed(0)
    layer = BayesLinear(1000, 500)
    assert layer.weight_mu.std().item() == pytest.approx(0.1, rel=0.01)
    assert layer.weight_mu.mean().item() == pytest.approx(0.0, abs=1e-3)
    assert layer.weight_rho.mean().item() == pytest.approx(-5.0, abs=1e-3)
    assert layer.weight_rho.std().item() == pytest.approx(0.1, rel=0.01)
    assert layer.bias_mu.std().item() == pytest.approx(0.1, rel=0.15)
    assert layer.bias_rho.mean().item() == pytest.approx(-5.0, abs=0.02)
    conv = BayesConv2d(64, 64, 3, prior_std=0.2, mu_init_std=0.05, rho_init_mean=-4.0)
    assert conv.weight_mu.shape == (64, 64, 3, 3) and conv.prior_std == 0.2
    assert conv.weight_mu.std().item() == pytest.approx(0.05, rel=0.03)
    assert conv.weight_rho.mean().item() == pytest.approx(-4.0, abs=0.01)


# -------------------------------------------------------------------------------- param groups
def test_param_groups_perturb_the_means_and_train_the_scales():
    model = create_model("bayes-resnet20")
    groups = bayes_param_groups(model, lr=1e-3, scale_group_options={"weight_decay": 0.0})
    assert [g["perturb"] for g in groups] == [True, False]
    assert all(g["lr"] == 1e-3 for g in groups) and groups[1]["weight_decay"] == 0.0
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters()) and len(set(ids)) == len(ids)
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)].rsplit(".", 1)[1] for p in groups[1]["params"]} == {"weight_rho", "bias_rho"}
    means = {names[id(p)].rsplit(".", 1)[1] for p in groups[0]["params"]}
    assert means == {"weight_mu", "bias_mu", "weight", "bias"}  # fc bias, batch norm
    assert all(not names[id(p)].endswith("_rho") for p in groups[0]["params"])
    rhos = [p for layer in bayes_layers(model) for p in (layer.weight_rho, layer.bias_rho) if p is not None]
    assert {id(p) for p in rhos} == {id(p) for p in groups[1]["params"]}
    assert any(n.endswith("fc.bias_rho") for n in names.values())
    # the groups build an optimizer; a deterministic model gives a single perturbed group
    torch.optim.Adam(groups)
    assert [g["perturb"] for g in bayes_param_groups(nn.Linear(2, 2))] == [True]
    with pytest.raises(ValueError):
        bayes_param_groups(model, perturb=False)


# -------------------------------------------------------------------------------------- models
@pytest.mark.parametrize("name", BAYES_MODELS)
def test_bayesian_models_map_mnist_and_cifar_batches_to_logits(name):
    torch.manual_seed(0)
    for in_channels, size in [(1, 28), (3, 32)]:
        options = {"input_size": size} if name == "bayes-mlp" else {}
        model = create_model(name, num_classes=7, in_channels=in_channels, **options)
        assert not any(isinstance(m, (nn.Linear, nn.Conv2d)) for m in model.modules())
        deterministic = create_model(name.removeprefix("bayes-"), num_classes=7, in_channels=in_channels, **options)
        weights = sum(p.numel() for m in deterministic.modules() if isinstance(m, (nn.Linear, nn.Conv2d))
                      for p in m.parameters(recurse=False))
        assert count_parameters(model) == count_parameters(deterministic) + weights
        with torch.no_grad():
            out = model(torch.randn(2, in_channels, size, size))
        assert out.shape == (2, 7) and torch.isfinite(out).all()


def test_bayesian_model_options():
    mlp = create_model("bayes-mlp", in_channels=1, hidden=(32,), prior_std=0.2, rho_init_mean=-3.0)
    assert [type(m).__name__ for m in mlp.net] == ["Flatten", "BayesLinear", "Softplus", "BayesLinear"]
    assert all(layer.prior_std == 0.2 for layer in bayes_layers(mlp))
    assert mlp.net[1].weight_rho.mean().item() == pytest.approx(-3.0, abs=0.02)
    relu = create_model("bayes-mlp", in_channels=1, hidden=(32,), activation="relu")
    assert isinstance(relu.net[2], nn.ReLU)
    lenet = create_model("bayes-lenet", activation="softplus")
    assert not any(isinstance(m, nn.ReLU) for m in lenet.modules())
    assert any(isinstance(m, nn.Softplus) for m in lenet.modules())
    assert any(isinstance(m, nn.ReLU) for m in create_model("bayes-resnet20").modules())  # CNNs: ReLU by default
    with pytest.raises(TypeError, match="prior_sd"):
        create_model("bayes-lenet", prior_sd=0.1)
    with pytest.raises(ValueError, match="activation"):
        create_model("bayes-lenet", activation="tanh")


def test_bayesianize_keeps_shapes_and_refuses_what_it_cannot_convert():
    torch.manual_seed(0)
    model = bayesianize(nn.Sequential(nn.Conv2d(3, 8, 5, stride=2, padding=2, bias=False), nn.Flatten(),
                                      nn.Linear(8 * 4 * 4, 3)).double(), prior_std=0.3)
    conv, _, fc = model
    assert isinstance(conv, BayesConv2d) and conv.weight_mu.shape == (8, 3, 5, 5) and conv.bias_mu is None
    assert conv.stride == (2, 2) and conv.padding == (2, 2) and conv.weight_mu.dtype == torch.float64
    assert isinstance(fc, BayesLinear) and fc.bias_mu.shape == (3,) and fc.prior_std == 0.3
    assert model(torch.randn(2, 3, 8, 8, dtype=torch.float64)).shape == (2, 3)
    assert isinstance(bayesianize(nn.Linear(2, 2)), BayesLayer)
    with pytest.raises(TypeError, match="Conv1d"):
        bayesianize(nn.Sequential(nn.Conv1d(2, 2, 3)))
    with pytest.raises(ValueError, match="padding"):
        bayesianize(nn.Conv2d(2, 2, 3, padding="same"))
