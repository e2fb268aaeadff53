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

Sharded checkpoints (``train.strategy: fsdp``, docs/distributed.md): the parameters and the
optimizer's per-parameter state are sharded over the processes, so no process holds them whole.
They are written by every process together with ``torch.distributed.checkpoint`` (DCP) into a
folder beside the file, ``checkpoints/state-EEEE-BBBBB.dcp/`` (EEEE epochs done, BBBBB steps of
the next; first written as ``.state-....partial`` and renamed once every process has written its
part), and the file (``last.pt``, ``best.pt``) holds everything else as usual plus a ``sharded``
entry naming that folder and where the optimizer's sharded tensors go. The file is written after
the folder and is what makes it current: a kill in between leaves the earlier file, still naming
its own folder, and the new folder is removed on resume. :func:`load_checkpoint` reads the model's
tensors back from the folder, whole, in one process (``otmdr eval`` and the other readers); a
resume loads them sharded instead (:mod:`otmdr.train.strategy`). DCP's files carry no checksum:
the file's SHA-256 covers the file alone, the folder is checked for the tensors it must hold.
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
           "atomic_write_text", "sharded_name", "split_optimizer_state", "join_optimizer_state", "sharded_folder",
           "load_sharded_model", "remove_sharded", "sharded_read_error"]


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


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", *,
                    sharded_model: bool = True) -> dict[str, Any]:
    """The checkpoint at ``path``, its checksum verified and its structure validated
    (:func:`validate_checkpoint`); :class:`CheckpointError` otherwise.

    A sharded checkpoint's model is read whole from its folder into ``"model"`` (in this process
    alone), unless ``sharded_model`` is false: then the state has no ``"model"`` entry (a resume
    under FSDP loads it sharded, every process its part)."""
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
    if not isinstance(state, dict) or ("model" not in state and "sharded" not in state) or "config" not in state:
        raise CheckpointError(f"checkpoint {path} is not an otmdr checkpoint (no model/config entries)")
    validate_checkpoint(state, path)
    if sharded_model and "sharded" in state and "model" not in state:
        from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

        try:
            state["model"] = {name: tensor.to(map_location)
                              for name, tensor in load_sharded_model(sharded_folder(state, path)).items()}
        except (Exception, CheckpointException) as error:  # a shard file cut short or damaged: one line
            raise sharded_read_error(sharded_folder(state, path), error) from None
    return state


def sharded_read_error(folder: Path, error: BaseException) -> CheckpointError:
    """One line for a sharded folder that DCP could not read (a shard file cut short, damaged or
    missing), naming the first process's failure when DCP gathered them."""
    failures = getattr(error, "failures", None)  # DCP's CheckpointException: rank -> (exception, its frames)
    if isinstance(failures, dict) and failures:
        raised = [f[0] if isinstance(f, tuple) else f for _, f in sorted(failures.items())]
        raised = [e for e in raised if isinstance(e, BaseException)] or [error]
        error = next((e for e in raised if str(e).strip()), raised[0])  # one that says why, if any does
    text = str(error).strip().splitlines()[0][:200] if str(error).strip() else "unreadable"
    return CheckpointError(f"sharded checkpoint {folder} cannot be read ({type(error).__name__}: {text}); {_ADVICE}")


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
    if problem is None:
        problem = _sharded_problem(state, Path(path))
    if problem is None and model_state is not None:
        saved = state["model"] if "model" in state else _sharded_shapes(sharded_folder(state, path))
        problem = _model_problem(saved, model_state)
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
    missing = [key for key in _REQUIRED if key not in state and not (key == "model" and "sharded" in state)]
    if missing:
        return f"it has no {', '.join(missing)} entr{'y' if len(missing) == 1 else 'ies'}"
    if not isinstance(state["config"], dict):
        return "its config entry is not a mapping"
    try:
        cfg = config_from_dict(state["config"])
    except ConfigError as error:
        return f"its config is not valid ({error})"
    model = state.get("model")
    if "sharded" in state and model is None:
        pass  # the model is in the sharded folder (checked by _sharded_problem)
    elif not isinstance(model, Mapping) or not model or not all(
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


# -- sharded checkpoints (FSDP) ----------------------------------------------------------------

_SHARDED_NAME = re.compile(r"state-\d{4,}-\d{5,}\.dcp")


def sharded_name(epoch: int, batch: int) -> str:
    """The folder of a sharded checkpoint after ``epoch`` epochs and ``batch`` steps of the next."""
    return f"state-{epoch:04d}-{batch:05d}.dcp"


def sharded_folder(state: dict[str, Any], path: str | Path) -> Path:
    """The folder holding the sharded tensors of the checkpoint ``state`` read from ``path``."""
    return Path(path).parent / state["sharded"]["folder"]


def _path_key(path: list[Any]) -> str:
    return ".".join(str(part) for part in path)


def split_optimizer_state(state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Tensor], list[list[Any]]]:
    """An optimizer's state dict under FSDP as ``(skeleton, tensors, layout)``: the skeleton is the
    state dict without its sharded tensors (DTensors; plain values and tensors stay, for the
    checkpoint file), ``tensors`` those tensors by key (for DCP), and ``layout`` one
    ``[path, parameter index]`` per tensor: where it goes back and which parameter it is laid out
    as (the base optimizer's per-parameter state, OT-MDR's stored LookSAM component)."""
    from ..optim.sharding import is_sharded

    tensors: dict[str, Tensor] = {}
    layout: list[list[Any]] = []

    def walk(value: Any, path: list[Any]) -> Any:
        if not isinstance(value, dict):
            return value
        kept = {}
        for key, item in value.items():
            if isinstance(item, Tensor) and is_sharded(item):
                record(item, path + [key])
            else:
                kept[key] = walk(item, path + [key])
        return kept

    def record(tensor: Tensor, path: list[Any]) -> None:
        if len(path) == 3 and path[0] == "state" and _is_int(path[1]):
            index = path[1]
        elif len(path) == 3 and path[:2] == ["otmdr", "reuse"] and _is_int(path[2]):
            index = path[2]
        else:
            raise CheckpointError(f"the optimizer state holds a sharded tensor at {_path_key(path)}, which a "
                                  "sharded checkpoint cannot place (only per-parameter state is sharded)")
        tensors[_path_key(path)] = tensor
        layout.append([list(path), int(index)])

    skeleton = walk(state, [])
    return skeleton, tensors, layout


def join_optimizer_state(skeleton: dict[str, Any], tensors: dict[str, Tensor],
                         layout: list[list[Any]]) -> dict[str, Any]:
    """The optimizer state dict that :func:`split_optimizer_state` split (a copy of the dicts)."""
    def copy(value: Any) -> Any:
        return {key: copy(item) for key, item in value.items()} if isinstance(value, dict) else value

    state = copy(skeleton)
    for path, _ in layout:
        target = state
        for part in path[:-1]:
            target = target.setdefault(part, {})
        target[path[-1]] = tensors[_path_key(path)]
    return state


def _sharded_metadata(folder: Path) -> dict[str, Any]:
    from torch.distributed.checkpoint import FileSystemReader

    metadata: dict[str, Any] = FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    return metadata


def _sharded_shapes(folder: Path) -> dict[str, Tensor]:
    """The model's tensors of a sharded checkpoint as empty meta tensors of their global shapes."""
    return {key[len("model."):]: torch.empty(tuple(meta.size), device="meta")
            for key, meta in _sharded_metadata(folder).items() if key.startswith("model.") and hasattr(meta, "size")}


def _sharded_problem(state: dict[str, Any], path: Path) -> str | None:
    """A sharded checkpoint's ``sharded`` entry and its folder: the folder must exist and hold the
    model's tensors and every optimizer tensor the layout names."""
    sharded = state.get("sharded")
    if sharded is None:
        return None
    if not isinstance(sharded, dict) or not isinstance(sharded.get("folder"), str) \
            or not _SHARDED_NAME.fullmatch(sharded["folder"]) or not isinstance(sharded.get("layout"), list) \
            or not all(isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], list)
                       and _is_int(entry[1]) for entry in sharded["layout"]):
        return "its sharded entry is not a sharded checkpoint's description (a folder and an optimizer layout)"
    folder = sharded_folder(state, path)
    try:
        metadata = _sharded_metadata(folder)
    except Exception:  # missing, or its .metadata unreadable
        return (f"its sharded folder {folder} (the weights and the optimizer state) is missing or unreadable: "
                "a sharded checkpoint is the file and that folder together")
    if not any(key.startswith("model.") for key in metadata):
        return f"its sharded folder {folder} holds no model tensors"
    lost = [_path_key(p) for p, _ in sharded["layout"] if f"optimizer.{_path_key(p)}" not in metadata]
    if lost:
        return f"its sharded folder {folder} lacks the optimizer tensor {lost[0]}"
    return None


def load_sharded_model(folder: Path) -> dict[str, Tensor]:
    """The model's tensors of a sharded checkpoint, whole, read in this process alone."""
    import torch.distributed.checkpoint as dcp

    template = {key[len("model."):]: torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
                for key, meta in _sharded_metadata(folder).items() if key.startswith("model.")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP's "assuming the intent is to load in a single process"
        dcp.load({"model": template}, checkpoint_id=str(folder), no_dist=True)
    return template


def remove_sharded(checkpoints: Path, names: set[str] | None = None, *, keep: set[str] | None = None) -> None:
    """Remove sharded folders: those ``names``, or (``keep`` given) every folder and every partial
    folder of an interrupted write except those kept (a resume's leftovers; nothing is writing)."""
    import shutil

    if names is not None:
        for name in names:
            shutil.rmtree(checkpoints / name, ignore_errors=True)
        return
    if keep is None or not checkpoints.is_dir():
        return
    for child in checkpoints.iterdir():
        stale = _SHARDED_NAME.fullmatch(child.name) and child.name not in keep
        partial = child.name.startswith(".state-") and child.name.endswith(".partial")
        if child.is_dir() and (stale or partial):
            shutil.rmtree(child, ignore_errors=True)


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

    def call(self, job: Callable[[], None]) -> None:
        """Run ``job`` on the writer's thread after everything queued before it."""
        self._submit(job)

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
