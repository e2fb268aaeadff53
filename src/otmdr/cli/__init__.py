"""The ``otmdr`` command: train, eval, compare, and list models and datasets.

A thin layer: ``parser`` holds the options; each command's module checks them before any work, then
calls the library (otmdr.train, otmdr.eval, otmdr.report). Every anticipated problem (bad config,
missing data, corrupt checkpoint, existing run directory, a run that diverged) ends in one
``otmdr: error: ...`` line and exit status 2 (:mod:`otmdr.cli.entry`).
"""

from .entry import main
from .parser import build_parser

__all__ = ["build_parser", "main"]
