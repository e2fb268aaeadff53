"""The OT-MDR optimizer: a thin Optimizer class around the functional core.

One object wraps any base ``torch.optim.Optimizer`` and shares its param groups and state, so LR
schedulers, gradient clipping utilities and ``state_dict()`` work on either object.

Three ways to drive a step:

1. one call per step, the optimizer runs every pass itself::

       opt = OTMDR(model, torch.optim.SGD, lr=0.1, momentum=0.9)
       result = opt.step(lambda b: F.cross_entropy(model(b[0]), b[1]), batch=(x, y))

2. a closure that does forward + backward on the whole batch (Lightning's automatic
   optimization); it is called at every point the step needs (ascent steps + final pass)::

       opt.step(closure)

3. low-level primitives for custom loops (AMP, DDP, manual Lightning optimization)::

       opt.zero_grad()
       loss_fn(b1).backward(); opt.perturb()      # ascent step 1 (consumes and zeroes .grad)
       loss_fn(b2).backward(); opt.perturb()      # ascent step 2
       loss_fn(b).backward();  opt.descend()      # restore the centre, base-optimizer step

Cost: each particle costs one pass per ascent step (on its fraction of the batch) plus one
full-batch pass; with the default halves that is 2 full-batch forward/backward passes, as SAM.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from . import functional as F
from .batching import batch_size, split_bounds, take
from .batchnorm import BatchNormState
from .config import PerturbationConfig, preset_options

__all__ = ["OTMDR", "StepResult"]

#: Per-group options: ``perturb`` (False: trained, never perturbed), ``rho_scale`` (multiplies the
#: radius), ``norm_group`` (groups with the same key share one perturbation norm; by default all
#: groups share one global norm, e.g. ensemble members get one key each for per-member radii) and
#: ``in_norm`` (a ``perturb=False`` group whose gradients still count in its norm group's ascent
#: norm: the release's Bayesian step, whose norm includes the sigma gradients while only the
#: means move; default False: the norm is that of the moved parameters only).
GROUP_DEFAULTS = {"perturb": True, "rho_scale": 1.0, "norm_group": None, "in_norm": False}


class StepResult(NamedTuple):
    """What one step measured; every field is a detached tensor (no host sync was needed)."""

    loss: Tensor  #: loss of the first pass, at the unperturbed weights (on its part of the batch)
    perturbed_loss: Tensor  #: full-batch loss at the perturbed weights (mean over particles)
    perturbation_norm: Tensor  #: measured ||theta~ - theta|| (mean over particles)
    outputs: Any = None  #: whatever the loss function returned besides the loss, first pass


class _AscentPlan(NamedTuple):
    """What :meth:`OTMDR.perturb` needs, fixed while the param groups do not change."""

    key: tuple  #: the config, groups, options and ids of parameters with a gradient it was built for
    params: list[Tensor]  #: the tensors that move, each norm group a contiguous slice
    parts: list[slice]  #: one slice of ``params`` per norm group
    norm_only: list[list[Tensor]]  #: per norm group: ``in_norm`` parameters that do not move
    rho_scales: list[float] | None  #: per-tensor radius factors (None: all 1)
    centre: list[Tensor]  #: scratch copy of the centre
    directions: list[Tensor] | None  #: the merge buffer (None without a merge)


class OTMDR(Optimizer):
    """Optimal Transport Model Distributional Robustness (Nguyen et al., NeurIPS 2023).

    Each step moves the weights to a loss-increasing neighbour by ``len(rho)`` normalised,
    optionally noisy ascent steps on disjoint parts of the batch, takes the full-batch gradient
    there, restores the weights and applies the base optimizer with that gradient.

    Defaults come from our tuned studies (docs/results.md, "Defaults, from the evidence"): two
    ascent steps of rho (0.02, 0.04) on the two halves of the batch along the merged direction,
    each divided by the merged direction's norm (so the radius is at most rho1 + rho2, about
    SAM's usual 0.05), no noise, one particle, batch-norm statistics from the clean pass. ``preset="release"`` gives the
    authors' code instead: rho (0.05, 0.1), each step divided by its own gradient's norm,
    statistics from the ascent passes. Any of ``rho``, ``normalize`` and ``bn_policy`` given
    explicitly overrides the preset. SAM and ASAM are the special case of one ascent step on the
    whole batch (see :class:`otmdr.optim.SAM`).

    Args:
        params: parameters or param groups, or an ``nn.Module`` (then also used as ``model``).
            Per-group options: ``perturb`` (False: trained but never perturbed, e.g. the sigma of
            a Bayesian layer) and ``rho_scale`` (multiplies rho for that group).
        base_optimizer: an Optimizer class (built with the same groups and ``**base_kwargs``) or
            an already built Optimizer instance (then ``params`` must be None).
        model: the module whose batch-norm statistics follow ``bn_policy`` and whose ``no_sync``
            is used under DDP. Without it, running statistics are updated in every pass.
        seed: seed of the optimizer's own generator (noise, particle splits). Default:
            ``torch.initial_seed()``, so ``torch.manual_seed`` makes runs reproducible.
        foreach: use the fused ``torch._foreach_*`` kernels (default) or a per-tensor loop.
        preset: ``"default"`` or ``"release"``: where ``rho``, ``normalize`` and ``bn_policy``
            left at None come from (see ``otmdr.optim.config.PRESETS``).
        The other keyword options are those of :class:`PerturbationConfig`. Weight decay stays in
        the base optimizer and does not enter the ascent gradient unless
        ``ascent_weight_decay=True``.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]] | nn.Module | None,
        base_optimizer: type[Optimizer] | Callable[..., Optimizer] | Optimizer = torch.optim.SGD,
        *,
        rho: float | tuple[float, ...] | None = None,
        split: tuple[float, ...] | None = None,
        merge: bool = True,
        normalize: str | None = None,
        reduce: str = "sum",
        particle_reduce: str | None = None,
        noise_std: float = 0.0,
        adaptive: bool = False,
        adaptive_eta: float = 0.0,
        particles: int = 1,
        bn_policy: str | None = None,
        preset: str = "default",
        ascent_weight_decay: bool = False,
        max_grad_norm: float | None = None,
        ascent_interval: int = 1,
        sync_ascent: bool = False,
        check_finite: bool = True,
        eps: float = 1e-12,
        seed: int | None = None,
        foreach: bool | None = None,
        model: nn.Module | None = None,
        **base_kwargs: Any,
    ) -> None:
        self.config = PerturbationConfig(
            **preset_options(preset, rho=rho, normalize=normalize, bn_policy=bn_policy),
            split=split, merge=merge, reduce=reduce, particle_reduce=particle_reduce,
            noise_std=noise_std, adaptive=adaptive, adaptive_eta=adaptive_eta, particles=particles,
            ascent_weight_decay=ascent_weight_decay,
            max_grad_norm=max_grad_norm, ascent_interval=ascent_interval, sync_ascent=sync_ascent,
            check_finite=check_finite, eps=eps,
        )
        if isinstance(params, nn.Module):
            model = params if model is None else model
            params = params.parameters()
        if isinstance(base_optimizer, Optimizer):
            if params is not None:
                raise ValueError("pass params=None when wrapping an already built optimizer (it has its own)")
            if base_kwargs:
                raise ValueError(f"options {sorted(base_kwargs)} cannot be applied to an already built optimizer")
            params = base_optimizer.param_groups
        elif params is None:
            raise ValueError("params is None: pass the model's parameters, param groups or the model")
        self.model = model
        self.foreach = True if foreach is None else bool(foreach)
        self.steps = 0
        self._building = True
        super().__init__(params, dict(GROUP_DEFAULTS))
        if not isinstance(base_optimizer, Optimizer):
            _check_base_kwargs(type(self).__name__, base_optimizer, base_kwargs)
            base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        self.base_optimizer = base_optimizer
        self.param_groups = base_optimizer.param_groups
        self.state = base_optimizer.state
        self.defaults.update(base_optimizer.defaults)
        self._building = False

        first = next(p for g in self.param_groups for p in g["params"])
        self._generator = torch.Generator(device=first.device)
        self._generator.manual_seed(torch.initial_seed() if seed is None else int(seed))
        self._scratch: dict[str, dict[Tensor, Tensor]] = {}
        self._bn_cache: tuple[nn.Module | None, BatchNormState] | None = None
        self._warned_no_model = False
        self.first_pass = False  #: True while step() runs its first (clean) pass: log the loss only then
        self._grad_versions: dict[Tensor, int] = {}  # .grad versions our last closure-form step left
        self.last_step: StepResult | None = None
        self.skipped: Tensor | None = None  # with a GradScaler: whether the last step was skipped
        self._last_distance = torch.zeros(())
        self._plan: _AscentPlan | None = None  # cached by _ascent_plan()
        self._reset_step_state()

    # ----------------------------------------------------------------- param groups and state
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        for key, value in GROUP_DEFAULTS.items():
            param_group.setdefault(key, value)
        for flag in ("perturb", "in_norm"):
            if not isinstance(param_group[flag], bool):
                raise ValueError(f"param group option {flag} must be True or False, got {param_group[flag]!r}")
        scale = param_group["rho_scale"]
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale >= 0 or scale == float("inf"):
            raise ValueError(f"param group option rho_scale must be a finite number >= 0, got {scale!r}")
        if getattr(self, "_building", True):
            super().add_param_group(param_group)
        else:  # the groups list is the base optimizer's: let it register the group
            self.base_optimizer.add_param_group(param_group)

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict plus an ``otmdr`` entry (step count, noise generator)."""
        state = self.base_optimizer.state_dict()
        state["otmdr"] = {"version": 1, "steps": self.steps, "generator": self._generator.get_state()}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "otmdr" not in state_dict:
            raise ValueError(
                "this state dict was not saved by an otmdr optimizer (it has no 'otmdr' entry); "
                "to start from a plain optimizer's state use opt.base_optimizer.load_state_dict(...)"
            )
        state_dict = dict(state_dict)
        extra = state_dict.pop("otmdr")
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        for group in self.param_groups:
            for key, value in GROUP_DEFAULTS.items():
                group.setdefault(key, value)
        self.steps = int(extra["steps"])
        try:
            self._generator.set_state(extra["generator"].cpu())
        except RuntimeError:  # e.g. saved on CPU, resumed on CUDA: the generators differ in kind
            warnings.warn(
                "the saved noise-generator state does not fit this device's generator; the noise "
                "and particle splits continue from a fresh seed (the run is not bit-exact)",
                stacklevel=2,
            )
            self._generator.manual_seed(torch.initial_seed() + self.steps)
        self._reset_step_state()

    # ----------------------------------------------------------------------------- primitives
    def _reset_step_state(self) -> None:
        self._ascent_index = 0  # ascent steps taken by the current particle
        self._particles_done = 0  # finished particles whose gradient is in the accumulator
        self._step_plan: _AscentPlan | None = None  # the plan of the particle being perturbed
        self._norm_total: Tensor | None = None  # sum of this step's ascent norms: finite iff all are
        self._norms: list[Tensor] = []  # the same norms, read only to report which pass failed
        self._distances: list[Tensor] = []
        self._particle_params: list[Tensor] = []
        self._particles_loaded = False
        self._distance: Tensor | None = None  # measured at the last ascent step of a particle

    def _ascent_plan(self) -> _AscentPlan:
        """Which tensors move, in which norm groups, with which scales and scratch buffers.

        Built once and reused while the param groups, their options and the set of parameters
        holding a gradient stay the same (checked each step by a tuple of ids and options), so
        the per-step work does not walk the groups or look buffers up tensor by tensor.
        """
        key = (self.config, *(
            (group["perturb"], group["in_norm"], group["norm_group"], group["rho_scale"],
             tuple(id(p) for p in group["params"] if p.grad is not None),
             (group["params"][0].device, group["params"][0].dtype) if group["params"] else None)
            for group in self.param_groups
        ))
        if self._plan is not None and self._plan.key == key:
            return self._plan
        by_norm_group: dict[Any, tuple[list[Tensor], list[float], list[Tensor]]] = {}
        for group in self.param_groups:
            if group["perturb"] or group["in_norm"]:
                chosen = [p for p in group["params"] if p.grad is not None]
                params_of, scales_of, norm_only = by_norm_group.setdefault(group["norm_group"], ([], [], []))
                if group["perturb"]:
                    params_of += chosen
                    scales_of += [float(group["rho_scale"])] * len(chosen)
                else:
                    norm_only += chosen
        perturbed: list[Tensor] = []
        scales: list[float] = []
        parts: list[slice] = []
        norm_only_parts: list[list[Tensor]] = []
        for params_of, scales_of, norm_only in by_norm_group.values():  # each norm group a contiguous slice
            if params_of:
                parts.append(slice(len(perturbed), len(perturbed) + len(params_of)))
                perturbed += params_of
                scales += scales_of
                norm_only_parts.append(norm_only)
        if not perturbed:
            raise RuntimeError(
                "perturb() found no gradient on any perturbed parameter: run backward() on the "
                "ascent loss first (and check that some param group has perturb=True)"
            )
        self._plan = _AscentPlan(
            key=key, params=perturbed, parts=parts, norm_only=norm_only_parts,
            rho_scales=None if all(x == 1.0 for x in scales) else scales,
            centre=self._buffers("centre", perturbed),
            directions=self._buffers("direction", perturbed) if self.config.uses_direction_buffer else None,
        )
        return self._plan

    def _buffers(self, name: str, params: list[Tensor]) -> list[Tensor]:
        """Persistent scratch tensors like ``params`` (allocated once, reused every step)."""
        store = self._scratch.setdefault(name, {})
        out = []
        for p in params:
            buffer = store.get(p)
            if buffer is None or buffer.shape != p.shape or buffer.device != p.device:
                buffer = store[p] = torch.empty_like(p, memory_format=torch.preserve_format)
            out.append(buffer)
        return out

    def _params_with_grad(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"] if p.grad is not None]

    def _zero_grads(self, params: list[Tensor] | None = None) -> None:
        grads = [p.grad for p in (self._params_with_grad() if params is None else params)]
        if grads:
            if self.foreach:
                torch._foreach_zero_(grads)
            else:
                for g in grads:
                    g.zero_()

    @torch.no_grad()
    def perturb(self) -> Tensor:
        """Take the next ascent step using the gradients now in ``.grad``; returns the norm used
        (one per norm group when the groups define several).

        The first call of a particle remembers the centre. The gradients are consumed: every
        ``.grad`` of the optimizer is zero afterwards, ready for the next pass.
        """
        cfg = self.config
        i = self._ascent_index
        if i >= cfg.steps:
            raise RuntimeError(
                f"perturb() called {i + 1} times in one particle but rho has {cfg.steps} ascent "
                "step(s): call descend() (or next_particle()) after the final pass"
            )
        if i == 0:
            self._step_plan = plan = self._ascent_plan()
            _copy(plan.centre, plan.params, self.foreach)
        plan = self._step_plan
        params = plan.params
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        if cfg.ascent_weight_decay:
            self._add_weight_decay(params, grads)
        directions = plan.directions
        weight = 1.0 / (i + 1) if (directions is not None and cfg.reduce == "mean") else 1.0
        if len(plan.parts) == 1 and not plan.norm_only[0]:  # one norm group: no slicing
            norm = F.ascent_move_(
                params, grads, directions, first=i == 0, rho=cfg.rho[i], weight=weight, normalize=cfg.normalize,
                adaptive=cfg.adaptive, adaptive_eta=cfg.adaptive_eta, eps=cfg.eps, foreach=self.foreach,
                rho_scales=plan.rho_scales)
        else:
            norms = [
                F.ascent_move_(
                    params[part], grads[part], None if directions is None else directions[part], first=i == 0,
                    rho=cfg.rho[i], weight=weight, normalize=cfg.normalize, adaptive=cfg.adaptive,
                    adaptive_eta=cfg.adaptive_eta, eps=cfg.eps, foreach=self.foreach,
                    rho_scales=None if plan.rho_scales is None else plan.rho_scales[part],
                    norm_extra=self._norm_extra(norm_only, i, directions is not None),
                )
                for part, norm_only in zip(plan.parts, plan.norm_only)
            ]
            norm = norms[0] if len(norms) == 1 else torch.stack([n.to(norms[0].device) for n in norms])
        F.add_noise_(params, cfg.noise_std, self._generator, foreach=self.foreach)
        total = norm if norm.dim() == 0 else norm.sum()  # non-finite iff some norm is (norms are >= 0)
        self._norm_total = total if self._norm_total is None else self._norm_total + total.to(self._norm_total)
        self._norms.append(norm)
        self._ascent_index += 1
        if self._ascent_index == cfg.steps:  # measure ||theta~ - theta|| in the spent gradients
            if cfg.steps > 1 or cfg.noise_std:  # else the move itself is still in ``grads``
                _copy(grads, params, self.foreach)
                _add(grads, plan.centre, self.foreach, alpha=-1.0)
            self._distance = F.global_norm(grads, foreach=self.foreach)
        self._zero_grads()
        return norm

    def _norm_extra(self, norm_only: list[Tensor], i: int, merged: bool) -> list[Tensor] | None:
        """What the ``in_norm`` (not perturbed) parameters add to an ascent norm: their gradient
        at this step, or with ``normalize="merged"`` their running merged direction; ASAM-scaled
        by |theta| + eta when adaptive. None when there are none."""
        params = [p for p in norm_only if p.grad is not None]
        if not params:
            return None
        grads = [p.grad for p in params]
        cfg = self.config
        if merged and cfg.normalize == "merged":
            buffers = self._buffers("norm_direction", params)
            _copy(buffers, grads, self.foreach) if i == 0 else _add(buffers, grads, self.foreach)
            grads = buffers
        if cfg.adaptive:  # params and grads stay aligned: both skip the same gradient-less tensors
            grads = [g * (p.detach().abs() + cfg.adaptive_eta) for g, p in zip(grads, params)]
        return grads

    def _add_weight_decay(self, params: list[Tensor], grads: list[Tensor]) -> None:
        by_decay: dict[float, tuple[list[Tensor], list[Tensor]]] = {}
        decay = {p: g.get("weight_decay", 0.0) for g in self.param_groups for p in g["params"]}
        for p, grad in zip(params, grads):
            if decay[p]:
                by_decay.setdefault(decay[p], ([], []))[0].append(grad)
                by_decay[decay[p]][1].append(p)
        for value, (grad_list, param_list) in by_decay.items():
            _add(grad_list, param_list, self.foreach, alpha=value)

    @torch.no_grad()
    def restore(self) -> Tensor:
        """Put the weights back at the centre; returns the measured ||theta~ - theta||."""
        plan = self._step_plan
        params = plan.params if plan is not None else []
        if self._ascent_index == 0 or not params:
            device = params[0].device if params else None
            distance = torch.zeros((), device=device)
        else:
            centre = plan.centre
            distance = self._distance
            if distance is None:  # restored before the last ascent step: measure here
                distance = F.distance(params, centre, foreach=self.foreach)
            _copy(params, centre, self.foreach)
        self._distance = None
        self._distances.append(distance)
        self._ascent_index = 0
        return distance

    @torch.no_grad()
    def next_particle(self) -> Tensor:
        """End a particle (K > 1): keep its final gradient, restore the centre, zero ``.grad``."""
        if self._particles_done == 0:
            self._particle_params = self._params_with_grad()
        params = self._particle_params
        accumulate = _copy if self._particles_done == 0 else _add
        accumulate(self._buffers("particles", params), [p.grad for p in params], self.foreach)
        self._particles_done += 1
        self._zero_grads(params)
        return self.restore()

    @torch.no_grad()
    def _load_particle_gradients(self) -> None:
        """Put the finished particles' gradient sum into ``.grad`` before the last final pass.

        Backward then accumulates the last particle on top, so DDP all-reduces once per step.
        """
        params = self._particle_params
        _copy([p.grad for p in params], self._buffers("particles", params), self.foreach)
        self._particles_loaded = True

    @torch.no_grad()
    def descend(self, scaler: torch.amp.GradScaler | None = None, loss: Tensor | None = None) -> None:
        """Restore the centre and apply the base optimizer with the gradient now in ``.grad``.

        With K > 1 particles the gradients of the particles ended by :meth:`next_particle` are
        added (and averaged if ``reduce="mean"``). With a GradScaler, the step goes through
        ``scaler.step`` and is skipped if any ascent or final gradient was non-finite; call
        ``scaler.update()`` afterwards as usual. Without a scaler, pass the final pass's
        ``loss`` to let the non-finite check use it instead of a norm of every gradient.
        """
        cfg = self.config
        params = self._params_with_grad()
        grads = [p.grad for p in params]
        if self._particles_done and not self._particles_loaded:
            params = self._particle_params  # the particles' gradients go where they came from
            _add([p.grad for p in params], self._buffers("particles", params), self.foreach)
            grads = [p.grad for p in params]
        n_particles = self._particles_done + 1
        if cfg.particles_reduce == "mean" and n_particles > 1 and grads:
            torch._foreach_mul_(grads, 1.0 / n_particles)
        self.restore()

        if scaler is not None:
            # Skip (through the scaler) if any ascent or the final gradient is non-finite: the
            # final gradient is poisoned so that scaler.step sees it, without a host sync here.
            final = F.global_norm(grads, foreach=self.foreach)
            bad = self._agree(~torch.isfinite(final if self._norm_total is None else final + self._norm_total.to(final)))
            if grads:
                grads[0].add_(torch.where(bad, float("nan"), 0.0).to(grads[0]))
            self.skipped = bad
            if cfg.max_grad_norm is not None:
                scaler.unscale_(self.base_optimizer)
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm, foreach=self.foreach)
            scaler.step(self.base_optimizer)
        else:
            if cfg.check_finite:
                self._raise_if_nonfinite(grads, loss)
            if cfg.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm, foreach=self.foreach)
            self.base_optimizer.step()
        self.steps += 1
        distances = self._distances
        self._reset_step_state()
        self._last_distance = (distances[0] if len(distances) == 1
                               else torch.stack([d.to(distances[-1].device) for d in distances]).mean())

    def _agree(self, flags: Tensor) -> Tensor:
        """Under DDP with local ascent passes, a non-finite ascent gradient is seen by one replica
        only: the flags are OR-ed over the replicas (one tiny all-reduce, no host sync) so that
        every replica skips, or raises at, the same step and the replicas stay identical."""
        if self.config.sync_ascent or getattr(self.model, "no_sync", None) is None:
            return flags
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() < 2:
            return flags
        agreed = flags.to(torch.uint8)
        dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
        return agreed.bool()

    def _raise_if_nonfinite(self, grads: list[Tensor], loss: Tensor | None) -> None:
        final = F.global_norm(grads, foreach=self.foreach) if loss is None else loss.detach()
        total = final if self._norm_total is None else final + self._norm_total.to(final)
        if bool(self._agree(~torch.isfinite(total))):  # the one host sync of the step
            if not all(bool(torch.isfinite(n).all()) for n in self._norms):
                where = "an ascent pass"
            elif not bool(torch.isfinite(final)):
                where = "the final pass"
            else:
                where = "another process's ascent pass"
            self._zero_grads()
            self._reset_step_state()
            raise FloatingPointError(
                f"non-finite gradient in {where} of step {self.steps}: the weights were left unchanged. "
                "Lower the learning rate or rho, check the data for NaN/inf, or use a GradScaler "
                "(which skips such steps)"
            )

    # ------------------------------------------------------------------------ one-call step
    def _batchnorm(self, model: nn.Module | None) -> BatchNormState:
        if self._bn_cache is None or self._bn_cache[0] is not model:
            self._bn_cache = (model, BatchNormState(model))
        return self._bn_cache[1]

    def _updates_bn(self, particle: int, ascent: int | None) -> bool:
        policy = self.config.bn_policy
        if policy in ("all", "none"):
            return policy == "all"
        if ascent is None:
            return False
        return policy == "ascent" or (particle == 0 and ascent == 0)

    def step(  # type: ignore[override]
        self,
        closure: Callable[..., Any] | None = None,
        batch: Any = None,
        *,
        scaler: torch.amp.GradScaler | None = None,
        model: nn.Module | None = None,
        micro_batches: int = 1,
    ) -> StepResult | Tensor:
        """One full training step; gradients are zeroed first, no ``zero_grad()`` call needed.

        ``micro_batches=k`` (gradient accumulation) runs every pass on its part of the batch in k
        chunks, each loss weighted by its share, and accumulates the gradients: the ascent
        gradients and the final one separately, so the step equals one on the whole batch (for a
        mean loss and no batch norm) with a k-th of the activation memory. During the first pass
        of a step :attr:`first_pass` is True (log the clean loss only then).

        With ``batch``: ``closure`` is a loss function ``loss_fn(part) -> loss`` (or a tuple whose
        first item is the loss) and ``batch`` a tensor or (nested) tuple/list/dict of tensors,
        split along dimension 0; the optimizer runs backward (through ``scaler.scale`` if a
        scaler is given). Returns a :class:`StepResult`.

        Without ``batch``: ``closure()`` (which need not zero gradients) computes the loss on its
        whole batch and calls backward itself (scaling it if you use a scaler); every ascent step
        then uses the whole batch. Returns the first loss, as ``torch.optim`` closures do.
        """
        if closure is None:
            raise ValueError(
                "step() needs the passes it runs: step(loss_fn, batch=...) or step(closure); to "
                "drive the passes yourself call perturb() after each ascent backward and descend() "
                "after the final one"
            )
        cfg = self.config
        model = self.model if model is None else model
        bn = self._batchnorm(model)
        watch = None
        if model is None and cfg.bn_policy != "all" and not self._warned_no_model:
            watch = _BatchNormWatch()  # the first step only: does the loss run batch norm we cannot reach?
            self._warned_no_model = True
        if batch is None and self._fresh_gradients():
            warnings.warn(
                "step(closure) found gradients computed before the call: they are discarded, since the closure "
                "recomputes every pass. After loss.backward(); opt.step(closure) (the davda54/sam pattern) this "
                "costs one extra pass: drop that backward or use first_step()/second_step(). With Lightning's "
                "accumulate_grad_batches > 1 the earlier micro-batches are lost: use accumulate_grad_batches=1 "
                "and opt.step(loss_fn, batch=..., micro_batches=k) in manual optimization", stacklevel=2)
        n = None if batch is None else batch_size(batch)
        bounds = None if n is None else self._ascent_bounds(n)
        start = bn.save() if bn and (scaler is not None or cfg.check_finite) else None
        self._zero_grads()
        self._reset_step_state()

        if isinstance(micro_batches, bool) or not isinstance(micro_batches, int) or micro_batches < 1:
            raise ValueError(f"micro_batches must be an integer >= 1, got {micro_batches!r}")
        if micro_batches > 1 and batch is None:
            raise ValueError("micro_batches needs the one-call form step(loss_fn, batch=...): a closure computes "
                             "its own batch")
        passes = [0]

        def run(part: Any, *, sync: bool, update_bn: bool) -> tuple[Tensor, Any]:
            no_sync = getattr(model, "no_sync", None)
            ctx = no_sync() if (not sync and no_sync is not None) else contextlib.nullcontext()
            self.first_pass = passes[0] == 0
            passes[0] += 1
            with ctx, bn.frozen(not update_bn), torch.enable_grad():
                if batch is None:
                    return _split_output(closure())[0].detach(), None
                size = 1 if micro_batches == 1 else batch_size(part)  # no batch walk on the plain path
                if size < 2:
                    loss, extra = _split_output(closure(part))
                    (scaler.scale(loss) if scaler is not None else loss).backward()
                    return loss.detach(), extra
                total, extras = None, []
                for lo, hi in _chunks(size, micro_batches):
                    loss, extra = _split_output(closure(take(part, slice(lo, hi))))
                    weighted = loss * ((hi - lo) / size)  # the mean over the part, accumulated
                    (scaler.scale(weighted) if scaler is not None else weighted).backward()
                    total = weighted.detach() if total is None else total + weighted.detach()
                    extras.append(extra)
                return total, _concatenate(extras)

        first_loss = first_outputs = None
        final_losses = []
        try:
            if watch is not None:
                watch.start()
            if self.steps % cfg.ascent_interval != 0:  # a plain base-optimizer step
                first_loss, first_outputs = run(batch, sync=True, update_bn=cfg.bn_policy != "none")
                final_losses.append(first_loss)
            else:
                for k in range(cfg.particles):
                    order = None
                    if n is not None and k > 0:
                        order = torch.randperm(n, generator=self._generator, device=self._generator.device)
                    for i in range(cfg.steps):
                        part = None
                        if bounds is not None:
                            lo, hi = bounds[i]
                            if order is not None:
                                part = take(batch, order[lo:hi])
                            else:  # SAM's one ascent step uses the whole batch: no views to build
                                part = batch if (lo, hi) == (0, n) else take(batch, slice(lo, hi))
                        loss, outputs = run(part, sync=cfg.sync_ascent, update_bn=self._updates_bn(k, i))
                        if first_loss is None:
                            first_loss, first_outputs = loss, outputs
                        self.perturb()
                    last = k == cfg.particles - 1
                    if last and self._particles_done:
                        self._load_particle_gradients()
                    loss, _ = run(batch, sync=last, update_bn=self._updates_bn(k, None))
                    final_losses.append(loss)
                    if not last:
                        self.next_particle()
            self.descend(scaler, loss=final_losses[0] if len(final_losses) == 1 else torch.stack(final_losses).sum())
        except BaseException:
            if watch is not None:
                watch.stop()
            self.restore()
            self._reset_step_state()
            if start is not None:
                bn.load(start)
            raise
        if watch is not None and watch.stop():
            warnings.warn(
                f"{type(self).__name__} was built without model=... but the loss runs batch norm in training "
                f"mode: bn_policy={cfg.bn_policy!r} cannot be applied and its running statistics update in every "
                "pass; pass model=your_model", stacklevel=2)
        if scaler is not None and start is not None:
            bn.load_where(self.skipped, start)  # a skipped step leaves the statistics as they were
        self.first_pass = False
        if batch is None:  # the closure form: remember which gradients our own passes left behind
            self._grad_versions = self._gradient_versions()
        self.last_step = StepResult(
            loss=first_loss,
            perturbed_loss=final_losses[0] if len(final_losses) == 1 else torch.stack(final_losses).mean(),
            perturbation_norm=self._last_distance,
            outputs=first_outputs,
        )
        return self.last_step if batch is not None else first_loss

    def _gradient_versions(self) -> dict[Tensor, int]:
        return {p: p.grad._version for g in self.param_groups for p in g["params"] if p.grad is not None}

    def _fresh_gradients(self) -> bool:
        """Whether some ``.grad`` was written since the last step (a backward the user ran before
        ``step(closure)``); the final gradient our own step leaves behind does not count."""
        for p, version in self._gradient_versions().items():
            if self._grad_versions.get(p) != version and bool(p.grad.any()):
                return True
        return False

    # ------------------------------------------------------------------ davda54/sam-style API
    def first_step(self, zero_grad: bool = False) -> Tensor:
        """davda54/sam's ``first_step``: move to the neighbour along the gradient now in ``.grad``
        (``loss.backward()`` first). For OT-MDR, each call is the next ascent step: call it once
        per entry of ``rho`` (with a backward on that step's part of the batch before each).
        ``zero_grad=False`` leaves the ascent gradient in ``.grad`` as davda54 does (the next
        backward then adds to it); ``True`` clears it. Returns the norm used."""
        params = self._params_with_grad()
        kept = None if zero_grad else [p.grad.detach().clone() for p in params]
        norm = self.perturb()  # consumes (zeroes) the gradients
        if kept is not None:
            with torch.no_grad():
                for p, g in zip(params, kept):
                    p.grad.copy_(g)
        return norm

    def second_step(self, zero_grad: bool = False) -> None:
        """davda54/sam's ``second_step``: back to the centre, base-optimizer step with the gradient
        now in ``.grad`` (taken at the neighbour); ``zero_grad=True`` clears it afterwards."""
        self.descend()
        if zero_grad:
            self._zero_grads()
        self._grad_versions = self._gradient_versions()

    def _ascent_bounds(self, n: int) -> list[tuple[int, int]]:
        """The part of the batch each ascent step uses. A batch too small to give every step a
        non-empty part (e.g. the last batch of an epoch holding 1 sample) uses the whole batch
        for every ascent step instead, the closure form's behaviour, so no sample is dropped."""
        try:
            return split_bounds(n, self.config.split)
        except ValueError:
            return [(0, n)] * self.config.steps

    def passes_per_step(self, closure_form: bool = False) -> float:
        """Forward/backward cost of one step in full-batch passes (SGD = 1, SAM = 2)."""
        cfg = self.config
        ascent = float(cfg.steps) if closure_form else sum(cfg.split)
        return (cfg.particles * (1.0 + ascent) + cfg.ascent_interval - 1) / cfg.ascent_interval


def _check_base_kwargs(name: str, base: Callable[..., Optimizer], kwargs: dict[str, Any]) -> None:
    """An option neither we nor the base optimizer take (a typo such as ``normalise=``) is named,
    with the closest real option, instead of surfacing as a TypeError from ``SGD.__init__``."""
    import difflib
    import inspect

    try:
        parameters = inspect.signature(base).parameters
    except (TypeError, ValueError):
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    ours = [p for p in inspect.signature(OTMDR.__init__).parameters if p not in ("self", "params", "base_kwargs")]
    known = ours + [p for p in parameters if p not in ("self", "params")]
    for key in kwargs:
        if key not in parameters:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {close[0]}=?" if close else f"; {name} options: {', '.join(ours)}"
            raise TypeError(f"{name}: unknown option {key}= (neither {name} nor "
                            f"{getattr(base, '__name__', base)} takes it){hint}")


class _BatchNormWatch:
    """A global forward hook, for one step: records whether any batch-norm layer that tracks
    running statistics ran in training mode (the only case where a missing ``model`` matters)."""

    def __init__(self) -> None:
        self.seen = False
        self._handle = None

    def start(self) -> None:
        from torch.nn.modules.batchnorm import _BatchNorm

        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if isinstance(module, _BatchNorm) and module.training and module.track_running_stats:
                self.seen = True

        self._handle = torch.nn.modules.module.register_module_forward_hook(hook)

    def stop(self) -> bool:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        return self.seen


def _chunks(n: int, k: int) -> list[tuple[int, int]]:
    """``min(k, n)`` consecutive non-empty ranges covering ``range(n)``, sizes differing by at most 1."""
    k = min(k, n)
    bounds = [round(i * n / k) for i in range(k + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def _concatenate(extras: list[Any]) -> Any:
    """The loss function's extra outputs of every micro-batch, joined along dimension 0 where
    they are tensors (e.g. logits); otherwise the list of them."""
    first = extras[0]
    if isinstance(first, Tensor):
        return torch.cat(extras)
    if isinstance(first, tuple) and all(isinstance(e, Tensor) for e in first):
        return type(first)(torch.cat(parts) for parts in zip(*extras))
    return extras


def _split_output(out: Any) -> tuple[Tensor, Any]:
    """A loss function returns the loss, or a tuple (loss, extra...)."""
    if isinstance(out, (tuple, list)):
        if not out:
            raise TypeError("the loss function returned an empty tuple; return the loss first")
        loss, extra = out[0], (out[1] if len(out) == 2 else tuple(out[1:]) or None)
    else:
        loss, extra = out, None
    if not isinstance(loss, Tensor):
        raise TypeError(f"the loss function must return the loss tensor, got {type(loss).__name__}")
    return loss, extra


def _copy(dst: list[Tensor], src: list[Tensor], foreach: bool) -> None:
    if foreach:
        torch._foreach_copy_(dst, src)
    else:
        for d, s in zip(dst, src):
            d.copy_(s)


def _add(dst: list[Tensor], src: list[Tensor], foreach: bool, alpha: float = 1.0) -> None:
    if foreach:
        torch._foreach_add_(dst, src, alpha=alpha)
    else:
        for d, s in zip(dst, src):
            d.add_(s, alpha=alpha)
