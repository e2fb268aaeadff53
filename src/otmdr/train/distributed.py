"""Several processes training one run (``torchrun --nproc_per_node N -m otmdr train ...``).

This module owns the process group and the few collectives the training loop needs, so the
single-process path never touches ``torch.distributed``: every helper is a no-op (or the
identity) when the world has one process.

Conventions (see docs/distributed.md):

* The launch is detected from torchrun's environment (``WORLD_SIZE``, ``RANK``,
  ``LOCAL_RANK``); a world of one process is the ordinary single-process run.
* ``data.batch_size`` is the *global* batch: every rank takes every ``world_size``-th sample
  of it (a strided shard), so a run's hyper-parameters mean the same at any world size, and
  the ascent parts of the shards (halves, for the default OT-MDR) together form the parts the
  one-process run would use.
* Rank 0 is the only one that touches the file system; decisions it takes there (a run
  folder's state, a checkpoint's content, an error) reach the other ranks by broadcast, so
  nodes need not share a file system.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

__all__ = ["Context", "DistributedError", "current", "launched", "torchrun_launched", "init", "ensure_group",
           "device_for", "shard",
           "from_rank0", "gather_to_rank0", "broadcast_object", "any_rank", "sum_across", "sync_buffers"]

T = TypeVar("T")

class DistributedError(RuntimeError):
    """The launch cannot work as asked (bad environment, unsupported device or batch size)."""


@dataclass(frozen=True)
class Context:
    """Where this process stands: its rank among ``world_size`` processes, and its GPU index."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_CURRENT = Context()


def current() -> Context:
    """The context :func:`init` set up (one process when nothing was launched)."""
    return _CURRENT


def _env_int(environ: dict[str, str], name: str, default: int) -> int:
    raw = environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise DistributedError(f"environment variable {name}={raw!r} is not an integer (set by torchrun)") from None


def launched(environ: dict[str, str] | None = None) -> Context:
    """The context torchrun's environment describes (one process when it describes none)."""
    environ = dict(os.environ if environ is None else environ)
    world = _env_int(environ, "WORLD_SIZE", 1)
    rank = _env_int(environ, "RANK", 0)
    local = _env_int(environ, "LOCAL_RANK", 0)
    if world < 1 or not 0 <= rank < world or local < 0:
        raise DistributedError(f"inconsistent launch environment: RANK={rank}, WORLD_SIZE={world}, "
                               f"LOCAL_RANK={local}")
    return Context(rank, world, local)


def torchrun_launched(environ: dict[str, str] | None = None) -> bool:
    """Whether torchrun started this process (its environment names a world), of any size: a
    launch of one process is otherwise the ordinary single-process run."""
    environ = dict(os.environ if environ is None else environ)
    return bool(environ.get("WORLD_SIZE")) and bool(environ.get("RANK"))


def _backend() -> str:
    import torch.distributed as dist

    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"


def ensure_group() -> None:
    """A process group, also for a torchrun launch of one process (which :func:`init` leaves
    without one): FSDP shards over a device mesh, which needs one. A group of one process talks to
    no one (an in-memory store)."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if current().enabled:
        raise DistributedError("the process group was not initialised (otmdr.train.distributed.init)")
    dist.init_process_group(_backend(), store=dist.HashStore(), rank=0, world_size=1)


def init(timeout: float) -> Context:
    """Join the process group described by the environment (once per process).

    Backend: ``cpu:gloo,cuda:nccl`` when CUDA is usable (gradients go over NCCL, the small
    bookkeeping collectives on CPU tensors over gloo, without a GPU sync), else gloo. Every
    collective waits at most ``timeout`` seconds for a peer, so a rank that died or hangs makes
    the others fail with an error instead of waiting forever.
    """
    global _CURRENT
    context = launched()
    if not context.enabled:
        _CURRENT = context
        return context
    import torch.distributed as dist

    if not dist.is_available():
        raise DistributedError("this PyTorch build has no torch.distributed: launch otmdr without torchrun")
    if not dist.is_initialized():
        backend = "gloo"
        if torch.cuda.is_available() and dist.is_nccl_available():
            if context.local_rank >= torch.cuda.device_count():
                raise DistributedError(f"LOCAL_RANK {context.local_rank} but only {torch.cuda.device_count()} CUDA "
                                       "device(s) on this node: lower --nproc_per_node")
            torch.cuda.set_device(context.local_rank)
            backend = "cpu:gloo,cuda:nccl"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
    _CURRENT = context
    return context


def device_for(device: torch.device) -> torch.device:
    """The device this rank trains on: ``cuda:LOCAL_RANK`` for a CUDA run (one GPU per process)."""
    context = current()
    if context.enabled and device.type == "cuda":
        return torch.device("cuda", context.local_rank)
    return device


def shard(batch: tuple[torch.Tensor, ...], context: Context | None = None) -> tuple[torch.Tensor, ...]:
    """This rank's strided part of a global batch: samples ``rank, rank + W, rank + 2W, ...``.

    Strided (not contiguous) so that the first half of every shard together is the first half
    of the global batch: OT-MDR's ascent parts then mean the same as in one process.
    """
    context = context or current()
    if not context.enabled:
        return batch
    return tuple(t[context.rank::context.world_size] for t in batch)


def _collective_device() -> torch.device:
    return torch.device("cpu")  # gloo (alone or beside nccl) serves CPU tensors: no GPU sync


def broadcast_object(value: T) -> T:
    """Rank 0's ``value`` on every rank (pickled; tensors in it arrive on the CPU)."""
    if not current().enabled:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0, device=_collective_device())
    return box[0]


class _Raised:
    def __init__(self, error: BaseException):
        self.error = error


def from_rank0(function: Callable[[], T]) -> T:
    """Run ``function`` on rank 0 only (file-system work) and hand its result, or the exception
    it raised, to every rank: all ranks then continue, or fail, together."""
    context = current()
    if not context.enabled:
        return function()
    outcome: Any = None
    if context.is_main:
        try:
            outcome = function()
        except Exception as error:  # re-raised below, on every rank
            outcome = _Raised(error)
    outcome = broadcast_object(outcome)
    if isinstance(outcome, _Raised):
        raised = outcome.error
        raised.otmdr_from_rank0 = True  # type: ignore[attr-defined]  # rank 0 reports it
        raise raised
    return outcome


def gather_to_rank0(value: Any) -> list[Any] | None:
    """Every rank's ``value``, in rank order, on rank 0 (None elsewhere)."""
    context = current()
    if not context.enabled:
        return [value]
    import torch.distributed as dist

    out = [None] * context.world_size if context.is_main else None
    dist.gather_object(value, out, dst=0)
    return out


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` is true on some rank (a collective: every rank must call it)."""
    if not current().enabled:
        return flag
    import torch.distributed as dist

    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def sum_across(values: torch.Tensor) -> torch.Tensor:
    """The sum of ``values`` over the ranks (returned, on the device of ``values``)."""
    if not current().enabled:
        return values
    import torch.distributed as dist

    out = values.detach().clone()
    dist.all_reduce(out)
    return out


def sync_buffers(module: torch.nn.Module) -> None:
    """Give every rank rank 0's buffers (batch-norm statistics): replicas then agree exactly,
    so any rank's evaluation is rank 0's."""
    if not current().enabled:
        return
    import torch.distributed as dist

    for buffer in module.buffers():
        dist.broadcast(buffer, src=0)
