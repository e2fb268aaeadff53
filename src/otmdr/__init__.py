"""otmdr: Optimal Transport Model Distributional Robustness (OT-MDR), SAM and ASAM for PyTorch."""

from ._version import __version__
from .optim import ASAM, OTMDR, SAM, StepResult

__all__ = ["OTMDR", "SAM", "ASAM", "StepResult", "__version__"]
