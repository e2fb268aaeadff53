"""SGD vs SAM vs OT-MDR on scikit-learn's digits, in plain PyTorch (``make example``).

Why this file exists: it is the smallest complete, runnable use of the optimizers from an
ordinary PyTorch training loop, with no framework and no download (the 1,797 8x8 digit images
ship with scikit-learn). It shows that

* ``otmdr.SAM`` and ``otmdr.OTMDR`` wrap a plain ``torch.optim.SGD`` and take its keywords;
* one call per step runs every forward/backward pass itself and zeroes the gradients:
  ``opt.step(loss_fn, batch=(x, y))`` returns a ``StepResult`` (loss, perturbed loss, the
  measured perturbation norm ||theta~ - theta||, outputs);
* a standard LR scheduler (``CosineAnnealingLR``) attaches to either optimizer as to SGD.

The same MLP, data split, hyper-parameters and seeds are used for the three methods; only the
optimizer changes. It prints test accuracy and test NLL (mean +- std over seeds), seconds per
epoch and the mean measured perturbation norm, and runs in well under a minute on 2 CPU cores.

    python examples/digits_compare.py                # 3 seeds, 40 epochs
    python examples/digits_compare.py --seeds 0 1 2 3 4 --epochs 60
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor, nn

from otmdr import OTMDR, SAM
from otmdr.models import count_parameters, create_model

METHODS = ("SGD", "SAM", "OT-MDR")

Batch = tuple[Tensor, Tensor]


@dataclass
class RunResult:
    method: str
    seed: int
    accuracy: float  # test accuracy in [0, 1]
    nll: float  # mean test cross-entropy
    seconds_per_epoch: float  # training only (no evaluation)
    perturbation_norm: float | None  # mean measured ||theta~ - theta|| over all steps (None: SGD)


def load_data() -> tuple[Batch, Batch]:
    """Digits as (N, 1, 8, 8) float tensors in [0, 1]; fixed stratified 80/20 split (seed 0)."""
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    train_idx, test_idx = train_test_split(
        torch.arange(len(y)).numpy(), test_size=0.2, stratify=y.numpy(), random_state=0
    )
    train_idx, test_idx = torch.from_numpy(train_idx), torch.from_numpy(test_idx)
    return (x[train_idx], y[train_idx]), (x[test_idx], y[test_idx])


def make_optimizer(method: str, model: nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    """The only place where the methods differ; the base optimizer's keywords are shared."""
    base = dict(lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    if method == "SGD":
        return torch.optim.SGD(model.parameters(), **base)
    if method == "SAM":
        return SAM(model, torch.optim.SGD, rho=args.sam_rho, **base)
    if method == "OT-MDR":
        return OTMDR(model, torch.optim.SGD, rho=tuple(args.otmdr_rho), **base)
    raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")


def train_step(opt: torch.optim.Optimizer, loss_fn: Callable[[Batch], Tensor], batch: Batch) -> Tensor | None:
    """One training step; returns the measured perturbation norm (None for plain SGD)."""
    if isinstance(opt, OTMDR):  # SAM is an OTMDR preset: one call runs all passes
        return opt.step(loss_fn, batch=batch).perturbation_norm
    opt.zero_grad()
    loss_fn(batch).backward()
    opt.step()
    return None


@torch.no_grad()
def evaluate(model: nn.Module, data: Batch) -> tuple[float, float]:
    model.eval()
    x, y = data
    logits = model(x)
    model.train()
    return (logits.argmax(1) == y).float().mean().item(), F.cross_entropy(logits, y).item()


def train(method: str, seed: int, train_data: Batch, test_data: Batch, args: argparse.Namespace) -> RunResult:
    """Train one model with one method and seed; initial weights and batch order depend on the seed only."""
    torch.manual_seed(seed)
    model = create_model("mlp", num_classes=10, in_channels=1, input_size=8, hidden=tuple(args.hidden))
    opt = make_optimizer(method, model, args)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs)
    order = torch.Generator().manual_seed(seed)

    def loss_fn(batch: Batch) -> Tensor:
        return F.cross_entropy(model(batch[0]), batch[1])

    x, y = train_data
    norms: list[Tensor] = []
    train_seconds = 0.0
    for _ in range(args.epochs):
        start = time.perf_counter()
        perm = torch.randperm(len(y), generator=order)
        for i in range(0, len(y), args.batch_size):
            idx = perm[i : i + args.batch_size]
            norm = train_step(opt, loss_fn, (x[idx], y[idx]))
            if norm is not None:
                norms.append(norm)
        scheduler.step()
        train_seconds += time.perf_counter() - start
    accuracy, nll = evaluate(model, test_data)
    return RunResult(
        method, seed, accuracy, nll, train_seconds / args.epochs,
        torch.stack(norms).mean().item() if norms else None,
    )


def mean_std(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.4f} ± {std:.4f}"


def print_table(results: list[RunResult], methods: list[str]) -> None:
    header = ("method", "test accuracy", "test NLL", "s / epoch", "mean ||theta~ - theta||")
    rows = []
    for method in methods:
        runs = [r for r in results if r.method == method]
        norms = [r.perturbation_norm for r in runs if r.perturbation_norm is not None]
        rows.append((
            method,
            mean_std([r.accuracy for r in runs]),
            mean_std([r.nll for r in runs]),
            f"{statistics.fmean(r.seconds_per_epoch for r in runs):.4f}",
            f"{statistics.fmean(norms):.4f}" if norms else "-",
        ))
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    line = lambda cells: " | ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    print(line(header))
    print("-+-".join("-" * w for w in widths))
    for row in rows:
        print(line(row))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one run per seed and method")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--sam-rho", type=float, default=0.05)
    parser.add_argument("--otmdr-rho", type=float, nargs="+", default=[0.02, 0.04],
                        help="OT-MDR's radius per ascent step (default: the optimizer's own, about SAM's 0.05)")
    parser.add_argument("--hidden", type=int, nargs="+", default=[128, 128], help="MLP hidden widths")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: this model is too small to gain from more)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    train_data, test_data = load_data()
    n_params = count_parameters(create_model("mlp", 10, 1, input_size=8, hidden=tuple(args.hidden)))
    print(
        f"digits: {len(train_data[1])} train / {len(test_data[1])} test images; MLP {args.hidden}, "
        f"{n_params:,} parameters; {args.epochs} epochs, batch {args.batch_size}, lr {args.lr} (cosine), "
        f"momentum {args.momentum}, weight decay {args.weight_decay}; SAM rho {args.sam_rho}, "
        f"OT-MDR rho {tuple(args.otmdr_rho)}; seeds {args.seeds}; {torch.get_num_threads()} thread(s)"
    )
    results = []
    for method in args.methods:
        for seed in args.seeds:
            result = train(method, seed, train_data, test_data, args)
            results.append(result)
            print(f"  {method:7s} seed {seed}: accuracy {result.accuracy:.4f}, NLL {result.nll:.4f}")
    print()
    print_table(results, args.methods)
    print(f"\ntotal wall time {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
