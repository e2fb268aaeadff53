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
                   *, per_member: bool, kl_weight: float | None):
    """``loss_fn(batch) -> (loss, (log_probs_or_logits, loss_to_report))`` for the optimizers.

    Per-member ensembles sum the members' own losses (each member gets its full gradient) and
    report their mean; Bayesian models add ``kl_weight * KL(q || prior)``.
    """
    from ..models.bayes import kl_divergence

    def loss_fn(batch: tuple[Tensor, Tensor]) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        x, y = batch
        ctx = torch.autocast(device.type, dtype=autocast) if autocast is not None else contextlib.nullcontext()
        with ctx:
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
            _check_finite(mean_loss, epoch, step)
            elapsed = time.perf_counter() - started
            radius = {"radius": f"{float(perturbation) / (step + 1):.3f}"} if perturbing else {}
            bar.set_postfix(loss=f"{mean_loss:.4f}", acc=f"{float(correct) / float(seen):.3f}", **radius,
                            img_s=f"{samples / elapsed:.0f}", refresh=False)
            bar.update(step + 1 - bar.n)
    if bar is not None:
        bar.close()
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
    """
    with folder_lock(run_dir), _sigterm_flag() as preempted, CheckpointWriter() as writer:
        return _train(cfg, run_dir, resume=resume, log=log, preempted=preempted, writer=writer)


def _train(cfg: ExperimentConfig | None, run_dir: str | Path, *, resume: bool, log: Callable[[str], None],
           preempted: list[bool], writer: CheckpointWriter) -> dict[str, Any]:
    run_dir = Path(run_dir)
    checkpoint = None
    if resume:
        checkpoint = load_checkpoint(run_dir / "checkpoints" / "last.pt")
        cfg = config_from_dict(checkpoint["config"])
    else:
        atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    if cfg.train.threads is not None:
        torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(cfg.train.seed)
    device = select_device(cfg.train.device)
    autocast = AUTOCAST[cfg.train.precision]
    data = build_data(cfg, device)
    model = build_model(cfg, data.spec).to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(cfg, model)
    scheduler = build_scheduler(cfg, optimizer, len(data.train))
    scaler = torch.amp.GradScaler(device.type) if cfg.train.precision == "fp16" else None
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.train.label_smoothing)
    from ..models.bayes import is_bayesian
    from ..models.ensemble import Ensemble

    per_member = cfg.ensemble.regime == "per-member" and isinstance(model, Ensemble)
    bayesian = is_bayesian(model)
    samples = cfg.bayes.test_samples if bayesian else 1
    loss_fn = _loss_function(model, criterion, autocast, device, per_member=per_member,
                             kl_weight=cfg.bayes.kl_weight if bayesian else None)
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
        torch.set_rng_state(checkpoint["rng"]["cpu"])
        if device.type == "cuda" and checkpoint["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(checkpoint["rng"]["cuda"], device)
        start_epoch, best, history = checkpoint["epoch"], checkpoint["best"], checkpoint["history"]
        _remove_leftovers(run_dir)
        if history:  # a kill between the checkpoint and the metrics write lost the last rows
            _write_history(run_dir, history)
        log(f"resuming {run_dir} after epoch {start_epoch}")

    def state(epoch: int) -> dict[str, Any]:
        return {
            "config": config_to_dict(cfg), "epoch": epoch, "best": best, "history": history,
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None, "loader": data.train.state_dict(),
            "rng": {"cpu": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None},
            "classes": data.classes, "spec": dataclasses.asdict(data.spec),
        }

    n_bins = cfg.eval.ece_bins
    nominal = nominal_radius(cfg)
    warned: dict[str, str] = {}  # kind -> the warning of the first epoch it showed, resumed epochs included
    for row in history:
        for kind, warning in _health_warnings(cfg, row, nominal, data.spec.num_classes).items():
            warned.setdefault(kind, warning)
    partial = checkpoint.get("partial_epoch") if checkpoint is not None else None
    if preempted[0]:  # SIGTERM while setting up: nothing new to save
        raise Preempted(f"preempted (SIGTERM) before training started; continue with: otmdr train --resume {run_dir}")
    for epoch in range(start_epoch, cfg.train.epochs):
        try:
            stats = _train_epoch(model, optimizer, scheduler, scaler, data.train, loss_fn,
                                 max_grad_norm=cfg.optim.max_grad_norm, progress=cfg.train.progress,
                                 epoch=epoch, epochs=cfg.train.epochs, partial=partial,
                                 should_stop=lambda: preempted[0])
            partial = None
        except _StoppedMidEpoch as stop:
            writer.save({**state(epoch), "partial_epoch": stop.partial}, run_dir / "checkpoints" / "last.pt")
            writer.flush()
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
        if data.val is not None:
            val, _ = evaluate_split(model, data.val, autocast=autocast, n_bins=n_bins, samples=samples)
            row.update({f"val_{k}": v for k, v in val.items() if k != "ece_bins"})
        history.append(row)
        score = row.get("val_accuracy", -stats.loss)
        improved = score > best
        best = max(best, score)
        # best.pt before last.pt: a kill between the two repeats this epoch on resume, which
        # rewrites the same best.pt, instead of leaving a stale one behind
        if improved:  # the same state twice: last.pt becomes a link to the new best.pt, not a second write
            writer.save(state(epoch + 1), run_dir / "checkpoints" / "best.pt")
            writer.link(run_dir / "checkpoints" / "best.pt", run_dir / "checkpoints" / "last.pt")
        else:
            writer.save(state(epoch + 1), run_dir / "checkpoints" / "last.pt")
        _write_history(run_dir, history, writer)
        val_text = f" val acc {row['val_accuracy']:.4f} nll {row['val_nll']:.4f}" if data.val is not None else ""
        radius_text = f" radius {stats.perturbation:.3f} (nominal {nominal:.3f})" if nominal else ""
        log(f"epoch {epoch + 1}/{cfg.train.epochs}: train loss {stats.loss:.4f} acc {stats.accuracy:.4f}"
            f"{val_text}{radius_text} ({stats.seconds:.1f}s, {row['images_per_second']:.0f} img/s)")
        for kind, warning in _health_warnings(cfg, row, nominal, data.spec.num_classes).items():
            if kind not in warned:  # each kind once: the first epoch it shows
                warned[kind] = warning
                log(f"warning: {warning}")
        if preempted[0] and epoch + 1 < cfg.train.epochs:  # SIGTERM during validation or saving
            writer.flush()
            raise Preempted(f"preempted (SIGTERM) after epoch {epoch + 1}: checkpoint written; continue "
                            f"with: otmdr train --resume {run_dir}")

    writer.flush()  # best.pt is read back below, and the run is done only when its files are on disk
    summary = _final_evaluation(cfg, model, optimizer, data, history)
    if warned:
        summary["warnings"] = list(warned.values())
    summary["early_stopped"] = _early_stopped_evaluation(cfg, model, data, run_dir / "checkpoints" / "best.pt")
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2))
    return summary


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
    return (f"training {cfg.model.name} ({count_parameters(model):,} parameters) with {method}, lr {o.lr}, "
            f"{cfg.train.epochs} epochs, on {cfg.data.name} ({sizes}{noise}), device {device}, {cfg.train.precision}")


def nominal_radius(cfg: ExperimentConfig) -> float:
    """The perturbation length the config asks for: SAM's rho, OT-MDR's rho1 + rho2 + ...
    (0 for SGD). ASAM's radius lives in the rescaled space and is not comparable: 0 too."""
    if cfg.optim.method == "sam":
        return cfg.sam.rho
    if cfg.optim.method == "otmdr":
        return float(sum(cfg.otmdr.rho))
    return 0.0


def _health_warnings(cfg: ExperimentConfig, row: dict[str, Any], nominal: float, classes: int) -> dict[str, str]:
    """What a user must see while training: a radius far above its nominal size (the release's
    normalisation divides by ||g2||, which can blow up) and training accuracy stuck at chance."""
    out = {}
    o = cfg.otmdr
    allowed = nominal
    if cfg.optim.method == "otmdr" and o.merge and o.normalize == "step":
        allowed = o.rho[0] + 2 * sum(o.rho[1:])  # ||g1 + g2|| / ||g2|| is about 2 when alike
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


def _early_stopped_evaluation(cfg, model, data, best_path: Path) -> dict[str, Any] | None:
    """Test metrics of the checkpoint of the best validation epoch: early stopping, the standard
    defence against label noise, so every comparison also reports it. Loads into ``model``."""
    if data.val is None or not best_path.is_file():
        return None
    from ..models.bayes import is_bayesian

    best = load_checkpoint(best_path)
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
