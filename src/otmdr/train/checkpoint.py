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

Integrity: every checkpoint carries the SHA-256 of its own bytes, so a flipped bit or a file cut
short (a disk or copy error) is refused instead of silently resumed. torch's format is a zip; the
digest of everything before it is stored as the zip's comment, the last bytes of the file
(``otmdr-sha256:<hex>``), which zip readers, ``torch.load`` included, skip. It is computed from
the serialised bytes on the writer's background thread (``CheckpointWriter``), so training does
not wait for it, and checked by :func:`load_checkpoint` before unpickling. A checkpoint without
one (written before checksums existed, or re-saved with plain ``torch.save``) still loads, checked
for its structure only. Then :func:`validate_checkpoint`, the one structural check every reader
goes through, refuses missing entries, entries of the wrong kind and states that do not fit the
model and optimizer, with one line, before a resume changes any file of its run.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import queue
import re
import threading
import warnings
from collections.abc import Callable, Mapping
from dataclasses import fields
from pathlib import Path
from typing import IO, Any

import torch
from torch import Tensor

from .._atomic import atomic_link, atomic_write, atomic_write_text
from ..config import ConfigError, config_from_dict
from ..data import DatasetSpec

__all__ = ["CheckpointError", "CheckpointWriter", "save_checkpoint", "load_checkpoint", "validate_checkpoint",
           "atomic_write_text"]


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read, with the path and what to do."""


_SEAL = b"otmdr-sha256:"
_SEAL_LENGTH = len(_SEAL) + 64  # the prefix and the hex digest: the zip comment
_ZIP_START = b"PK\x03\x04"
_ZIP_END = b"PK\x05\x06"  # the end-of-central-directory record: 22 bytes, then the comment
_ADVICE = ("restore it from an intact copy, or use the run's other checkpoint (otmdr eval --checkpoint best; "
           "to resume from best.pt copy it over last.pt: the epochs after it train again), or retrain")


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    data = _serialise(state)
    atomic_write(path, lambda handle: _write_sealed(handle, data))


def _serialise(state: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def _write_sealed(handle: IO[bytes], data: bytes) -> None:
    """Write torch's zip ``data`` with the SHA-256 of its bytes as the zip's comment (the comment
    length, in the end record, is part of what is hashed)."""
    if len(data) < 22 or data[-22:-18] != _ZIP_END or data[-2:] != b"\0\0":
        handle.write(data)  # not the layout torch writes (a zip with no comment): left unsealed
        return
    body, length = memoryview(data)[:-2], _SEAL_LENGTH.to_bytes(2, "little")
    digest = hashlib.sha256(body)
    digest.update(length)
    handle.write(body)
    handle.write(length)
    handle.write(_SEAL + digest.hexdigest().encode())


def _check_seal(handle: IO[bytes], path: Path) -> None:
    """Refuse a file whose bytes do not match the SHA-256 it ends with; a zip without a comment
    (an older or a plain ``torch.save`` checkpoint) passes, anything else is left to torch.load."""
    handle.seek(0, io.SEEK_END)
    size = handle.tell()
    handle.seek(0)
    if handle.read(4) != _ZIP_START:
        return  # not a zip: torch's legacy format or not a checkpoint at all, torch.load decides
    handle.seek(max(0, size - 22 - _SEAL_LENGTH))
    tail = handle.read()
    if tail[-_SEAL_LENGTH:-64] == _SEAL:
        digest = hashlib.sha256()
        handle.seek(0)
        left = size - _SEAL_LENGTH
        while left > 0:
            chunk = handle.read(min(left, 1 << 22))
            if not chunk:
                break
            digest.update(chunk)
            left -= len(chunk)
        if digest.hexdigest().encode() != tail[-64:]:
            raise CheckpointError(f"checkpoint {path} is damaged: its bytes do not match the SHA-256 checksum "
                                  f"written with it (a disk or copy error); {_ADVICE}")
        return
    if tail[-22:-18] == _ZIP_END and tail[-2:] == b"\0\0":
        return  # no checksum: written before checksums, or re-saved with torch.save
    raise CheckpointError(f"checkpoint {path} is damaged: corrupted or not an otmdr checkpoint (it does not end "
                          f"with a zip's end record: cut short?); {_ADVICE}")


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The checkpoint at ``path``, its checksum verified and its structure validated
    (:func:`validate_checkpoint`); :class:`CheckpointError` otherwise."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with path.open("rb") as handle:  # one open file: a checkpoint renamed over it meanwhile is not mixed in
            _check_seal(handle, path)
            handle.seek(0)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # e.g. the pickle-protocol warning of a plain pickle: one line only
                state = torch.load(handle, map_location=map_location, weights_only=True)
    except CheckpointError:
        raise
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
    validate_checkpoint(state, path)
    return state


def _unreadable(path: Path, error: BaseException) -> str:
    return (f"checkpoint {path} is corrupted or not an otmdr checkpoint ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else 'unreadable'}); use another checkpoint "
            "(best.pt / last.pt) or retrain")


# -- the structure of a checkpoint ------------------------------------------------------------

_REQUIRED = ("config", "model", "epoch", "best", "history", "optimizer", "scheduler", "loader", "rng")
_PARTIAL = ("loss_sum", "correct", "seen", "perturbation", "samples", "seconds")  # an epoch stopped part-way
_ROW_NUMBERS = ("train_loss", "train_accuracy", "perturbation_norm", "seconds")  # what resumed rows are read for


def validate_checkpoint(state: Any, path: str | Path, *, model_state: Mapping[str, Tensor] | None = None,
                        optimizer: torch.optim.Optimizer | None = None) -> None:
    """Refuse a checkpoint that a resume or an evaluation could not use, with one line naming the
    damaged entry: every reader calls this before it uses the state or writes anything, so a
    damaged file fails here instead of as a traceback half-way through a resume.

    The structure (entries, their kinds, the history's rows) is checked alone; with the built
    ``model_state`` and ``optimizer`` also that the saved tensors fit them (names and shapes), so
    that loading them cannot fail part-way."""
    problem = _structure_problem(state)
    if problem is None and model_state is not None:
        problem = _model_problem(state["model"], model_state)
    if problem is None and optimizer is not None:
        problem = _optimizer_fit_problem(state["optimizer"], optimizer)
    if problem is not None:
        raise CheckpointError(f"checkpoint {path} is damaged: {problem}; {_ADVICE}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _structure_problem(state: Any) -> str | None:
    if not isinstance(state, dict):
        return "it holds no mapping of entries"
    missing = [key for key in _REQUIRED if key not in state]
    if missing:
        return f"it has no {', '.join(missing)} entr{'y' if len(missing) == 1 else 'ies'}"
    if not isinstance(state["config"], dict):
        return "its config entry is not a mapping"
    try:
        cfg = config_from_dict(state["config"])
    except ConfigError as error:
        return f"its config is not valid ({error})"
    model = state["model"]
    if not isinstance(model, Mapping) or not model or not all(
            isinstance(k, str) and isinstance(v, Tensor) for k, v in model.items()):
        return "its model entry is not a mapping of names to tensors"
    epoch = state["epoch"]
    if not _is_int(epoch) or not 0 <= epoch <= cfg.train.epochs:
        return f"its epoch {epoch!r} is not a count of epochs between 0 and {cfg.train.epochs}"
    if not _is_number(state["best"]):
        return f"its best score {state['best']!r} is not a number"
    checks = (_history_problem(state["history"], epoch),
              _optimizer_problem(state["optimizer"], needs_otmdr=cfg.optim.method != "sgd"),
              _scheduler_problem(state["scheduler"]),
              None if state.get("scaler") is None or isinstance(state["scaler"], dict)
              else "its scaler entry is not a mapping",
              _loader_problem(state["loader"]),
              _rank_problem(state, "its"),
              _ranks_problem(state),
              _spec_problem(state))
    return next((problem for problem in checks if problem is not None), None)


def _history_problem(history: Any, epoch: int) -> str | None:
    if not isinstance(history, list) or len(history) != epoch:
        return f"its history is not a list of {epoch} epoch rows"
    keys = None
    for number, row in enumerate(history, 1):
        if not isinstance(row, dict) or row.get("epoch") != number:
            return f"its history row {number} is not the row of epoch {number}"
        keys = keys or set(row)  # every row has the first one's columns (metrics.csv's header)
        if set(row) != keys or not all(_is_number(row.get(key)) for key in _ROW_NUMBERS):
            return f"its history row {number} lacks a metric or has one that is not a number"
    return None


def _optimizer_problem(optimizer: Any, *, needs_otmdr: bool) -> str | None:
    if not isinstance(optimizer, dict) or not isinstance(optimizer.get("state"), dict) \
            or not isinstance(optimizer.get("param_groups"), list) or not optimizer["param_groups"]:
        return "its optimizer entry is not an optimizer state (state and param_groups)"
    held: set[Any] = set()
    for group in optimizer["param_groups"]:
        if not isinstance(group, dict) or not isinstance(group.get("params"), list) \
                or not all(_is_int(i) for i in group["params"]) or not _is_number(group.get("lr")):
            return "its optimizer's param_groups are not lists of parameter indices with a learning rate"
        held.update(group["params"])
    for key, entries in optimizer["state"].items():
        if key not in held or not isinstance(entries, dict):
            return f"its optimizer state names parameter {key!r}, which no param group holds"
    if needs_otmdr:
        extra = optimizer.get("otmdr")
        if not isinstance(extra, dict) or not _is_int(extra.get("steps")) \
                or not _is_byte_state(extra.get("generator")):
            return "its optimizer state lacks the OT-MDR entry (step count and noise generator)"
    return None


def _scheduler_problem(scheduler: Any) -> str | None:
    if not isinstance(scheduler, dict) or not _is_int(scheduler.get("last_epoch")) \
            or not isinstance(scheduler.get("base_lrs"), list):
        return "its scheduler entry is not a learning-rate schedule's state"
    return None


def _loader_problem(loader: Any) -> str | None:
    if not isinstance(loader, dict) or not all(_is_int(loader.get(key)) and loader[key] >= 0
                                               for key in ("epoch", "batch", "seed")):
        return "its loader entry is not a batch loader's position (epoch, batch, seed)"
    return None


def _is_byte_state(value: Any) -> bool:
    return isinstance(value, Tensor) and value.dtype == torch.uint8 and value.dim() == 1 and value.numel() > 0


def _rank_problem(state: dict[str, Any], whose: str) -> str | None:
    """One process's random states and partial epoch (the checkpoint's own, or a rank's)."""
    rng = state.get("rng")
    if not isinstance(rng, dict) or not _is_byte_state(rng.get("cpu")) \
            or rng["cpu"].numel() != torch.get_rng_state().numel() \
            or not (rng.get("cuda") is None or _is_byte_state(rng["cuda"])):
        return f"{whose} rng entry is not a random-number generator's state"
    if state.get("optimizer_generator") is not None and not _is_byte_state(state["optimizer_generator"]):
        return f"{whose} optimizer_generator entry is not a generator's state"
    partial = state.get("partial_epoch")
    if partial is not None and (not isinstance(partial, dict)
                                or not all(_is_number(partial.get(key)) for key in _PARTIAL)):
        return f"{whose} partial_epoch entry is not the running sums of an epoch"
    return None


def _ranks_problem(state: dict[str, Any]) -> str | None:
    """A torchrun run's per-process states: one per process."""
    world = state.get("world_size", 1)
    if not _is_int(world) or world < 1:
        return f"its world_size {world!r} is not a number of processes"
    if world == 1:
        return None
    ranks = state.get("ranks")
    if not isinstance(ranks, list) or len(ranks) != world:
        return f"its ranks entry does not hold the states of its {world} processes"
    for rank, mine in enumerate(ranks):
        problem = _rank_problem(mine, f"rank {rank}'s") if isinstance(mine, dict) else f"rank {rank}'s state is lost"
        if problem is not None:
            return problem
    return None


def _spec_problem(state: dict[str, Any]) -> str | None:
    spec, classes = state.get("spec"), state.get("classes")
    if classes is not None and not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
        return "its classes entry is not a list of class names"
    if spec is None:  # older checkpoints: the dataset's registered spec is used
        return None
    if not isinstance(spec, dict) or set(spec) != {f.name for f in fields(DatasetSpec)} \
            or not all(isinstance(spec[key], (list, tuple)) and all(_is_number(v) for v in spec[key])
                       for key in ("mean", "std")):
        return "its spec entry is not a dataset description"
    return None


def _model_problem(saved: Mapping[str, Tensor], built: Mapping[str, Tensor]) -> str | None:
    missing, unexpected = [k for k in built if k not in saved], [k for k in saved if k not in built]
    if missing or unexpected:
        return (f"its model state does not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    for name, tensor in built.items():
        if saved[name].shape != tensor.shape:
            return (f"its model tensor {name} has shape {list(saved[name].shape)}, the model's "
                    f"{list(tensor.shape)}")
    return None


def _optimizer_fit_problem(saved: dict[str, Any], optimizer: torch.optim.Optimizer) -> str | None:
    """The saved optimizer state against the built optimizer, matched as ``load_state_dict``
    matches them (groups in order, parameters in order): counts, then every per-parameter tensor
    (a 0-d step count, or one of the parameter's shape)."""
    groups = optimizer.param_groups
    if len(saved["param_groups"]) != len(groups) or any(
            len(s["params"]) != len(g["params"]) for s, g in zip(saved["param_groups"], groups)):
        return "its optimizer state has other parameter groups than this run's optimizer"
    params = {index: param for s, g in zip(saved["param_groups"], groups)
              for index, param in zip(s["params"], g["params"])}
    for index, entries in saved["state"].items():
        for name, value in entries.items():
            if isinstance(value, Tensor) and value.dim() > 0 and value.shape != params[index].shape:
                return (f"its optimizer's {name} of parameter {index} has shape {list(value.shape)}, the "
                        f"parameter's {list(params[index].shape)}")
    return None


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
        data = _serialise(state)  # the snapshot; its checksum is computed on the writer's thread
        self._submit(lambda: atomic_write(path, lambda handle: _write_sealed(handle, data)))

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
