"""Metrics to the loggers users already have: TensorBoard, a CSV file, Weights & Biases (offline).

``train.loggers`` (``--set 'train.loggers=[tensorboard]'``) makes :func:`otmdr.train.train` stream
every epoch's metrics row (the keys of ``metrics.jsonl``), the training loss of every
:data:`STEP_EVERY`-th step (``train_loss_step``) and the final test metrics (``test_*``) into the
run folder: ``RUN/tensorboard/`` and ``RUN/wandb/``; ``csv`` is ``RUN/metrics.csv``, which every
run writes anyway. The x axis is the optimizer step (an epoch's row at its last step, and
``epoch`` is logged too). Only rank 0 logs under torchrun. A resumed run writes from where its
checkpoint stopped: TensorBoard hides what an interrupted process wrote past that point
(``purge_step``), so no step shows twice.

For your own loop::

    from otmdr.train.loggers import open_loggers

    with open_loggers(["tensorboard", "csv"], "runs/mine") as loggers:
        for step in ...:
            loggers.log(step, {"train_loss": loss.item()})

A logger whose package is missing is a one-line :class:`~otmdr.config.ConfigError` naming the
extra to install (``pip install 'otmdr[tensorboard]'``), raised when the loggers are opened.
"""

from __future__ import annotations

import csv
import math
import os
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ..config import LOGGERS, ConfigError, check_loggers

__all__ = ["Loggers", "open_loggers", "STEP_EVERY", "KINDS"]

#: the logger names ``train.loggers`` and :func:`open_loggers` accept
KINDS = tuple(LOGGERS)
#: :func:`otmdr.train.train` logs the training loss of every this many optimizer steps
#: (one host sync each): a curve inside the epochs at no measurable cost
STEP_EVERY = 50


def open_loggers(kinds: Iterable[str], folder: str | Path, *, start_step: int = 0, name: str | None = None,
                 config: Mapping[str, Any] | None = None) -> Loggers:
    """Open the loggers ``kinds`` (``csv``, ``tensorboard``, ``wandb``) writing under ``folder``.

    ``tensorboard`` writes event files to ``folder/tensorboard/``; ``wandb`` an offline run in
    ``folder/wandb/`` (``WANDB_MODE=online`` sends it; the run id is kept in the folder, so a
    resumed run continues the same run); ``csv`` appends ``step,name,value`` rows to
    ``folder/scalars.csv``. With ``start_step`` (a resumed run: the first step it will log) what an
    earlier process logged at that step or later is dropped (TensorBoard: hidden by ``purge_step``;
    CSV: removed), so nothing is logged twice. ``name`` and ``config`` describe the run to wandb.
    Raises ConfigError for an unknown kind or a missing package (one line, naming the extra).
    """
    kinds = list(dict.fromkeys(kinds))  # each once, in the order given
    for kind in kinds:
        if kind not in LOGGERS:
            raise ConfigError(f"unknown logger {kind!r}: choose from {', '.join(KINDS)}")
    check_loggers(kinds)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    opened: list[_Logger] = []
    try:
        for kind in kinds:
            opened.append(_OPENERS[kind](folder, start_step, name or folder.name, dict(config or {})))
    except BaseException:
        for logger in opened:
            logger.close()
        raise
    return Loggers(opened)


class Loggers:
    """The open loggers: ``log(step, metrics)`` to each, ``flush()``, ``close()`` (or ``with``)."""

    def __init__(self, loggers: list[_Logger] | None = None) -> None:
        self._loggers = list(loggers or [])

    def __bool__(self) -> bool:
        return bool(self._loggers)

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Log the numbers of ``metrics`` (other values, such as lists, are skipped) at ``step``."""
        numbers = {key: float(value) for key, value in metrics.items()
                   if isinstance(value, (int, float)) and not isinstance(value, bool)}
        if numbers:
            for logger in self._loggers:
                logger.log(int(step), numbers)

    def flush(self) -> None:
        for logger in self._loggers:
            logger.flush()

    def close(self) -> None:
        loggers, self._loggers = self._loggers, []
        for logger in loggers:
            logger.close()

    def __enter__(self) -> Loggers:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


class _Logger:
    def log(self, step: int, metrics: dict[str, float]) -> None:
        raise NotImplementedError

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class _TensorBoard(_Logger):
    def __init__(self, folder: Path, start_step: int, name: str, config: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: TensorBoard hides the events an interrupted process wrote at or after it
        self._writer = SummaryWriter(str(folder / "tensorboard"), purge_step=start_step or None)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self._writer.add_scalar(key, value, step)

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class _CSV(_Logger):
    """``step,name,value`` rows (long format: steps may log different names)."""

    def __init__(self, folder: Path, start_step: int, name: str, config: dict[str, Any]) -> None:
        self._path = folder / "scalars.csv"
        if start_step and self._path.is_file():  # a resumed run: drop what it logs again
            with open(self._path, newline="", encoding="utf-8") as file:
                kept = [row for row in csv.DictReader(file) if int(row["step"]) < start_step]
            with open(self._path, "w", newline="", encoding="utf-8") as file:
                writer = csv.DictWriter(file, fieldnames=["step", "name", "value"])
                writer.writeheader()
                writer.writerows(kept)
        new = not self._path.is_file() or self._path.stat().st_size == 0
        self._file = open(self._path, "a", newline="", encoding="utf-8")  # closed by close()
        self._csv = csv.writer(self._file)
        if new:
            self._csv.writerow(["step", "name", "value"])

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self._csv.writerows([step, key, repr(value) if math.isfinite(value) else str(value)]
                            for key, value in metrics.items())

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class _WandB(_Logger):
    """An offline Weights & Biases run in ``folder/wandb/`` (``wandb sync`` uploads it later)."""

    def __init__(self, folder: Path, start_step: int, name: str, config: dict[str, Any]) -> None:
        import wandb

        where = folder / "wandb"
        where.mkdir(exist_ok=True)
        id_file = where / "otmdr-run-id"
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:8]
        id_file.write_text(run_id + "\n")
        self._run = wandb.init(dir=str(folder), id=run_id, name=name, config=config, resume="allow",
                               mode=os.environ.get("WANDB_MODE", "offline"))
        self._start = start_step

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if step >= self._start:
            self._run.log(metrics, step=step)

    def close(self) -> None:
        self._run.finish()


_OPENERS = {"csv": _CSV, "tensorboard": _TensorBoard, "wandb": _WandB}
