"""Evaluation: metrics, calibration, prediction, and a trained model evaluated as its config asks."""

from .autoattack import MissingDependencyError, autoattack_accuracy  # imports pyautoattack only when run
from .calibration import fit_temperature
from .diversity import (diversity_metrics, double_fault, error_correlation, mutual_information,
                        normalized_disagreement, pairwise_disagreement)
from .evaluate import AUTOCAST, evaluate_model, evaluate_split
from .metrics import Reliability, accuracy, brier, classification_metrics, ece, nll, reliability
from .predict import Prediction, predict, predict_logits

__all__ = ["accuracy", "nll", "brier", "ece", "reliability", "Reliability", "classification_metrics",
           "fit_temperature", "predict", "predict_logits", "Prediction",
           "pairwise_disagreement", "normalized_disagreement", "double_fault", "error_correlation",
           "mutual_information", "diversity_metrics", "autoattack_accuracy", "MissingDependencyError",
           "AUTOCAST", "evaluate_split", "evaluate_model"]
