"""Wall time per training step and extra optimizer memory: SGD, SAM, OT-MDR, their cheaper variants and
pytorch-optimizer's SAM.

Measures, in one run, the wall time of a training step (all forward/backward passes, the ascent
moves and the base SGD update) for

* ``SGD``         plain ``torch.optim.SGD`` (momentum 0.9): one forward/backward pass;
* ``SAM``         ``otmdr.SAM`` (rho 0.05), one-call ``opt.step(loss_fn, batch=...)``;
* ``OT-MDR K=1``  ``otmdr.OTMDR`` (rho (0.05, 0.1), one particle): two half-batch ascent passes
                  plus one full-batch pass, the same FLOPs as SAM;
* ``OT-MDR K=2``  the same with two particles (twice the passes);
* ``PO-SAM``      ``pytorch_optimizer.SAM`` in its documented two-pass pattern
                  (backward, ``first_step``, backward, ``second_step``), as an outside reference
                  (it leaves batch-norm statistics alone, where otmdr's optimizers save and
                  restore them around the passes that must not update them: a small extra cost);
* ``hand SAM`` / ``hand OT-MDR``  the same passes and moves written inline with no option, check
                  or measurement: the floor each optimizer's bookkeeping is measured against (and
                  their ratio, the cost of OT-MDR's third pass, which bookkeeping cannot remove),
* the cheaper variants of docs/optimizer.md, "Cheaper steps", named as ``otmdr compare``'s
  METHOD+VARIANT (``OT-MDR`` is K=1; each with the radius above):
  ``OT-MDR+interval`` (``ascent_interval=5``), ``OT-MDR+reuse`` (and ``reuse=True``: LookSAM),
  ``OT-MDR+late`` (``phase_start=0.8``), ``OT-MDR+trigger`` (``trigger=(-1.0, 1.0)``: AE-SAM),
  ``OT-MDR+momentum`` (``momentum_ascent="all"``: MSAM), ``OT-MDR+momentum1`` (``"first"``),
  ``SAM+reuse`` and ``SAM+momentum`` (MSAM); ``--methods`` also takes ``SAM+interval``,
  ``SAM+late`` and ``SAM+trigger``,

on three models: the digits MLP of ``examples/digits_compare.py`` (1x8x8 inputs), otmdr's LeNet
at MNIST shape (1x28x28) and ResNet-20 at CIFAR shape (3x32x32), all at batch 128. Inputs and
labels are random synthetic tensors (one fixed batch per model): step time does not depend on
the data. Every method trains its own copy of the same initial model.

Method: a few warm-up repetitions per method, then rounds in which the methods run round-robin
(the order rotates every round) so that machine drift affects all of them alike; the figure is
the median over rounds, and ratios carry a 95% bootstrap interval (resampling whole rounds). For
SGD, SAM, OT-MDR, PO-SAM and the hand steps a repetition is one step. A variant alternates cheap
and full steps, so the median of single steps would be the cheap step's time: its repetition is a
whole cycle and its figure the mean time per step in it (the median over rounds of these means):

* ``+interval``, ``+reuse``: 5 consecutive steps (one full step and four plain or reusing ones,
  wherever the block starts);
* ``+late``, ``+trigger``: a whole simulated run of ``--run-steps`` steps (10; ``--quick`` 5) with
  ``total_steps`` set to it: ``opt.step_count`` is set back to 0 at the start of each repetition,
  so the option's own schedule runs (late phase: ceil(0.8 N) plain steps, then full ones; trigger:
  c moves from -1 to 1 over the run) while the weights, momentum and the trigger's statistics
  carry on. This times the real schedule rather than weighting separately timed plain and full
  steps 0.8/0.2; a run of 10 instead of thousands changes nothing but the number of phase
  changes, which cost nothing (the optimizer's buffers persist through plain steps). The
  trigger's share of full steps on one fixed random batch is not what it would be in training:
  the table reports the share measured, and the time belongs to that share;
* ``+momentum``, ``+momentum1``: one step (every step is alike once the momentum exists).

Each method's gradient evaluations per step (``StepResult.gradient_evaluations`` averaged over
the timed steps; the known value for SGD 1, PO-SAM and the hand steps 2) and share of full
(perturbed) steps (``StepResult.kind``) are reported next to its time. Rounds repeat until a time
budget per model is spent (``--budget``, default 600 s, with ``--min-reps``/``--max-reps``), so the
default run (15 methods) takes about 11-12 minutes on 2 CPU cores, about 40-80 rounds on LeNet and
ResNet-20 (it was 240 s and 4-5 minutes for the first 7 methods; ``--budget 240`` still bounds it
there, with fewer rounds). The CPU time other processes used during the run is reported: on a
shared machine the figures are only as good as that is small. With ``--device cuda`` every timed
repetition is bracketed by ``torch.cuda.synchronize()``.

Extra memory is what the optimizer keeps beyond the base optimizer's own state (SGD momentum
is excluded everywhere): for otmdr's optimizers the persistent scratch tensors in
``opt.scratch`` (centre copy, merge direction, particle gradient sum; LookSAM's clean gradient,
MSAM's momentum direction) and, with ``reuse``, the stored LookSAM component; for
pytorch-optimizer's SAM the per-parameter ``old_p`` copies, measured right after ``first_step``
(its peak). Both are reported in multiples of the parameter bytes. Transient temporaries inside a
step are not counted.

A last section (``benchmarks/pipeline_overhead.py``) times whole ``otmdr train`` epochs of the
digits MLP (``configs/demo.yaml``) against a minimal hand-written loop with the same model, data
and optimizer: the pipeline's overhead (``--pipeline-epochs 0`` skips it).

Results go to ``benchmarks/results/step_speed.md`` and ``.json`` (not written for ``--quick``).

    python benchmarks/step_speed.py                 # full run, writes the results files
    python benchmarks/step_speed.py --quick         # seconds-long smoke run, writes nothing
    python benchmarks/step_speed.py --device cuda
    python benchmarks/step_speed.py --methods SGD SAM "OT-MDR K=1" OT-MDR+reuse OT-MDR+late --run-steps 50
    python benchmarks/step_speed.py --baseline 48d0e6e --models "digits MLP" --methods SAM "OT-MDR K=1" \
        "hand SAM" "hand OT-MDR" --pipeline-epochs 0 --output benchmarks/results/step_speed_vs_48d0e6e

``--baseline REV`` adds ``SAM@base`` and ``OT-MDR K=1@base``: ``otmdr.optim`` as it was at the git
revision REV (it imports nothing outside itself, so it is extracted into a temporary folder and
imported under another name), timed round-robin with the current code: what a change to the
optimizer did, apart from the run-to-run drift of a shared machine (about 5% on the MLP).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pytorch_optimizer import SAM as PoSAM
from torch import Tensor, nn

from benchmark_env import machine_busy_s, run_environment
from otmdr import OTMDR, SAM
from otmdr.models import count_parameters, create_model

#: a cheaper variant of SAM or OT-MDR (K=1), as ``otmdr compare`` names it: its options and its
#: repetition (steps in a row, or RUN: a simulated run of ``--run-steps`` steps; see the docstring)
RUN = 0
VARIANTS: dict[str, tuple[dict[str, Any], int]] = {
    "interval": (dict(ascent_interval=5), 5),
    "reuse": (dict(ascent_interval=5, reuse=True), 5),
    "late": (dict(phase_start=0.8), RUN),
    "trigger": (dict(trigger=(-1.0, 1.0)), RUN),
    "momentum": (dict(momentum_ascent="all"), 1),
    "momentum1": (dict(momentum_ascent="first"), 1),  # SAM's one ascent step: the same as "all"
}
VARIANT_METHODS = tuple(f"OT-MDR+{v}" for v in VARIANTS) + ("SAM+reuse", "SAM+momentum")
METHODS = ("SGD", "SAM", "OT-MDR K=1", "OT-MDR K=2", "PO-SAM", "hand SAM", "hand OT-MDR", *VARIANT_METHODS)
CHOICES = (*METHODS, *(f"SAM+{v}" for v in VARIANTS if f"SAM+{v}" not in METHODS and v != "momentum1"))
#: gradient evaluations per step of the methods whose step returns no StepResult
KNOWN_EVALUATIONS = {"SGD": 1.0, "PO-SAM": 2.0, "hand SAM": 2.0, "hand OT-MDR": 2.0,
                     "SAM@base": 2.0, "OT-MDR K=1@base": 2.0}  # the baselines: where their StepResult has none
SGD_KWARGS = dict(lr=0.01, momentum=0.9, weight_decay=5e-4)
SAM_RHO = 0.05
OTMDR_RHO = (0.05, 0.1)
RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class ModelSpec:
    label: str
    name: str
    input_shape: tuple[int, int, int]  # C, H, W
    kwargs: dict[str, Any]
    budget_share: float  # fraction of --budget spent on this model's timed repetitions


MODELS = (
    ModelSpec("digits MLP", "mlp", (1, 8, 8), {"input_size": 8, "hidden": (128, 128)}, 0.07),
    ModelSpec("LeNet", "lenet", (1, 28, 28), {}, 0.28),
    ModelSpec("ResNet-20", "resnet20", (3, 32, 32), {}, 0.65),
)


@dataclass
class MethodResult:
    method: str
    median_ms: float  # per step: the median over repetitions of a repetition's mean time per step
    q25_ms: float
    q75_ms: float
    extra_state_bytes: int
    extra_state_x_params: float
    steps_per_rep: int = 1
    gradient_evaluations_per_step: float = 0.0  # measured over the timed steps (known for SGD, PO-SAM, hand)
    full_step_share: float = 0.0  # timed steps that perturbed


@dataclass
class ModelResult:
    model: str
    parameters: int
    parameter_bytes: int
    batch_size: int
    warmup_steps: int
    repetitions: int
    methods: dict[str, MethodResult] = field(default_factory=dict)
    ratios: dict[str, float] = field(default_factory=dict)  # ratio of median step times
    ratio_ci95: dict[str, tuple[float, float]] = field(default_factory=dict)  # bootstrap over rounds


# ------------------------------------------------------------------------------------ methods
Cost = tuple[float, int]  # gradient evaluations (full-batch passes) and full (perturbed) steps


def make_stepper(method: str, model: nn.Module, batch: tuple[Tensor, Tensor],
                 run_steps: int = 10) -> tuple[Callable[[], Cost], Any, int]:
    """A zero-argument function running one repetition of ``method`` and returning its cost, its
    optimizer, and the steps in a repetition (1; a variant's cycle: see the module docstring)."""

    def loss_fn(b: tuple[Tensor, Tensor] = batch) -> Tensor:
        return F.cross_entropy(model(b[0]), b[1])

    steps = 1
    if method == "SGD":
        opt: Any = torch.optim.SGD(model.parameters(), **SGD_KWARGS)

        def step() -> Cost:
            opt.zero_grad()
            loss_fn().backward()
            opt.step()
            return KNOWN_EVALUATIONS[method], 0

    elif method in ("SAM", "OT-MDR K=1", "OT-MDR K=2", "SAM@base", "OT-MDR K=1@base") or "+" in method:
        base, _, variant = method.partition("+")
        options, steps = VARIANTS[variant] if variant else ({}, 1)
        if steps == RUN:
            steps, options = run_steps, {**options, "total_steps": run_steps}
        sam, otmdr = (BASELINE.SAM, BASELINE.OTMDR) if method.endswith("@base") else (SAM, OTMDR)
        if base.startswith("SAM"):
            opt = sam(model, torch.optim.SGD, rho=SAM_RHO, **options, **SGD_KWARGS)
        else:
            particles = int(base[9]) if base.startswith("OT-MDR K=") else 1
            opt = otmdr(model, torch.optim.SGD, rho=OTMDR_RHO, particles=particles, **options, **SGD_KWARGS)

        def one() -> Cost:
            result = opt.step(loss_fn, batch=batch)
            evaluations = getattr(result, "gradient_evaluations", None) or KNOWN_EVALUATIONS[method]  # older @base
            return float(evaluations), int(getattr(result, "kind", "full") == "full")

        def cycle() -> Cost:
            if "total_steps" in options:  # a simulated run: the option's schedule from its start
                opt.step_count = 0
            costs = [one() for _ in range(steps)]
            return sum(c[0] for c in costs), sum(c[1] for c in costs)

        step = one if steps == 1 else cycle

    elif method == "PO-SAM":
        opt = PoSAM(model.parameters(), torch.optim.SGD, rho=SAM_RHO, **SGD_KWARGS)

        def step() -> Cost:  # its second_step zeroes the gradients for the next step
            loss_fn().backward()
            opt.first_step(zero_grad=True)
            loss_fn().backward()
            opt.second_step(zero_grad=True)
            return KNOWN_EVALUATIONS[method], 1

    elif method in ("hand SAM", "hand OT-MDR"):
        opt = torch.optim.SGD(model.parameters(), **SGD_KWARGS)
        step = _hand_step(method, model, opt, loss_fn, batch)
    else:
        raise ValueError(f"unknown method {method!r}")
    return step, opt, steps


def _hand_step(method: str, model: nn.Module, opt: torch.optim.Optimizer, loss_fn: Callable[..., Tensor],
               batch: tuple[Tensor, Tensor]) -> Callable[[], Cost]:
    """The floor: the same passes and moves written inline, with no option, check or measurement.

    ``hand SAM``: one ascent step on the whole batch. ``hand OT-MDR``: the release's K=1 step,
    ascent on each half (the second along g1 + g2 divided by ||g2||), then the full batch. The gap
    between an otmdr optimizer and its floor is its bookkeeping; the gap between the two floors
    is the cost of the algorithm's extra pass, which no bookkeeping can remove.
    """
    params = list(model.parameters())
    centre = [p.detach().clone() for p in params]
    merged = [torch.zeros_like(p) for p in params]
    half = len(batch[1]) // 2
    ascent = [(batch, SAM_RHO)] if method == "hand SAM" else [
        ((batch[0][:half], batch[1][:half]), OTMDR_RHO[0]), ((batch[0][half:], batch[1][half:]), OTMDR_RHO[1])]

    def step() -> Cost:
        with torch.no_grad():
            torch._foreach_copy_(centre, params)
        for i, (part, rho) in enumerate(ascent):
            opt.zero_grad(set_to_none=True)
            loss_fn(part).backward()
            with torch.no_grad():
                grads = [p.grad for p in params]
                (torch._foreach_copy_ if i == 0 else torch._foreach_add_)(merged, grads)
                norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
                torch._foreach_add_(params, torch._foreach_mul(merged, rho / (norm + 1e-12)))
        opt.zero_grad(set_to_none=True)
        loss_fn(batch).backward()
        with torch.no_grad():
            torch._foreach_copy_(params, centre)
        opt.step()
        return KNOWN_EVALUATIONS[method], 1

    return step


def tensor_bytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def extra_state_bytes(method: str, opt: Any, model: nn.Module, batch: tuple[Tensor, Tensor]) -> int:
    """Optimizer-owned tensors beyond the base optimizer's state (after warm-up)."""
    if method == "SGD":
        return 0
    if method.startswith("hand"):
        return 2 * tensor_bytes(model.parameters())  # the centre copy and the merge buffer
    if isinstance(opt, OTMDR):  # with reuse, LookSAM's stored component too (a parameter-sized buffer)
        return tensor_bytes(opt.scratch.tensors()) + tensor_bytes(opt._reuse.values())
    if method.endswith("@base"):  # the baseline's own bookkeeping: .scratch, or the older ._scratch dicts
        scratch = getattr(opt, "scratch", None)
        tensors = scratch.tensors() if scratch is not None else (t for d in opt._scratch.values() for t in d.values())
        return tensor_bytes(tensors)
    # pytorch-optimizer SAM: old_p lives in the state between first_step and second_step
    F.cross_entropy(model(batch[0]), batch[1]).backward()
    opt.first_step(zero_grad=True)
    peak = tensor_bytes(s["old_p"] for s in opt.state.values() if "old_p" in s)
    F.cross_entropy(model(batch[0]), batch[1]).backward()
    opt.second_step(zero_grad=True)
    return peak


# ------------------------------------------------------------------------------------- timing
def timed(step: Callable[[], Cost], device: torch.device) -> tuple[float, Cost]:
    """Seconds one repetition took, and what it cost."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    cost = step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, cost


def bench_model(spec: ModelSpec, args: argparse.Namespace, device: torch.device) -> ModelResult:
    torch.manual_seed(0)
    base = create_model(spec.name, num_classes=10, in_channels=spec.input_shape[0], **spec.kwargs).to(device)
    base.train()
    batch = (torch.randn(args.batch_size, *spec.input_shape, device=device),
             torch.randint(0, 10, (args.batch_size,), device=device))
    models = {m: copy.deepcopy(base) for m in args.methods}
    steppers = {m: make_stepper(m, models[m], batch, args.run_steps) for m in args.methods}

    for _ in range(args.warmup):
        for m in args.methods:
            steppers[m][0]()
    # Rounds until this model's share of the budget is spent (at least --min-reps, at most --max-reps).
    times: dict[str, list[float]] = {m: [] for m in args.methods}  # per step: a repetition's mean
    evaluations = dict.fromkeys(args.methods, 0.0)
    full_steps = dict.fromkeys(args.methods, 0)
    n = len(args.methods)
    budget_s = args.budget * spec.budget_share
    start = time.perf_counter()
    reps = 0
    while reps < args.max_reps and (reps < args.min_reps or time.perf_counter() - start < budget_s):
        for j in range(n):
            m = args.methods[(reps + j) % n]  # rotate the order: no method always runs first
            seconds, (evals, full) = timed(steppers[m][0], device)
            times[m].append(seconds / steppers[m][2])
            evaluations[m] += evals
            full_steps[m] += full
        reps += 1
    print(f"{spec.label}: {reps} rounds of all methods in {time.perf_counter() - start:.1f} s", flush=True)

    param_bytes = tensor_bytes(base.parameters())
    result = ModelResult(spec.label, count_parameters(base), param_bytes, args.batch_size, args.warmup, reps)
    for m in args.methods:
        q = statistics.quantiles(times[m], n=4, method="inclusive") if reps > 1 else [times[m][0]] * 3
        extra = extra_state_bytes(m, steppers[m][1], models[m], batch)
        timed_steps = reps * steppers[m][2]
        result.methods[m] = MethodResult(m, 1e3 * q[1], 1e3 * q[0], 1e3 * q[2], extra, extra / param_bytes,
                                         steppers[m][2], evaluations[m] / timed_steps, full_steps[m] / timed_steps)
    samples = {m: np.asarray(t) for m, t in times.items()}
    rng = np.random.default_rng(0)
    rounds = rng.integers(0, reps, size=(args.bootstrap, reps))  # resample whole rounds: keeps pairing
    for name, (a, b) in {**RATIOS, **variant_ratios(args.methods)}.items():
        if a in samples and b in samples:
            result.ratios[name] = float(np.median(samples[a]) / np.median(samples[b]))
            boot = np.median(samples[a][rounds], axis=1) / np.median(samples[b][rounds], axis=1)
            lo, hi = np.quantile(boot, [0.025, 0.975])
            result.ratio_ci95[name] = (float(lo), float(hi))
    return result


BASELINE: Any = None  # otmdr.optim at --baseline, imported by load_baseline()
RATIOS = {
    "OT-MDR K=1 / SAM": ("OT-MDR K=1", "SAM"),
    "hand OT-MDR / hand SAM": ("hand OT-MDR", "hand SAM"),
    "SAM / hand SAM": ("SAM", "hand SAM"),
    "OT-MDR K=1 / hand OT-MDR": ("OT-MDR K=1", "hand OT-MDR"),
    "SAM / PO-SAM": ("SAM", "PO-SAM"),
    "OT-MDR K=2 / OT-MDR K=1": ("OT-MDR K=2", "OT-MDR K=1"),
    "SAM / SGD": ("SAM", "SGD"),
    "SAM / SAM@base": ("SAM", "SAM@base"),
    "OT-MDR K=1 / OT-MDR K=1@base": ("OT-MDR K=1", "OT-MDR K=1@base"),
    "SAM@base / hand SAM": ("SAM@base", "hand SAM"),
    "OT-MDR K=1@base / hand OT-MDR": ("OT-MDR K=1@base", "hand OT-MDR"),
}


def full_method(variant: str) -> str:
    """The method a variant makes cheaper: ``OT-MDR+reuse`` -> ``OT-MDR K=1``, ``SAM+reuse`` -> ``SAM``."""
    base = variant.partition("+")[0]
    return "OT-MDR K=1" if base == "OT-MDR" else base


def variant_ratios(methods: Any) -> dict[str, tuple[str, str]]:
    """Each variant's step time against SGD's and against its full method's."""
    return {f"{v} / {b}": (v, b) for v in methods if "+" in v for b in ("SGD", full_method(v))}


def load_baseline(revision: str, folder: Path) -> Any:
    """``otmdr.optim`` at git ``revision``, imported as the package ``baseline_optim``."""
    root = Path(__file__).resolve().parent.parent

    def git(*cmd: str) -> str:
        return subprocess.run(["git", *cmd], cwd=root, capture_output=True, text=True, check=True).stdout

    target = folder / "baseline_optim"
    target.mkdir()
    for name in git("ls-tree", "--name-only", f"{revision}:src/otmdr/optim").split():
        (target / name).write_text(git("show", f"{revision}:src/otmdr/optim/{name}"))
    sys.path.insert(0, str(folder))
    import importlib

    return importlib.import_module("baseline_optim")


def verdict(result: ModelResult, ratio: str, limit: float) -> str:
    """met / MISSED, or 'within noise' when the 95% interval of the ratio contains the limit."""
    value, (lo, hi) = result.ratios[ratio], result.ratio_ci95[ratio]
    state = "met" if value <= limit else ("MISSED" if lo > limit else "missed, within noise")
    return f"{value:.3f} (95% CI {lo:.3f}-{hi:.3f}) -> {state}"


def targets(result: ModelResult) -> list[str]:
    """The stated targets (reported, not asserted)."""
    out = []
    if "OT-MDR K=1 / SAM" in result.ratios:
        line = f"OT-MDR (K=1) within 5% of SAM: {verdict(result, 'OT-MDR K=1 / SAM', 1.05)}"
        floor = result.ratios.get("hand OT-MDR / hand SAM")
        if floor is not None and floor > 1.05 and result.ratios["OT-MDR K=1 / SAM"] > 1.05:
            line += (f"; the floor, the same passes written inline, is {floor:.3f}: OT-MDR's third pass (two "
                     "half-batch ascent passes + one full pass, against SAM's two full passes) costs that much "
                     "on this model, which no bookkeeping can remove")
        out.append(line)
    if "OT-MDR K=1 / hand OT-MDR" in result.ratios:
        out.append(f"OT-MDR (K=1) bookkeeping within 10% of its inline floor: "
                   f"{verdict(result, 'OT-MDR K=1 / hand OT-MDR', 1.10)}")
    if "SAM / PO-SAM" in result.ratios:
        out.append(f"SAM no slower than pytorch-optimizer's SAM: {verdict(result, 'SAM / PO-SAM', 1.0)}")
    for m in ("OT-MDR K=1", "OT-MDR K=2"):
        if m in result.methods:
            v = result.methods[m].extra_state_x_params
            state = "met" if v <= 2.0 + 1e-9 else "MISSED"
            out.append(f"{m} extra state <= 2 parameter-sized buffers: {v:.2f}x -> {state}")
    return out


# ------------------------------------------------------------------------------------ reports
def environment(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    env = {
        **run_environment(),
        "threads": torch.get_num_threads(),
        "device": str(device),
        "input_data": "random synthetic tensors, one fixed batch per model",
        "sgd": SGD_KWARGS,
        "sam_rho": SAM_RHO,
        "otmdr_rho": OTMDR_RHO,
        "budget_s": args.budget,
        "run_steps": args.run_steps,
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def markdown(env: dict[str, Any], results: list[ModelResult], wall_s: float) -> str:
    lines = [
        "# Step speed and extra optimizer memory",
        "",
        f"Command: `{env['command']}` at commit {env['git']}  ",
        f"Date: {env['date']}; torch {env['torch']}, Python {env['python']}; device {env['device']}"
        + (f" ({env['gpu']})" if "gpu" in env else "")
        + f"; CPU {env['cpu']} ({env['cpu_count']} logical CPUs), {env['threads']} torch thread(s); "
        f"load average before {env['loadavg_before']}; total wall time {wall_s:.0f} s; CPU time used by "
        f"other processes meanwhile {env.get('other_processes_cpu_s', '?')} s "
        f"({100 * env.get('other_processes_share', float('nan')):.0f}% of the machine).  ",
        f"Inputs: {env['input_data']}; SGD {env['sgd']}; SAM rho {env['sam_rho']}; OT-MDR rho {env['otmdr_rho']}; "
        f"simulated runs of {env['run_steps']} steps (+late, +trigger)."
        + (f" `@base`: `otmdr.optim` as of commit {env['baseline']}, imported next to this commit's." if "baseline"
           in env else ""),
        "",
        "Median wall time of one training step with its interquartile range (IQR); methods run",
        "round-robin. A repetition is one step, or for a cheaper variant a whole cycle of `steps / rep`",
        "steps (5 in a row; late phase and trigger: a simulated run with `total_steps` that long), timed",
        "as one: its figures are the median and IQR over repetitions of the cycle's mean time per step.",
        "Grad. evals / step: full-batch forward/backward passes per step, measured over the timed steps",
        "(`StepResult.gradient_evaluations`; SGD, PO-SAM and the hand steps: their known 1, 2, 2); full",
        "steps: the share that perturbed. Extra state: optimizer-owned tensors beyond the base SGD state,",
        "in multiples of the parameter bytes (otmdr: `opt.scratch` and a reusing variant's stored",
        "component; pytorch-optimizer SAM: `old_p` after `first_step`).",
        "",
        "| model | params | method | steps / rep | median ms / step | IQR ms | x SGD | grad. evals / step | "
        "full steps | extra state (x params) |",
        "|---|---:|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    for res in results:
        sgd = res.methods.get("SGD")
        for m, r in res.methods.items():
            rel = f"{r.median_ms / sgd.median_ms:.2f}" if sgd else "-"
            lines.append(
                f"| {res.model} (batch {res.batch_size}, {res.repetitions} reps) | {res.parameters:,} | {m} | "
                f"{r.steps_per_rep} | {r.median_ms:.2f} | {r.q25_ms:.2f}-{r.q75_ms:.2f} | {rel} | "
                f"{r.gradient_evaluations_per_step:.2f} | {r.full_step_share:.2f} | {r.extra_state_x_params:.2f} |"
            )
    names = [n for n in RATIOS if any(n in res.ratios for res in results)]
    lines += ["", "Ratios of median step times (95% bootstrap interval over repetitions in brackets):", "",
              "| model | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)] if names else []
    for res in results if names else []:
        cells = [f"{res.ratios[n]:.3f} ({res.ratio_ci95[n][0]:.3f}-{res.ratio_ci95[n][1]:.3f})" if n in res.ratios
                 else "-" for n in names]
        lines.append(f"| {res.model} | " + " | ".join(cells) + " |")
    variants = [(res, m) for res in results for m in res.methods if "+" in m]
    if variants:
        lines += ["", "Cheaper variants: ratios of median step times (95% bootstrap interval over repetitions in",
                  "brackets) to SGD and to the full method they make cheaper (OT-MDR K=1 or SAM), next to the",
                  "measured gradient evaluations per step and share of full steps:", "",
                  "| model | method | x SGD | full method | x full method | grad. evals / step | full steps |",
                  "|---|---|---:|---|---:|---:|---:|"]
        for res, m in variants:
            cells = [f"{res.ratios[n]:.3f} ({res.ratio_ci95[n][0]:.3f}-{res.ratio_ci95[n][1]:.3f})"
                     if (n := f"{m} / {b}") in res.ratios else "-" for b in ("SGD", full_method(m))]
            r = res.methods[m]
            lines.append(f"| {res.model} | {m} | {cells[0]} | {full_method(m)} | {cells[1]} | "
                         f"{r.gradient_evaluations_per_step:.2f} | {r.full_step_share:.2f} |")
    lines += ["", "Targets (stated, not asserted):", ""]
    for res in results:
        lines += [f"- {res.model}: {t}" for t in targets(res)]
    return "\n".join(lines) + "\n"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's, = cores)")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (batch 16, 2 reps); writes no results")
    parser.add_argument("--budget", type=float, default=600.0, help="seconds of timed repetitions over all models")
    parser.add_argument("--warmup", type=int, default=3, help="warm-up steps per method and model")
    parser.add_argument("--min-reps", type=int, default=10)
    parser.add_argument("--max-reps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--bootstrap", type=int, default=1000, help="resamples for the ratios' 95%% intervals")
    parser.add_argument("--models", nargs="+", default=[m.label for m in MODELS], choices=[m.label for m in MODELS])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=CHOICES)
    parser.add_argument("--run-steps", type=int, default=None, help="steps of the simulated run that is one "
                        "repetition of a +late or +trigger variant (total_steps; a multiple of 5 keeps 0.8 exact; "
                        "default 10, --quick 5)")
    parser.add_argument("--baseline", metavar="REV", help="also time otmdr.optim as of this git revision "
                        "(methods SAM@base, OT-MDR K=1@base)")
    parser.add_argument("--pipeline-epochs", type=int, default=30,
                        help="epochs per side for the pipeline-overhead section (0: skip it)")
    parser.add_argument("--output", type=Path, default=RESULTS / "step_speed",
                        help="results path without suffix (.md and .json are written)")
    args = parser.parse_args()
    if args.run_steps is None:
        args.run_steps = 5 if args.quick else 10
    if args.run_steps < 1:
        parser.error("--run-steps must be at least 1")
    if args.quick:
        args.batch_size, args.warmup, args.min_reps, args.max_reps, args.budget = 16, 1, 2, 2, 0.0
        args.pipeline_epochs = 0
        args.bootstrap = 10
    return args


def main() -> None:
    args = parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device is available")
    env = environment(args, device)
    env["loadavg_before"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
    busy_before, own_before = machine_busy_s(), time.process_time()
    start = time.perf_counter()
    global BASELINE
    with tempfile.TemporaryDirectory() as baseline_folder:
        if args.baseline:
            BASELINE = load_baseline(args.baseline, Path(baseline_folder))
            env["baseline"] = subprocess.run(["git", "rev-parse", "--short", args.baseline], capture_output=True,
                                             text=True, check=True, cwd=Path(__file__).resolve().parent).stdout.strip()
            args.methods = [*args.methods, "SAM@base", "OT-MDR K=1@base"]
        results = [bench_model(spec, args, device) for spec in MODELS if spec.label in args.models]
    pipeline = []
    if args.pipeline_epochs and device.type == "cpu":  # a fresh process, one thread (see pipeline_overhead.py)
        from pipeline_overhead import Overhead

        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "pipeline.json"
            subprocess.run([sys.executable, str(Path(__file__).with_name("pipeline_overhead.py")), "--epochs",
                            str(args.pipeline_epochs), "--threads", "1", "--json", str(out)], check=True)
            pipeline = [Overhead(**row) for row in json.loads(out.read_text())]
    wall_s = time.perf_counter() - start
    busy_after, own_after = machine_busy_s(), time.process_time()
    if busy_before is not None and busy_after is not None:
        other = max(0.0, (busy_after - busy_before) - (own_after - own_before))
        env["other_processes_cpu_s"] = round(other, 1)
        env["other_processes_share"] = round(other / (wall_s * (os.cpu_count() or 1)), 3)
    report = markdown(env, results, wall_s)
    if pipeline:
        from pipeline_overhead import DEFAULT_CONFIG
        from pipeline_overhead import markdown as pipeline_markdown

        report += ("\n## Pipeline overhead: `otmdr train` epochs against a hand-written loop\n\n"
                   "`benchmarks/pipeline_overhead.py`, run in a fresh process with 1 torch thread.\n\n"
                   + pipeline_markdown(pipeline, DEFAULT_CONFIG) + "\n\nTarget (stated, not asserted): whole "
                   "epoch within 10% of the hand loop: " + "; ".join(
                       f"{r.method} {r.epoch_ratio:.3f} -> {'met' if r.epoch_ratio <= 1.10 else 'MISSED'}"
                       for r in pipeline) + ".\n")
    print()
    print(report)
    if not args.quick:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.with_suffix(".md").write_text(report)
        payload = {"environment": env, "wall_s": wall_s, "results": [asdict(r) for r in results],
                   "pipeline": [asdict(r) for r in pipeline]}
        args.output.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {args.output.with_suffix('.md')} and {args.output.with_suffix('.json')}")


if __name__ == "__main__":
    main()
