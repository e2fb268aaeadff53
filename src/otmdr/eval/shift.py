"""Deprecated: renamed :mod:`otmdr.eval.corruption_grid` (a model's metrics over the corruption x
severity grid of a test set). This alias goes in the next release."""

import warnings

from .corruption_grid import *  # noqa: F403
from .corruption_grid import __all__  # noqa: F401

warnings.warn("otmdr.eval.shift is renamed otmdr.eval.corruption_grid; the old name goes in the next release",
              DeprecationWarning, stacklevel=2)
