"""What ``otmdr train`` costs beyond the training itself: its epochs against a minimal hand-written loop.

Both sides train the same model (same config, same seed, same initial weights) on the same data
tensors with the same optimizer and schedule; the hand loop does what a user would write in a
dozen lines: shuffle, slice the batch, ``opt.step(loss_fn, batch=...)``, ``scheduler.step()``,
then an accuracy pass over the validation split. ``otmdr train`` additionally computes NLL, ECE
and Brier on validation, writes two atomic checkpoints and the metrics file, and checks health
every epoch. Two figures per method, each a median over epochs 2..E (epoch 1 warms up):

* **train phase**: the loop over the training batches only (``seconds`` in otmdr's history
  against the hand loop's batch loop): the per-step bookkeeping of the training loop;
* **whole epoch**: wall time between two epoch lines of the log (training, validation,
  checkpoints, metrics) against the hand loop's training + validation: the pipeline's overhead.

The two sides alternate epoch blocks (pipeline run, then hand loop, twice) so that drift on a
shared machine affects both. ``benchmarks/step_speed.py`` runs it in a fresh process with one
thread (its results file has a section for it; in the process that has just timed ResNet-20
steps with 2 threads the small epochs measured up to 30% slower); runnable alone:

    python benchmarks/pipeline_overhead.py [--config configs/demo.yaml] [--epochs 12]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from otmdr.config import load_config
from otmdr.train import train
from otmdr.train.builders import build_data, build_model, build_optimizer, build_scheduler, select_device

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "configs" / "demo.yaml"


@dataclass
class Overhead:
    method: str
    epochs: int
    steps_per_epoch: int
    pipeline_train_s: float  # median seconds of the train phase of one epoch
    hand_train_s: float
    pipeline_epoch_s: float  # median seconds of a whole epoch
    hand_epoch_s: float

    @property
    def train_ratio(self) -> float:
        return self.pipeline_train_s / self.hand_train_s

    @property
    def epoch_ratio(self) -> float:
        return self.pipeline_epoch_s / self.hand_epoch_s


def _pipeline(cfg, workdir: Path) -> tuple[list[float], list[float]]:
    """Train with ``otmdr.train.train``; per-epoch train-phase seconds and whole-epoch seconds."""
    stamps: list[float] = []

    def log(line: str) -> None:
        if line.startswith("epoch "):
            stamps.append(time.perf_counter())

    run_dir = Path(tempfile.mkdtemp(dir=workdir))
    start = time.perf_counter()
    train(cfg, run_dir, log=log)
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    whole = [b - a for a, b in zip([start] + stamps[:-1], stamps)]
    return [row["seconds"] for row in history][1:], whole[1:]


def _hand(cfg) -> tuple[list[float], list[float]]:
    """The minimal loop: same data tensors, model, optimizer and schedule as ``otmdr train``."""
    if cfg.train.threads is not None:
        torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(cfg.train.seed)
    device = select_device(cfg.train.device)
    data = build_data(cfg, device)
    model = build_model(cfg, data.spec).to(device)
    opt = build_optimizer(cfg, model)
    scheduler = build_scheduler(cfg, opt, len(data.train))
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.train.label_smoothing)
    images, labels = _tensors(data.train)
    val_images, val_labels = _tensors(data.val)
    bs = cfg.data.batch_size

    def loss_fn(batch):
        return criterion(model(batch[0]), batch[1])

    train_s, whole_s = [], []
    generator = torch.Generator().manual_seed(cfg.train.seed)
    for _ in range(cfg.train.epochs):
        started = time.perf_counter()
        model.train()
        order = torch.randperm(len(labels), generator=generator)
        for lo in range(0, len(labels), bs):
            idx = order[lo:lo + bs]
            batch = (images[idx], labels[idx])
            if hasattr(opt, "perturb"):
                opt.step(loss_fn, batch=batch)
            else:
                opt.zero_grad(set_to_none=True)
                loss_fn(batch).backward()
                opt.step()
            scheduler.step()
        trained = time.perf_counter()
        model.eval()
        with torch.no_grad():
            correct = sum(int((model(val_images[i:i + 512]).argmax(1) == val_labels[i:i + 512]).sum())
                          for i in range(0, len(val_labels), 512))
        assert 0 <= correct <= len(val_labels)
        train_s.append(trained - started)
        whole_s.append(time.perf_counter() - started)
    return train_s[1:], whole_s[1:]


def _tensors(loader) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole split as float inputs and labels, read through the loader once (unshuffled order
    does not matter: the hand loop shuffles itself)."""
    xs, ys = zip(*[(x, y) for x, y in loader])
    return torch.cat(xs), torch.cat(ys)


def measure(method: str, *, config: Path = DEFAULT_CONFIG, epochs: int = 12, threads: int = 1,
            rounds: int = 2) -> Overhead:
    """Median train-phase and whole-epoch seconds of ``otmdr train`` and of the hand loop."""
    cfg = load_config(config, [f"optim.method={method}", f"train.epochs={epochs}", f"train.threads={threads}",
                               "train.progress=false"])
    pipe_train, pipe_whole, hand_train, hand_whole = [], [], [], []
    with tempfile.TemporaryDirectory() as workdir:
        for _ in range(rounds):
            t, w = _pipeline(cfg, Path(workdir))
            pipe_train += t
            pipe_whole += w
            t, w = _hand(cfg)
            hand_train += t
            hand_whole += w
    steps = -(-int(_count_train(cfg)) // cfg.data.batch_size)
    return Overhead(method, epochs, steps, statistics.median(pipe_train), statistics.median(hand_train),
                    statistics.median(pipe_whole), statistics.median(hand_whole))


def _count_train(cfg) -> int:
    return build_data(cfg, torch.device("cpu")).train.num_samples


def markdown(results: list[Overhead], config: Path) -> str:
    lines = [
        f"Config `{config.relative_to(ROOT) if config.is_relative_to(ROOT) else config}`, "
        f"{results[0].epochs} epochs x 2 rounds per side, {results[0].steps_per_epoch} steps per epoch; medians over "
        "epochs 2..E of both rounds.",
        "",
        "| method | train phase: otmdr train (ms) | hand loop (ms) | ratio | whole epoch: otmdr train (ms) "
        "| hand loop (ms) | ratio |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(f"| {r.method} | {1e3 * r.pipeline_train_s:.1f} | {1e3 * r.hand_train_s:.1f} "
                     f"| {r.train_ratio:.3f} "
                     f"| {1e3 * r.pipeline_epoch_s:.1f} | {1e3 * r.hand_epoch_s:.1f} | {r.epoch_ratio:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--methods", default="sgd,sam,otmdr")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of both sides (default 1)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    results = [measure(m, config=args.config, epochs=args.epochs, threads=args.threads)
               for m in args.methods.split(",")]
    print(markdown(results, args.config))
    if args.json:
        args.json.write_text(json.dumps([dataclasses.asdict(r) for r in results], indent=2))


if __name__ == "__main__":
    main()
