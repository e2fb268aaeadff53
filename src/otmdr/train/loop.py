"""The training loop of one run: setup -> epochs -> finish.

``train`` prepares the run (config, data, model, optimizer, and a resumed checkpoint's state),
runs its epochs (steps of SGD / SAM / ASAM / OT-MDR, validation, the epoch's checkpoint and
metrics) and finishes it (the final test evaluation written to ``summary.json``). How the
processes of a launch share the work is one :mod:`~otmdr.train.strategy` object that every phase
calls; what a run folder holds is :mod:`~otmdr.train.run_dir`'s.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor, nn

from .. import _signals
from .._lock import folder_lock
from ..config import ExperimentConfig, check_loggers, config_from_dict, config_to_dict
from ..eval import AUTOCAST, evaluate_model, evaluate_split
from ..eval.calibration import CalibrationError
from ..eval.evaluate import prediction_samples
from ..models import count_parameters
from ..optim import OTMDR
from .builders import RunData, build_data, build_model, build_optimizer, build_scheduler, select_device
from .checkpoint import (CheckpointError, CheckpointWriter, atomic_write_text, load_checkpoint, remove_sharded,
                         sharded_name)
from .compute import gradient_evaluations_per_step, machine_info
from .loggers import STEP_EVERY, Loggers, open_loggers
from .run_dir import RunDirError, check_same_run, load_run, prepare_run_dir, remove_leftovers, write_history
from .strategy import SingleProcess, Strategy, current_strategy, strategy_for

__all__ = ["TrainingError", "Preempted", "train", "nominal_radius",
           # moved; re-exported for one release (import them from otmdr.train, otmdr.eval)
           "RunDirError", "prepare_run_dir", "load_run", "evaluate_split", "evaluate_model", "AUTOCAST"]


class TrainingError(RuntimeError):
    """A run that had to stop (e.g. a non-finite loss); the message says what was kept."""


class Preempted(Exception):
    """A stop request (SIGTERM, a cluster's preemption notice, or Ctrl-C: :mod:`otmdr._signals`)
    stopped the work at a safe point, leaving it resumable; the message says how to continue."""


def train(cfg: ExperimentConfig | None, run_dir: str | Path, *, resume: bool = False,
          log: Callable[[str], None] = print, test: bool = True) -> dict[str, Any]:
    """Train one run into ``run_dir`` (prepared by :func:`prepare_run_dir`); returns the summary.

    With ``resume`` the config saved in the run's last checkpoint is used (``cfg`` is ignored).
    SIGTERM or SIGINT (in the main thread) stops at the next step boundary, or after the epoch's
    checkpoint when it came during validation, after writing a resumable checkpoint, and raises
    :class:`Preempted` (``otmdr._signals``: one policy for every command).

    Under torchrun every process calls this with the same arguments; only rank 0 reads and
    writes ``run_dir`` and logs, and every process returns rank 0's summary.

    ``cfg.train.loggers`` (:mod:`otmdr.train.loggers`) also streams the metrics to TensorBoard or
    Weights & Biases in ``run_dir``; a missing package is a ConfigError before anything is written.

    ``test=False`` scores the run on the validation split only: no test evaluation at the end, and
    its summary has no test metrics (``"validation_only": true``). A study's search runs are so
    trained: a choice must not read the test split, and for a Bayesian network the test-time
    predictive costs more than the training. ``resume`` of such a finished run evaluates it.
    """
    strategy = current_strategy()
    with contextlib.ExitStack() as stack:
        strategy.on_main(lambda: stack.enter_context(folder_lock(run_dir)))
        stack.enter_context(_signals.deferred())
        writer = stack.enter_context(CheckpointWriter())  # rank 0's writes; idle on the other ranks
        run = _setup(cfg, Path(run_dir), resume=resume, strategy=strategy, writer=writer,
                     log=log if strategy.is_main else _quiet)  # rank 0 reports for the whole run
        if strategy.is_main and run.cfg.train.loggers:
            run.loggers = stack.enter_context(_open_loggers(run))
        _run_epochs(run, lambda: run.strategy.stop_requested(_signals.requested() is not None))
        return _finish(run, test=test)


def _quiet(_: str) -> None:
    pass


@dataclass
class _Run:
    """What one run holds from its setup to its finish."""

    cfg: ExperimentConfig
    run_dir: Path
    strategy: Strategy
    writer: CheckpointWriter
    log: Callable[[str], None]
    device: torch.device
    data: RunData
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler | None
    loss_fn: Callable[..., Any]
    per_member: bool
    samples: int  # Monte-Carlo draws of the predictive (BNNs), 1 otherwise
    start_epoch: int = 0
    best: float = -1.0
    history: list[dict[str, Any]] = field(default_factory=list)
    partial: dict[str, Any] | None = None  # the running sums of an epoch stopped part-way
    warned: dict[str, str] = field(default_factory=dict)  # kind -> its first warning
    loggers: Loggers = field(default_factory=Loggers)  # train.loggers (rank 0's; none elsewhere)
    #: the sharded folders the checkpoint files name (train.strategy=fsdp; rank 0's record)
    sharded: dict[str, str | None] = field(default_factory=lambda: {"last": None, "best": None})

    def checkpoint(self, name: str) -> Path:
        return self.run_dir / "checkpoints" / name

    def state(self, epoch: int, ranks: list[dict[str, Any]] | None = None,
              sharded: dict[str, Any] | None = None) -> dict[str, Any]:
        """The checkpoint after ``epoch`` epochs: everything an exact resume needs. ``sharded``:
        the entries naming the sharded folder that holds the model and the optimizer's tensors
        (``Strategy.save_sharded``), in place of them."""
        tensors = sharded if sharded is not None else {
            "model": self.strategy.model_state(self.model), "optimizer": self.optimizer.state_dict()}
        return self.strategy.checkpoint_extra(ranks) | tensors | {
            "config": config_to_dict(self.cfg), "epoch": epoch, "best": self.best, "history": self.history,
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "loader": self.data.train.state_dict(),
            "rng": {"cpu": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None},
            "classes": self.data.classes, "spec": dataclasses.asdict(self.data.spec),
        }


# -- setup ------------------------------------------------------------------------------------

def _setup(cfg: ExperimentConfig | None, run_dir: Path, *, resume: bool, strategy: Strategy,
           writer: CheckpointWriter, log: Callable[[str], None]) -> _Run:
    """The run's objects, built in a fixed order (the random draws of a resumed run depend on
    it), and a resumed checkpoint's state loaded into them."""
    checkpoint = None
    if resume:
        last = run_dir / "checkpoints" / "last.pt"
        # a sharded checkpoint's model stays in its folder: every process loads its shards (_restore)
        checkpoint = strategy.on_main(lambda: load_checkpoint(last, sharded_model=False))
        cfg = config_from_dict(checkpoint["config"])
    if cfg is None:
        raise TypeError("train() needs a config unless it resumes a run")
    strategy = strategy_for(cfg)  # train.strategy: replicas or shards, under torchrun
    if checkpoint is not None:
        strategy.check_checkpoint(checkpoint, last)
    strategy.bind(cfg)
    loggers = cfg.train.loggers
    strategy.on_main(lambda: check_loggers(loggers))  # a missing package: before anything is written
    if not resume:
        strategy.on_main(lambda: atomic_write_text(run_dir / "config.yaml",
                                                   yaml.safe_dump(config_to_dict(cfg), sort_keys=False)))
        strategy.on_main(lambda: _signals.pause_point("after-config"))  # test-only
    if cfg.train.threads is not None:
        torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(cfg.train.seed)
    device = strategy.device(select_device(cfg.train.device))
    data = build_data(cfg, device, shard=strategy.shard())
    strategy.check_data(data.train.num_samples)
    model = build_model(cfg, data.spec).to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # stubs omit it
    from ..models.bayes import is_bayesian
    from ..models.ensemble import Ensemble

    per_member = cfg.ensemble.regime == "per-member" and isinstance(model, Ensemble)
    model, forward = strategy.wrap(model, device, per_member)
    optimizer = build_optimizer(cfg, model, wrapper=forward, seed=strategy.optimizer_seed())
    if isinstance(optimizer, OTMDR):  # SAM and ASAM too: a late phase or a moving trigger reads the run's length
        optimizer.total_steps = cfg.train.epochs * len(data.train)
    scheduler = build_scheduler(cfg, optimizer, len(data.train))
    scaler = torch.amp.GradScaler(device.type) if cfg.train.precision == "fp16" else None
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.train.label_smoothing)
    loss_fn = _loss_function(model, criterion, AUTOCAST[cfg.train.precision], device, per_member=per_member,
                             kl_weight=cfg.bayes.kl_weight if is_bayesian(model) else None, forward=forward)
    log(_describe_run(cfg, model, data, device, strategy))
    run = _Run(cfg, run_dir, strategy, writer, log, device, data, model, optimizer, scheduler, scaler, loss_fn,
               per_member, prediction_samples(cfg, model))
    if checkpoint is not None:
        _restore(run, checkpoint)
    return run


def _restore(run: _Run, checkpoint: dict[str, Any]) -> None:
    """Continue where ``checkpoint`` stopped: weights, optimizer, schedule, loader position and
    every random stream, so the resumed run equals the uninterrupted one bit for bit."""
    strategy = run.strategy
    strategy.on_main(lambda: check_same_run(run.run_dir, checkpoint, model_state=strategy.model_state(run.model),
                                            optimizer=run.optimizer))  # before anything is loaded or written
    if "sharded" in checkpoint:  # every process reads its shards of the model and the optimizer state
        strategy.load_sharded(run.model, run.optimizer, run.checkpoint(""), checkpoint)
    else:
        try:
            strategy.load_model_state(run.model, checkpoint["model"])
        except RuntimeError as error:
            raise CheckpointError(f"{run.checkpoint('last.pt')} does not fit model {run.cfg.model.name!r}: "
                                  f"{str(error).splitlines()[0]}") from None
        run.optimizer.load_state_dict(checkpoint["optimizer"])
    run.scheduler.load_state_dict(checkpoint["scheduler"])
    if run.scaler is not None and checkpoint.get("scaler"):
        run.scaler.load_state_dict(checkpoint["scaler"])
    run.data.train.load_state_dict(checkpoint["loader"])
    mine = strategy.own_state(checkpoint)
    torch.set_rng_state(mine["rng"]["cpu"])
    if run.device.type == "cuda" and mine["rng"].get("cuda") is not None:
        torch.cuda.set_rng_state(mine["rng"]["cuda"], run.device)
    strategy.restore_own_state(run.optimizer, mine)
    run.start_epoch, run.best, run.history = checkpoint["epoch"], checkpoint["best"], checkpoint["history"]
    _backfill_compute(run.history, gradient_evaluations_per_step(run.cfg) * len(run.data.train))
    _backfill_radius_parts(run.history, _noisy(run.cfg))
    run.partial = mine.get("partial_epoch")
    if strategy.is_main:
        remove_leftovers(run.run_dir)
        if "sharded" in checkpoint:
            _keep_sharded(run, checkpoint)
        if run.history:  # a kill between the checkpoint and the metrics write lost the last rows
            write_history(run.run_dir, run.history)
    run.log(f"resuming {run.run_dir} after epoch {run.start_epoch}")


def _keep_sharded(run: _Run, checkpoint: dict[str, Any]) -> None:
    """Rank 0 on resume: record the sharded folders that last.pt and best.pt name, and remove any
    other (a write a kill interrupted before its checkpoint file named it)."""
    run.sharded["last"] = checkpoint["sharded"]["folder"]
    best = run.checkpoint("best.pt")
    if best.is_file():
        run.sharded["best"] = load_checkpoint(best, sharded_model=False).get("sharded", {}).get("folder")
    remove_sharded(run.checkpoint(""), keep={name for name in run.sharded.values() if name})


def _named_sharded(run: _Run, sharded: dict[str, Any] | None, *, best: bool) -> None:
    """Rank 0, with the checkpoint files just queued: last.pt (and best.pt) now name ``sharded``'s
    folder; the folders no file names any more are removed once those files are written."""
    if sharded is None:
        return
    before = {name for name in run.sharded.values() if name}
    run.sharded["last"] = sharded["sharded"]["folder"]
    if best:
        run.sharded["best"] = run.sharded["last"]
    dropped = before - set(run.sharded.values())
    if dropped:
        checkpoints = run.checkpoint("")
        run.writer.call(lambda: remove_sharded(checkpoints, dropped))


def _open_loggers(run: _Run) -> Loggers:
    """``train.loggers`` in the run folder, from the step the run continues at. What an earlier,
    interrupted process logged from there on is dropped (TensorBoard's purge_step), never doubled;
    a resume after a whole epoch logs that epoch's row again (its process may have been killed
    between the checkpoint and the log) in place of the earlier copy."""
    steps = len(run.data.train)
    kinds = [kind for kind in run.cfg.train.loggers if kind != "csv"]  # csv: metrics.csv, written anyway
    again = run.history[-1] if run.history and not run.partial else None
    start = run.start_epoch * steps + (run.data.train.state_dict()["batch"] if run.partial else 0)
    loggers = open_loggers(kinds, run.run_dir, start_step=start if again else start + 1, name=run.run_dir.name,
                           config=config_to_dict(run.cfg))
    if again is not None:
        loggers.log(start, again)
    return loggers


def _backfill_compute(history: list[dict[str, Any]], per_epoch: float) -> None:
    """Rows of a run saved before gradient evaluations were counted get the predicted cumulative
    count, so the count continues and every metrics.csv row has the same columns."""
    for row in history:
        row.setdefault("gradient_evaluations", per_epoch * row["epoch"])


def _backfill_radius_parts(history: list[dict[str, Any]], noisy: bool) -> None:
    """Rows of a run saved before the radius was recorded in parts get them: without noise the
    radius is the ascent move and the noise 0; with noise the parts are unknown (None)."""
    for row in history:
        if "perturbation_move_norm" not in row:
            row["perturbation_move_norm"] = None if noisy else row["perturbation_norm"]
            row["perturbation_noise_norm"] = None if noisy else 0.0


def _noisy(cfg: ExperimentConfig) -> bool:
    """Whether the run's perturbation holds OT-MDR's Langevin noise (the Bayesian configs)."""
    return cfg.optim.method == "otmdr" and cfg.otmdr.noise_std > 0


# -- epochs -----------------------------------------------------------------------------------

def _run_epochs(run: _Run, stop_requested: Callable[[], bool]) -> None:
    """Train, validate, checkpoint and log each remaining epoch; a stop request (SIGTERM to any
    process) ends the run with a resumable checkpoint and :class:`Preempted`."""
    cfg = run.cfg
    nominal = nominal_radius(cfg, len(run.model) if run.per_member else 1)  # type: ignore[arg-type]  # an Ensemble
    for row in run.history:  # warnings of resumed epochs are not shown again
        for kind, warning in _health_warnings(cfg, row, nominal, run.data.spec.num_classes).items():
            run.warned.setdefault(kind, warning)
    if stop_requested():  # a signal while setting up: nothing new to save
        raise Preempted(f"{_signals.stopped_by()} before training started; continue with: otmdr train --resume "
                        f"{run.run_dir}")
    for epoch in range(run.start_epoch, cfg.train.epochs):
        stats = _train_epoch_or_stop(run, epoch, stop_requested)
        row = _validate(run, epoch, stats)
        _save_epoch(run, epoch, row, stats)
        _log_epoch(run, row, stats, nominal)
        if run.loggers:  # after the checkpoint: a resume continues after this epoch's step
            run.loggers.log((epoch + 1) * len(run.data.train), row)
            run.loggers.flush()
        if stop_requested():  # a signal during validation or saving (the last epoch's too: the final
            run.strategy.on_main(run.writer.flush)  # evaluation can take long; it runs on resume)
            last = " (the last; the final evaluation runs on resume)" if epoch + 1 == cfg.train.epochs else ""
            raise Preempted(f"{_signals.stopped_by()} after epoch {epoch + 1}{last}: checkpoint written; continue "
                            f"with: otmdr train --resume {run.run_dir}")


def _train_epoch_or_stop(run: _Run, epoch: int, stop_requested: Callable[[], bool]) -> _Epoch:
    """One epoch's steps; a stop mid-epoch saves its running sums with the checkpoint."""
    cfg = run.cfg
    try:
        stats = _train_epoch(run.model, run.optimizer, run.scheduler, run.scaler, run.data.train, run.loss_fn,
                             max_grad_norm=cfg.optim.max_grad_norm, epoch=epoch, epochs=cfg.train.epochs,
                             progress=cfg.train.progress and run.strategy.is_main, partial=run.partial,
                             should_stop=stop_requested, strategy=run.strategy,
                             on_step=_step_logger(run, epoch) if run.loggers else None)
    except _StoppedMidEpoch as stop:
        partial = stop.partial
        ranks = run.strategy.rank_states(run.optimizer, run.device, partial)
        step = run.data.train.state_dict()["batch"]
        sharded = run.strategy.save_sharded(run.model, run.optimizer, run.checkpoint(""), sharded_name(epoch, step))

        def write_partial() -> None:
            run.writer.save({**run.state(epoch, ranks, sharded), "partial_epoch": partial},
                            run.checkpoint("last.pt"))
            _named_sharded(run, sharded, best=False)
            run.writer.flush()

        run.strategy.on_main(write_partial)
        raise Preempted(f"{_signals.stopped_by()} in epoch {epoch + 1} after step {step}: checkpoint written; "
                        f"continue with: otmdr train --resume {run.run_dir}") from None
    except FloatingPointError as error:
        kept = f"checkpoints/last.pt holds epoch {epoch}" if epoch else "no checkpoint was written"
        raise TrainingError(
            f"training stopped: {error}. {kept} (in {run.run_dir}). Lower optim.lr or the radius "
            "(sam.rho / otmdr.rho), add optim.max_grad_norm, or check the data"
        ) from None
    run.partial = None
    return stats


def _step_logger(run: _Run, epoch: int) -> Callable[[int, Tensor], None]:
    """Logs the training loss of every STEP_EVERY-th step (``batch``: the steps of the epoch done)."""
    first = epoch * len(run.data.train)

    def on_step(batch: int, loss: Tensor) -> None:
        if (first + batch) % STEP_EVERY == 0:
            run.loggers.log(first + batch, {"train_loss_step": float(loss)})

    return on_step


def _validate(run: _Run, epoch: int, stats: _Epoch) -> dict[str, Any]:
    """The epoch's metrics row: training statistics, then validation metrics (rank 0's decide)."""
    row: dict[str, Any] = {"epoch": epoch + 1, "lr": run.optimizer.param_groups[0]["lr"],
                           "train_loss": stats.loss, "train_accuracy": stats.accuracy,
                           "perturbation_norm": stats.perturbation,
                           # its parts, the ascent move and OT-MDR's Langevin noise (None: unknown, an
                           # epoch resumed from a checkpoint that did not record them)
                           "perturbation_move_norm": stats.move, "perturbation_noise_norm": stats.noise,
                           "seconds": stats.seconds,
                           "images_per_second": stats.samples / stats.seconds,
                           # cumulative: the compute spent so far, for equal-compute comparisons
                           "gradient_evaluations": _evaluations_so_far(run) + stats.gradient_evaluations}
    if stats.full_steps is not None:  # a cheaper variant: how many of the epoch's steps perturbed
        row["full_steps"] = stats.full_steps
    run.strategy.sync_buffers(run.model)  # every replica now holds rank 0's batch-norm statistics
    if run.data.val is not None:
        val, _ = evaluate_split(run.model, run.data.val, autocast=AUTOCAST[run.cfg.train.precision],
                                n_bins=run.cfg.eval.ece_bins, samples=run.samples)
        row.update({f"val_{k}": v for k, v in val.items() if k != "ece_bins"})
    return run.strategy.agree(row)  # a BNN's predictive samples differ per rank


def _evaluations_so_far(run: _Run) -> float:
    """The gradient evaluations of the epochs already in the history (resumed ones included)."""
    return float(run.history[-1]["gradient_evaluations"]) if run.history else 0.0


def _compute_summary(run: _Run) -> dict[str, Any]:
    """What the run cost: measured gradient evaluations and steps, the config's prediction, and
    the training seconds (validation and checkpoints excluded)."""
    total = _evaluations_so_far(run)
    steps = len(run.data.train) * len(run.history)  # AMP's skipped steps included: their passes ran
    compute = {"gradient_evaluations": total, "steps": steps, "per_step": total / steps if steps else 0.0,
               "predicted_per_step": gradient_evaluations_per_step(run.cfg),
               "train_seconds": sum(row["seconds"] for row in run.history)}
    full_steps = getattr(run.optimizer, "full_steps", None)
    if full_steps is not None:  # the steps that took the sharpness-aware step (efficiency.*: not all of them)
        counted = getattr(run.optimizer, "step_count", 0)
        compute["full_steps"] = int(full_steps)
        compute["full_step_fraction"] = full_steps / counted if counted else 0.0
    return compute


def _save_epoch(run: _Run, epoch: int, row: dict[str, Any], stats: _Epoch) -> None:
    """Append the row; write best.pt (if validation improved), last.pt and the metrics files."""
    run.history.append(row)
    score = row.get("val_accuracy", -stats.loss)
    improved = score > run.best
    run.best = max(run.best, score)
    ranks = run.strategy.rank_states(run.optimizer, run.device)
    # a sharded model: every process writes its part first, rank 0's checkpoint file then names it
    sharded = run.strategy.save_sharded(run.model, run.optimizer, run.checkpoint(""), sharded_name(epoch + 1, 0))

    # best.pt before last.pt: a kill between the two repeats this epoch on resume, which
    # rewrites the same best.pt, instead of leaving a stale one behind
    def write() -> None:
        if improved:  # the same state twice: last.pt becomes a link to the new best.pt, not a second write
            run.writer.save(run.state(epoch + 1, ranks, sharded), run.checkpoint("best.pt"))
            run.writer.link(run.checkpoint("best.pt"), run.checkpoint("last.pt"))
        else:
            run.writer.save(run.state(epoch + 1, ranks, sharded), run.checkpoint("last.pt"))
        _named_sharded(run, sharded, best=improved)
        write_history(run.run_dir, run.history, run.writer)

    run.strategy.on_main(write)


def _log_epoch(run: _Run, row: dict[str, Any], stats: _Epoch, nominal: float) -> None:
    cfg = run.cfg
    # accuracy in percent, as every table shows it (metrics.csv and summary.json keep fractions)
    val_text = (f" val acc {100 * row['val_accuracy']:.2f}% nll {row['val_nll']:.4f}" if run.data.val is not None
                else "")
    radius_text = f" radius {stats.perturbation:.3f} (nominal {nominal:.3f})" if nominal else ""
    run.log(f"epoch {row['epoch']}/{cfg.train.epochs}: train loss {stats.loss:.4f} acc {100 * stats.accuracy:.2f}%"
            f"{val_text}{radius_text} ({stats.seconds:.1f}s, {row['images_per_second']:.0f} img/s)")
    for kind, warning in _health_warnings(cfg, row, nominal, run.data.spec.num_classes).items():
        if kind not in run.warned:  # each kind once: the first epoch it shows
            run.warned[kind] = warning
            run.log(f"warning: {warning}")


# -- finish -----------------------------------------------------------------------------------

def _finish(run: _Run, *, test: bool = True) -> dict[str, Any]:
    """The final and the early-stopped test evaluations (none without ``test``), written to
    ``summary.json``."""
    strategy, cfg, data = run.strategy, run.cfg, run.data
    strategy.on_main(run.writer.flush)  # best.pt is read back below; the run is done when its files are on disk
    strategy.on_main(lambda: _signals.pause_point("final-evaluation"))  # test-only
    # every process evaluates (the same weights: no process waits on another for minutes, which
    # a collective's timeout would turn into a failure); rank 0's numbers are written and returned
    try:
        summary = _final_evaluation(cfg, run.model, run.optimizer, data, run.history, test=test)
    except CalibrationError as error:  # e.g. NaN in the validation inputs: the epochs' work is kept
        raise TrainingError(f"the final evaluation failed: {error}. The checkpoints and metrics are kept in "
                            f"{run.run_dir}; once fixed, otmdr train --resume {run.run_dir} evaluates it "
                            "again") from None
    summary["compute"] = _compute_summary(run)
    summary["machine"] = machine_info(run.device)
    # how many examples each score rests on (a study's search judges its close calls by them)
    summary["data_sizes"] = {name: split.num_samples for name, split in
                             (("train", data.train), ("val", data.val), ("test", data.test)) if split is not None}
    if strategy.summary() is not None:  # torchrun: {strategy: ddp | fsdp, world_size}
        summary["distributed"] = strategy.summary()
    if "chance" in run.warned:  # how long it sat there, now that the run is over
        first = next(row for row in run.history if _at_chance(cfg, row, data.spec.num_classes))
        run.warned["chance"] = _chance_warning(cfg, first, data.spec.num_classes, run.history)
    if run.history and _at_chance(cfg, run.history[-1], data.spec.num_classes):  # its test numbers are a chance model's
        run.warned["ended at chance"] = (
            f"training accuracy {100 * run.history[-1]['train_accuracy']:.1f}% was still at chance at the last epoch: "
            f"this run did not learn, and its test numbers count in its method's mean; {_chance_remedy(cfg)}")
        run.log(f"warning: {run.warned['ended at chance']}")
    if run.warned:
        summary["warnings"] = list(run.warned.values())
    if test:
        best_path = run.checkpoint("best.pt")
        best_state = None
        if data.val is not None:
            best_state = strategy.on_main(lambda: load_checkpoint(best_path, sharded_model=False)
                                          if best_path.is_file() else None)
        summary["early_stopped"] = _early_stopped_evaluation(run, best_state)
        if run.loggers:  # the test metrics, at the last step
            run.loggers.log(len(run.data.train) * len(run.history),
                            {f"test_{k}": v for k, v in summary["test"].items() if k != "ece_bins"})
            run.loggers.flush()
    else:
        summary["validation_only"] = True
    strategy.on_main(lambda: atomic_write_text(run.run_dir / "summary.json", json.dumps(summary, indent=2)))
    return strategy.agree(summary)


def _final_evaluation(cfg, model, optimizer, data, history, *, test: bool = True) -> dict[str, Any]:
    from ..models.ensemble import Ensemble

    summary: dict[str, Any] = {
        "method": cfg.optim.method, "seed": cfg.train.seed, "dataset": cfg.data.name, "model": cfg.model.name,
        "parameters": count_parameters(model), "epochs": cfg.train.epochs,
        # the median: the first epoch carries start-up costs (allocation, caches, lazy imports)
        "seconds_per_epoch": statistics.median(r["seconds"] for r in history) if history else 0.0,
        "passes_per_step": optimizer.passes_per_step() if isinstance(optimizer, OTMDR) else 1.0,
        "perturbation_norm": history[-1]["perturbation_norm"] if history else 0.0,
        # the last epoch's ascent move and Langevin noise, the two parts of that radius
        "perturbation_move_norm": history[-1].get("perturbation_move_norm") if history else 0.0,
        "perturbation_noise_norm": history[-1].get("perturbation_noise_norm") if history else 0.0,
    }
    if isinstance(model, Ensemble):
        summary["regime"] = cfg.ensemble.regime
    if data.label_noise is not None:
        summary["label_noise"] = data.label_noise
    # a BNN's test split is evaluated twice, with independent weight draws (test_second_pass,
    # monte_carlo): its Monte-Carlo error, at twice its test-time cost; deterministic models once
    if test:
        summary.update(evaluate_model(cfg, model, data, second_pass=True))
    summary["history"] = history
    return summary


def _early_stopped_evaluation(run: _Run, best: dict[str, Any] | None) -> dict[str, Any] | None:
    """Test metrics of ``best``, the checkpoint of the best validation epoch: early stopping, the
    standard defence against label noise, so every comparison also reports it. Loads into the model."""
    if run.data.val is None or best is None:
        return None
    if "sharded" in best:  # every process reads its shards of best.pt's folder
        run.strategy.load_sharded(run.model, None, run.checkpoint(""), best)
    else:
        run.strategy.load_model_state(run.model, best["model"])
    autocast, n_bins = AUTOCAST[run.cfg.train.precision], run.cfg.eval.ece_bins
    test, _ = evaluate_split(run.model, run.data.test, autocast=autocast, n_bins=n_bins, samples=run.samples)
    row = best["history"][-1]
    result = {"epoch": best["epoch"], "val_accuracy": row.get("val_accuracy"), "test": test}
    if run.samples > 1:  # a BNN: a second, independent set of weight draws (twice the test-time cost)
        from ..eval.evaluate import evaluate_second_pass, monte_carlo_difference, second_pass_seed

        second = evaluate_second_pass(run.model, run.data.test, autocast=autocast, n_bins=n_bins,
                                      samples=run.samples, seed=second_pass_seed(run.cfg, "early_stopped"))
        result["test_second_pass"] = second
        result["monte_carlo"] = monte_carlo_difference(test, second, run.samples)
    return result


# -- one epoch's steps ------------------------------------------------------------------------

@dataclass
class _Epoch:
    loss: float
    accuracy: float
    perturbation: float
    seconds: float
    samples: int
    gradient_evaluations: float  # full-batch forward+backward passes of the epoch (see train.compute)
    move: float | None = 0.0  # the perturbation's parts (means, as ``perturbation``): the ascent move
    noise: float | None = 0.0  # and the Langevin noise; None: unknown (an older checkpoint's partial epoch)
    full_steps: int | None = None  # steps that perturbed, when some steps do not (the radius is their mean)


class _StoppedMidEpoch(Exception):
    def __init__(self, partial: dict[str, Any]):
        super().__init__("stopped mid-epoch")
        self.partial = partial


def _loss_function(model: nn.Module, criterion: nn.Module, autocast: torch.dtype | None, device: torch.device,
                   *, per_member: bool, kl_weight: float | None, forward: nn.Module | None = None):
    """``loss_fn(batch) -> (loss, (log_probs_or_logits, loss_to_report))`` for the optimizers.

    Per-member ensembles sum the members' own losses (each member gets its full gradient) and
    report their mean; Bayesian models add ``kl_weight * KL(q || prior)``. ``forward`` (a
    DistributedDataParallel wrapper) computes the outputs instead of ``model``, so that DDP sees
    every forward pass.
    """
    from ..models.bayes import kl_divergence

    def loss_fn(batch: tuple[Tensor, Tensor]) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        x, y = batch
        ctx = torch.autocast(device.type, dtype=autocast) if autocast is not None else contextlib.nullcontext()
        with ctx:
            if forward is not None:
                out = forward(x)
            else:
                out = model.member_logits(x) if per_member else model(x)  # type: ignore[operator]  # an Ensemble
        if per_member:
            out = out.float()
            losses = torch.stack([criterion(member, y) for member in out])
            loss, reported = losses.sum(), losses.mean().detach()
            out = torch.logsumexp(torch.log_softmax(out, dim=-1), dim=0) - math.log(len(out))
        else:
            loss = criterion(out.float(), y)
            reported = loss.detach()
        if kl_weight is not None:
            loss = loss + kl_weight * kl_divergence(model)
        return loss, (out.detach(), reported)

    return loss_fn


def _train_epoch(model, optimizer, scheduler, scaler, loader, loss_fn, *, max_grad_norm, progress, epoch, epochs,
                 partial: dict[str, Any] | None = None, should_stop: Callable[[], bool] | None = None,
                 strategy: Strategy | None = None, on_step: Callable[[int, Tensor], None] | None = None) -> _Epoch:
    """One epoch (or the rest of one: ``partial`` holds the running sums of its first steps).
    Raises :class:`_StoppedMidEpoch` with those sums when ``should_stop()`` turns true after a step.
    ``on_step(steps_done, loss)`` follows every step (the steps of the epoch done, resumed ones included)."""
    strategy = strategy or SingleProcess()
    model.train()
    device = next(model.parameters()).device
    partial = partial or {}
    loss_sum = torch.tensor(partial.get("loss_sum", 0.0), device=device)
    correct = torch.tensor(partial.get("correct", 0), device=device, dtype=torch.long)
    seen = torch.tensor(partial.get("seen", 0), device=device, dtype=torch.long)
    perturbation = torch.tensor(partial.get("perturbation", 0.0), device=device)
    # its parts are summed only with noise (without, the move is the radius and the noise 0); an
    # older checkpoint's partial epoch did not record them: that epoch's parts are unknown
    noisy = isinstance(optimizer, OTMDR) and optimizer.config.noise_std > 0
    parts_known = not (noisy and partial and "perturbation_move" not in partial)
    move = torch.tensor(partial.get("perturbation_move", 0.0), device=device)
    noise = torch.tensor(partial.get("perturbation_noise", 0.0), device=device)
    samples = partial.get("samples", 0)
    evaluations = float(partial.get("gradient_evaluations", 0.0))  # Python floats: no host sync
    full_steps = int(partial.get("full_steps", 0))  # steps that perturbed (StepResult.kind: a Python str)
    started = time.perf_counter() - partial.get("seconds", 0.0)
    pause = _signals.step_pause(epoch)  # test-only, read once per epoch
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(loader), desc=f"epoch {epoch + 1}/{epochs}", leave=False, dynamic_ncols=True)
    perturbing = isinstance(optimizer, OTMDR)
    #: some steps do not perturb (docs/optimizer.md, "Cheaper steps"): the radius is the mean over
    #: those that do, the size of the neighbourhood the method trained against
    skipping = isinstance(optimizer, OTMDR) and (optimizer.config.ascent_interval > 1 or optimizer.config.skips_passes)
    from ..models.bayes import fixed_sample, is_bayesian

    one_sample = fixed_sample if is_bayesian(model) else (lambda _: contextlib.nullcontext())
    for step, (x, y) in enumerate(loader):
        with one_sample(model):  # a Bayesian network: one weight sample for all passes of a step
            if perturbing:
                result = optimizer.step(loss_fn, batch=(x, y), scaler=scaler)
                logits, loss = result.outputs
                perturbation += result.perturbation_norm.to(device)
                if noisy:
                    assert result.move_norm is not None and result.noise_norm is not None
                    move += result.move_norm.to(device)
                    noise += result.noise_norm.to(device)
                evaluations += result.gradient_evaluations
                full_steps += result.kind == "full"
            else:
                optimizer.zero_grad(set_to_none=True)
                objective, (logits, loss) = loss_fn((x, y))
                (scaler.scale(objective) if scaler is not None else objective).backward()
                if max_grad_norm is not None:
                    if scaler is not None:
                        scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
                if scaler is not None:
                    scaler.step(optimizer)
                else:
                    optimizer.step()
                evaluations += 1.0  # one full pass, even when the scaler skips the step
        if scaler is not None:
            scaler.update()
        scheduler.step()
        part = y[: len(logits)]  # the first (clean) pass saw the first part of the batch
        loss_sum += loss * len(part)
        correct += (logits.argmax(dim=1) == part).sum()
        seen += len(part)
        samples += len(y)
        if on_step is not None:
            on_step(loader.state_dict()["batch"], loss)
        if pause is not None and loader.state_dict()["batch"] == pause[0]:
            _signals.wait_for_test(pause[1])
        if should_stop is not None and should_stop() and loader.state_dict()["batch"] < len(loader):
            if bar is not None:
                bar.close()
            sums = {"loss_sum": float(loss_sum), "correct": int(correct), "seen": int(seen),
                    "perturbation": float(perturbation), "samples": samples,
                    "seconds": time.perf_counter() - started, "gradient_evaluations": evaluations,
                    "full_steps": full_steps}
            if parts_known:
                sums.update(perturbation_move=float(move) if noisy else sums["perturbation"],
                            perturbation_noise=float(noise) if noisy else 0.0)
            raise _StoppedMidEpoch(sums)
        if bar is not None and (step % 10 == 9 or step == len(loader) - 1):
            mean_loss = float(loss_sum / seen)  # the progress bar's sync, every 10 steps
            if strategy.checks_loss_every_bar():
                _check_finite(mean_loss, epoch, step)
            elapsed = time.perf_counter() - started
            radius = ({"radius": f"{float(perturbation) / max(1, full_steps if skipping else step + 1):.3f}"}
                      if perturbing else {})
            bar.set_postfix(loss=f"{mean_loss:.4f}", acc=f"{float(correct) / float(seen):.3f}", **radius,
                            img_s=f"{samples / elapsed:.0f}", refresh=False)
            bar.update(step + 1 - bar.n)
    if bar is not None:
        bar.close()
    loss_sum, correct, seen, perturbation, samples = strategy.reduce_epoch(loss_sum, correct, seen, perturbation,
                                                                           samples)
    steps = max(1, full_steps) if skipping else len(loader)  # every process took the same kinds of step
    radius_mean = float(perturbation) / steps
    move_mean: float | None = radius_mean
    noise_mean: float | None = 0.0
    if noisy:  # the processes' means, as the radius's (each sum in the radius's place)
        move = strategy.reduce_epoch(loss_sum, correct, seen, move, 0)[3]
        noise = strategy.reduce_epoch(loss_sum, correct, seen, noise, 0)[3]
        move_mean, noise_mean = ((float(move) / steps, float(noise) / steps) if parts_known
                                 else (None, None))
    mean_loss = float(loss_sum / seen)
    _check_finite(mean_loss, epoch, len(loader) - 1)
    return _Epoch(mean_loss, float(correct) / float(seen), radius_mean,
                  time.perf_counter() - started, samples, evaluations, move_mean, noise_mean,
                  full_steps if skipping else None)


def _check_finite(loss: float, epoch: int, step: int) -> None:
    if not math.isfinite(loss):
        raise FloatingPointError(f"the training loss became {loss} (epoch {epoch + 1}, step {step + 1})")


#: test-only hook (tests/test_preemption.py): see otmdr._signals.pause_point and step_pause
TEST_PAUSE_VARIABLE = _signals.TEST_PAUSE_VARIABLE


def _describe_run(cfg: ExperimentConfig, model: nn.Module, data: RunData, device: torch.device,
                  strategy: Strategy) -> str:
    """One line saying what is about to train, so a wrong setting shows before an hour is spent."""
    o = cfg.optim
    method = {"sgd": o.base, "sam": f"SAM rho {cfg.sam.rho} on {o.base}",
              "asam": f"ASAM rho {cfg.asam.rho} on {o.base}",
              "otmdr": f"OT-MDR rho {list(cfg.otmdr.rho or [])} ({cfg.otmdr.normalize} normalisation) on {o.base}"
              }[o.method]
    if o.method != "sgd":
        method += _cheaper_steps(cfg)
    sizes = f"{data.train.num_samples:,} train / {data.val.num_samples if data.val else 0:,} val / " \
            f"{data.test.num_samples:,} test"
    noise = (f", {100 * cfg.data.label_noise:.0f}% {cfg.data.label_noise_kind} label noise"
             if cfg.data.label_noise else "")
    where = f"device {device}"
    if strategy.world_size > 1:
        where = (f"{strategy.world_size} processes ({device.type}), global batch {cfg.data.batch_size} = "
                 f"{strategy.world_size} x {cfg.data.batch_size // strategy.world_size}")
    if cfg.train.strategy == "fsdp":
        where = f"{where}, parameters sharded (FSDP)" if strategy.world_size > 1 else f"{where}, FSDP on one process"
    return (f"training {cfg.model.name} ({count_parameters(model):,} parameters) with {method}, lr {o.lr}, "
            f"{cfg.train.epochs} epochs, on {cfg.data.name} ({sizes}{noise}), {where}, {cfg.train.precision}")


def _cheaper_steps(cfg: ExperimentConfig) -> str:
    """The ``efficiency`` options in force, as words for the run's first line ("" when none)."""
    e = cfg.efficiency
    parts = []
    if e.interval > 1:
        parts.append(f"{'LookSAM reuse' if e.reuse else 'plain steps'} between every {e.interval}th step")
    if e.phase_start:
        parts.append(f"plain steps until {100 * e.phase_start:g}% of training")
    if e.trigger is not None:
        parts.append(f"AE-SAM trigger c {list(e.trigger)}")
    if e.momentum_ascent != "none":
        parts.append(f"{e.momentum_ascent} ascent step{'s' if e.momentum_ascent == 'all' else ''} along the momentum")
    return f" ({'; '.join(parts)})" if parts else ""


def nominal_radius(cfg: ExperimentConfig, norm_groups: int = 1) -> float:
    """The perturbation length the config asks for: SAM's rho, OT-MDR's rho1 + rho2 + ...
    (0 for SGD). ASAM's radius lives in the rescaled space and is not comparable: 0 too.
    With ``norm_groups`` perturbation norms (an ensemble's per-member regime: one per member) each
    group moves that far on its own coordinates, so the whole step is sqrt(norm_groups) times it."""
    if cfg.optim.method == "sam":
        return math.sqrt(norm_groups) * cfg.sam.rho
    if cfg.optim.method == "otmdr":
        return math.sqrt(norm_groups) * float(sum(cfg.otmdr.rho or []))
    return 0.0


def _health_warnings(cfg: ExperimentConfig, row: dict[str, Any], nominal: float, classes: int) -> dict[str, str]:
    """What a user must see while training: a radius far above its nominal size (the release's
    normalisation divides by ||g2||, which can blow up) and training accuracy stuck at chance
    once any warm-up is over.
    With OT-MDR's Langevin noise the radius holds the noise, which has no nominal size: the
    ascent move alone (the radius without the noise) is checked then, where the row records it."""
    out = {}
    o = cfg.otmdr
    allowed = nominal
    if nominal and cfg.optim.method == "otmdr" and o.merge and o.normalize == "step" and o.rho:  # nominal 0: rho 0
        allowed = nominal * (o.rho[0] + 2 * sum(o.rho[1:])) / sum(o.rho)  # ||g1 + g2|| / ||g2|| ~ 2 when alike
    noisy = _noisy(cfg)
    measured = row.get("perturbation_move_norm") if noisy else row["perturbation_norm"]
    if nominal and measured is not None and measured > 1.5 * allowed:
        what = (f"the measured ascent move {measured:.3f} (the radius without the Langevin noise)" if noisy
                else f"the measured radius {measured:.3f}")
        out["radius"] = (f"{what} is far above the nominal {nominal:.3f} "
                         f"(epoch {row['epoch']}): try otmdr.normalize=merged, smaller rho, or label smoothing")
    if _at_chance(cfg, row, classes):
        out["chance"] = _chance_warning(cfg, row, classes)
    return out


def _chance_warning(cfg: ExperimentConfig, row: dict[str, Any], classes: int,
                    history: list[dict[str, Any]] | None = None) -> str:
    """The warning for training accuracy at chance, first seen at ``row``; with the run's whole
    ``history`` it also says for how many epochs, so that a reader of the summary can tell a run that
    sat there two epochs and recovered from one that lost half its budget there."""
    span = ""
    if history:
        epochs = [r["epoch"] for r in history if _at_chance(cfg, r, classes)]
        span = f" ({len(epochs)} of its {len(history)} epochs at chance, the last epoch {epochs[-1]})"
    return (f"training accuracy {100 * row['train_accuracy']:.1f}% is at chance after {row['epoch']} epochs{span}: "
            f"{_chance_remedy(cfg)}")


def _at_chance(cfg: ExperimentConfig, row: dict[str, Any], classes: int) -> bool:
    """Training accuracy within 1.5x of chance, from the second epoch after any warm-up: a
    transformer under a 2-epoch warm-up with noisy labels sits near chance until its learning rate
    has peaked, then learns."""
    return row["epoch"] >= max(2, math.ceil(cfg.schedule.warmup_epochs) + 1) and row["train_accuracy"] <= 1.5 / classes


def _chance_remedy(cfg: ExperimentConfig) -> str:
    """What to try when training sits at chance: a large learning rate from the first step can
    leave a network there for epochs and let it escape by luck or not (CIFAR-10 ResNet-20 at lr 0.8,
    docs/results.md), so a warm-up comes first; the radius only where there is one."""
    rho = " or a smaller rho" if cfg.optim.method in ("sam", "asam", "otmdr") else ""
    return (f"the learning rate{' or the radius' if rho else ''} is too large for this model: warm the learning "
            f"rate up (schedule.warmup_epochs), or try a smaller optim.lr{rho} (otmdr compare --grid)")
