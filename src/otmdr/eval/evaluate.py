"""Evaluating a trained model as its config asks: the metrics of one split, and the test report
of a run (``summary.json``'s ``test`` and ``otmdr eval``). Training validates with the same
functions, so a run's numbers and a later ``otmdr eval`` of it agree.

A Bayesian network's metrics are Monte-Carlo estimates (the predictive is the mean over
``bayes.test_samples`` weight draws), so training also evaluates its test split a second time
with an independent, seeded set of draws (:func:`evaluate_second_pass`): the difference between
the two passes is the Monte-Carlo error a reader must weigh small differences between methods
against (``summary.json``'s ``test_second_pass`` and ``monte_carlo``). This doubles the test-time
cost of a BNN (not of its validation, nor of a deterministic model, which gets no second pass)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .calibration import fit_temperature
from .metrics import classification_metrics, reliability
from .predict import Prediction, predict

if TYPE_CHECKING:
    from ..config import ExperimentConfig

__all__ = ["AUTOCAST", "evaluate_split", "evaluate_model", "prediction_samples", "evaluate_second_pass",
           "second_pass_seed", "monte_carlo_difference", "MONTE_CARLO_METRICS"]

#: the autocast dtype of each ``train.precision`` (None: float32, no autocast); training and
#: evaluation both read it, so a run is evaluated at the precision it trained at
AUTOCAST: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def prediction_samples(cfg: ExperimentConfig, model: nn.Module) -> int:
    """Monte-Carlo draws of the predictive: ``bayes.test_samples`` for a BNN, else 1."""
    from ..models.bayes import is_bayesian

    return cfg.bayes.test_samples if is_bayesian(model) else 1


#: the metrics whose second-pass minus first-pass difference ``monte_carlo`` records
MONTE_CARLO_METRICS = ("accuracy", "nll", "ece", "brier")

#: offsets from ``train.seed`` of the second pass's generator (one per evaluated model, so the
#: final and the early-stopped model draw independent samples even when they are the same weights)
_SECOND_PASS_OFFSETS = {"final": 0x5EC0_0001, "early_stopped": 0x5EC0_0002}


def second_pass_seed(cfg: ExperimentConfig, model: str = "final") -> int:
    """Seed of the second Monte-Carlo pass of ``model`` ("final" or "early_stopped"): a function of
    the config alone, so a run (fresh, resumed or evaluated again) always draws the same second
    pass. The first pass draws from the global stream left by training (seeded by ``train.seed``)."""
    return cfg.train.seed + _SECOND_PASS_OFFSETS[model]


def _model_cuda_devices(model: nn.Module) -> list[int]:
    devices = {p.device for p in model.parameters()} | {b.device for b in model.buffers()}
    return sorted({d.index if d.index is not None else torch.cuda.current_device()
                   for d in devices if d.type == "cuda"})


def evaluate_second_pass(model: nn.Module, loader, *, autocast: torch.dtype | None, n_bins: int, samples: int,
                         seed: int) -> dict[str, float]:
    """The metrics of :func:`evaluate_split` from an independent set of ``samples`` weight draws,
    taken from a generator seeded with ``seed`` (see :func:`second_pass_seed`). The global random
    state is forked: it is the same afterwards as before, so the first pass, and everything drawn
    after it, is unchanged. Costs one more Monte-Carlo evaluation of the split."""
    devices = _model_cuda_devices(model)
    with torch.random.fork_rng(devices=devices):
        torch.random.default_generator.manual_seed(seed)
        for index in devices:  # only this model's devices: another process's GPU keeps its stream
            with torch.cuda.device(index):
                torch.cuda.manual_seed(seed)
        metrics, _ = evaluate_split(model, loader, autocast=autocast, n_bins=n_bins, samples=samples)
    return metrics


def monte_carlo_difference(first: dict[str, float], second: dict[str, float], samples: int) -> dict[str, Any]:
    """``summary.json``'s ``monte_carlo`` block: the samples per pass and, per metric, second − first."""
    return {"samples": samples, **{f"{key}_difference": second[key] - first[key] for key in MONTE_CARLO_METRICS}}


def evaluate_split(model: nn.Module, loader, *, autocast: torch.dtype | None, n_bins: int,
                   temperature: float | None = None, samples: int = 1) -> tuple[dict[str, float], Prediction]:
    """Metrics of the predictive distribution of ``model`` on a split (optionally with the
    log-probabilities divided by ``temperature``); ``samples`` Monte-Carlo draws for BNNs."""
    prediction = predict(model, loader, autocast_dtype=autocast, samples=samples)
    log_probs = prediction.log_probs if temperature is None else prediction.log_probs / temperature
    return classification_metrics(torch.softmax(log_probs, dim=1), prediction.labels, n_bins), prediction


def evaluate_model(cfg: ExperimentConfig, model: nn.Module, data, *, n_bins: int | None = None,
                   temperature_scaling: bool | None = None, second_pass: bool = False) -> dict[str, Any]:
    """Test metrics of a trained model: the predictive (MC for BNNs, mean for ensembles), its
    reliability data, temperature-scaled metrics (T fitted on validation) and ensemble diversity.
    ``data`` has ``test`` and ``val`` loaders (:func:`otmdr.train.builders.build_data`).

    With ``second_pass`` a Bayesian network's test split is evaluated again with independent
    weight draws (:func:`evaluate_second_pass`, seeded by :func:`second_pass_seed`): the result
    then has ``test_second_pass`` (the keys of ``test``) and ``monte_carlo``
    (:func:`monte_carlo_difference`). Twice the test-time cost of a BNN; nothing for a
    deterministic model (one forward is exact)."""
    n_bins = n_bins or cfg.eval.ece_bins
    autocast = AUTOCAST[cfg.train.precision]
    samples = prediction_samples(cfg, model)
    test, prediction = evaluate_split(model, data.test, autocast=autocast, n_bins=n_bins, samples=samples)
    result: dict[str, Any] = {
        "test": test, "reliability": reliability(prediction.log_probs.exp(), prediction.labels, n_bins).__dict__,
    }
    if samples > 1:
        result["test_samples"] = samples
        if second_pass:
            second = evaluate_second_pass(model, data.test, autocast=autocast, n_bins=n_bins, samples=samples,
                                          seed=second_pass_seed(cfg, "final"))
            result["test_second_pass"] = second
            result["monte_carlo"] = monte_carlo_difference(test, second, samples)
    if prediction.member_probs is not None:
        from .diversity import diversity_metrics

        result["diversity"] = diversity_metrics(prediction.member_probs, prediction.labels)
    if temperature_scaling is None:
        temperature_scaling = cfg.eval.temperature_scaling
    if temperature_scaling and data.val is not None:
        val = predict(model, data.val, autocast_dtype=autocast, samples=samples)
        temperature = fit_temperature(val.log_probs, val.labels)
        scaled = classification_metrics(torch.softmax(prediction.log_probs / temperature, dim=1),
                                        prediction.labels, n_bins)
        result["test_temperature_scaled"] = {**scaled, "temperature": temperature}
    return result
