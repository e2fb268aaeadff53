"""Run folders: made fresh or checked for a resume, read back as a trained model, and cleared of
what a run that failed before its first checkpoint left behind.

A run directory holds ``config.yaml`` (the resolved config), ``metrics.jsonl`` and
``metrics.csv`` (one row per epoch), ``checkpoints/last.pt`` and ``checkpoints/best.pt``, and
``summary.json`` once the run has finished. A study's folder (``otmdr compare``) holds run
directories. Every decision about what a folder may hold is taken here, so the CLI only parses
and calls.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import yaml

from ..config import ExperimentConfig, comparable_config, config_from_dict
from .checkpoint import CheckpointError, CheckpointWriter, atomic_write_text, load_checkpoint, validate_checkpoint

if TYPE_CHECKING:
    import torch
    from torch import Tensor, nn

__all__ = ["RunDirError", "prepare_run_dir", "load_run", "check_same_run", "remove_leftovers", "write_history",
           "restart_config", "discard_unfinished", "prepare_study_dir", "discard_failed_study"]


class RunDirError(RuntimeError):
    """A run directory that cannot be used as asked (exists, or has nothing to resume)."""


def prepare_run_dir(run_dir: str | Path, *, resume: bool) -> Path:
    """Create a fresh run directory, or check that ``resume`` has a checkpoint to continue."""
    run_dir = Path(run_dir)
    if resume:
        if not (run_dir / "checkpoints" / "last.pt").is_file():
            raise RunDirError(f"nothing to resume in {run_dir}: no checkpoints/last.pt (start it without --resume)")
        return run_dir
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"--out {run_dir} is a file, not a folder: choose another --out")
    if run_dir.exists() and any(run_dir.iterdir()):
        raise RunDirError(
            f"run directory {run_dir} already exists and is not empty; it is never overwritten: choose "
            "another --out, remove it, or continue it with --resume"
        )
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    return run_dir


def load_run(path: str | Path, device: str = "auto",
             which: str = "last") -> tuple[ExperimentConfig, nn.Module, dict[str, Any]]:
    """A trained model from a checkpoint file, or from a run directory: its final model
    (``which="last"``, what ``summary.json`` reports) or its best on validation (``"best"``)."""
    from ..data import DatasetSpec, get_spec
    from .builders import build_model, build_optimizer, select_device

    path = Path(path)
    if path.is_dir():
        checkpoint = path / "checkpoints" / f"{which}.pt"
        if not checkpoint.is_file():
            raise CheckpointError(f"{path} holds no checkpoints/{which}.pt: is it a run directory?")
        path = checkpoint
    state = load_checkpoint(path)
    cfg = config_from_dict(state["config"])
    saved = state.get("spec")  # resolved at training time (image folders); older checkpoints lack it
    spec = get_spec(cfg.data.name) if saved is None else DatasetSpec(
        **{**saved, "mean": tuple(saved["mean"]), "std": tuple(saved["std"])})
    model = build_model(cfg, spec)
    # the whole checkpoint must be sound, not only its weights: a damaged optimizer state means
    # a damaged file, whose weights are not to be trusted either
    validate_checkpoint(state, path, model_state=model.state_dict(), optimizer=build_optimizer(cfg, model))
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as error:
        raise CheckpointError(f"checkpoint {path} does not fit model {cfg.model.name!r}: "
                              f"{str(error).splitlines()[0]}") from None
    return cfg, model.to(select_device(device)), state


def check_same_run(run_dir: Path, checkpoint: dict[str, Any], *, model_state: Mapping[str, Tensor] | None = None,
                   optimizer: torch.optim.Optimizer | None = None) -> None:
    """A resumed checkpoint must be this run's: one copied from another run would silently
    continue that run's config in this folder. Given the built model's state and optimizer, it
    must also fit them, and the run's ``best.pt`` (read at the run's end) must be intact: all
    checked before a resume loads anything or writes a file."""
    last = run_dir / "checkpoints" / "last.pt"
    saved = run_dir / "config.yaml"
    if saved.is_file() and comparable_config(yaml.safe_load(saved.read_text())) != comparable_config(
            checkpoint["config"]):
        raise CheckpointError(f"{last} belongs to another run than {saved} describes "
                              "(a copied checkpoint?): restore this run's checkpoint or start a new run")
    validate_checkpoint(checkpoint, last, model_state=model_state, optimizer=optimizer)
    best = run_dir / "checkpoints" / "best.pt"
    if best.is_file() and not (last.is_file() and best.samefile(last)):
        try:
            load_checkpoint(best, sharded_model=False)  # its file and, if sharded, its folder's metadata
        except CheckpointError as error:
            raise CheckpointError(f"{error} (a resume ends by reading it: restore it, or delete it to resume "
                                  "without the early-stopped model so far)") from None


def remove_leftovers(run_dir: Path) -> None:
    """Temporary files of writes a kill interrupted (``.<name>.<random>.tmp``, see
    :func:`otmdr._atomic.atomic_write`): never renamed into place, so never needed."""
    for folder in (run_dir, run_dir / "checkpoints"):
        for leftover in folder.glob(".*.tmp"):
            leftover.unlink(missing_ok=True)


def write_history(run_dir: Path, history: list[dict[str, Any]], writer: CheckpointWriter | None = None) -> None:
    """``metrics.jsonl`` and ``metrics.csv``, one row per epoch."""
    # not fsynced: rebuilt from the checkpoint's history on resume, and an fsync per epoch costs
    # more than a small model's epoch (benchmarks/pipeline_overhead.py)
    write = writer.write_text if writer is not None else atomic_write_text
    write(run_dir / "metrics.jsonl", "".join(json.dumps(row) + "\n" for row in history), durable=False)
    buffer = io.StringIO()
    table = csv.DictWriter(buffer, fieldnames=list(history[0]))
    table.writeheader()
    table.writerows(history)
    write(run_dir / "metrics.csv", buffer.getvalue(), durable=False)


def restart_config(run_dir: Path) -> dict[str, Any] | None:
    """The saved config of a run stopped before its first checkpoint (None for any other
    folder): nothing was trained, so starting again from it is exactly what continuing would do."""
    saved = run_dir / "config.yaml"
    if (run_dir / "checkpoints" / "last.pt").is_file() or not saved.is_file():
        return None
    (run_dir / "checkpoints").mkdir(exist_ok=True)
    remove_leftovers(run_dir)  # a kill during the first checkpoint's write left its temporary file
    return yaml.safe_load(saved.read_text())


def discard_unfinished(run_dir: Path, *, keep_folder: bool) -> bool:
    """After a fresh run failed: remove what it wrote unless it reached its first checkpoint (a
    folder the user made stays, emptied). Returns whether anything was checkpointed (and kept)."""
    if (run_dir / "checkpoints" / "last.pt").exists():
        return True
    if keep_folder:
        for child in run_dir.iterdir():
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    else:
        shutil.rmtree(run_dir, ignore_errors=True)
    return False


def prepare_study_dir(out: Path, *, resume: bool) -> str:
    """Make (or check) a study's folder; returns how it was found: ``"created"``, ``"empty"``, or
    ``""`` when it holds an earlier invocation's runs (only with ``resume``)."""
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--out {out} is a file, not a folder: choose another --out")
    if out.exists() and any(out.iterdir()) and not resume:
        raise RunDirError(f"{out} already exists and is not empty; it is never overwritten: choose another "
                          "--out, or add --resume to finish the runs it holds")
    fresh = "created" if not out.exists() else ("empty" if not any(out.iterdir()) else "")
    out.mkdir(parents=True, exist_ok=True)
    return fresh


def discard_failed_study(out: Path, fresh: str) -> None:
    """After a study failed (e.g. a missing data directory found by its first run): what it put
    into a new or empty folder (``fresh`` from :func:`prepare_study_dir`) is removed if nothing
    was checkpointed, so a failed start leaves no partial artefact; an empty folder the user
    made stays."""
    if not fresh or any(out.rglob("*.pt")):
        return
    for child in ([out] if fresh == "created" else list(out.iterdir())):
        shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink(missing_ok=True)
