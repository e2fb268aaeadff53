"""Atomic checkpoints: written to a temporary file in the same folder, then renamed over the
target, so a crash mid-write never leaves a half-written ``last.pt`` or ``best.pt``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .._atomic import atomic_write

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "atomic_write_text"]


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read, with the path and what to do."""


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    atomic_write(path, lambda handle: torch.save(state, handle))


def atomic_write_text(path: str | Path, text: str, *, durable: bool = True) -> None:
    atomic_write(path, lambda handle: handle.write(text.encode()), durable=durable)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as error:  # truncated zip, wrong format, ...
        raise CheckpointError(
            f"checkpoint {path} is corrupted or not an otmdr checkpoint ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else 'unreadable'}); use another checkpoint "
            "(best.pt / last.pt) or retrain"
        ) from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise CheckpointError(f"checkpoint {path} is not an otmdr checkpoint (no model/config entries)")
    return state
