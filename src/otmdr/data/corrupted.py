"""Deprecated name of :mod:`otmdr.data.corrupted_dataset` (renamed after 0.1.0: this module's name did
not say what separates it from :mod:`otmdr.data.corruptions`, the image corruptions themselves).

Importing it still works for one release and warns; import from ``otmdr.data`` or
``otmdr.data.corrupted_dataset`` instead.
"""

from __future__ import annotations

import warnings

from .corrupted_dataset import (  # noqa: F401  (re-exported for old imports)
    CORRUPTION_VERSION,
    HOW_TO_GET,
    LABELS,
    LAYOUT,
    META,
    SEVERITIES,
    list_corruptions,
    load_corrupted,
    write_corrupted,
)

__all__ = ["list_corruptions", "load_corrupted", "write_corrupted", "LAYOUT", "HOW_TO_GET"]

warnings.warn(
    "otmdr.data.corrupted is deprecated and will be removed in the next release; import list_corruptions, "
    "load_corrupted and write_corrupted from otmdr.data (or otmdr.data.corrupted_dataset)",
    DeprecationWarning,
    stacklevel=2,
)
