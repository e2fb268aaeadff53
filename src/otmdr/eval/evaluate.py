"""Evaluating a trained model as its config asks: the metrics of one split, and the test report
of a run (``summary.json``'s ``test`` and ``otmdr eval``). Training validates with the same
functions, so a run's numbers and a later ``otmdr eval`` of it agree."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .calibration import fit_temperature
from .metrics import classification_metrics, reliability
from .predict import Prediction, predict

if TYPE_CHECKING:
    from ..config import ExperimentConfig

__all__ = ["AUTOCAST", "evaluate_split", "evaluate_model", "prediction_samples"]

#: the autocast dtype of each ``train.precision`` (None: float32, no autocast); training and
#: evaluation both read it, so a run is evaluated at the precision it trained at
AUTOCAST: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def prediction_samples(cfg: ExperimentConfig, model: nn.Module) -> int:
    """Monte-Carlo draws of the predictive: ``bayes.test_samples`` for a BNN, else 1."""
    from ..models.bayes import is_bayesian

    return cfg.bayes.test_samples if is_bayesian(model) else 1


def evaluate_split(model: nn.Module, loader, *, autocast: torch.dtype | None, n_bins: int,
                   temperature: float | None = None, samples: int = 1) -> tuple[dict[str, float], Prediction]:
    """Metrics of the predictive distribution of ``model`` on a split (optionally with the
    log-probabilities divided by ``temperature``); ``samples`` Monte-Carlo draws for BNNs."""
    prediction = predict(model, loader, autocast_dtype=autocast, samples=samples)
    log_probs = prediction.log_probs if temperature is None else prediction.log_probs / temperature
    return classification_metrics(torch.softmax(log_probs, dim=1), prediction.labels, n_bins), prediction


def evaluate_model(cfg: ExperimentConfig, model: nn.Module, data, *, n_bins: int | None = None,
                   temperature_scaling: bool | None = None) -> dict[str, Any]:
    """Test metrics of a trained model: the predictive (MC for BNNs, mean for ensembles), its
    reliability data, temperature-scaled metrics (T fitted on validation) and ensemble diversity.
    ``data`` has ``test`` and ``val`` loaders (:func:`otmdr.train.builders.build_data`)."""
    n_bins = n_bins or cfg.eval.ece_bins
    autocast = AUTOCAST[cfg.train.precision]
    samples = prediction_samples(cfg, model)
    test, prediction = evaluate_split(model, data.test, autocast=autocast, n_bins=n_bins, samples=samples)
    result: dict[str, Any] = {
        "test": test, "reliability": reliability(prediction.log_probs.exp(), prediction.labels, n_bins).__dict__,
    }
    if samples > 1:
        result["test_samples"] = samples
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
