"""Ensembles (log of the mean member probability, param groups, registry) and diversity metrics."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from otmdr.eval import diversity_metrics, nll
from otmdr.eval.diversity import (double_fault, error_correlation, mutual_information, normalized_disagreement,
                                  pairwise_disagreement)
from otmdr.models import count_parameters, create_model, describe_models, list_models
from otmdr.models.ensemble import Ensemble, create_ensemble, member_param_groups
from otmdr.models.registry import is_known_model


pytestmark = pytest.mark.usefixtures("one_thread")


def linear_ensemble(m: int = 3, scale: float = 1.0) -> Ensemble:
    torch.manual_seed(0)
    members = [nn.Linear(6, 4).double() for _ in range(m)]
    with torch.no_grad():
        for member in members:
            member.weight.mul_(scale)
    return Ensemble(members)


# ---------------------------------------------------------------- the ensemble module


@torch.no_grad()
def test_forward_is_the_log_of_the_mean_member_probability():
    ensemble = linear_ensemble()
    x = torch.randn(5, 6, dtype=torch.float64)
    mean_probs = torch.stack([torch.softmax(member(x), dim=1) for member in ensemble.members]).mean(dim=0)
    out = ensemble(x)
    assert out.shape == (5, 4)
    torch.testing.assert_close(out, mean_probs.log())
    torch.testing.assert_close(torch.softmax(out, dim=1).sum(dim=1), torch.ones(5, dtype=torch.float64))
    torch.testing.assert_close(torch.softmax(out, dim=1), mean_probs)
    # cross-entropy on the output is the NLL of the averaged probability (the release's loss) ...
    y = torch.tensor([0, 1, 2, 3, 0])
    assert float(F.cross_entropy(out, y)) == pytest.approx(nll(mean_probs, y))
    # ... and label smoothing smooths the cross-entropy of the average
    smoothed = 0.9 * -mean_probs.log().gather(1, y[:, None]).mean() + 0.1 * -mean_probs.log().mean()
    assert float(F.cross_entropy(out, y, label_smoothing=0.1)) == pytest.approx(float(smoothed))
    assert ensemble.member_logits(x).shape == (3, 5, 4)
    torch.testing.assert_close(ensemble.member_log_probs(x).exp().mean(dim=0), mean_probs)
    assert len(ensemble) == 3 and ensemble.member(1) is ensemble.members[1]


def test_forward_stays_finite_where_the_direct_formula_underflows():
    ensemble = linear_ensemble(scale=1e3)
    x = torch.randn(8, 6, dtype=torch.float64) * 10
    direct = torch.stack([torch.softmax(member(x), dim=1) for member in ensemble.members]).mean(dim=0).log()
    out = ensemble(x)
    assert torch.isfinite(out).all()
    assert not torch.isfinite(direct).all()  # the naive log underflows for these logits
    finite = torch.isfinite(direct)
    torch.testing.assert_close(out[finite], direct[finite])


def test_one_member_ensemble_is_the_members_log_softmax():
    ensemble = linear_ensemble(m=1)
    x = torch.randn(4, 6, dtype=torch.float64)
    torch.testing.assert_close(ensemble(x), torch.log_softmax(ensemble.member(0)(x), dim=1))
    with pytest.raises(ValueError, match="at least one"):
        Ensemble([])


def test_mixed_architectures_on_mnist_shaped_inputs():
    torch.manual_seed(0)
    x = torch.randn(2, 1, 28, 28)
    built = create_ensemble(["lenet", "mlp"], num_classes=7, in_channels=1, per_member=[{}, {"input_size": 28}])
    direct = Ensemble([create_model("lenet", num_classes=7, in_channels=1),
                       create_model("mlp", num_classes=7, in_channels=1, input_size=28)])
    for ensemble in (built, direct):
        assert [type(m).__name__ for m in ensemble.members] == ["LeNet", "MLP"]
        with torch.no_grad():
            assert ensemble(x).shape == (2, 7) and ensemble.member_logits(x).shape == (2, 2, 7)
    with pytest.raises(ValueError, match="per_member"):
        create_ensemble(["lenet", "mlp"], per_member=[{}])
    with pytest.raises(ValueError, match="output shape"):
        Ensemble([nn.Linear(3, 2), nn.Linear(3, 4)]).member_logits(torch.randn(1, 3))


def test_member_param_groups_cover_every_parameter_once():
    torch.manual_seed(0)
    ensemble = create_ensemble(["lenet", "lenet"], num_classes=3, in_channels=1)
    groups = member_param_groups(ensemble, lr=0.05, weight_decay=5e-4)
    assert [g["norm_group"] for g in groups] == [0, 1]
    assert all(g["lr"] == 0.05 and g["weight_decay"] == 5e-4 for g in groups)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) and set(ids) == {id(p) for p in ensemble.parameters()}
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in ensemble.member(1).parameters()}
    optimizer = torch.optim.SGD(groups, lr=0.1)  # torch keeps the extra key
    assert [g["norm_group"] for g in optimizer.param_groups] == [0, 1]
    shared = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="shares"):
        member_param_groups(Ensemble([shared, shared]))
    with pytest.raises(ValueError, match="norm_group"):
        member_param_groups(ensemble, norm_group=3)


# ---------------------------------------------------------------- registry


def test_cheap_registered_ensembles_map_batches_to_logits():
    torch.manual_seed(0)
    cases = [("lenet-x3", {}, 1, 28), ("lenet-x3", {}, 3, 32), ("resnet20-x3", {}, 3, 32),
             ("mlp-x3", {"input_size": 28}, 1, 28), ("mlp-x3", {"input_size": 32, "hidden": (16,)}, 3, 32)]
    for name, options, channels, size in cases:
        model = create_model(name, num_classes=7, in_channels=channels, **options)
        assert isinstance(model, Ensemble) and len(model) == 3
        with torch.no_grad():
            out = model(torch.randn(2, channels, size, size))
        assert out.shape == (2, 7) and torch.isfinite(out).all(), name
        torch.testing.assert_close(out.exp().sum(dim=1), torch.ones(2))


def test_members_are_initialised_differently():
    torch.manual_seed(0)
    model = create_model("lenet-x3", in_channels=1)
    weights = [m.features[0].weight for m in model.members]
    assert not torch.equal(weights[0], weights[1]) and not torch.equal(weights[1], weights[2])


@pytest.mark.parametrize("name,members,single", [("resnet18-x3", 3, ["resnet18"] * 3),
                                                 ("resnet10-x5", 5, ["resnet10"] * 5),
                                                 ("mixed-r18-mbn-effb0", 3,
                                                  ["resnet18", "mobilenet", "efficientnet-b0"]),
                                                 ("wrn16-4-x2", 2, ["wrn16-4"] * 2)])
def test_big_ensembles_on_the_meta_device(name, members, single):
    with torch.device("meta"):
        model = create_model(name)
        expected = sum(count_parameters(create_model(s)) for s in single)
        out = model(torch.empty(2, 3, 32, 32))
    assert len(model) == members and count_parameters(model) == expected
    assert out.shape == (2, 10)


def test_registry_lists_named_ensembles_and_resolves_repeated_names():
    assert {"lenet-x3", "resnet20-x3", "resnet10-x5", "resnet18-x3", "mixed-r18-mbn-effb0"} <= set(list_models())
    assert "wrn16-4-x2" not in list_models()  # built on demand, not listed
    assert is_known_model("wrn16-4-x2") and is_known_model("MLP_x3") and is_known_model("resnet20")
    assert not is_known_model("resnet7-x3") and not is_known_model("resnet20-x0")
    with pytest.raises(ValueError, match="unknown model 'resnet7-x3'"):
        create_model("resnet7-x3")
    with pytest.raises(ValueError, match="unknown model 'resnet20-x0'"):
        create_model("resnet20-x0")
    sizes = {name: n for name, n, _ in describe_models()}
    assert sizes["resnet18-x3"] == 3 * sizes["resnet18"] and sizes["resnet10-x5"] == 5 * sizes["resnet10"]
    assert sizes["mixed-r18-mbn-effb0"] == sizes["resnet18"] + sizes["mobilenet"] + sizes["efficientnet-b0"]


# ---------------------------------------------------------------- diversity


def one_hot_probs(predictions: list[list[int]], classes: int = 3, confidence: float = 0.8) -> torch.Tensor:
    """(m, N, C): each member puts ``confidence`` on its prediction, the rest spread evenly."""
    rest = (1 - confidence) / (classes - 1)
    probs = torch.full((len(predictions), len(predictions[0]), classes), rest, dtype=torch.float64)
    probs.scatter_(2, torch.tensor(predictions)[..., None], confidence)
    return probs


# labels 0 1 2 0; A wrong on {3}, B wrong on {1, 3}, C wrong on {0, 2}
LABELS = torch.tensor([0, 1, 2, 0])
PROBS = one_hot_probs([[0, 1, 2, 1],   # A: accuracy 3/4
                       [0, 2, 2, 1],   # B: accuracy 1/2
                       [1, 1, 0, 0]])  # C: accuracy 1/2


def test_pairwise_disagreement_by_hand():
    # A-B differ on sample 1; A-C on 0, 2, 3; B-C on all four
    assert pairwise_disagreement(PROBS) == pytest.approx((1 / 4 + 3 / 4 + 4 / 4) / 3)


def test_normalized_disagreement_by_hand():
    # ordered pairs (reference, other): disagreement / error rate of the reference
    # (A,B) .25/.25, (A,C) .75/.25, (B,A) .25/.5, (B,C) 1/.5, (C,A) .75/.5, (C,B) 1/.5
    expected = (1 + 3 + 0.5 + 2 + 1.5 + 2) / 6
    assert normalized_disagreement(PROBS, LABELS) == pytest.approx(expected)
    # an error-free reference is left out: A perfect, B wrong on {3} and disagreeing with A there
    probs = one_hot_probs([[0, 1, 2, 0], [0, 1, 2, 1]])
    assert normalized_disagreement(probs, LABELS) == pytest.approx(0.25 / 0.25)
    assert math.isnan(normalized_disagreement(one_hot_probs([[0, 1, 2, 0]] * 2), LABELS))


def test_double_fault_counts_samples_both_members_get_wrong():
    # both wrong: A-B on {3}; A-C none; B-C none
    assert double_fault(PROBS, LABELS) == pytest.approx((1 / 4 + 0 + 0) / 3)
    # "at least one wrong" (the release's count) would be (2/4 + 3/4 + 4/4) / 3 = 0.75
    assert double_fault(PROBS, LABELS) != pytest.approx(0.75)


def test_error_correlation_by_hand():
    # errors A = 0001, B = 0101, C = 1010: corr(A,B) = 1/sqrt(3), corr(A,C) = -1/sqrt(3), corr(B,C) = -1
    assert error_correlation(PROBS, LABELS) == pytest.approx(-1 / 3)
    # an error-free member (constant indicator) counts as uncorrelated
    probs = one_hot_probs([[0, 1, 2, 0], [0, 2, 2, 1]])
    assert error_correlation(probs, LABELS) == 0.0


def test_mutual_information():
    assert mutual_information(torch.stack([PROBS[0]] * 3)) == pytest.approx(0.0, abs=1e-12)
    assert mutual_information(PROBS) > 0
    # two confident members that disagree: H(mean) = log 2, member entropies 0
    probs = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]], dtype=torch.float64)
    assert mutual_information(probs) == pytest.approx(math.log(2))
    # one sample where all agree (MI 0), one where they split 0.8/0.2 vs 0.2/0.8
    h = lambda *p: -sum(q * math.log(q) for q in p)  # noqa: E731
    probs = torch.tensor([[[0.7, 0.3], [0.8, 0.2]], [[0.7, 0.3], [0.2, 0.8]]], dtype=torch.float64)
    assert mutual_information(probs) == pytest.approx((0 + h(0.5, 0.5) - h(0.8, 0.2)) / 2)


def test_diversity_metrics_collects_everything():
    metrics = diversity_metrics(PROBS, LABELS)
    assert set(metrics) == {"pairwise_disagreement", "normalized_disagreement", "double_fault", "error_correlation",
                            "mutual_information", "member_accuracy", "ensemble_accuracy"}
    assert metrics["member_accuracy"] == pytest.approx([0.75, 0.5, 0.5])
    assert metrics["ensemble_accuracy"] == 0.75  # mean probability predicts 0 1 2 1
    assert metrics["double_fault"] == pytest.approx(1 / 12)
    with pytest.raises(ValueError, match="two members"):
        diversity_metrics(PROBS[:1], LABELS)
    with pytest.raises(ValueError, match="labels"):
        diversity_metrics(PROBS, LABELS[:3])


def test_diversity_of_an_ensembles_predictions():
    ensemble = linear_ensemble(m=4)
    x = torch.randn(32, 6, dtype=torch.float64)
    y = torch.randint(0, 4, (32,))
    with torch.no_grad():
        metrics = diversity_metrics(ensemble.member_log_probs(x).exp(), y)
    assert 0 <= metrics["pairwise_disagreement"] <= 1 and metrics["mutual_information"] > 0
    assert len(metrics["member_accuracy"]) == 4
