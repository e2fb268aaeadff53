"""Where a step stands between its passes (one small object), and what a finished step reports."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

from torch import Tensor

from .plan import AscentPlan

__all__ = ["StepResult", "StepProgress"]


class StepResult(NamedTuple):
    """What one step measured: detached tensors (no host sync was needed) and its cost, counted
    from batch sizes (Python ints), so equal-compute comparisons can use measured numbers."""

    loss: Tensor  #: loss of the first pass, at the unperturbed weights (on its part of the batch)
    perturbed_loss: Tensor  #: full-batch loss at the perturbed weights (mean over particles)
    perturbation_norm: Tensor  #: measured ||theta~ - theta|| (mean over particles)
    outputs: Any = None  #: whatever the loss function returned besides the loss, first pass
    #: forward+backward passes run, in full-batch units (a pass on a part counts its fraction)
    gradient_evaluations: float = 0.0
    #: the deterministic part of the perturbation, ||theta~ - theta - xi|| with xi the Langevin
    #: noise the ascent added (mean over particles): ``perturbation_norm`` itself without noise.
    #: None only in a result built by hand; the optimizer always fills it
    move_norm: Tensor | None = None
    #: ||xi||, the noise part (mean over particles); 0 without noise (a shared zero: do not modify)
    noise_norm: Tensor | None = None
    #: "full" (perturbed), "plain" (one pass, base step) or "reuse" (LookSAM's reused component)
    kind: str = "full"


@dataclass
class StepProgress:
    """The state of the step in flight; a fresh one starts every step (see the module diagram
    in :mod:`otmdr.optim.otmdr`). Nothing here outlives a step or enters the state dict."""

    ascent: int = 0  #: ascent steps the current particle has taken
    particles_done: int = 0  #: particles ended by next_particle(), their gradients summed
    plan: AscentPlan | None = None  #: the tensors the current particle moves
    norm_total: Tensor | None = None  #: sum of the step's ascent norms: finite iff all are
    norms: list[Tensor] = field(default_factory=list)  #: the same norms, to say which pass failed
    distance: Tensor | None = None  #: ||theta~ - theta|| of the current particle, once measured
    distances: list[Tensor] = field(default_factory=list)  #: one per particle, at restore
    #: with noise only: ||theta~ - theta - xi|| and ||xi|| of the current particle, once measured,
    #: and one of each per particle, at restore (without noise the distance is the move)
    move: Tensor | None = None
    noise: Tensor | None = None
    moves: list[Tensor] = field(default_factory=list)
    noises: list[Tensor] = field(default_factory=list)
    particle_params: list[Tensor] = field(default_factory=list)  #: where the particle sum goes
    particles_loaded: bool = False  #: the particle sum is already in ``.grad`` (one-call form)
    perturbed: bool = False  #: some ascent step moved the weights (a full step, not a plain one)

    def add_norm(self, norm: Tensor) -> None:
        total = norm if norm.dim() == 0 else norm.sum()  # non-finite iff some norm is (norms are >= 0)
        self.norm_total = total if self.norm_total is None else self.norm_total + total.to(self.norm_total)
        self.norms.append(norm)
