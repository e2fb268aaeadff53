"""AutoAttack through pyautoattack: linear models, whose worst case is known in closed form, the
optional-dependency error, and what the evaluation must leave as it found it."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
import torch
from torch import nn

from otmdr.eval.autoattack import MissingDependencyError, autoattack_accuracy
from conftest import require_oracle


@pytest.fixture
def pyautoattack():
    """The AutoAttack implementation the module drives (the autoattack extra, in the test extra):
    required in CI, a skip with the reason elsewhere."""
    return require_oracle("pyautoattack", "AutoAttack against the closed-form worst case of linear models")


needs_pyautoattack = pytest.mark.usefixtures("pyautoattack")


def _linear(n_classes: int, *, n: int = 48, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A linear classifier on images in [0.3, 0.7] (the [0, 1] box never binds for eps <= 0.3),
    labels mostly its own predictions so that most points start correct."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, n_classes)).to(dtype)
    x = 0.3 + 0.4 * torch.rand(n, 1, 3, 4, dtype=dtype)
    with torch.no_grad():
        y = model(x).argmax(dim=1)
    wrong = torch.arange(n) % 8 == 0
    y[wrong] = (y[wrong] + 1) % n_classes
    return model, x, y


def _worst_margins(model: nn.Sequential, x: torch.Tensor, y: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """min over classes j != y of the logit margin z_y - z_j after the worst perturbation in the
    ball: z_y - z_j - eps * ||w_y - w_j||_dual (dual of linf is l1, of l2 is l2). A point is
    robust iff this is > 0."""
    w, b = model[1].weight.detach().double(), model[1].bias.detach().double()
    z = x.double().flatten(1) @ w.T + b
    diff = w[y][:, None, :] - w[None, :, :]  # (n, classes, d)
    dual = diff.abs().sum(-1) if norm == "linf" else diff.norm(dim=-1)
    margins = z.gather(1, y[:, None]) - z - eps * dual
    return margins.scatter(1, y[:, None], float("inf")).min(dim=1).values


def test_without_pyautoattack_the_error_says_how_to_install_it(monkeypatch):
    model, x, y = _linear(2)
    monkeypatch.setitem(sys.modules, "pyautoattack", None)  # import pyautoattack now fails
    with pytest.raises(MissingDependencyError, match=r"pip install 'otmdr\[autoattack\]'") as info:
        autoattack_accuracy(model, (x, y), 0.03)
    assert isinstance(info.value, ImportError)
    assert "pyautoattack" in str(info.value)


def test_importing_otmdr_eval_leaves_pyautoattack_unimported():
    code = ("import sys, otmdr.eval; from otmdr.eval import autoattack_accuracy, MissingDependencyError; "
            "assert 'pyautoattack' not in sys.modules, 'imported eagerly'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@needs_pyautoattack
@pytest.mark.parametrize("n_classes, norm, eps, attacks, dtype", [
    (2, "linf", 0.03, ["apgd-ce"], torch.float64),  # float64 model: the inputs are cast for it
    (2, "l2", 0.08, ["apgd-ce"], torch.float32),
    (5, "linf", 0.03, ["apgd-ce", "apgd-t"], torch.float32),  # 5 classes: 4 target classes, not 9
])
def test_robust_accuracy_is_the_closed_form_worst_case_of_a_linear_model(one_thread, n_classes, norm, eps,
                                                                         attacks, dtype):
    model, x, y = _linear(n_classes, dtype=dtype)
    worst = _worst_margins(model, x, y, eps, norm)
    assert float(worst.abs().min()) > 1e-3  # no point so close to the boundary that float32 decides
    result = autoattack_accuracy(model, (x, y), eps, norm=norm, version="custom", attacks=attacks)
    clean = (model(x).argmax(dim=1) == y).double().mean().item()
    assert result["clean_accuracy"] == pytest.approx(clean)
    assert result["robust_accuracy"] == pytest.approx((worst > 0).double().mean().item())
    assert 0 < result["robust_accuracy"] < result["clean_accuracy"]  # the test says something
    assert result["n_examples"] == len(y)
    assert eps * 0.999 <= result["max_perturbation"] <= eps * (1 + 1e-6)
    assert result["settings"]["norm"] == norm and result["settings"]["attacks"] == attacks
    assert result["settings"]["n_classes"] == n_classes
    assert result["settings"]["n_target_classes"] == (n_classes - 1 if "apgd-t" in attacks else None)


@needs_pyautoattack
def test_standard_version_with_five_classes_runs_every_stage_down_to_the_worst_case(one_thread):
    """The standard sequence asks for 9 target classes; with 5 it uses the 4 others (pyautoattack
    alone fails with an IndexError). Stages never raise the accuracy."""
    model, x, y = _linear(5, n=32)
    eps = 0.05
    worst = _worst_margins(model, x, y, eps, "linf")
    assert float(worst.abs().min()) > 1e-3
    result = autoattack_accuracy(model, [(x[:20], y[:20]), (x[20:], y[20:])], eps, batch_size=16)
    stages = result["stages"]
    assert list(stages) == ["apgd-ce", "apgd-t", "fab-t", "square"]
    accuracies = [result["clean_accuracy"], *stages.values()]
    assert all(a >= b for a, b in zip(accuracies, accuracies[1:]))
    assert result["robust_accuracy"] == stages["square"] == pytest.approx((worst > 0).float().mean().item())
    assert result["robust_accuracy"] < result["clean_accuracy"]
    assert result["settings"]["n_target_classes"] == 4 and result["settings"]["version"] == "standard"


@needs_pyautoattack
def test_too_few_classes_is_a_clear_error_naming_the_custom_call_and_that_call_works(one_thread):
    model, x, y = _linear(3)
    with pytest.raises(ValueError, match=r"3 classes.*apgd-t needs at least 4.*version='custom', "
                                         r"attacks=\['apgd-ce', 'fab-t', 'square'\]"):
        autoattack_accuracy(model, (x, y), 0.03)
    model, x, y = _linear(2, n=16)
    with pytest.raises(ValueError, match=r"apgd-dlr needs at least 3.*attacks=\['apgd-ce'\], eot_iter=20"):
        autoattack_accuracy(model, (x, y), 0.03, version="rand")
    eps = 0.03
    result = autoattack_accuracy(model, (x, y), eps, version="custom", attacks=["apgd-ce", "fab-t"])
    worst = _worst_margins(model, x, y, eps, "linf")
    assert result["robust_accuracy"] == pytest.approx((worst > 0).double().mean().item())
    assert result["robust_accuracy"] < result["clean_accuracy"]


@needs_pyautoattack
def test_model_mode_random_state_logger_and_tracer_are_left_as_they_were(one_thread):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 4), nn.BatchNorm1d(4))
    model.train()
    x, y = 0.3 + 0.4 * torch.rand(16, 1, 3, 4), torch.randint(0, 4, (16,))
    running_mean = model[2].running_mean.clone()
    logger = logging.getLogger("auto-attack")
    logger.setLevel(logging.INFO)
    rng = torch.get_rng_state()
    tracer = lambda frame, event, arg: None  # noqa: E731
    sys.settrace(tracer)
    try:
        autoattack_accuracy(model, (x, y), 0.02, version="custom", attacks=["apgd-ce"])
        traced = sys.gettrace()
    finally:
        sys.settrace(None)
        logger.setLevel(logging.NOTSET)
    assert model.training and model[2].training
    torch.testing.assert_close(model[2].running_mean, running_mean)  # batch norm ran in eval mode
    assert torch.equal(torch.get_rng_state(), rng)
    assert traced is tracer


class _Noisy(nn.Module):
    """A linear model whose weights are redrawn around W at every forward (like a Bayesian net)."""

    def __init__(self, n_classes: int = 4, noise: float = 0.1):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_classes, 12))
        self.noise = noise

    def forward(self, x):
        w = self.weight + self.noise * torch.randn_like(self.weight)
        return (x.flatten(1) - 0.5) @ w.T


@needs_pyautoattack
def test_randomized_model_rand_version_and_autoattacks_warning_passes_once(one_thread, caplog):
    torch.manual_seed(0)
    model = _Noisy()
    x = 0.3 + 0.4 * torch.rand(24, 1, 3, 4)
    with torch.no_grad():
        y = ((x.flatten(1) - 0.5) @ model.weight.T).argmax(dim=1)  # the noise-free predictions
    with caplog.at_level(logging.DEBUG, logger="auto-attack"):
        # without verbose the progress messages stay quiet, the sanity check's warning does not
        caplog.clear()
        result = autoattack_accuracy(model, (x, y), 0.05, version="custom", attacks=["apgd-ce", "apgd-dlr"])
        randomized = [r for r in caplog.records if "randomized defense" in r.getMessage()]
        assert len(randomized) == 1 and randomized[0].levelno == logging.WARNING
        assert all(r.levelno >= logging.WARNING for r in caplog.records if r.name == "auto-attack")
        assert result["robust_accuracy"] <= result["stages"]["apgd-ce"] < result["clean_accuracy"]
        caplog.clear()
        result = autoattack_accuracy(model, (x, y), 0.05, version="rand", max_examples=8, verbose=True)
        assert not [r for r in caplog.records if "randomized defense" in r.getMessage()]
        assert any("apgd-ce" in r.getMessage() for r in caplog.records)  # verbose lets progress through
    assert result["n_examples"] == 8 and result["settings"]["eot_iter"] == 20
    assert result["robust_accuracy"] < result["clean_accuracy"]
    assert list(result["stages"]) == ["apgd-ce", "apgd-dlr"]


class _Rounded(nn.Module):
    """Gradient masking: a linear model on inputs rounded to a grid, whose input gradient is zero."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(12, 2)

    def forward(self, x):
        return self.linear(torch.round(x.flatten(1) * 10) / 10)


@needs_pyautoattack
def test_square_beating_the_gradient_attacks_is_reported_as_pyautoattack_would(one_thread, caplog):
    """pyautoattack warns when Square lowers the accuracy after the gradient attacks; run stage by
    stage its own check never sees both numbers, so the module makes it."""
    torch.manual_seed(0)
    model = _Rounded()
    x = 0.3 + 0.4 * torch.rand(32, 1, 3, 4)
    with torch.no_grad():
        y = model(x).argmax(dim=1)
    with caplog.at_level(logging.WARNING, logger="auto-attack"):
        result = autoattack_accuracy(model, (x, y), 0.05, version="custom", attacks=["apgd-ce", "square"])
    assert result["stages"]["square"] < result["stages"]["apgd-ce"] - 0.002
    assert any("Square Attack lowered" in r.getMessage() for r in caplog.records)


@needs_pyautoattack
def test_inputs_must_be_images_in_the_unit_box_and_arguments_are_checked():
    model, x, y = _linear(4)
    with pytest.raises(ValueError, match=r"\[0, 1\].*Normalized"):
        autoattack_accuracy(model, ((x - 0.5) / 0.25, y), 0.03)
    with pytest.raises(ValueError, match="N, C, H, W"):
        autoattack_accuracy(model, (x.flatten(1), y), 0.03)
    with pytest.raises(ValueError, match="norm"):
        autoattack_accuracy(model, (x, y), 0.03, norm="l1")
    with pytest.raises(ValueError, match="version='custom'"):
        autoattack_accuracy(model, (x, y), 0.03, attacks=["apgd-ce"])
    with pytest.raises(ValueError, match="distinct names"):
        autoattack_accuracy(model, (x, y), 0.03, version="custom", attacks=["apgd-ce", "pgd"])
