"""A Bayesian network's second Monte-Carlo pass: recorded by training (deterministically, for BNNs
only) and read by the report to name the verdicts that a second set of weight samples changes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from otmdr.config import load_config
from otmdr.eval.evaluate import evaluate_second_pass, evaluate_split
from otmdr.models import create_model
from otmdr.report.monte_carlo import monte_carlo_note
from otmdr.train import prepare_run_dir, train

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
FAST = ["train.epochs=1", "train.progress=false", "model.options={hidden: [32]}"]
BNN = ["model.name=bayes-mlp", "optim.base=adam", "optim.lr=0.01", "optim.weight_decay=0", "bayes.test_samples=4"]
KEYS = ("accuracy", "nll", "ece", "brier")


def _train(tmp_path: Path, name: str, *overrides: str) -> dict:
    run = prepare_run_dir(tmp_path / name, resume=False)
    summary = train(load_config(DEMO, FAST + list(overrides)), run, log=lambda _: None)
    assert json.loads((run / "summary.json").read_text()) == json.loads(json.dumps(summary))
    return summary


def test_a_bnn_records_a_second_independent_and_reproducible_pass(tmp_path):
    summary = _train(tmp_path, "a", *BNN)
    first, second = summary["test"], summary["test_second_pass"]
    assert set(second) == set(first)
    assert second != first  # other weight draws give other numbers ...
    assert second["nll"] != first["nll"]
    for key in KEYS:  # ... yet close ones: both estimate the same predictive
        assert abs(second[key] - first[key]) < (0.15 if key != "nll" else 0.3), key
    mc = summary["monte_carlo"]
    assert mc["samples"] == 4 == summary["test_samples"]
    for key in KEYS:
        assert mc[f"{key}_difference"] == pytest.approx(second[key] - first[key])
    stopped = summary["early_stopped"]
    assert set(stopped["test_second_pass"]) == set(stopped["test"])
    assert stopped["test_second_pass"] != stopped["test"]
    assert stopped["monte_carlo"]["samples"] == 4

    again = _train(tmp_path, "b", *BNN)  # seeded: a rerun draws the very same second pass
    assert again["test"] == first and again["test_second_pass"] == second
    assert again["early_stopped"]["test_second_pass"] == stopped["test_second_pass"]


def test_a_deterministic_model_records_no_second_pass(tmp_path):
    summary = _train(tmp_path, "mlp")
    assert "test_second_pass" not in summary and "monte_carlo" not in summary
    assert "test_second_pass" not in summary["early_stopped"] and "monte_carlo" not in summary["early_stopped"]


def test_the_second_pass_draws_other_samples_and_leaves_the_global_stream_alone():
    torch.manual_seed(0)
    model = create_model("bayes-mlp", in_channels=1, input_size=8, num_classes=10, hidden=(16,))
    x, y = torch.randn(64, 1, 8, 8), torch.randint(0, 10, (64,))
    batches = [(x, y)]
    torch.manual_seed(1)
    state = torch.get_rng_state()
    a = evaluate_second_pass(model, batches, autocast=None, n_bins=15, samples=3, seed=7)
    assert torch.equal(torch.get_rng_state(), state)  # the first pass draws as if there were no second
    assert evaluate_second_pass(model, batches, autocast=None, n_bins=15, samples=3, seed=7) == a
    assert evaluate_second_pass(model, batches, autocast=None, n_bins=15, samples=3, seed=8) != a
    first, _ = evaluate_split(model, batches, autocast=None, n_bins=15, samples=3)
    assert first != a


# -- the report's note ---------------------------------------------------------------------------

def _block(accuracy: float, nll: float = 0.5, ece: float = 0.05) -> dict:
    return {"accuracy": accuracy, "nll": nll, "ece": ece, "brier": 0.3, "ece_bins": 15}


def _run(seed: int, first: dict, second: dict | None, samples: int = 30) -> dict:
    run = {"seed": seed, "test": first, "test_samples": samples}
    if second is not None:
        run["test_second_pass"] = second
        run["monte_carlo"] = {"samples": samples}
    return run


def _summaries(otmdr_second: list[float], shift: float = 0.0) -> dict[str, list[dict]]:
    """sgd at 0.80, 0.82, 0.84; otmdr about 1 pp above it on every seed in the first pass."""
    sgd = [_run(s, _block(0.80 + 0.02 * s), _block(0.80 + 0.02 * s + shift)) for s in range(3)]
    first = [0.810, 0.8305, 0.8498]
    otmdr = [_run(s, _block(first[s]), _block(0.80 + 0.02 * s + otmdr_second[s])) for s in range(3)]
    return {"sgd": sgd, "otmdr": otmdr}


def test_monte_carlo_note_names_a_verdict_the_second_pass_flips():
    summaries = _summaries([0.010, -0.005, 0.002])  # second pass: the gain is gone
    lines = monte_carlo_note(summaries, ["sgd"])
    assert lines[0] == ("otmdr − sgd accuracy (final): better with the first 30 samples, inconclusive with 3 seeds "
                        "with a second 30: Monte Carlo error matters at this sample count; raise bayes.test_samples")
    # the gain is large enough to survive Holm over the report's 6 tests in the first pass only
    assert lines[1] == ("otmdr − sgd accuracy (final), after Holm: better with the first 30 samples, inconclusive "
                        "with 3 seeds with a second 30")
    assert len(lines) == 3  # NLL and ECE are the same in both passes
    assert lines[-1].startswith("Monte Carlo error at 30 weight samples per pass")
    assert "1 of 3 paired verdicts change with a second pass, 1 of 3 after Holm's correction" in lines[-1]


def test_monte_carlo_note_tells_a_raw_flip_from_one_that_survives_holm():
    """A raw "better" at p about 0.01 flips with the second pass, but Holm over the report's 6 tests
    never called it: the corrected verdict, the one a bottom line quotes, holds."""
    sgd = [_run(s, _block(0.80 + 0.02 * s), _block(0.80 + 0.02 * s)) for s in range(3)]
    first, second = [0.810, 0.828, 0.852], [0.810, 0.823, 0.852]
    otmdr = [_run(s, _block(first[s]), _block(second[s])) for s in range(3)]
    lines = monte_carlo_note({"sgd": sgd, "otmdr": otmdr}, ["sgd"])
    assert [line.split(":")[0] for line in lines[:-1]] == ["otmdr − sgd accuracy (final)"]  # no Holm line
    assert "1 of 3 paired verdicts change with a second pass, 0 of 3 after Holm's correction" in lines[-1]


def test_monte_carlo_note_with_a_stable_verdict_has_only_the_error_line():
    summaries = _summaries([0.0105, 0.0104, 0.0099], shift=0.001)
    lines = monte_carlo_note(summaries, ["sgd"])
    assert len(lines) == 1
    # |second - first| of accuracy: sgd 0.1 pp on each seed, otmdr 0.05, 0.01, 0.01 pp
    assert lines[0] == ("Monte Carlo error at 30 weight samples per pass (mean |second pass − first pass|): "
                        "final model over 6 runs: accuracy 0.06 pp, NLL 0.0000, ECE 0.00 pp; 0 of 3 paired verdicts "
                        "change with a second pass, 0 of 3 after Holm's correction.")


def test_monte_carlo_note_reads_the_early_stopped_second_pass_too():
    summaries = _summaries([0.0105, 0.0104, 0.0099])
    for runs in summaries.values():
        for run in runs:
            run["early_stopped"] = {"epoch": 1, "test": run["test"], "test_second_pass": run["test_second_pass"]}
    summaries["otmdr"][1]["early_stopped"]["test_second_pass"] = _block(0.80)  # seed 1: the gain reverses
    lines = monte_carlo_note(summaries, ["sgd"])
    assert [line.split(":")[0] for line in lines[:-1]] == ["otmdr − sgd accuracy (early-stopped)",
                                                           "otmdr − sgd accuracy (early-stopped), after Holm"]
    assert "early-stopped model over 6 runs" in lines[-1] and "1 of 6 paired verdicts" in lines[-1]
    assert "1 of 6 after Holm's correction" in lines[-1]


def test_monte_carlo_note_is_empty_without_a_second_pass():
    summaries = {m: [_run(s, _block(0.8 + 0.01 * s), None, samples=1) for s in range(3)] for m in ("sgd", "otmdr")}
    assert monte_carlo_note(summaries, ["sgd"]) == []


def test_a_bayesian_compare_report_states_the_monte_carlo_error(tmp_path):
    from otmdr.cli import main

    out = tmp_path / "study"
    args = ["compare", "--config", str(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"),
            "--methods", "sgd,sam", "--seeds", "2", "--out", str(out), "--quiet"]
    for override in ("model.name=bayes-mlp", "model.options={hidden: [16]}", "train.epochs=1", "train.threads=1",
                     "bayes.test_samples=4", "optim.base=adam", "optim.lr=1e-3"):
        args += ["--set", override]
    assert main(args) == 0
    report = (out / "report.md").read_text()
    assert "**Monte Carlo error of the predictive**" in report
    assert "Monte Carlo error at 4 weight samples per pass" in report


class _Draws(torch.nn.Module):
    """A stochastic model whose i-th forward returns the i-th of fixed logits: its draws known."""

    def __init__(self, logits: list[list[list[float]]]):
        super().__init__()
        self.logits, self.calls, self.grad_modes = [torch.tensor(draw) for draw in logits], 0, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.grad_modes.append(torch.is_grad_enabled())
        out = self.logits[self.calls % len(self.logits)]
        self.calls += 1
        return out + 0 * x.sum()


def test_each_half_of_the_draws_gives_its_own_predictive_and_accuracy():
    """Prediction.halves and robust_accuracies' second value are the predictive of draws 1-2 and
    of draws 3-4 alone: here the first half says class 0 and the second class 1 on every image."""
    from otmdr.eval.attacks import robust_accuracies
    from otmdr.eval.predict import predict

    first, second = [[3.0, 0.0], [2.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [0.0, 4.0], [0.0, 4.0]]
    x, y = torch.zeros(3, 1), torch.tensor([0, 1, 0])
    prediction = predict(_Draws([first, first, second, second]), [(x, y)], samples=4, halves=True)
    assert prediction.halves is not None
    expected = [torch.log_softmax(torch.tensor(half, dtype=torch.float64), dim=1) for half in (first, second)]
    torch.testing.assert_close(prediction.halves[0], expected[0])
    torch.testing.assert_close(prediction.halves[1], expected[1])
    torch.testing.assert_close(prediction.log_probs, torch.log((expected[0].exp() + expected[1].exp()) / 2))
    assert predict(_Draws([first]), [(x, y)], samples=1, halves=True).halves is None
    assert predict(_Draws([first, second]), [(x, y)], samples=2).halves is None  # only when asked for

    draws = _Draws([first, first, second, second])
    accuracy, halves = robust_accuracies(draws, [(x, y)], lambda m, a, b: a, samples=4)
    assert draws.grad_modes == [False] * 4  # scoring the attacked images builds no graph
    assert halves == [2 / 3, 1 / 3]  # class 0 everywhere, then class 1 everywhere
    assert accuracy == 2 / 3  # the pooled predictive: right on images 1 and 2 (classes 0, 1), wrong on 3
    assert robust_accuracies(_Draws([first]), [(x, y)], lambda m, a, b: a, samples=1) == (2 / 3, None)
