"""The knobs of one perturbation step (method.md section 2), validated once at construction."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

from .batchnorm import BN_POLICIES

__all__ = ["PRESETS", "Preset", "PerturbationConfig", "preset_options", "sam_equivalent"]

NORMALIZATIONS = ("step", "merged")
REDUCTIONS = ("sum", "mean")
#: which ascent steps move along the base optimizer's momentum instead of a gradient pass
MOMENTUM_ASCENTS = ("none", "first", "all")


@dataclass(frozen=True)
class Preset:
    """Values of the three knobs our tuned studies changed from the authors' release."""

    rho: tuple[float, ...]
    normalize: str
    bn_policy: str


#: "default" (docs/results.md, "Defaults, from the evidence"): merged normalisation, so the radius
#: is bounded by rho1 + rho2 and is the number a search tunes (the release's can grow without
#: bound and collapsed runs); a radius about SAM's usual 0.05 (tuned radii ranged 0.02-0.28 across
#: our studies; the paper's lost on every small network); batch-norm statistics from the clean
#: pass, as SAM and every tuned study. "release": the authors' code, for reproducing the paper.
PRESETS: dict[str, Preset] = {
    "default": Preset(rho=(0.02, 0.04), normalize="merged", bn_policy="clean"),
    "release": Preset(rho=(0.05, 0.1), normalize="step", bn_policy="ascent"),
}


def preset_options(preset: str, **given: object) -> dict[str, object]:
    """``given`` (some of rho, normalize, bn_policy) with every None replaced by ``preset``'s value."""
    _check_choice("preset", preset, tuple(PRESETS))
    return {name: getattr(PRESETS[preset], name) if value is None else value for name, value in given.items()}


def as_float_tuple(name: str, value: float | Sequence[float]) -> tuple[float, ...]:
    values = (value,) if isinstance(value, (int, float)) else tuple(value)
    if not values:
        raise ValueError(f"{name} must hold at least one value, got an empty sequence")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"{name} must be finite numbers, got {value!r}")
    return tuple(float(v) for v in values)


@dataclass(frozen=True)
class PerturbationConfig:
    """Step-level options shared by SAM, ASAM and OT-MDR (per-group options live in param groups).

    rho: radius of each ascent step; its length is the number of ascent steps.
    split: fraction of the batch each ascent step uses, as disjoint consecutive parts (sum <= 1).
        Default: equal parts, i.e. the whole batch for one step and halves for two (the release).
    merge: step i moves along the sum (or mean) of the ascent gradients so far, not its own.
    normalize: "step" divides by the norm of the step's own gradient (the release); "merged" by
        the norm of the merged direction (each step then has length rho exactly).
    reduce: "sum" or "mean", for the merged direction and (unless ``particle_reduce`` is given)
        for the particles' gradients: the release's "mode 1" and its single-particle "mode 1.1".
    particle_reduce: "sum" or "mean" for the K particles' final gradients only (None: as
        ``reduce``). The release's multi-particle "mode 1.1" is ``reduce="sum",
        particle_reduce="mean"``: its second ascent step still moves along g1 + g2.
    noise_std: standard deviation of the Gaussian (Langevin) noise added after each ascent step.
    adaptive, adaptive_eta: ASAM's element-wise scaling T = |theta| + eta.
    particles: K; each particle runs the ascent from the centre on its own random split.
    bn_policy: which passes update batch-norm running statistics (see ``BN_POLICIES``).
    ascent_weight_decay: add the group's weight decay to the ascent gradient (default: no; weight
        decay stays in the base optimizer, as in common PyTorch SAM code).
    max_grad_norm: clip the final gradient (after unscaling) to this norm.
    ascent_interval: perturb every k-th step only; the others are plain base-optimizer steps
        (Composer's SAM ``interval``).
    reuse: with ``ascent_interval`` k > 1, the steps between add the stored component of the last
        perturbed gradient orthogonal to its clean gradient, scaled to the plain gradient's norm
        times ``reuse_alpha`` (LookSAM, Liu et al. 2022), instead of plain steps.
    phase_start: plain steps until this fraction of ``OTMDR.total_steps`` ("SAM in the late phase").
    trigger: AE-SAM's adaptive trigger (Jiang et al. 2023): the sharpness-aware step only when the
        first pass's squared gradient norm is at least mean + c * std of its running statistics
        (decay ``trigger_decay``); c moves linearly from ``trigger[0]`` at the first step to
        ``trigger[1]`` at the last. None: off.
    momentum_ascent: MSAM (Becker et al. 2024): ``"first"`` or ``"all"`` ascent steps move against
        the base optimizer's normalised momentum (no gradient pass for them) instead of along a
        gradient; ``"none"``: off.
    sync_ascent: under DDP, all-reduce the ascent gradients too (default: per-replica ascent
        under ``no_sync()``, one all-reduce of the final gradient). Under FSDP every pass is
        reduce-scattered whatever this says (docs/distributed.md, "FSDP2").
    check_finite: raise on a non-finite gradient (one host sync per step; with a GradScaler the
        step is skipped instead and no sync is added).
    eps: added to every norm before dividing (use ~1e-8 when parameters are fp16).
    """

    rho: tuple[float, ...] = PRESETS["default"].rho
    split: tuple[float, ...] | None = None
    merge: bool = True
    normalize: str = PRESETS["default"].normalize
    reduce: str = "sum"
    particle_reduce: str | None = None
    noise_std: float = 0.0
    adaptive: bool = False
    adaptive_eta: float = 0.0
    particles: int = 1
    bn_policy: str = PRESETS["default"].bn_policy
    ascent_weight_decay: bool = False
    max_grad_norm: float | None = None
    ascent_interval: int = 1
    reuse: bool = False
    reuse_alpha: float = 0.7
    phase_start: float = 0.0
    trigger: tuple[float, ...] | None = None
    trigger_decay: float = 0.9
    momentum_ascent: str = "none"
    sync_ascent: bool = False
    check_finite: bool = True
    eps: float = 1e-12

    def __post_init__(self) -> None:
        rho = as_float_tuple("rho", self.rho)
        if any(r < 0 for r in rho):
            raise ValueError(f"rho must be non-negative, got {self.rho!r}")
        object.__setattr__(self, "rho", rho)

        split = (1.0 / len(rho),) * len(rho) if self.split is None else as_float_tuple("split", self.split)
        if len(split) != len(rho):
            raise ValueError(
                f"split needs one fraction per ascent step: rho has {len(rho)} steps, split {split!r}"
            )
        if any(not 0.0 < s <= 1.0 for s in split):
            raise ValueError(f"split fractions must lie in (0, 1], got {split!r}")
        if sum(split) > 1.0 + 1e-9:
            raise ValueError(
                f"split fractions must sum to at most 1 (disjoint parts of the batch), got {split!r} "
                f"summing to {sum(split):g}"
            )
        object.__setattr__(self, "split", split)

        for name in ("merge", "adaptive", "ascent_weight_decay", "sync_ascent", "check_finite", "reuse"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        _check_choice("normalize", self.normalize, NORMALIZATIONS)
        _check_choice("reduce", self.reduce, REDUCTIONS)
        if self.particle_reduce is not None:
            _check_choice("particle_reduce", self.particle_reduce, REDUCTIONS)
        _check_choice("bn_policy", self.bn_policy, BN_POLICIES)
        _check_number("noise_std", self.noise_std, minimum=0.0)
        _check_number("adaptive_eta", self.adaptive_eta, minimum=0.0)
        _check_number("eps", self.eps, minimum=0.0, strict=True)
        _check_int("particles", self.particles)
        _check_int("ascent_interval", self.ascent_interval)
        if self.max_grad_norm is not None:
            _check_number("max_grad_norm", self.max_grad_norm, minimum=0.0, strict=True)
        self._check_efficiency()

    def _check_efficiency(self) -> None:
        """The options that skip passes (docs/optimizer.md, "Cheaper steps")."""
        if self.reuse and self.ascent_interval < 2:
            raise ValueError("reuse=True stores a component at every k-th step and reuses it in between: "
                             "give ascent_interval=k >= 2 (LookSAM used 5)")
        _check_number("reuse_alpha", self.reuse_alpha, minimum=0.0)
        _check_number("phase_start", self.phase_start, minimum=0.0)
        if self.phase_start >= 1.0:
            raise ValueError(f"phase_start must be below 1 (a fraction of the steps), got {self.phase_start!r}")
        _check_number("trigger_decay", self.trigger_decay, minimum=0.0, strict=True)
        if self.trigger_decay >= 1.0:
            raise ValueError(f"trigger_decay must lie in (0, 1), got {self.trigger_decay!r}")
        if self.trigger is not None:
            trigger = as_float_tuple("trigger", self.trigger)
            if len(trigger) > 2:
                raise ValueError(f"trigger takes c, or (c at the first step, c at the last), got {self.trigger!r}")
            object.__setattr__(self, "trigger", trigger)
        _check_choice("momentum_ascent", self.momentum_ascent, MOMENTUM_ASCENTS)
        if self.momentum_ascent != "none" and (self.reuse or self.trigger is not None):
            raise ValueError(f"momentum_ascent={self.momentum_ascent!r} takes no clean gradient pass, which "
                             f"{'reuse' if self.reuse else 'trigger'} needs: choose one of them")
        if self.momentum_ascent == "all" and self.particles > 1 and not self.noise_std:
            raise ValueError("momentum_ascent='all' without noise gives every particle the same neighbour: "
                             "use particles=1, or noise_std > 0, or momentum_ascent='first'")

    @property
    def split_fractions(self) -> tuple[float, ...]:
        """``split`` as resolved at construction (never None)."""
        assert self.split is not None
        return self.split

    @property
    def ascent_steps(self) -> int:
        """Number of ascent steps of a particle (one per entry of ``rho``)."""
        return len(self.rho)

    @property
    def particle_reduction(self) -> str:
        """How the K particles' final gradients are combined: ``particle_reduce``, or ``reduce``
        when that option is None."""
        return self.reduce if self.particle_reduce is None else self.particle_reduce

    @property
    def steps(self) -> int:
        """Deprecated name of :attr:`ascent_steps`; removed in the next release."""
        warnings.warn("PerturbationConfig.steps is deprecated: use ascent_steps", DeprecationWarning, stacklevel=2)
        return self.ascent_steps

    @property
    def particles_reduce(self) -> str:
        """Deprecated name of :attr:`particle_reduction`; removed in the next release."""
        warnings.warn("PerturbationConfig.particles_reduce is deprecated: use particle_reduction",
                      DeprecationWarning, stacklevel=2)
        return self.particle_reduction

    @property
    def uses_direction_buffer(self) -> bool:
        return self.merge and self.gradient_ascent_steps > 1

    @property
    def momentum_steps(self) -> int:
        """Leading ascent steps that move along the momentum (no gradient pass)."""
        return {"none": 0, "first": 1, "all": self.ascent_steps}[self.momentum_ascent]

    @property
    def gradient_ascent_steps(self) -> int:
        """Ascent steps that take a gradient pass."""
        return self.ascent_steps - self.momentum_steps

    @property
    def skips_passes(self) -> bool:
        """Whether some steps are decided by :func:`OTMDR.step` (plain, reused, triggered or
        momentum steps): the pass-by-pass primitives cannot apply these options."""
        return (self.reuse or self.phase_start > 0 or self.trigger is not None
                or self.momentum_ascent != "none")


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}: choose one of {', '.join(choices)}")


def _check_number(name: str, value: object, *, minimum: float, strict: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not isinstance(value, (int, float)) or value < minimum or (strict and value == minimum):
        relation = ">" if strict else ">="
        raise ValueError(f"{name} must be a finite number {relation} {minimum:g}, got {value!r}")


def _check_int(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def sam_equivalent(config: PerturbationConfig) -> str | None:
    """``"SAM"`` or ``"ASAM"`` when ``config`` is exactly that method: one ascent step on the whole
    batch, no noise, one particle (with one step, merging and either normalisation are the same
    thing); None for a genuine OT-MDR configuration. OT-MDR refuses the first two under its own
    name (a one-entry ``rho`` silently running SAM misreports what was compared)."""
    if config.ascent_steps != 1 or config.noise_std > 0 or config.particles > 1 or config.split_fractions[0] < 1.0:
        return None
    return "ASAM" if config.adaptive else "SAM"
