"""Evaluation: metrics, calibration, prediction."""

from .calibration import fit_temperature
from .metrics import Reliability, accuracy, brier, classification_metrics, ece, nll, reliability
from .predict import predict_logits

__all__ = ["accuracy", "nll", "brier", "ece", "reliability", "Reliability", "classification_metrics",
           "fit_temperature", "predict_logits"]
