"""Deprecated: renamed :mod:`otmdr.eval.run_robustness` (a trained run's robustness to attacks and
corruptions, as ``otmdr eval`` computes it). This alias goes in the next release."""

import warnings

from .run_robustness import *  # noqa: F403
from .run_robustness import __all__  # noqa: F401

warnings.warn("otmdr.eval.robustness is renamed otmdr.eval.run_robustness; the old name goes in the next release",
              DeprecationWarning, stacklevel=2)
