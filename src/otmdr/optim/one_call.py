"""The one-call step: every pass of a training step, run from a loss function and a batch.

``OTMDR.step(loss_fn, batch=...)`` (and ``step(closure)``) delegate here. This module owns what
the step arithmetic need not know about: slicing the batch for each ascent step (a fresh random
order for every particle after the first), micro-batches, which pass may update batch-norm
statistics, DDP's ``no_sync`` for the local passes (FSDP synchronises every pass: see
:func:`_check_fsdp_gradient_sync`), the one-time check for batch norm the
optimizer cannot reach, and putting weights and statistics back when a pass raises. The
arithmetic is the optimizer's primitives: ``perturb``, ``next_particle``, ``descend``.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from . import functional as F
from .batching import batch_size, split_bounds, take
from .batchnorm import BatchNormState
from .efficiency import FULL, PLAIN, REUSE, scheduled_kind
from .progress import StepResult
from .sharding import local

if TYPE_CHECKING:
    from .otmdr import OTMDR

__all__ = ["run_step", "updates_batchnorm", "BatchNormWatch"]

_NOTHING = contextlib.nullcontext()  # reusable: the contexts a pass does not need cost nothing


def run_step(opt: OTMDR, closure: Callable[..., Any], batch: Any, *, scaler: torch.amp.GradScaler | None,
             model: nn.Module | None, micro_batches: int) -> StepResult:
    """Run every pass of one step of ``opt`` and apply it; see :meth:`OTMDR.step`."""
    if isinstance(micro_batches, bool) or not isinstance(micro_batches, int) or micro_batches < 1:
        raise ValueError(f"micro_batches must be an integer >= 1, got {micro_batches!r}")
    if micro_batches > 1 and batch is None:
        raise ValueError("micro_batches needs the one-call form step(loss_fn, batch=...): a closure computes "
                         "its own batch")
    cfg = opt.config
    bn = opt._batchnorm(model)
    watch = None
    if model is None and cfg.bn_policy != "all" and not opt._warned_no_model:
        watch = BatchNormWatch()  # the first step only: does the loss run batch norm we cannot reach?
        opt._warned_no_model = True
    if batch is None and opt._fresh_gradients():
        warnings.warn(
            "step(closure) found gradients computed before the call: they are discarded, since the closure "
            "recomputes every pass. After loss.backward(); opt.step(closure) (the davda54/sam pattern) this "
            "costs one extra pass: drop that backward or use first_step()/second_step(). With Lightning's "
            "accumulate_grad_batches > 1 the earlier micro-batches are lost: use accumulate_grad_batches=1 "
            "and opt.step(loss_fn, batch=..., micro_batches=k) in manual optimization", stacklevel=4)
    if opt.sharding is not None and model is not None:
        _check_fsdp_gradient_sync(model)
    passes = _Passes(opt, closure, batch, scaler=scaler, model=model, bn=bn, micro_batches=micro_batches)
    start = bn.save() if bn and (scaler is not None or cfg.check_finite) else None
    opt._begin_step()
    opt._in_step = True
    try:
        if watch is not None:
            watch.start()
        first, finals, kind = _run_passes(opt, passes)
        final = finals[0] if len(finals) == 1 else torch.stack(finals).sum()
        opt.descend(scaler, loss=final)
    except BaseException:
        opt.gradient_evaluations += passes.evaluations  # the passes that ran were spent
        if watch is not None:
            watch.stop()
        opt._abandon_step()
        if start is not None:
            bn.load(start)
        raise
    finally:
        opt._in_step = False
    if watch is not None and watch.stop():
        warnings.warn(
            f"{type(opt).__name__} was built without model=... but the loss runs batch norm in training "
            f"mode: bn_policy={cfg.bn_policy!r} cannot be applied and its running statistics update in every "
            "pass; pass model=your_model", stacklevel=4)
    if scaler is not None and start is not None and opt.skipped is not None:
        bn.load_where(opt.skipped, start)  # a skipped step leaves the statistics as they were
    opt.first_pass = False
    opt.gradient_evaluations += passes.evaluations
    return StepResult(
        loss=first[0],
        perturbed_loss=finals[0] if len(finals) == 1 else torch.stack(finals).mean(),
        perturbation_norm=opt._last_distance,
        outputs=first[1],
        gradient_evaluations=passes.evaluations,
        move_norm=opt._last_move,
        noise_norm=opt._last_noise,
        kind=kind,
    )


def _run_passes(opt: OTMDR, passes: _Passes) -> tuple[tuple[Tensor, Any], list[Tensor], str]:
    """The passes of one step in order, with the primitives between them; returns the first
    pass's (loss, outputs), each particle's final-pass loss and the step's kind (full, plain or
    reuse: docs/optimizer.md, "Cheaper steps")."""
    cfg = opt.config
    kind = scheduled_kind(cfg, opt.step_count, opt.total_steps)
    momentum = opt.momentum_directions() if kind == FULL and cfg.momentum_steps else None
    if kind != FULL or (cfg.momentum_steps and momentum is None):  # a plain base-optimizer step
        plain = passes.run(passes.batch, sync=True, update_bn=cfg.bn_policy != "none")
        if kind == REUSE:
            opt.add_reused_component()
        return plain, [plain[0]], PLAIN if kind == FULL else kind
    #: the first pass's gradient outlives the ascent (trigger, reuse): all-reduce it under DDP
    shared_first = cfg.trigger is not None or cfg.reuse
    first_pass = cfg.momentum_steps if cfg.momentum_steps < cfg.ascent_steps else None
    first: tuple[Tensor, Any] | None = None
    finals = []
    for k in range(cfg.particles):
        last = k == cfg.particles - 1
        for i, part in enumerate(passes.ascent_parts(k)):
            if i < cfg.momentum_steps:
                assert momentum is not None
                opt.momentum_ascent(momentum)
                continue
            update_bn = updates_batchnorm(cfg.bn_policy, k, i, first_pass=first_pass)
            result = passes.run(part, sync=cfg.sync_ascent or (shared_first and first is None), update_bn=update_bn,
                                share=passes.shares[i])
            if first is None and cfg.trigger is not None and not _triggered(opt, passes):
                _complete_plain(opt, passes)
                return result, [result[0]], PLAIN
            first = result if first is None else first
            opt.perturb()
        if last and opt._progress.particles_done:
            opt._load_particle_gradients()
        update_bn = updates_batchnorm(cfg.bn_policy, k, None, first_pass=first_pass)
        final = passes.run(passes.batch, sync=last, update_bn=update_bn)
        finals.append(final[0])
        first = final if first is None else first  # every ascent step moved along the momentum: the only pass
        if not last:
            opt.next_particle()
    assert first is not None
    return first, finals, FULL


def _check_fsdp_gradient_sync(model: nn.Module) -> None:
    """Under FSDP every pass must reduce-scatter its gradient: with gradient sync off, FSDP leaves
    the sharded ``.grad`` alone and keeps the whole gradient until the next synchronised
    backward, which would add the ascent gradients to the final one (and the ascent steps would
    find no gradient). Refuse instead, naming the fix."""
    from torch.distributed.fsdp import FSDPModule

    for name, module in model.named_modules():
        if isinstance(module, FSDPModule):
            group = getattr(module._get_fsdp_state(), "_fsdp_param_group", None)
            if group is not None and not getattr(group, "reduce_grads", True):
                raise RuntimeError(
                    f"FSDP gradient sync is off for {name or 'the model'} (set_requires_gradient_sync(False)): every "
                    "pass of a sharpness-aware step must reduce-scatter its gradient under FSDP, or the ascent "
                    "gradients would end up in the final one; call model.set_requires_gradient_sync(True) before "
                    "step()")


def _triggered(opt: OTMDR, passes: _Passes) -> bool:
    """AE-SAM: whether this step perturbs, from the first pass's squared gradient norm (the
    gradient unscaled when a GradScaler scaled it). One host sync."""
    assert opt.trigger is not None
    norm = float(F.global_norm(_gradients(opt), foreach=opt.foreach, shard_sum=opt._shard_sum))
    if passes.scaler is not None and passes.scaler.is_enabled():
        norm /= float(passes.scaler.get_scale())
    return opt.trigger.observe(norm * norm, opt.trigger.threshold(opt.step_count, opt.total_steps))


def _gradients(opt: OTMDR) -> list[Tensor]:
    return [local(g) for p in opt._params_with_grad() if (g := p.grad) is not None]


def _complete_plain(opt: OTMDR, passes: _Passes) -> None:
    """A step the trigger declined, after its first pass on a part of the batch: the rest of the
    batch at the same weights, so that ``.grad`` is the whole batch's gradient (weighted by the
    parts' sizes) for a plain step."""
    share = passes.shares[0]
    if passes.size is None or share >= 1.0:
        return
    assert passes.bounds is not None
    grads = _gradients(opt)
    if opt.foreach:
        torch._foreach_mul_(grads, share)
    else:
        for g in grads:
            g.mul_(share)
    rest = take(passes.batch, slice(passes.bounds[0][1], passes.size))
    passes.run(rest, sync=True, update_bn=False, share=1.0 - share, weight=1.0 - share)


def updates_batchnorm(policy: str, particle: int, ascent: int | None, *, first_pass: int | None = 0) -> bool:
    """Whether a pass updates the running statistics under ``policy`` (``ascent`` None: the
    particle's final pass). ``first_pass``: the ascent step whose pass is the step's first (the
    steps before it moved along the momentum without a pass), None when no ascent step runs a
    pass: particle 0's final pass is then the first, and updates under "clean" and "ascent"."""
    if policy in ("all", "none"):
        return policy == "all"
    if ascent is None:
        return particle == 0 and first_pass is None
    return policy == "ascent" or (particle == 0 and ascent == first_pass)


class _Passes:
    """Runs one forward/backward pass on a part of the batch (or calls the closure)."""

    def __init__(self, opt: OTMDR, closure: Callable[..., Any], batch: Any, *,
                 scaler: torch.amp.GradScaler | None, model: nn.Module | None, bn: BatchNormState,
                 micro_batches: int) -> None:
        self.opt = opt
        self.closure = closure
        self.batch = batch
        self.scaler = scaler
        self.no_sync = opt._no_sync(model)
        self.bn = bn
        self.micro_batches = micro_batches
        self.count = 0
        self.evaluations = 0.0  #: passes run so far, in full-batch units (see :class:`StepResult`)
        self.size = None if batch is None else batch_size(batch)
        self.bounds = None if self.size is None else _ascent_bounds(self.size, opt.config.split_fractions)
        #: the fraction of the batch each ascent step's part holds (a closure's pass counts 1)
        self.shares = ([1.0] * opt.config.ascent_steps if self.bounds is None or self.size is None
                       else [(hi - lo) / self.size for lo, hi in self.bounds])

    def ascent_parts(self, particle: int) -> list[Any]:
        """The part of the batch each ascent step of ``particle`` uses: consecutive slices of the
        batch, in a fresh random order for every particle after the first (None: the closure's
        own batch)."""
        steps = self.opt.config.ascent_steps
        if self.bounds is None:
            return [None] * steps
        n = self.size
        if particle == 0:  # SAM's one ascent step uses the whole batch: no views to build
            return [self.batch if (lo, hi) == (0, n) else take(self.batch, slice(lo, hi)) for lo, hi in self.bounds]
        generator = self.opt.generator
        order = torch.randperm(n, generator=generator, device=generator.device)  # type: ignore[arg-type]
        return [take(self.batch, order[lo:hi]) for lo, hi in self.bounds]

    def run(self, part: Any, *, sync: bool, update_bn: bool, share: float = 1.0,
            weight: float = 1.0) -> tuple[Tensor, Any]:
        """Forward and backward on ``part`` (through the scaler, in micro-batches), inside
        ``no_sync`` unless ``sync``, with the statistics frozen unless ``update_bn``; returns the
        detached loss and the loss function's other outputs. ``share``: the fraction of the batch
        ``part`` holds, counted in :attr:`evaluations` (micro-batches together make the part);
        ``weight`` multiplies the loss before backward."""
        self.opt.first_pass = self.count == 0
        self.count += 1
        self.evaluations += share
        with (self.no_sync() if not sync and self.no_sync is not None else _NOTHING), \
                (self.bn.frozen() if self.bn and not update_bn else _NOTHING), \
                (_NOTHING if torch.is_grad_enabled() else torch.enable_grad()):
            if self.batch is None:
                try:
                    out = self.closure()
                except TypeError:
                    if _needs_an_argument(self.closure):  # never called: the loss function of a batch
                        raise TypeError("step(loss_fn) called without batch=...: pass the batch, "
                                        "opt.step(loss_fn, batch=(x, y)), or give a closure that takes no "
                                        "argument") from None
                    raise  # the closure's own TypeError
                return split_output(out)[0].detach(), None
            size = 1 if self.micro_batches == 1 else batch_size(part)  # no batch walk on the plain path
            if size < 2:
                loss, extra = split_output(self.closure(part))
                self._backward(loss if weight == 1.0 else loss * weight)
                return loss.detach(), extra
            total: Tensor | None = None
            extras = []
            for lo, hi in _chunks(size, self.micro_batches):
                loss, extra = split_output(self.closure(take(part, slice(lo, hi))))
                weighted = loss * ((hi - lo) / size)  # the mean over the part, accumulated
                self._backward(weighted if weight == 1.0 else weighted * weight)
                total = weighted.detach() if total is None else total + weighted.detach()
                extras.append(extra)
            assert total is not None
            return total, _concatenate(extras)

    def _backward(self, loss: Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()  # type: ignore[no-untyped-call]


def _needs_an_argument(function: Callable[..., Any]) -> bool:
    """Whether ``function()`` fails for want of an argument (a loss function of the batch given
    without ``batch=``), not inside its body."""
    import inspect

    try:
        inspect.signature(function).bind()
    except TypeError:
        return True
    except ValueError:  # no signature to read (some builtins): not ours to judge
        return False
    return False


def _ascent_bounds(n: int, split: tuple[float, ...]) -> list[tuple[int, int]]:
    """The ``[lo, hi)`` range of the batch each ascent step uses. A batch too small to give every
    step a non-empty part (e.g. the last batch of an epoch holding 1 sample) uses the whole batch
    for every ascent step instead, the closure form's behaviour, so no sample is dropped."""
    try:
        return split_bounds(n, split)
    except ValueError:
        return [(0, n)] * len(split)


class BatchNormWatch:
    """A global forward hook, for one step: records whether any batch-norm layer that tracks
    running statistics ran in training mode (the only case where a missing ``model`` matters)."""

    def __init__(self) -> None:
        self.seen = False
        self._handle: Any = None

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


def split_output(out: Any) -> tuple[Tensor, Any]:
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
