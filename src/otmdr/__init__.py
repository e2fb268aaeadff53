"""otmdr: Optimal Transport Model Distributional Robustness (OT-MDR), SAM and ASAM for PyTorch."""

from .optim import ASAM, OTMDR, SAM, StepResult

__version__ = "0.1.0"
__all__ = ["OTMDR", "SAM", "ASAM", "StepResult", "__version__"]
