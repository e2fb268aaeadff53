"""Optimizers: OT-MDR and its special cases SAM and ASAM, wrapping any torch optimizer."""

from .batchnorm import BN_POLICIES, frozen_batchnorm
from .config import PRESETS, PerturbationConfig
from .otmdr import OTMDR, StepResult
from .sam import ASAM, SAM

__all__ = ["OTMDR", "SAM", "ASAM", "StepResult", "PerturbationConfig", "PRESETS", "BN_POLICIES", "frozen_batchnorm"]
