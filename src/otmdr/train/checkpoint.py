"""Atomic checkpoints: written to a temporary file in the same folder, then renamed over the
target, so a crash mid-write never leaves a half-written ``last.pt`` or ``best.pt``.

Loading is safe: ``torch.load(..., weights_only=True)``, whose unpickler builds only tensors and
plain values and refuses anything else (a pickled ``os.system`` call, a class) before running it.
A checkpoint holds dicts, lists, tuples, strings, numbers, booleans, ``None`` and tensors (the RNG
states are ByteTensors, the loader state plain ints), all accepted by torch's default allow-list,
so nothing is added to it (no ``torch.serialization.add_safe_globals``). Every checkpoint otmdr has
written loads this way; a file that needs more is refused with one line (:class:`CheckpointError`).
What is added to the saved state must stay within these types: ``tests/test_checkpoint_safety.py``
loads real runs' checkpoints with the same loader.
"""

from __future__ import annotations

import io
import pickle
import queue
import re
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .._atomic import atomic_link, atomic_write, atomic_write_text

__all__ = ["CheckpointError", "CheckpointWriter", "save_checkpoint", "load_checkpoint", "atomic_write_text"]


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read, with the path and what to do."""


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    atomic_write(path, lambda handle: torch.save(state, handle))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. the pickle-protocol warning of a plain pickle: one line only
            state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        if "weights only load failed" not in str(error).lower():
            raise CheckpointError(_unreadable(path, error)) from None
        found = re.search(r"GLOBAL (\S+)", str(error))
        what = f"it names {found.group(1)}" if found else "a pickle instruction the safe loader does not accept"
        raise CheckpointError(
            f"checkpoint {path} was refused: it holds more than tensors and plain values ({what}), and "
            "unpickling that could run code; otmdr loads only what it writes: use a checkpoint of an otmdr "
            "run (best.pt / last.pt) or retrain"
        ) from None
    except Exception as error:  # truncated zip, wrong format, ...
        raise CheckpointError(_unreadable(path, error)) from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise CheckpointError(f"checkpoint {path} is not an otmdr checkpoint (no model/config entries)")
    return state


def _unreadable(path: Path, error: BaseException) -> str:
    return (f"checkpoint {path} is corrupted or not an otmdr checkpoint ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else 'unreadable'}); use another checkpoint "
            "(best.pt / last.pt) or retrain")


class CheckpointWriter:
    """Writes a run's checkpoints and files in order on one background thread, so that the fsync
    making each checkpoint durable overlaps the next epoch instead of stalling training (on a
    small model it costs more than the epoch: ``benchmarks/pipeline_overhead.py``).

    ``save`` serialises the state at once (a snapshot: training goes on changing the tensors) and
    queues the write; writes land in the order they were queued, each atomic as before, so a kill
    leaves a consistent older state at worst, never a newer file next to an older one that should
    precede it. A failed write is raised in the caller at the next call or at ``flush``; leaving
    the ``with`` block waits for every queued write, also when an exception (e.g. a preemption)
    ends training.
    """

    def __init__(self) -> None:
        self._jobs: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="otmdr-checkpoint-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                if job is None:
                    return
                if self._error is None:  # after a failure nothing more is written: order is kept
                    job()
            except BaseException as error:  # noqa: BLE001 (handed to the training thread)
                self._error = error
            finally:
                self._jobs.task_done()

    def _submit(self, job: Callable[[], None]) -> None:
        self._raise()
        self._jobs.put(job)

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def save(self, state: dict[str, Any], path: str | Path) -> None:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        data = buffer.getvalue()
        self._submit(lambda: atomic_write(path, lambda handle: handle.write(data)))

    def link(self, source: str | Path, path: str | Path) -> None:
        self._submit(lambda: atomic_link(source, path))

    def write_text(self, path: str | Path, text: str, *, durable: bool = True) -> None:
        self._submit(lambda: atomic_write_text(path, text, durable=durable))

    def flush(self) -> None:
        """Wait until everything queued is on disk; raise the first failed write."""
        self._jobs.join()
        self._raise()

    def close(self) -> None:
        self._jobs.join()
        self._jobs.put(None)
        self._thread.join()

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: Any) -> None:
        try:
            if kind is None:
                self.flush()
        finally:
            self.close()
