"""The training loop: epochs of SGD / SAM / ASAM / OT-MDR steps, validation, logging, atomic
checkpoints, exact resume, and the final test evaluation written to ``summary.json``.

A run directory holds ``config.yaml`` (the resolved config), ``metrics.jsonl`` and
``metrics.csv`` (one row per epoch), ``checkpoints/last.pt`` and ``checkpoints/best.pt``, and
``summary.json`` once the run has finished.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import math
import signal
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable
from typing import Any

import torch
import yaml
from torch import Tensor, nn

from .._lock import folder_lock
from ..config import ExperimentConfig, comparable_config, config_from_dict, config_to_dict
from ..eval import Prediction, classification_metrics, fit_temperature, predict, reliability
from ..models import count_parameters
from ..optim import OTMDR
from . import distributed
from .builders import build_data, build_model, build_optimizer, build_scheduler, select_device
from .checkpoint import CheckpointError, CheckpointWriter, atomic_write_text, load_checkpoint

__all__ = ["TrainingError", "RunDirError", "Preempted", "train", "prepare_run_dir", "evaluate_split", "evaluate_model", "load_run"]

AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class TrainingError(RuntimeError):
    """A run that had to stop (e.g. a non-finite loss); the message says what was kept."""


class RunDirError(RuntimeError):
    """A run directory that cannot be used as asked (exists, or has nothing to resume)."""


def prepare_run_dir(run_dir: str | Path, *, resume: bool) -> Path:
    """Create a fresh run directory, or check that ``resume`` has a checkpoint to continue."""
    run_dir = Path(run_dir)
    if resume:
        if not (run_dir / "checkpoints" / "last.pt").is_file():
            raise RunDirError(f"nothing to resume in {run_dir}: no checkpoints/last.pt (start it without --resume)")
        return run_dir
    if run_dir.exists() and any(run_dir.iterdir()):
        raise RunDirError(
            f"run directory {run_dir} already exists and is not empty; it is never overwritten: choose "
            "another --out, remove it, or continue it with --resume"
        )
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    return run_dir


@dataclass
class _Epoch:
    loss: float
    accuracy: float
    perturbation: float
    seconds: float
    samples: int


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
                out = model.member_logits(x) if per_member else model(x)
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


class Preempted(Exception):
    """SIGTERM (a cluster's preemption notice) stopped training at a step boundary after a
    resumable checkpoint was written; the message says how to continue."""


class _StoppedMidEpoch(Exception):
    def __init__(self, partial: dict[str, Any]):
        super().__init__("stopped mid-epoch")
        self.partial = partial


def _train_epoch(model, optimizer, scheduler, scaler, loader, loss_fn, *, max_grad_norm, progress, epoch, epochs,
                 on_step: Callable[[], None] | None = None, partial: dict[str, Any] | None = None,
                 should_stop: Callable[[], bool] | None = None) -> _Epoch:
    """One epoch (or the rest of one: ``partial`` holds the running sums of its first steps).
    Raises :class:`_StoppedMidEpoch` with those sums when ``should_stop()`` turns true after a step."""
    model.train()
    device = next(model.parameters()).device
    partial = partial or {}
    loss_sum = torch.tensor(partial.get("loss_sum", 0.0), device=device)
    correct = torch.tensor(partial.get("correct", 0), device=device, dtype=torch.long)
    seen = torch.tensor(partial.get("seen", 0), device=device, dtype=torch.long)
    perturbation = torch.tensor(partial.get("perturbation", 0.0), device=device)
    samples = partial.get("samples", 0)
    started = time.perf_counter() - partial.get("seconds", 0.0)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(loader), desc=f"epoch {epoch + 1}/{epochs}", leave=False, dynamic_ncols=True)
    perturbing = isinstance(optimizer, OTMDR)
    from ..models.bayes import fixed_sample, is_bayesian

    one_sample = fixed_sample if is_bayesian(model) else (lambda _: contextlib.nullcontext())
    for step, (x, y) in enumerate(loader):
        with one_sample(model):  # a Bayesian network: one weight sample for all passes of a step
            if perturbing:
                result = optimizer.step(loss_fn, batch=(x, y), scaler=scaler)
                logits, loss = result.outputs
                perturbation += result.perturbation_norm.to(device)
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
        if scaler is not None:
            scaler.update()
        scheduler.step()
        part = y[: len(logits)]  # the first (clean) pass saw the first part of the batch
        loss_sum += loss * len(part)
        correct += (logits.argmax(dim=1) == part).sum()
        seen += len(part)
        samples += len(y)
        if on_step is not None:
            on_step()
        if should_stop is not None and should_stop() and loader.state_dict()["batch"] < len(loader):
            if bar is not None:
                bar.close()
            raise _StoppedMidEpoch({"loss_sum": float(loss_sum), "correct": int(correct), "seen": int(seen),
                                    "perturbation": float(perturbation), "samples": samples,
                                    "seconds": time.perf_counter() - started})
        if bar is not None and (step % 10 == 9 or step == len(loader) - 1):
            mean_loss = float(loss_sum / seen)  # the progress bar's sync, every 10 steps
            if not distributed.current().enabled:  # distributed: checked at the epoch's end, by all ranks
                _check_finite(mean_loss, epoch, step)
            elapsed = time.perf_counter() - started
            radius = {"radius": f"{float(perturbation) / (step + 1):.3f}"} if perturbing else {}
            bar.set_postfix(loss=f"{mean_loss:.4f}", acc=f"{float(correct) / float(seen):.3f}", **radius,
                            img_s=f"{samples / elapsed:.0f}", refresh=False)
            bar.update(step + 1 - bar.n)
    if bar is not None:
        bar.close()
    context = distributed.current()
    if context.enabled:  # the epoch's statistics over every process's shards (float64: exact counts)
        totals = distributed.sum_across(torch.stack([loss_sum.double(), correct.double(), seen.double(),
                                                     perturbation.double(), torch.tensor(samples, device=device,
                                                                                         dtype=torch.float64)]))
        loss_sum, correct, seen = totals[0], totals[1], totals[2]
        perturbation, samples = totals[3] / context.world_size, int(totals[4])
    mean_loss = float(loss_sum / seen)
    _check_finite(mean_loss, epoch, len(loader) - 1)
    return _Epoch(mean_loss, float(correct) / float(seen), float(perturbation) / len(loader),
                  time.perf_counter() - started, samples)


def _check_finite(loss: float, epoch: int, step: int) -> None:
    if not math.isfinite(loss):
        raise FloatingPointError(f"the training loss became {loss} (epoch {epoch + 1}, step {step + 1})")


def evaluate_split(model: nn.Module, loader, *, autocast: torch.dtype | None, n_bins: int,
                   temperature: float | None = None, samples: int = 1) -> tuple[dict[str, float], Prediction]:
    """Metrics of the predictive distribution of ``model`` on a split (optionally with the
    log-probabilities divided by ``temperature``); ``samples`` Monte-Carlo draws for BNNs."""
    prediction = predict(model, loader, autocast_dtype=autocast, samples=samples)
    log_probs = prediction.log_probs if temperature is None else prediction.log_probs / temperature
    return classification_metrics(torch.softmax(log_probs, dim=1), prediction.labels, n_bins), prediction


def _check_same_run(run_dir: Path, checkpoint: dict[str, Any]) -> None:
    """A resumed checkpoint must be this run's: one copied from another run would silently
    continue that run's config in this folder."""
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        return
    if comparable_config(yaml.safe_load(saved.read_text())) != comparable_config(checkpoint["config"]):
        raise CheckpointError(f"{run_dir / 'checkpoints' / 'last.pt'} belongs to another run than {saved} describes "
                              "(a copied checkpoint?): restore this run's checkpoint or start a new run")


def _remove_leftovers(run_dir: Path) -> None:
    """Temporary files of writes a kill interrupted (``.<name>.<random>.tmp``, see
    :func:`otmdr._atomic.atomic_write`): never renamed into place, so never needed."""
    for folder in (run_dir, run_dir / "checkpoints"):
        for leftover in folder.glob(".*.tmp"):
            leftover.unlink(missing_ok=True)


def _write_history(run_dir: Path, history: list[dict[str, Any]], writer: CheckpointWriter | None = None) -> None:
    # not fsynced: rebuilt from the checkpoint's history on resume, and an fsync per epoch costs
    # more than a small model's epoch (benchmarks/pipeline_overhead.py)
    write = writer.write_text if writer is not None else atomic_write_text
    write(run_dir / "metrics.jsonl", "".join(json.dumps(row) + "\n" for row in history), durable=False)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(history[0]))
    writer.writeheader()
    writer.writerows(history)
    write(run_dir / "metrics.csv", buffer.getvalue(), durable=False)


def train(cfg: ExperimentConfig | None, run_dir: str | Path, *, resume: bool = False,
          log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train one run into ``run_dir`` (prepared by :func:`prepare_run_dir`); returns the summary.

    With ``resume`` the config saved in the run's last checkpoint is used (``cfg`` is ignored).
    SIGTERM (in the main thread) stops at the next step boundary after writing a resumable
    checkpoint and raises :class:`Preempted`.

    Under torchrun every process calls this with the same arguments; only rank 0 reads and
    writes ``run_dir`` and logs, and every process returns rank 0's summary.
    """
    with contextlib.ExitStack() as stack:
        distributed.from_rank0(lambda: stack.enter_context(folder_lock(run_dir)))
        preempted = stack.enter_context(_sigterm_flag())
        writer = stack.enter_context(CheckpointWriter())  # rank 0's writes; idle on the other ranks
        return _train(cfg, run_dir, resume=resume, log=log, preempted=preempted, writer=writer)


def _quiet(_: str) -> None:
    pass


def _rank_seed(seed: int, rank: int) -> int:
    """A process's own seed (dropout, Bayesian weight samples, optimizer noise) in a
    distributed run; reproducible, and different on every rank."""
    from ..data.loader import _derive_seed

    return _derive_seed(seed, rank, 0x0DD9) & 0x7FFF_FFFF_FFFF


def _check_distributed(cfg: ExperimentConfig, context: distributed.Context) -> None:
    """What a distributed launch needs of the config, checked before anything is written."""
    from ..config import ConfigError

    world = context.world_size
    if cfg.data.batch_size % world:
        raise ConfigError(f"config key data.batch_size: {cfg.data.batch_size} is the global batch and must be divisible "
                          f"by the {world} processes of this launch (e.g. data.batch_size="
                          f"{max(world, cfg.data.batch_size // world * world)})")
    if cfg.train.device.startswith("cuda:"):
        raise ConfigError(f"config key train.device: {cfg.train.device} under torchrun: every process uses its own "
                          "GPU (cuda:LOCAL_RANK); use train.device=cuda or auto")
    cuda = cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available())
    if cfg.train.sync_batchnorm and not cuda:
        raise ConfigError("config key train.sync_batchnorm: SyncBatchNorm needs CUDA devices (PyTorch has no CPU "
                          "version); set train.sync_batchnorm=false or train on GPUs")


def _check_world(checkpoint: dict[str, Any], context: distributed.Context, path: Path) -> None:
    saved = checkpoint.get("world_size", 1)
    if saved != context.world_size:
        how = ("without torchrun (or with --nproc_per_node 1)" if saved == 1
               else f"with torchrun and {saved} processes in all (--nnodes x --nproc_per_node)")
        raise CheckpointError(f"{path} was written by a run of {saved} process(es) and this launch has "
                              f"{context.world_size}: resume it {how}, so that it continues exactly")


def _replicate(cfg: ExperimentConfig, model: nn.Module, device: torch.device,
               per_member: bool) -> tuple[nn.Module, nn.Module]:
    """``(model, wrapper)``: the model (batch norm synchronised if asked) and the
    DistributedDataParallel that runs its training passes (rank 0's weights on every rank)."""
    from torch.nn.parallel import DistributedDataParallel

    if cfg.train.sync_batchnorm:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    target = _MemberLogits(model) if per_member else model
    return model, DistributedDataParallel(target, device_ids=[device.index] if device.type == "cuda" else None)


class _MemberLogits(nn.Module):
    """``forward`` = the ensemble's ``member_logits``: DDP only synchronises what runs through
    its own forward."""

    def __init__(self, ensemble: nn.Module):
        super().__init__()
        self.ensemble = ensemble

    def forward(self, x: Tensor) -> Tensor:
        return self.ensemble.member_logits(x)


def _rank_state(optimizer, device: torch.device, partial: dict[str, Any] | None) -> dict[str, Any]:
    """What differs between the processes of a distributed run and must survive a resume."""
    generator = getattr(optimizer, "_generator", None)
    return {"rng": {"cpu": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None},
            "optimizer_generator": generator.get_state() if generator is not None else None,
            "partial_epoch": partial}


def _train(cfg: ExperimentConfig | None, run_dir: str | Path, *, resume: bool, log: Callable[[str], None],
           preempted: list[bool], writer: CheckpointWriter) -> dict[str, Any]:
    run_dir = Path(run_dir)
    context = distributed.current()
    main = context.is_main
    if not main:
        log = _quiet  # rank 0 reports for the whole run
    checkpoint = None
    if resume:
        checkpoint = distributed.from_rank0(lambda: load_checkpoint(run_dir / "checkpoints" / "last.pt"))
        cfg = config_from_dict(checkpoint["config"])
        _check_world(checkpoint, context, run_dir / "checkpoints" / "last.pt")
    if context.enabled:
        _check_distributed(cfg, context)
    if not resume:
        distributed.from_rank0(lambda: atomic_write_text(run_dir / "config.yaml",
                                                         yaml.safe_dump(config_to_dict(cfg), sort_keys=False)))
    if cfg.train.threads is not None:
        torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(cfg.train.seed)
    device = distributed.device_for(select_device(cfg.train.device))
    autocast = AUTOCAST[cfg.train.precision]
    data = build_data(cfg, device, shard=(context.rank, context.world_size) if context.enabled else None)
    if context.enabled and 0 < data.train.num_samples % cfg.data.batch_size < context.world_size:
        from ..config import ConfigError

        raise ConfigError(f"config key data.batch_size: the last batch of every epoch would hold "
                          f"{data.train.num_samples % cfg.data.batch_size} training image(s), fewer than the "
                          f"{context.world_size} processes: change data.batch_size or data.train_limit")
    model = build_model(cfg, data.spec).to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    from ..models.ensemble import Ensemble

    per_member = cfg.ensemble.regime == "per-member" and isinstance(model, Ensemble)
    wrapper, optimizer_seed = None, None
    if context.enabled:
        model, wrapper = _replicate(cfg, model, device, per_member)
        torch.manual_seed(_rank_seed(cfg.train.seed, context.rank))
        section = {"sam": cfg.sam, "asam": cfg.asam, "otmdr": cfg.otmdr}.get(cfg.optim.method)
        if section is not None and not section.sync_ascent:  # one shared neighbour needs one noise draw
            optimizer_seed = _rank_seed(cfg.train.seed, context.rank)
    optimizer = build_optimizer(cfg, model, wrapper=wrapper, seed=optimizer_seed)
    scheduler = build_scheduler(cfg, optimizer, len(data.train))
    scaler = torch.amp.GradScaler(device.type) if cfg.train.precision == "fp16" else None
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.train.label_smoothing)
    from ..models.bayes import is_bayesian

    bayesian = is_bayesian(model)
    samples = cfg.bayes.test_samples if bayesian else 1
    loss_fn = _loss_function(model, criterion, autocast, device, per_member=per_member,
                             kl_weight=cfg.bayes.kl_weight if bayesian else None, forward=wrapper)
    log(_describe_run(cfg, model, data, device))
    start_epoch, best, history = 0, -1.0, []
    if checkpoint is not None:
        _check_same_run(run_dir, checkpoint)
        try:
            model.load_state_dict(checkpoint["model"])
        except RuntimeError as error:
            raise CheckpointError(f"{run_dir / 'checkpoints' / 'last.pt'} does not fit model {cfg.model.name!r}: "
                                  f"{str(error).splitlines()[0]}") from None
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        if scaler is not None and checkpoint.get("scaler"):
            scaler.load_state_dict(checkpoint["scaler"])
        data.train.load_state_dict(checkpoint["loader"])
        mine = checkpoint["ranks"][context.rank] if context.enabled else checkpoint
        torch.set_rng_state(mine["rng"]["cpu"])
        if device.type == "cuda" and mine["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(mine["rng"]["cuda"], device)
        if context.enabled and mine.get("optimizer_generator") is not None:
            optimizer._generator.set_state(mine["optimizer_generator"])
        start_epoch, best, history = checkpoint["epoch"], checkpoint["best"], checkpoint["history"]
        if main:
            _remove_leftovers(run_dir)
            if history:  # a kill between the checkpoint and the metrics write lost the last rows
                _write_history(run_dir, history)
        log(f"resuming {run_dir} after epoch {start_epoch}")

    def state(epoch: int, ranks: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        extra = {"world_size": context.world_size, "ranks": ranks} if context.enabled else {}
        return extra | {
            "config": config_to_dict(cfg), "epoch": epoch, "best": best, "history": history,
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None, "loader": data.train.state_dict(),
            "rng": {"cpu": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None},
            "classes": data.classes, "spec": dataclasses.asdict(data.spec),
        }

    n_bins = cfg.eval.ece_bins
    nominal = nominal_radius(cfg, len(model) if per_member else 1)
    warned: dict[str, str] = {}  # kind -> the warning of the first epoch it showed, resumed epochs included
    for row in history:
        for kind, warning in _health_warnings(cfg, row, nominal, data.spec.num_classes).items():
            warned.setdefault(kind, warning)
    partial = None
    if checkpoint is not None:
        partial = (checkpoint["ranks"][context.rank] if context.enabled else checkpoint).get("partial_epoch")

    def stop_requested() -> bool:  # a SIGTERM to any process stops them all at the same step
        return distributed.any_rank(preempted[0]) if context.enabled else preempted[0]

    def ranks_state(stopped: dict[str, Any] | None = None) -> list[dict[str, Any]] | None:
        return distributed.gather_to_rank0(_rank_state(optimizer, device, stopped)) if context.enabled else None

    if stop_requested():  # SIGTERM while setting up: nothing new to save
        raise Preempted(f"preempted (SIGTERM) before training started; continue with: otmdr train --resume {run_dir}")
    for epoch in range(start_epoch, cfg.train.epochs):
        try:
            stats = _train_epoch(model, optimizer, scheduler, scaler, data.train, loss_fn,
                                 max_grad_norm=cfg.optim.max_grad_norm, progress=cfg.train.progress and main,
                                 epoch=epoch, epochs=cfg.train.epochs, partial=partial,
                                 should_stop=stop_requested)
            partial = None
        except _StoppedMidEpoch as stop:
            ranks = ranks_state(stop.partial)

            def write_partial() -> None:
                writer.save({**state(epoch, ranks), "partial_epoch": stop.partial}, run_dir / "checkpoints" / "last.pt")
                writer.flush()

            distributed.from_rank0(write_partial)
            raise Preempted(f"preempted (SIGTERM) in epoch {epoch + 1} after step {data.train.state_dict()['batch']}: "
                            f"checkpoint written; continue with: otmdr train --resume {run_dir}") from None
        except FloatingPointError as error:
            kept = f"checkpoints/last.pt holds epoch {epoch}" if epoch else "no checkpoint was written"
            raise TrainingError(
                f"training stopped: {error}. {kept} (in {run_dir}). Lower optim.lr or the radius "
                "(sam.rho / otmdr.rho), add optim.max_grad_norm, or check the data"
            ) from None
        row: dict[str, Any] = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"],
                               "train_loss": stats.loss, "train_accuracy": stats.accuracy,
                               "perturbation_norm": stats.perturbation, "seconds": stats.seconds,
                               "images_per_second": stats.samples / stats.seconds}
        distributed.sync_buffers(model)  # every replica now holds rank 0's batch-norm statistics
        if data.val is not None:
            val, _ = evaluate_split(model, data.val, autocast=autocast, n_bins=n_bins, samples=samples)
            row.update({f"val_{k}": v for k, v in val.items() if k != "ece_bins"})
        if context.enabled:  # rank 0's row decides for all (a BNN's predictive samples differ per rank)
            row = distributed.broadcast_object(row)
        history.append(row)
        score = row.get("val_accuracy", -stats.loss)
        improved = score > best
        best = max(best, score)
        # best.pt before last.pt: a kill between the two repeats this epoch on resume, which
        # rewrites the same best.pt, instead of leaving a stale one behind
        ranks = ranks_state()

        def write(epoch: int = epoch, improved: bool = improved, ranks=ranks) -> None:
            if improved:  # the same state twice: last.pt becomes a link to the new best.pt, not a second write
                writer.save(state(epoch + 1, ranks), run_dir / "checkpoints" / "best.pt")
                writer.link(run_dir / "checkpoints" / "best.pt", run_dir / "checkpoints" / "last.pt")
            else:
                writer.save(state(epoch + 1, ranks), run_dir / "checkpoints" / "last.pt")
            _write_history(run_dir, history, writer)

        distributed.from_rank0(write)
        val_text = f" val acc {row['val_accuracy']:.4f} nll {row['val_nll']:.4f}" if data.val is not None else ""
        radius_text = f" radius {stats.perturbation:.3f} (nominal {nominal:.3f})" if nominal else ""
        log(f"epoch {epoch + 1}/{cfg.train.epochs}: train loss {stats.loss:.4f} acc {stats.accuracy:.4f}"
            f"{val_text}{radius_text} ({stats.seconds:.1f}s, {row['images_per_second']:.0f} img/s)")
        for kind, warning in _health_warnings(cfg, row, nominal, data.spec.num_classes).items():
            if kind not in warned:  # each kind once: the first epoch it shows
                warned[kind] = warning
                log(f"warning: {warning}")
        if stop_requested() and epoch + 1 < cfg.train.epochs:  # SIGTERM during validation or saving
            distributed.from_rank0(writer.flush)
            raise Preempted(f"preempted (SIGTERM) after epoch {epoch + 1}: checkpoint written; continue "
                            f"with: otmdr train --resume {run_dir}")

    distributed.from_rank0(writer.flush)  # best.pt is read back below; the run is done when its files are on disk
    # every process evaluates (the same weights: no process waits on another for minutes, which
    # a collective's timeout would turn into a failure); rank 0's numbers are written and returned
    summary = _final_evaluation(cfg, model, optimizer, data, history)
    if warned:
        summary["warnings"] = list(warned.values())
    best_path = run_dir / "checkpoints" / "best.pt"
    best_state = None
    if data.val is not None:
        best_state = distributed.from_rank0(lambda: load_checkpoint(best_path) if best_path.is_file() else None)
    summary["early_stopped"] = _early_stopped_evaluation(cfg, model, data, best_state)
    distributed.from_rank0(lambda: atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2)))
    return distributed.broadcast_object(summary)


@contextlib.contextmanager
def _sigterm_flag():
    """Turn SIGTERM into a flag (``flag[0]``) that the epoch checks after every step, so that a
    preempted job writes a resumable checkpoint at the next step boundary instead of dying
    mid-write. Outside the main thread (where signals cannot be caught) the flag stays False."""
    flag = [False]
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        flag[0] = True

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGTERM, previous)


def _describe_run(cfg: ExperimentConfig, model: nn.Module, data, device: torch.device) -> str:
    """One line saying what is about to train, so a wrong setting shows before an hour is spent."""
    o = cfg.optim
    method = {"sgd": o.base, "sam": f"SAM rho {cfg.sam.rho} on {o.base}", "asam": f"ASAM rho {cfg.asam.rho} on {o.base}",
              "otmdr": f"OT-MDR rho {list(cfg.otmdr.rho)} ({cfg.otmdr.normalize} normalisation) on {o.base}"}[o.method]
    sizes = f"{data.train.num_samples:,} train / {data.val.num_samples if data.val else 0:,} val / " \
            f"{data.test.num_samples:,} test"
    noise = f", {100 * cfg.data.label_noise:.0f}% {cfg.data.label_noise_kind} label noise" if cfg.data.label_noise else ""
    context = distributed.current()
    where = f"device {device}"
    if context.enabled:
        where = (f"{context.world_size} processes ({device.type}), global batch {cfg.data.batch_size} = "
                 f"{context.world_size} x {cfg.data.batch_size // context.world_size}")
    return (f"training {cfg.model.name} ({count_parameters(model):,} parameters) with {method}, lr {o.lr}, "
            f"{cfg.train.epochs} epochs, on {cfg.data.name} ({sizes}{noise}), {where}, {cfg.train.precision}")


def nominal_radius(cfg: ExperimentConfig, norm_groups: int = 1) -> float:
    """The perturbation length the config asks for: SAM's rho, OT-MDR's rho1 + rho2 + ...
    (0 for SGD). ASAM's radius lives in the rescaled space and is not comparable: 0 too.
    With ``norm_groups`` perturbation norms (an ensemble's per-member regime: one per member) each
    group moves that far on its own coordinates, so the whole step is sqrt(norm_groups) times it."""
    if cfg.optim.method == "sam":
        return math.sqrt(norm_groups) * cfg.sam.rho
    if cfg.optim.method == "otmdr":
        return math.sqrt(norm_groups) * float(sum(cfg.otmdr.rho))
    return 0.0


def _health_warnings(cfg: ExperimentConfig, row: dict[str, Any], nominal: float, classes: int) -> dict[str, str]:
    """What a user must see while training: a radius far above its nominal size (the release's
    normalisation divides by ||g2||, which can blow up) and training accuracy stuck at chance."""
    out = {}
    o = cfg.otmdr
    allowed = nominal
    if nominal and cfg.optim.method == "otmdr" and o.merge and o.normalize == "step":  # nominal 0: rho all 0
        allowed = nominal * (o.rho[0] + 2 * sum(o.rho[1:])) / sum(o.rho)  # ||g1 + g2|| / ||g2|| ~ 2 when alike
    noisy = cfg.optim.method == "otmdr" and o.noise_std > 0
    if nominal and not noisy and row["perturbation_norm"] > 1.5 * allowed:
        out["radius"] = (f"the measured radius {row['perturbation_norm']:.3f} is far above the nominal {nominal:.3f} "
                         f"(epoch {row['epoch']}): try otmdr.normalize=merged, smaller rho, or label smoothing")
    if row["epoch"] >= 2 and row["train_accuracy"] <= 1.5 / classes:
        out["chance"] = (f"training accuracy {100 * row['train_accuracy']:.1f}% is at chance after {row['epoch']} "
                         "epochs: the radius or the learning rate is too large for this model (compare a smaller "
                         "rho with otmdr compare --grid)")
    return out


def evaluate_model(cfg: ExperimentConfig, model: nn.Module, data, *, n_bins: int | None = None,
                   temperature_scaling: bool | None = None) -> dict[str, Any]:
    """Test metrics of a trained model: the predictive (MC for BNNs, mean for ensembles), its
    reliability data, temperature-scaled metrics (T fitted on validation) and ensemble diversity."""
    from ..models.bayes import is_bayesian

    n_bins = n_bins or cfg.eval.ece_bins
    autocast = AUTOCAST[cfg.train.precision]
    samples = cfg.bayes.test_samples if is_bayesian(model) else 1
    test, prediction = evaluate_split(model, data.test, autocast=autocast, n_bins=n_bins, samples=samples)
    result: dict[str, Any] = {
        "test": test, "reliability": reliability(prediction.log_probs.exp(), prediction.labels, n_bins).__dict__,
    }
    if samples > 1:
        result["test_samples"] = samples
    if prediction.member_probs is not None:
        from ..eval.diversity import diversity_metrics

        result["diversity"] = diversity_metrics(prediction.member_probs, prediction.labels)
    if temperature_scaling is None:
        temperature_scaling = cfg.eval.temperature_scaling
    if temperature_scaling and data.val is not None:
        val = predict(model, data.val, autocast_dtype=autocast, samples=samples)
        temperature = fit_temperature(val.log_probs, val.labels)
        scaled = classification_metrics(torch.softmax(prediction.log_probs / temperature, dim=1),
                                        prediction.labels, n_bins)
        result["test_temperature_scaled"] = {**scaled, "temperature": temperature}
    return result


def _final_evaluation(cfg, model, optimizer, data, history) -> dict[str, Any]:
    from ..models.ensemble import Ensemble

    summary: dict[str, Any] = {
        "method": cfg.optim.method, "seed": cfg.train.seed, "dataset": cfg.data.name, "model": cfg.model.name,
        "parameters": count_parameters(model), "epochs": cfg.train.epochs,
        # the median: the first epoch carries start-up costs (allocation, caches, lazy imports)
        "seconds_per_epoch": statistics.median(r["seconds"] for r in history) if history else 0.0,
        "passes_per_step": optimizer.passes_per_step() if isinstance(optimizer, OTMDR) else 1.0,
        "perturbation_norm": history[-1]["perturbation_norm"] if history else 0.0,
    }
    if isinstance(model, Ensemble):
        summary["regime"] = cfg.ensemble.regime
    if data.label_noise is not None:
        summary["label_noise"] = data.label_noise
    summary.update(evaluate_model(cfg, model, data))
    summary["history"] = history
    return summary


def _early_stopped_evaluation(cfg, model, data, best: dict[str, Any] | None) -> dict[str, Any] | None:
    """Test metrics of ``best``, the checkpoint of the best validation epoch: early stopping, the
    standard defence against label noise, so every comparison also reports it. Loads into ``model``."""
    if data.val is None or best is None:
        return None
    from ..models.bayes import is_bayesian

    model.load_state_dict(best["model"])
    test, _ = evaluate_split(model, data.test, autocast=AUTOCAST[cfg.train.precision], n_bins=cfg.eval.ece_bins,
                             samples=cfg.bayes.test_samples if is_bayesian(model) else 1)
    row = best["history"][-1]
    return {"epoch": best["epoch"], "val_accuracy": row.get("val_accuracy"), "test": test}


def load_run(path: str | Path, device: str = "auto", which: str = "last") -> tuple[ExperimentConfig, nn.Module, dict[str, Any]]:
    """A trained model from a checkpoint file, or from a run directory: its final model
    (``which="last"``, what ``summary.json`` reports) or its best on validation (``"best"``)."""
    path = Path(path)
    if path.is_dir():
        checkpoint = path / "checkpoints" / f"{which}.pt"
        if not checkpoint.is_file():
            raise CheckpointError(f"{path} holds no checkpoints/{which}.pt: is it a run directory?")
        path = checkpoint
    state = load_checkpoint(path)
    cfg = config_from_dict(state["config"])
    from ..data import DatasetSpec, get_spec

    saved = state.get("spec")  # resolved at training time (image folders); older checkpoints lack it
    spec = get_spec(cfg.data.name) if saved is None else DatasetSpec(
        **{**saved, "mean": tuple(saved["mean"]), "std": tuple(saved["std"])})
    model = build_model(cfg, spec)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as error:
        raise CheckpointError(f"checkpoint {path} does not fit model {cfg.model.name!r}: {str(error).splitlines()[0]}") from None
    return cfg, model.to(select_device(device)), state
