"""Compute accounting: the gradient evaluations a config's method costs per training step, and
the machine a run's timings come from.

A gradient evaluation is one forward+backward pass over a full batch: a pass on a part of the
batch counts its fraction, so SGD costs 1 per step, SAM 2, OT-MDR with two ascent steps on the
batch's halves 2 as well. An ensemble or a Bayesian model counts one pass of the whole model as 1
(the loop runs its members, or its one weight sample, in that pass). Equal-compute comparisons
scale each method's epochs by this number; the loop also measures it (``summary.json``'s
``compute`` block), so a prediction that drifted from the optimizer shows there.
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

import torch

from ..config import ExperimentConfig, efficiency_options, otmdr_options
from ..optim import PerturbationConfig
from ..optim.otmdr import passes_per_step

__all__ = ["gradient_evaluations_per_step", "cpu_model", "machine_info"]


def gradient_evaluations_per_step(cfg: ExperimentConfig) -> float:
    """The expected gradient evaluations of one training step of the method ``cfg`` selects
    (the mean over the run's steps where the ``efficiency`` section makes some of them cheaper:
    plain or reusing steps between sharpness-aware ones, a late start, momentum ascent)."""
    method = cfg.optim.method
    if method == "sgd":
        return 1.0
    efficiency = efficiency_options(cfg.efficiency)
    if method in ("sam", "asam"):  # one ascent step on the whole batch, then the full pass
        return passes_per_step(PerturbationConfig(rho=(getattr(cfg, method).rho,), split=(1.0,), **efficiency))
    return passes_per_step(PerturbationConfig(**otmdr_options(cfg.otmdr), **efficiency))


def cpu_model() -> str:
    """The CPU's model name (timings are only comparable on the same one): /proc/cpuinfo on
    Linux, else ``platform.processor()``, else ``"unknown"``."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(device: torch.device | str) -> dict[str, Any]:
    """Where a run's seconds were measured, for ``summary.json``'s ``machine`` block."""
    return {"cpu": cpu_model(), "machine": platform.machine(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "device": str(device)}
