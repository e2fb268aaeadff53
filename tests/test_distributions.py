"""Distributions of models under the optimizers and the pipeline: ensemble regimes and BNNs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from otmdr import OTMDR
from otmdr.config import load_config
from otmdr.models import create_model
from otmdr.models.bayes import bayes_param_groups, fixed_sample
from otmdr.models.ensemble import Ensemble, member_param_groups
from otmdr.train import prepare_run_dir, train
from conftest import data

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def _member(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 4)).double()


def _joint(ensemble):
    return lambda b: F.cross_entropy(ensemble(b[0]), b[1])


def _per_member(ensemble):
    return lambda b: sum(F.cross_entropy(m, b[1]) for m in ensemble.member_logits(b[0]))


@pytest.mark.parametrize("regime", ["joint", "per-member"])
def test_one_member_ensemble_reduces_to_the_single_model(regime):
    single, ensemble = _member(0), Ensemble([_member(0)])
    groups = member_param_groups(ensemble) if regime == "per-member" else ensemble.parameters()
    opt_e = OTMDR(groups, torch.optim.SGD, lr=0.1, momentum=0.9, model=ensemble)
    opt_s = OTMDR(single, torch.optim.SGD, lr=0.1, momentum=0.9)
    loss_e = _joint(ensemble) if regime == "joint" else _per_member(ensemble)
    for step in range(4):
        x, y = data(16, seed=step)
        opt_e.step(loss_e, batch=(x, y))
        opt_s.step(lambda b: F.cross_entropy(single(b[0]), b[1]), batch=(x, y))
    for p, q in zip(ensemble.members[0].parameters(), single.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-11)


def test_per_member_regime_decouples_members_and_joint_does_not():
    """Per-member: member 0's update does not depend on member 1. Joint: it does (shared loss
    and one global norm)."""
    x, y = data(16)

    def member0_after(regime, other_seed):
        ensemble = Ensemble([_member(0), _member(other_seed)])
        groups = member_param_groups(ensemble) if regime == "per-member" else ensemble.parameters()
        opt = OTMDR(groups, torch.optim.SGD, lr=0.1, model=ensemble)
        opt.step(_per_member(ensemble) if regime == "per-member" else _joint(ensemble), batch=(x, y))
        return [p.detach().clone() for p in ensemble.members[0].parameters()]

    for a, b in zip(member0_after("per-member", 1), member0_after("per-member", 2)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert any(not torch.allclose(a, b) for a, b in zip(member0_after("joint", 1), member0_after("joint", 2)))


def test_otmdr_never_moves_sigma_during_ascent_but_trains_it():
    model = create_model("bayes-mlp", num_classes=4, in_channels=1, input_size=6).double()
    scales = [p for name, p in model.named_parameters() if name.endswith("_rho")]
    assert scales
    opt = OTMDR(bayes_param_groups(model), torch.optim.Adam, rho=(0.005, 0.01), noise_std=0.01, lr=1e-2, model=model)
    x, y = data(16)
    x = x.view(16, 1, 6, 1).expand(16, 1, 6, 6).contiguous()
    before = [p.detach().clone() for p in scales]
    seen = []

    def loss_fn(b):
        seen.append(all(torch.equal(p, q) for p, q in zip(scales, before)))
        return F.cross_entropy(model(b[0]), b[1])

    with fixed_sample(model):
        opt.step(loss_fn, batch=(x, y))
    assert seen == [True, True, True]
    assert any(not torch.equal(p, q) for p, q in zip(scales, before))


def _fast(*overrides):
    return load_config(DEMO, ["train.epochs=1", "train.progress=false", *overrides])


def test_pipeline_trains_an_ensemble_per_member_and_reports_diversity(tmp_path):
    run = prepare_run_dir(tmp_path / "ens", resume=False)
    lines: list[str] = []
    cfg = _fast("model.name=mlp-x3", "model.options={hidden: [32]}", "ensemble.regime=per-member",
                "optim.method=otmdr", "otmdr.normalize=merged")
    summary = train(cfg, run, log=lines.append)
    # each member moves by rho1 + rho2 on its own weights: sqrt(3) times that in all, and no warning
    nominal = 3 ** 0.5 * sum(cfg.otmdr.rho)
    assert any(f"(nominal {nominal:.3f})" in line for line in lines)
    assert summary["perturbation_norm"] == pytest.approx(nominal, rel=0.1) and "warnings" not in summary
    diversity = summary["diversity"]
    assert len(diversity["member_accuracy"]) == 3 and summary["regime"] == "per-member"
    assert 0.0 <= diversity["double_fault"] <= 1.0 and diversity["mutual_information"] >= 0.0
    assert summary["test"]["accuracy"] > 0.5


def test_pipeline_trains_a_bnn_with_a_monte_carlo_predictive(tmp_path):
    run = prepare_run_dir(tmp_path / "bnn", resume=False)
    summary = train(_fast("model.name=bayes-mlp", "model.options={hidden: [64]}", "optim.base=adam",
                          "optim.lr=0.01", "optim.weight_decay=0", "bayes.test_samples=8", "eval.ece_bins=20",
                          "otmdr.rho=[0.005, 0.01]", "otmdr.noise_std=0.01"), run, log=lambda _: None)
    assert summary["test_samples"] == 8 and summary["test"]["ece_bins"] == 20
    assert summary["test"]["accuracy"] > 0.3
    assert json.loads((run / "summary.json").read_text())["test"] == summary["test"]
