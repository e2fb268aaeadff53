"""The OT-MDR optimizer: a thin class over pure kernels (:mod:`.functional`).

One object wraps any base ``torch.optim.Optimizer`` and shares its param groups and state, so LR
schedulers, gradient clipping utilities and ``state_dict()`` work on either object.

A step, as a state machine (``n`` = ``len(rho)`` ascent steps, ``K`` particles)::

              perturb()                 perturb()            final backward
    centre ──────────────► ascent 1 ──► ... ──────► ascent n ───────────────┐
      ▲   (saves centre)   (theta moved)            (theta~, radius measured) │
      │                                                                       ▼
      ├──────────── next_particle(): keep the gradient, restore ◄──── particle k < K
      │                                                                       │ k = K
      └──────────── descend(): restore, combine particles, check, base step ◄─┘

Every arrow is one call of a primitive after one forward/backward pass; the per-step progress is
one :class:`~.progress.StepProgress`, replaced at every step start and after every abort.
Three ways to drive it:

1. one call per step, the optimizer runs every pass itself (:mod:`.one_call`)::

       opt = OTMDR(model, torch.optim.SGD, lr=0.1, momentum=0.9)
       result = opt.step(lambda b: F.cross_entropy(model(b[0]), b[1]), batch=(x, y))

2. a closure that does forward + backward on the whole batch (Lightning's automatic
   optimization); it is called at every point the step needs (ascent steps + final pass)::

       loss = opt.step(closure)

3. the primitives, for custom loops (AMP, DDP, manual Lightning optimization)::

       opt.zero_grad()
       loss_fn(b1).backward(); opt.perturb()      # ascent step 1 (consumes and zeroes .grad)
       loss_fn(b2).backward(); opt.perturb()      # ascent step 2
       loss_fn(b).backward();  opt.descend()      # restore the centre, base-optimizer step

Cost: each particle costs one pass per ascent step (on its fraction of the batch) plus one
full-batch pass; with the default halves that is 2 full-batch forward/backward passes, as SAM.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any, overload

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from . import functional as F
from .batchnorm import BatchNormState
from .config import PerturbationConfig, as_float_tuple, preset_options, sam_equivalent
from .efficiency import Trigger, check_momentum_base, momentum_buffers, orthogonal_component_, reuse_scale
from .one_call import run_step
from .plan import AscentPlan, Scratch, build_plan, plan_key
from .progress import StepProgress, StepResult
from .sharding import Sharding, find_sharding, like, local

__all__ = ["OTMDR", "StepResult", "GROUP_DEFAULTS"]

#: Per-group options: ``perturb`` (False: trained, never perturbed), ``rho_scale`` (multiplies the
#: radius), ``norm_group`` (groups with the same key share one perturbation norm; by default all
#: groups share one global norm, e.g. ensemble members get one key each for per-member radii) and
#: ``in_norm`` (a ``perturb=False`` group whose gradients still count in its norm group's ascent
#: norm: the release's Bayesian step, whose norm includes the sigma gradients while only the
#: means move; default False: the norm is that of the moved parameters only).
GROUP_DEFAULTS: dict[str, Any] = {"perturb": True, "rho_scale": 1.0, "norm_group": None, "in_norm": False}


class OTMDR(Optimizer):
    """Optimal Transport Model Distributional Robustness (Nguyen et al., NeurIPS 2023).

    Each step moves the weights to a loss-increasing neighbour by ``len(rho)`` normalised,
    optionally noisy ascent steps on disjoint parts of the batch, takes the full-batch gradient
    there, restores the weights and applies the base optimizer with that gradient.

    Defaults come from our tuned studies (docs/results.md, "Defaults, from the evidence"): two
    ascent steps of rho (0.02, 0.04) on the two halves of the batch along the merged direction,
    each divided by the merged direction's norm (so the radius is at most rho1 + rho2, about
    SAM's usual 0.05), no noise, one particle, batch-norm statistics from the clean pass.
    ``preset="release"`` gives the authors' code instead: rho (0.05, 0.1), each step divided by
    its own gradient's norm, statistics from the ascent passes. Any of ``rho``, ``normalize`` and
    ``bn_policy`` given explicitly overrides the preset. SAM and ASAM are the special case of one
    ascent step on the whole batch (see :class:`otmdr.optim.SAM`).

    Args:
        params: parameters or param groups, or an ``nn.Module`` (then also used as ``model``).
            Per-group options: see :data:`GROUP_DEFAULTS`.
        base_optimizer: an Optimizer class (built with the same groups and ``**base_kwargs``) or
            an already built Optimizer instance (then ``params`` must be None).
        model: the module whose batch-norm statistics follow ``bn_policy`` and whose ``no_sync``
            is used under DDP. Without it, running statistics are updated in every pass. Under
            FSDP2 (parameters sharded as DTensors by ``fully_shard``; build the optimizer after it)
            the step moves each process's shards and sums its norms over the processes (see
            :attr:`sharding` and docs/distributed.md, "FSDP2").
        seed: seed of the optimizer's own :attr:`generator` (noise, particle splits). Default:
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
        reuse: bool = False,
        reuse_alpha: float = 0.7,
        phase_start: float = 0.0,
        trigger: float | tuple[float, ...] | None = None,
        trigger_decay: float = 0.9,
        momentum_ascent: str = "none",
        total_steps: int | None = None,
        sync_ascent: bool = False,
        check_finite: bool = True,
        eps: float = 1e-12,
        seed: int | None = None,
        foreach: bool | None = None,
        model: nn.Module | None = None,
        **base_kwargs: Any,
    ) -> None:
        self.config = PerturbationConfig(
            **preset_options(preset, rho=rho, normalize=normalize, bn_policy=bn_policy),  # type: ignore[arg-type]
            split=split, merge=merge, reduce=reduce, particle_reduce=particle_reduce,
            noise_std=noise_std, adaptive=adaptive, adaptive_eta=adaptive_eta, particles=particles,
            ascent_weight_decay=ascent_weight_decay,
            max_grad_norm=max_grad_norm, ascent_interval=ascent_interval, reuse=reuse, reuse_alpha=reuse_alpha,
            phase_start=phase_start, trigger=None if trigger is None else as_float_tuple("trigger", trigger),
            trigger_decay=trigger_decay, momentum_ascent=momentum_ascent,
            sync_ascent=sync_ascent, check_finite=check_finite, eps=eps,
        )
        if type(self) is OTMDR:  # SAM and ASAM are subclasses that mean their one step
            _refuse_sam(self.config)
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
        self.step_count = 0  #: steps applied (plain interval steps included); saved in the state dict
        self.full_steps = 0  #: steps that perturbed (the others were plain or reused); saved in the state dict
        #: the run's length in steps, which ``phase_start`` and a moving ``trigger`` need (the loop sets it)
        self.total_steps = total_steps
        #: forward+backward passes since construction, in full-batch units (a pass on a part of the
        #: batch counts its fraction): the compute spent, for equal-compute comparisons; saved in
        #: the state dict
        self.gradient_evaluations = 0.0
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
        if self.config.momentum_ascent != "none":
            check_momentum_base(base_optimizer)

        every = [p for g in self.param_groups for p in g["params"]]
        #: how the parameters are sharded (FSDP2's DTensors), None when they are whole; the kernels
        #: then move each rank's local shards and every norm is summed over the ranks
        self.sharding: Sharding | None = find_sharding(every)
        self._shard_sum = None if self.sharding is None else self.sharding.sum
        first = every[0]
        #: the optimizer's own random numbers (noise, particle splits); saved in the state dict
        self.generator = torch.Generator(device=first.device)
        self.generator.manual_seed(torch.initial_seed() if seed is None else int(seed))
        self.scratch = Scratch()  #: the parameter-sized buffers the optimizer keeps between steps
        self.first_pass = False  #: True while step() runs its first (clean) pass: log the loss only then
        self.last_step: StepResult | None = None  #: what the last step() measured (both forms)
        self.skipped: Tensor | None = None  #: with a GradScaler: whether the last step was skipped
        self._progress = StepProgress()
        self._plan: AscentPlan | None = None  # cached by _ascent_plan()
        self._last_distance = torch.zeros(())
        self._last_move = self._last_distance  # the move and the noise parts of it (see StepResult)
        self._last_noise = torch.zeros(())
        self._no_noise = self._last_noise  # the shared zero a noise-free step reports as its noise
        self._noise_total: tuple[AscentPlan, list[Tensor]] | None = None  # the particle's summed noise
        self._bn_cache: tuple[nn.Module | None, BatchNormState] | None = None
        self._warned_no_model = False
        self._no_sync_cache: tuple[nn.Module | None, Callable[[], Any] | None] | None = None
        self._grad_versions: dict[Tensor, int] = {}  # .grad versions our last closure-form step left
        cfg = self.config
        self.trigger = None if cfg.trigger is None else Trigger(cfg.trigger, cfg.trigger_decay)  #: AE-SAM's statistics
        self._reuse: dict[Tensor, Tensor] = {}  # LookSAM's stored component, by parameter (saved)
        self._in_step = False  # step() is driving the primitives (options that skip passes are applied there)

    @property
    def steps(self) -> int:
        """Deprecated name of :attr:`step_count` (``config.ascent_steps`` is the number of ascent
        steps per step); removed in the next release."""
        warnings.warn("OTMDR.steps is deprecated: use step_count (steps taken)", DeprecationWarning, stacklevel=2)
        return self.step_count

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
        """The base optimizer's state dict plus an ``otmdr`` entry (step count, generator, passes run)."""
        state = self.base_optimizer.state_dict()
        state["otmdr"] = {"version": 1, "steps": self.step_count, "generator": self.generator.get_state(),
                          "gradient_evaluations": self.gradient_evaluations, "full_steps": self.full_steps}
        if self.trigger is not None:
            state["otmdr"]["trigger"] = self.trigger.state_dict()
        if self._reuse:
            index = {p: i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
            # a sharded parameter's component as a DTensor like it (its shard), for sharded checkpoints
            state["otmdr"]["reuse"] = {index[p]: like(p, c.clone()) for p, c in self._reuse.items()}
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
        self.step_count = int(extra["steps"])
        self.gradient_evaluations = float(extra.get("gradient_evaluations", 0.0))  # absent before it was counted
        self.full_steps = int(extra.get("full_steps", self.step_count))
        if self.trigger is not None and "trigger" in extra:
            self.trigger.load_state_dict(extra["trigger"])
        params = [p for g in self.param_groups for p in g["params"]]
        # copied: the stored component becomes a working buffer, never the caller's tensor
        self._reuse = {params[int(i)]: local(c).to(local(params[int(i)]), copy=True)
                       for i, c in extra.get("reuse", {}).items()}
        try:
            self.generator.set_state(extra["generator"].cpu())
        except RuntimeError:  # e.g. saved on CPU, resumed on CUDA: the generators differ in kind
            warnings.warn(
                "the saved noise-generator state does not fit this device's generator; the noise "
                "and particle splits continue from a fresh seed (the run is not bit-exact)",
                stacklevel=2,
            )
            self.generator.manual_seed(torch.initial_seed() + self.step_count)
        self._progress = StepProgress()

    # ----------------------------------------------------------------------------- primitives
    @torch.no_grad()
    def perturb(self) -> Tensor:
        """Take the next ascent step using the gradients now in ``.grad``; returns the norm used
        (one per norm group when the groups define several).

        The first call of a particle remembers the centre. The gradients are consumed: every
        ``.grad`` of the optimizer is zero afterwards, ready for the next pass.
        """
        cfg = self.config
        if cfg.skips_passes and not self._in_step:
            raise RuntimeError("reuse, phase_start, trigger and momentum_ascent decide which passes a step runs, "
                               "so only step() applies them: use opt.step(loss_fn, batch=...) or opt.step(closure)")
        plan = self._begin_ascent_step()
        i = self._progress.ascent
        grads = [local(p.grad) if p.grad is not None else torch.zeros_like(t)
                 for p, t in zip(plan.params, plan.tensors)]
        if i == 0 and cfg.reuse and self._progress.particles_done == 0:  # LookSAM's clean gradient
            F.copy_(self.scratch.get("clean", plan.params), grads, foreach=self.foreach)
        if cfg.ascent_weight_decay:
            self._add_weight_decay(plan.params, grads)
        norm = self._ascend(plan, grads, merge=True)
        self._zero_grads()
        return norm

    @torch.no_grad()
    def momentum_ascent(self, buffers: list[Tensor]) -> Tensor:
        """The next ascent step against the base optimizer's momentum ``buffers`` (one per moved
        tensor) instead of a gradient (MSAM): no pass, outside the merged direction, its own norm.
        Called by :meth:`step`; returns the norm used."""
        plan = self._begin_ascent_step()
        direction = self.scratch.get("momentum", plan.params)
        F.copy_(direction, [local(b) for b in buffers], foreach=self.foreach)
        torch._foreach_neg_(direction) if self.foreach else [d.neg_() for d in direction]
        return self._ascend(plan, direction, merge=False)

    def _begin_ascent_step(self) -> AscentPlan:
        """The plan of the particle's next ascent step; the centre saved at its first."""
        progress = self._progress
        i = progress.ascent
        if i >= self.config.ascent_steps:
            raise RuntimeError(
                f"perturb() called {i + 1} times in one particle but rho has {self.config.ascent_steps} ascent "
                "step(s): call descend() (or next_particle()) after the final pass"
            )
        if i == 0:
            progress.plan = self._ascent_plan()
            F.copy_(progress.plan.centre, progress.plan.tensors, foreach=self.foreach)
        assert progress.plan is not None
        progress.perturbed = True
        return progress.plan

    def _ascend(self, plan: AscentPlan, grads: list[Tensor], *, merge: bool) -> Tensor:
        """Move ``plan``'s tensors by ascent step ``progress.ascent`` along ``grads`` (consumed),
        add the noise, and after the last step measure the radius."""
        cfg = self.config
        progress = self._progress
        i = progress.ascent
        norm = self._move(plan, grads, i, merge=merge)
        noise = self._noise_buffers(plan) if cfg.noise_std else None
        F.add_noise_(plan.tensors, cfg.noise_std, self.generator, foreach=self.foreach, into=noise, first=i == 0,
                     layout=plan.layout)
        progress.add_norm(norm)
        progress.ascent += 1
        if progress.ascent == cfg.ascent_steps:  # measure ||theta~ - theta|| in the spent gradients
            if cfg.ascent_steps > 1 or cfg.noise_std:  # else the move itself is still in ``grads``
                F.copy_(grads, plan.tensors, foreach=self.foreach)
                F.add_(grads, plan.centre, alpha=-1.0, foreach=self.foreach)
            progress.distance = F.global_norm(grads, foreach=self.foreach, shard_sum=self._shard_sum)
            if noise is not None:  # theta~ - theta = move + xi: measure both parts
                progress.noise = F.global_norm(noise, foreach=self.foreach, shard_sum=self._shard_sum)
                F.add_(grads, noise, alpha=-1.0, foreach=self.foreach)
                progress.move = F.global_norm(grads, foreach=self.foreach, shard_sum=self._shard_sum)
        return norm

    def _move(self, plan: AscentPlan, grads: list[Tensor], i: int, *, merge: bool = True) -> Tensor:
        """Ascent step ``i`` of every norm group; the norm (a vector with several groups).
        ``merge=False``: a momentum step, outside the merged direction of the gradient steps."""
        cfg = self.config
        directions = plan.directions if merge else None
        j = i - cfg.momentum_steps  # the index among the gradient steps, which the merge counts
        weight = 1.0 / (j + 1) if (directions is not None and cfg.reduce == "mean") else 1.0

        def move(part: slice, norm_extra: list[Tensor] | None = None) -> Tensor:
            return F.ascent_move_(
                plan.tensors[part], grads[part], None if directions is None else directions[part], first=j == 0,
                rho=cfg.rho[i], weight=weight, normalize=cfg.normalize, adaptive=cfg.adaptive,
                adaptive_eta=cfg.adaptive_eta, rho_scales=None if plan.rho_scales is None else plan.rho_scales[part],
                norm_extra=norm_extra, eps=cfg.eps, foreach=self.foreach, shard_sum=self._shard_sum)

        if plan.single_norm:
            return move(slice(None))
        norms = [move(part, self._norm_extra(norm_only, j, directions is not None))
                 for part, norm_only in zip(plan.parts, plan.norm_only)]
        return norms[0] if len(norms) == 1 else torch.stack([n.to(norms[0].device) for n in norms])

    def _noise_buffers(self, plan: AscentPlan) -> list[Tensor]:
        """The buffers that sum the noise of the particle's ascent chain (one per moved tensor),
        looked up once per plan."""
        cached = self._noise_total
        if cached is None or cached[0] is not plan:
            cached = self._noise_total = (plan, self.scratch.get("noise", plan.params))
        return cached[1]

    @torch.no_grad()
    def restore(self) -> Tensor:
        """Put the weights back at the centre; returns the measured ||theta~ - theta||."""
        progress = self._progress
        plan = progress.plan
        params = plan.tensors if plan is not None else []
        noisy = bool(self.config.noise_std)
        if progress.ascent == 0 or plan is None or not params:
            distance = torch.zeros((), device=params[0].device if params else None)
            move, noise = (distance, torch.zeros_like(distance)) if noisy else (None, None)
        else:
            measured = progress.distance  # None: restored before the last ascent step, measure here
            shard_sum = self._shard_sum
            distance = (F.distance(params, plan.centre, foreach=self.foreach, shard_sum=shard_sum)
                        if measured is None else measured)
            move, noise = progress.move, progress.noise
            if noisy and (move is None or noise is None):
                total = self._noise_buffers(plan)
                noise = F.global_norm(total, foreach=self.foreach, shard_sum=shard_sum)
                move = F.global_norm([p - c - x for p, c, x in zip(params, plan.centre, total)], foreach=self.foreach,
                                     shard_sum=shard_sum)
            F.copy_(params, plan.centre, foreach=self.foreach)
        if noisy:
            assert move is not None and noise is not None
            progress.moves.append(move)
            progress.noises.append(noise)
        progress.distance = progress.move = progress.noise = None
        progress.distances.append(distance)
        progress.ascent = 0
        return distance

    @torch.no_grad()
    def next_particle(self) -> Tensor:
        """End a particle (K > 1): keep its final gradient, restore the centre, zero ``.grad``."""
        progress = self._progress
        if progress.particles_done == 0:
            progress.particle_params = self._params_with_grad()
        params = progress.particle_params
        accumulate = F.copy_ if progress.particles_done == 0 else F.add_
        accumulate(self.scratch.get("particles", params), _grads(params), foreach=self.foreach)
        progress.particles_done += 1
        self._zero_grads(params)
        return self.restore()

    @torch.no_grad()
    def descend(self, scaler: torch.amp.GradScaler | None = None, loss: Tensor | None = None) -> None:
        """Restore the centre and apply the base optimizer with the gradient now in ``.grad``.

        With K > 1 particles the gradients of the particles ended by :meth:`next_particle` are
        added (and averaged if the particle reduction is ``"mean"``). With a GradScaler, the step
        goes through ``scaler.step`` and is skipped if any ascent or final gradient was
        non-finite; call ``scaler.update()`` afterwards as usual. Without a scaler, pass the final
        pass's ``loss`` to let the non-finite check use it instead of a norm of every gradient.
        """
        cfg = self.config
        progress = self._progress
        params = self._params_with_grad()
        if progress.particles_done and not progress.particles_loaded:
            params = progress.particle_params  # the particles' gradients go where they came from
            F.add_(_grads(params), self.scratch.get("particles", params), foreach=self.foreach)
        grads = _grads(params)
        n_particles = progress.particles_done + 1
        if cfg.particle_reduction == "mean" and n_particles > 1 and grads:
            torch._foreach_mul_(grads, 1.0 / n_particles)
        if progress.perturbed:
            self.full_steps += 1
            if cfg.reuse and progress.plan is not None:
                self._store_reuse(progress.plan.params)
        self.restore()
        if scaler is not None:
            self._scaled_base_step(scaler, params, grads)
        else:
            if cfg.check_finite:
                self._raise_if_nonfinite(grads, loss)
            if cfg.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm, foreach=self.foreach)
            self.base_optimizer.step()
        self.step_count += 1
        distances = progress.distances
        self._progress = StepProgress()
        self._last_distance = _mean(distances)
        if progress.moves:  # with noise: its parts, measured apart
            self._last_move, self._last_noise = _mean(progress.moves), _mean(progress.noises)
        else:  # without: the distance is the move
            self._last_move = self._last_distance
            zero = self._no_noise
            if zero.device != self._last_distance.device or zero.dtype != self._last_distance.dtype:
                zero = self._no_noise = torch.zeros_like(self._last_distance)
            self._last_noise = zero

    @torch.no_grad()
    def _store_reuse(self, params: list[Tensor]) -> None:
        """LookSAM, at a perturbed step: keep the part of the final (perturbed) gradient that the
        clean gradient of the first pass does not explain. It is built in the clean gradient's
        buffer, which then trades places with the stored one: no allocation after the first. A
        non-finite result (a step a scaler skips) keeps the previous component."""
        component = self.scratch.get("clean", params)
        perturbed = [local(p.grad) if p.grad is not None else torch.zeros_like(c) for p, c in zip(params, component)]
        orthogonal_component_(component, perturbed, foreach=self.foreach, shard_sum=self._shard_sum)
        if bool(torch.isfinite(F.global_norm(component, foreach=self.foreach, shard_sum=self._shard_sum))):
            self.scratch.trade("clean", params, self._reuse)

    @torch.no_grad()
    def add_reused_component(self) -> None:
        """LookSAM, between perturbed steps: ``.grad += alpha ||g|| / ||g_v|| * g_v`` with the
        stored g_v (nothing before the first perturbed step), scaled in the clean gradient's
        buffer, which a step without ascent leaves free. Called by :meth:`step`."""
        params = [p for p in self._reuse if p.grad is not None]
        if not params:
            return
        grads, stored = _grads(params), [self._reuse[p] for p in params]
        scale = reuse_scale(grads, stored, self.config.reuse_alpha, self.config.eps, foreach=self.foreach,
                            shard_sum=self._shard_sum)
        scaled = self.scratch.get("clean", params)
        F.copy_(scaled, stored, foreach=self.foreach)
        F.mul_(scaled, scale.to(scaled[0].device), foreach=self.foreach)
        F.add_(grads, scaled, foreach=self.foreach)

    def momentum_directions(self) -> list[Tensor] | None:
        """The base optimizer's momentum of each tensor the ascent moves, or None before there
        is any (then the step is plain). Gives every perturbed parameter a ``.grad`` (zero) first,
        so that the ascent plan includes it before any backward of the step. Used by :meth:`step`."""
        params = [p for g in self.param_groups if g["perturb"] for p in g["params"] if p.requires_grad]
        if momentum_buffers(self.base_optimizer, params) is None:
            if any(self.base_optimizer.state.get(p) for p in params):
                raise RuntimeError(
                    f"momentum_ascent found no momentum in {type(self.base_optimizer).__name__}'s state "
                    "('momentum_buffer' or 'exp_avg'): use a base optimizer with momentum, or momentum_ascent='none'")
            return None
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        return momentum_buffers(self.base_optimizer, self._ascent_plan().params)

    def _scaled_base_step(self, scaler: torch.amp.GradScaler, params: list[Tensor], grads: list[Tensor]) -> None:
        """``scaler.step``, skipped if any ascent or the final gradient is non-finite: the final
        gradient is poisoned so that the scaler sees it, without a host sync here."""
        final = F.global_norm(grads, foreach=self.foreach, shard_sum=self._shard_sum)
        total = self._progress.norm_total
        bad = self._agree(~torch.isfinite(final if total is None else final + total.to(final)))
        # poison a gradient that holds a number (a rank's shard of a small tensor can be empty)
        target = next((g for g in grads if g.numel()), None)
        if target is not None:
            target.add_(torch.where(bad, float("nan"), 0.0).to(target))
        self.skipped = bad
        if self.config.max_grad_norm is not None:
            scaler.unscale_(self.base_optimizer)
            torch.nn.utils.clip_grad_norm_(params, self.config.max_grad_norm, foreach=self.foreach)
        scaler.step(self.base_optimizer)

    # ------------------------------------------------------------------------ one-call step
    @overload  # type: ignore[override]  # torch.optim's step takes no batch
    def step(self, closure: Callable[[], Any], batch: None = None, *, scaler: torch.amp.GradScaler | None = None,
             model: nn.Module | None = None, micro_batches: int = 1) -> Tensor: ...

    @overload
    def step(self, closure: Callable[[Any], Any], batch: Any, *,
             scaler: torch.amp.GradScaler | None = None, model: nn.Module | None = None,
             micro_batches: int = 1) -> StepResult: ...

    def step(
        self,
        closure: Callable[..., Any] | None = None,
        batch: Any = None,
        *,
        scaler: torch.amp.GradScaler | None = None,
        model: nn.Module | None = None,
        micro_batches: int = 1,
    ) -> StepResult | Tensor:
        """One full training step; gradients are zeroed first, no ``zero_grad()`` call needed.

        With ``batch`` (the one-call form): ``closure`` is a loss function ``loss_fn(part) ->
        loss`` (or a tuple whose first item is the loss) and ``batch`` a tensor or (nested)
        tuple/list/dict of tensors, split along dimension 0; the optimizer runs backward (through
        ``scaler.scale`` if a scaler is given). Returns a :class:`StepResult`.

        Without ``batch`` (the closure form of ``torch.optim``): ``closure()`` (which need not
        zero gradients) computes the loss on its whole batch and calls backward itself (scaling
        it if you use a scaler); every ascent step then uses the whole batch. Returns the first
        loss, as ``torch.optim`` closures do. Both forms also leave the :class:`StepResult` in
        :attr:`last_step`.

        ``micro_batches=k`` (gradient accumulation) runs every pass on its part of the batch in k
        chunks, each loss weighted by its share, and accumulates the gradients: the ascent
        gradients and the final one separately, so the step equals one on the whole batch (for a
        mean loss and no batch norm) with a k-th of the activation memory. During the first pass
        of a step :attr:`first_pass` is True (log the clean loss only then).
        """
        if closure is None:
            raise ValueError(
                "step() needs the passes it runs: step(loss_fn, batch=...) with a loss function of the "
                "batch, or step(closure) with a closure that runs forward and backward; to drive the "
                "passes yourself call perturb() after each ascent backward and descend() after the final one"
            )
        self.last_step = result = run_step(self, closure, batch, scaler=scaler, micro_batches=micro_batches,
                                           model=self.model if model is None else model)
        if batch is not None:
            return result
        self._grad_versions = self._gradient_versions()  # what our own passes left in .grad
        return result.loss

    # ------------------------------------------------------------------ davda54/sam-style API
    def first_step(self, zero_grad: bool = False) -> Tensor:
        """davda54/sam's ``first_step``: move to the neighbour along the gradient now in ``.grad``
        (``loss.backward()`` first). For OT-MDR, each call is the next ascent step: call it once
        per entry of ``rho`` (with a backward on that step's part of the batch before each).
        ``zero_grad=False`` leaves the ascent gradient in ``.grad`` as davda54 does (the next
        backward then adds to it); ``True`` clears it. Returns the norm used."""
        params = self._params_with_grad()
        kept = None if zero_grad else [g.detach().clone() for g in _grads(params)]
        i = self._progress.ascent
        norm = self.perturb()  # consumes (zeroes) the gradients
        self.gradient_evaluations += self.config.split_fractions[i]  # the backward on this step's part
        if kept is not None:
            with torch.no_grad():
                F.copy_(_grads(params), kept)
        return norm

    def second_step(self, zero_grad: bool = False) -> None:
        """davda54/sam's ``second_step``: back to the centre, base-optimizer step with the gradient
        now in ``.grad`` (taken at the neighbour); ``zero_grad=True`` clears it afterwards."""
        self.gradient_evaluations += 1.0  # the full-batch pass at the neighbour
        self.descend()
        if zero_grad:
            self._zero_grads()
        self._grad_versions = self._gradient_versions()

    def passes_per_step(self, closure_form: bool = False) -> float:
        """Forward/backward cost of one step in full-batch passes (SGD = 1, SAM = 2)."""
        return passes_per_step(self.config, closure_form)

    # ------------------------------------------------------------------------------ internals
    def _begin_step(self) -> None:
        """Zero the gradients and start a fresh progress record (the one-call form)."""
        self._zero_grads()
        self._progress = StepProgress()

    def _abandon_step(self) -> None:
        """After a pass raised: weights back at the centre, no progress left over."""
        self.restore()
        self._progress = StepProgress()

    def _ascent_plan(self) -> AscentPlan:
        """The cached :class:`AscentPlan`, rebuilt when the groups or the gradients present change."""
        key = plan_key(self.config, self.param_groups, sharded=self.sharding is not None)
        if self._plan is None or self._plan.key != key:
            self._plan = build_plan(key, self.param_groups, self.scratch,
                                    merge_buffer=self.config.uses_direction_buffer, sharding=self.sharding,
                                    noise=bool(self.config.noise_std))
        return self._plan

    def _norm_extra(self, norm_only: list[Tensor], i: int, merged: bool) -> list[Tensor] | None:
        """What the ``in_norm`` (not perturbed) parameters add to an ascent norm: their gradient
        at this step, or with ``normalize="merged"`` their running merged direction; ASAM-scaled
        by |theta| + eta when adaptive. None when there are none."""
        params = [p for p in norm_only if p.grad is not None]
        if not params:
            return None
        grads = _grads(params)
        cfg = self.config
        if merged and cfg.normalize == "merged":
            buffers = self.scratch.get("norm_direction", params)
            F.merge_(buffers, grads, first=i == 0, foreach=self.foreach)
            grads = buffers
        if cfg.adaptive:  # params and grads stay aligned: both skip the same gradient-less tensors
            grads = [g * (local(p).detach().abs() + cfg.adaptive_eta) for g, p in zip(grads, params)]
        return grads

    def _add_weight_decay(self, params: list[Tensor], grads: list[Tensor]) -> None:
        by_decay: dict[float, tuple[list[Tensor], list[Tensor]]] = {}
        decay = {p: g.get("weight_decay", 0.0) for g in self.param_groups for p in g["params"]}
        for p, grad in zip(params, grads):
            if decay[p]:
                by_decay.setdefault(decay[p], ([], []))[0].append(grad)
                by_decay[decay[p]][1].append(local(p))
        for value, (grad_list, param_list) in by_decay.items():
            F.add_(grad_list, param_list, alpha=value, foreach=self.foreach)

    @torch.no_grad()
    def _load_particle_gradients(self) -> None:
        """Put the finished particles' gradient sum into ``.grad`` before the last final pass.

        Backward then accumulates the last particle on top, so DDP all-reduces once per step.
        """
        params = self._progress.particle_params
        F.copy_(_grads(params), self.scratch.get("particles", params), foreach=self.foreach)
        self._progress.particles_loaded = True

    def _params_with_grad(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"] if p.grad is not None]

    def _zero_grads(self, params: list[Tensor] | None = None) -> None:
        F.zero_(_grads(self._params_with_grad() if params is None else params), foreach=self.foreach)

    def _no_sync(self, model: nn.Module | None) -> Callable[[], Any] | None:
        """``model.no_sync`` (DDP) or None; looked up once per model, since a missing attribute
        costs an exception in ``nn.Module.__getattr__`` on every step."""
        cached = self._no_sync_cache
        if cached is None or cached[0] is not model:
            cached = self._no_sync_cache = (model, getattr(model, "no_sync", None))
        return cached[1]

    def _distributed_flags(self) -> bool:
        """Whether the replicas' non-finite flags must be combined: under DDP (a local ascent
        gradient, and with ``sync_ascent`` too the final loss the check reads, are seen by one
        replica only) and with sharded parameters (each rank checks its own loss and shards)."""
        if self.sharding is not None:
            return self.sharding.size > 1
        if self._no_sync(self.model) is None:
            return False
        import torch.distributed as dist

        return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

    def _agree(self, flags: Tensor) -> Tensor:
        """Under DDP a non-finite ascent gradient (local ascent passes) or final loss is seen by
        one replica only: the flags are OR-ed over the replicas (one tiny all-reduce, no host
        sync) so that every replica skips, or raises at, the same step and the replicas stay
        identical. With sharded parameters, over the device mesh."""
        if not self._distributed_flags():
            return flags
        if self.sharding is not None:
            return self.sharding.any(flags)
        import torch.distributed as dist

        agreed = flags.to(torch.uint8)
        dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
        return agreed.bool()

    def _raise_if_nonfinite(self, grads: list[Tensor], loss: Tensor | None) -> None:
        final = F.global_norm(grads, foreach=self.foreach, shard_sum=self._shard_sum) if loss is None else loss.detach()
        total = self._progress.norm_total
        total = final if total is None else final + total.to(final)
        if self._distributed_flags():
            bad = bool(self._agree(~torch.isfinite(total)))
        else:
            bad = not bool(torch.isfinite(total))
        if bad:  # the one host sync of the step
            if not all(bool(torch.isfinite(n).all()) for n in self._progress.norms):
                where = "an ascent pass"
            elif not bool(torch.isfinite(final)):
                where = "the final pass"
            else:
                where = "another process's ascent pass"
            self._zero_grads()
            self._progress = StepProgress()
            raise FloatingPointError(
                f"non-finite gradient in {where} of step {self.step_count}: the weights were left unchanged. "
                "Lower the learning rate or rho, check the data for NaN/inf, or use a GradScaler "
                "(which skips such steps)"
            )

    def _batchnorm(self, model: nn.Module | None) -> BatchNormState:
        if self._bn_cache is None or self._bn_cache[0] is not model:
            self._bn_cache = (model, BatchNormState(model))
        return self._bn_cache[1]

    def _gradient_versions(self) -> dict[Tensor, int]:
        return {p: local(g)._version for p in self._params_with_grad() if (g := p.grad) is not None}

    def _fresh_gradients(self) -> bool:
        """Whether some ``.grad`` was written since the last step (a backward the user ran before
        ``step(closure)``); the final gradient our own step leaves behind does not count."""
        for p, version in self._gradient_versions().items():
            if self._grad_versions.get(p) != version and p.grad is not None and bool(local(p.grad).any()):
                return True
        return False


def passes_per_step(cfg: PerturbationConfig, closure_form: bool = False) -> float:
    """The expected forward/backward cost of one step of ``cfg``, in full-batch passes, averaged
    over a run: a perturbed step costs, per particle, its gradient ascent passes (on their parts
    of the batch; a closure's pass counts 1; momentum steps none) plus one full pass; a plain or
    reused step 1. Every ``ascent_interval``-th step perturbs, and none before ``phase_start``.
    With a ``trigger`` this is the cost if every candidate step fires (an upper bound: the
    measured :attr:`OTMDR.gradient_evaluations` says what it cost). What the optimizer measures,
    up to the rounding of the parts' sizes."""
    gradient_steps = cfg.split_fractions[cfg.momentum_steps:]
    ascent = float(len(gradient_steps)) if closure_form else sum(gradient_steps)
    per_step = (cfg.particles * (1.0 + ascent) + cfg.ascent_interval - 1) / cfg.ascent_interval
    return cfg.phase_start + (1.0 - cfg.phase_start) * per_step


def _refuse_sam(cfg: PerturbationConfig) -> None:
    """OT-MDR configured as exactly SAM (ASAM) would run that method under OT-MDR's name."""
    same = sam_equivalent(cfg)
    if same is None:
        return
    r = cfg.rho[0]
    options = f", adaptive_eta={cfg.adaptive_eta:g}" if same == "ASAM" else ""
    options += f", bn_policy={cfg.bn_policy!r}" if cfg.bn_policy != "clean" else ""
    raise ValueError(f"rho={cfg.rho} has one entry: OT-MDR with one ascent step on the whole batch is {same}; use "
                     f"{same}(params, base, rho={r:g}{options}), or give one radius per ascent step, e.g. "
                     f"rho=({r / 2:g}, {r:g}) (one step differs from {same} only with noise_std > 0, particles > 1 or "
                     "a split below 1)")


def _mean(values: list[Tensor]) -> Tensor:
    """The mean over a step's particles (the one value as it is)."""
    return values[0] if len(values) == 1 else torch.stack([v.to(values[-1].device) for v in values]).mean()


def _grads(params: Iterable[Tensor]) -> list[Tensor]:
    """The ``.grad`` of each parameter (those without one skipped); of a sharded parameter, the
    local shard of its gradient."""
    return [local(g) for p in params if (g := p.grad) is not None]


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
