"""How the processes of a run share the work: one object the training loop calls at fixed
points instead of branching on the launch.

:class:`SingleProcess` is the ordinary run: every hook is the identity. :class:`DataParallel` is
a torchrun launch with DistributedDataParallel (docs/distributed.md): sharded batches, rank 0's
weights and batch-norm statistics on every replica, per-rank random streams saved with the
checkpoint, rank 0 alone on the file system. :class:`FullyShard` is a torchrun launch with FSDP2
(``train.strategy: fsdp``): the same, with the parameters, gradients and optimizer state sharded
over the processes, and sharded checkpoints (``save_sharded``/``load_sharded``) written by every
process. :func:`strategy_for` picks one from the launch and the run's config.

The hooks, in the order the loop meets them: ``check_checkpoint``, ``bind`` (the run's config,
checked and kept: the hooks after it read it), ``device``, ``shard``, ``check_data``, ``wrap``,
``optimizer_seed``; per step ``stop_requested``; per epoch ``reduce_epoch``, ``sync_buffers``,
``agree``, ``rank_states``, ``save_sharded`` (every process, before rank 0 writes the file);
throughout ``on_main``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from ..config import ConfigError, ExperimentConfig
from . import distributed
from .checkpoint import (CheckpointError, join_optimizer_state, remove_sharded, sharded_read_error,
                         split_optimizer_state)

__all__ = ["Strategy", "SingleProcess", "DataParallel", "FullyShard", "current_strategy", "strategy_for"]

T = TypeVar("T")


class SingleProcess:
    """One process trains the run: nothing to shard, reduce or agree on."""

    rank = 0
    world_size = 1
    is_main = True
    cfg: ExperimentConfig

    def bind(self, cfg: ExperimentConfig) -> None:
        """Check ``cfg`` for this launch (before anything is written) and keep it for the hooks."""
        self.check_config(cfg)
        self.cfg = cfg

    def on_main(self, function: Callable[[], T]) -> T:
        """File-system work: rank 0 runs it, every rank gets its result (or its exception)."""
        return function()

    def check_checkpoint(self, checkpoint: dict[str, Any], path: Any) -> None:
        """A checkpoint must come from a launch of the same number of processes."""
        saved = checkpoint.get("world_size", 1)
        if saved != self.world_size:
            how = ("without torchrun (or with --nproc_per_node 1)" if saved == 1
                   else f"with torchrun and {saved} processes in all (--nnodes x --nproc_per_node)")
            raise CheckpointError(f"{path} was written by a run of {saved} process(es) and this launch has "
                                  f"{self.world_size}: resume it {how}, so that it continues exactly")

    def check_config(self, cfg: ExperimentConfig) -> None:
        """What this launch needs of the config, checked before anything is written."""

    def device(self, device: torch.device) -> torch.device:
        return device

    def shard(self) -> tuple[int, int] | None:
        """``(rank, world_size)`` of this process's part of every training batch; None: all of it."""
        return None

    def check_data(self, train_samples: int) -> None:
        pass

    def wrap(self, model: nn.Module, device: torch.device, per_member: bool) -> tuple[nn.Module, nn.Module | None]:
        """``(model, forward)``: the model to train and save, and the module its training passes
        run through (None: the model itself)."""
        return model, None

    def optimizer_seed(self) -> int | None:
        """Seeds this process's own random stream; returns the optimizer generator's seed
        (None: ``train.seed``)."""
        return None

    def stop_requested(self, flag: bool) -> bool:
        """Whether any process was asked to stop (a collective under torchrun)."""
        return flag

    def checks_loss_every_bar(self) -> bool:
        """Whether the progress bar's running loss may stop the run (one process: at once)."""
        return True

    def reduce_epoch(self, loss_sum: Tensor, correct: Tensor, seen: Tensor, perturbation: Tensor,
                     samples: int) -> tuple[Tensor, Tensor, Tensor, Tensor, int]:
        """The epoch's sums over every process (the perturbation norm: their mean)."""
        return loss_sum, correct, seen, perturbation, samples

    def sync_buffers(self, model: nn.Module) -> None:
        pass

    def agree(self, value: T) -> T:
        """Rank 0's value on every process."""
        return value

    def rank_states(self, optimizer: torch.optim.Optimizer, device: torch.device,
                    partial: dict[str, Any] | None = None) -> list[dict[str, Any]] | None:
        """What differs between processes and must survive a resume, gathered on rank 0 (None:
        the checkpoint's own random state is this process's)."""
        return None

    def checkpoint_extra(self, ranks: list[dict[str, Any]] | None) -> dict[str, Any]:
        return {}

    def own_state(self, checkpoint: dict[str, Any]) -> dict[str, Any]:
        """This process's part of a checkpoint: its random states and its partial epoch."""
        return checkpoint

    def restore_own_state(self, optimizer: torch.optim.Optimizer, mine: dict[str, Any]) -> None:
        pass

    def model_state(self, model: nn.Module) -> dict[str, Any]:
        return model.state_dict()

    def load_model_state(self, model: nn.Module, state: dict[str, Any]) -> None:
        model.load_state_dict(state)

    def summary(self) -> dict[str, Any] | None:
        """How the run was distributed, for ``summary.json`` (None: one process)."""
        return None

    def save_sharded(self, model: nn.Module, optimizer: torch.optim.Optimizer, checkpoints: Path,
                     name: str) -> dict[str, Any] | None:
        """Write the sharded part of a checkpoint (every process); returns the checkpoint file's
        entries that name it (``sharded``, ``optimizer``), or None: the file holds everything."""
        return None

    def load_sharded(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, checkpoints: Path,
                     checkpoint: dict[str, Any]) -> None:
        raise CheckpointError(f"{checkpoints} holds a sharded checkpoint (train.strategy=fsdp): resume it with "
                              "torchrun and train.strategy=fsdp")


Strategy = SingleProcess


class DataParallel(SingleProcess):
    """``world_size`` processes, one DistributedDataParallel replica each (a torchrun launch)."""

    def __init__(self, context: distributed.Context):
        self.context = context
        self.rank = context.rank
        self.world_size = context.world_size
        self.is_main = context.is_main

    def on_main(self, function: Callable[[], T]) -> T:
        return distributed.from_rank0(function)

    def check_config(self, cfg: ExperimentConfig) -> None:
        world = self.world_size
        if cfg.data.batch_size % world:
            raise ConfigError(f"config key data.batch_size: {cfg.data.batch_size} is the global batch and must be "
                              f"divisible by the {world} processes of this launch (e.g. data.batch_size="
                              f"{max(world, cfg.data.batch_size // world * world)})")
        if cfg.train.device.startswith("cuda:"):
            raise ConfigError(f"config key train.device: {cfg.train.device} under torchrun: every process uses its "
                              "own GPU (cuda:LOCAL_RANK); use train.device=cuda or auto")
        cuda = cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available())
        if cfg.train.sync_batchnorm and not cuda:
            raise ConfigError("config key train.sync_batchnorm: SyncBatchNorm needs CUDA devices (PyTorch has no CPU "
                              "version); set train.sync_batchnorm=false or train on GPUs")

    def device(self, device: torch.device) -> torch.device:
        return distributed.device_for(device)

    def shard(self) -> tuple[int, int] | None:
        return self.rank, self.world_size

    def check_data(self, train_samples: int) -> None:
        batch = self.cfg.data.batch_size
        if 0 < train_samples % batch < self.world_size:
            raise ConfigError(f"config key data.batch_size: the last batch of every epoch would hold "
                              f"{train_samples % batch} training image(s), fewer than the "
                              f"{self.world_size} processes: change data.batch_size or data.train_limit")

    def wrap(self, model: nn.Module, device: torch.device, per_member: bool) -> tuple[nn.Module, nn.Module | None]:
        """The model (batch norm synchronised if asked) and the DistributedDataParallel that runs
        its training passes (rank 0's weights on every rank)."""
        from torch.nn.parallel import DistributedDataParallel

        if self.cfg.train.sync_batchnorm:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        target = _MemberLogits(model) if per_member else model
        return model, DistributedDataParallel(target, device_ids=[device.index] if device.type == "cuda" else None)

    def optimizer_seed(self) -> int | None:
        """Dropout, Bayesian weight samples and optimizer noise draw from a per-rank stream; the
        optimizer's shared noise stays one draw when the ascent is synchronised."""
        cfg = self.cfg
        seed = _rank_seed(cfg.train.seed, self.rank)
        torch.manual_seed(seed)
        synchronised = {"sam": cfg.sam.sync_ascent, "asam": cfg.asam.sync_ascent,
                        "otmdr": cfg.otmdr.sync_ascent}.get(cfg.optim.method)
        if synchronised is False:  # a perturbing method with its own neighbour per rank: its own noise
            return seed
        return None  # SGD, or one shared neighbour, which needs one noise draw

    def stop_requested(self, flag: bool) -> bool:  # a SIGTERM to any process stops them all at the same step
        return distributed.any_rank(flag)

    def checks_loss_every_bar(self) -> bool:  # checked at the epoch's end, by all ranks together
        return False

    def reduce_epoch(self, loss_sum: Tensor, correct: Tensor, seen: Tensor, perturbation: Tensor,
                     samples: int) -> tuple[Tensor, Tensor, Tensor, Tensor, int]:
        totals = distributed.sum_across(torch.stack([  # float64: exact counts
            loss_sum.double(), correct.double(), seen.double(), perturbation.double(),
            torch.tensor(samples, device=loss_sum.device, dtype=torch.float64)]))
        return totals[0], totals[1], totals[2], totals[3] / self.world_size, int(totals[4])

    def sync_buffers(self, model: nn.Module) -> None:
        distributed.sync_buffers(model)

    def agree(self, value: T) -> T:
        return distributed.broadcast_object(value)

    def rank_states(self, optimizer: torch.optim.Optimizer, device: torch.device,
                    partial: dict[str, Any] | None = None) -> list[dict[str, Any]] | None:
        generator = getattr(optimizer, "generator", None)  # SAM/ASAM/OT-MDR's own stream; SGD has none
        state = {"rng": {"cpu": torch.get_rng_state(),
                         "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None},
                 "optimizer_generator": generator.get_state() if generator is not None else None,
                 "partial_epoch": partial}
        return distributed.gather_to_rank0(state)

    def checkpoint_extra(self, ranks: list[dict[str, Any]] | None) -> dict[str, Any]:
        return {"world_size": self.world_size, "ranks": ranks}

    def own_state(self, checkpoint: dict[str, Any]) -> dict[str, Any]:
        return checkpoint["ranks"][self.rank]

    def restore_own_state(self, optimizer: torch.optim.Optimizer, mine: dict[str, Any]) -> None:
        if mine.get("optimizer_generator") is not None:
            optimizer.generator.set_state(mine["optimizer_generator"])  # type: ignore[attr-defined]

    def summary(self) -> dict[str, Any] | None:
        return {"strategy": "ddp", "world_size": self.world_size}


class FullyShard(DataParallel):
    """``world_size`` processes of a torchrun launch training one model sharded with FSDP2
    (``fully_shard`` per unit of :func:`otmdr.models.units.fsdp_units`, then the root).

    As :class:`DataParallel` for everything but the model: the batches are sharded the same way,
    rank 0 alone writes files, each process keeps its own random streams. Differences:

    * no wrapper: the optimizer runs its passes through the sharded model itself, and every pass
      reduce-scatters its gradient, so the ascent is global (one shared neighbour, as DDP's
      ``sync_ascent``) and the optimizer's generator has the same seed on every process;
    * FSDP does not broadcast buffers: each process updates its batch-norm running statistics from
      its own shard during an epoch, and rank 0's are broadcast at its end (``sync_buffers``) and
      before every checkpoint, as DDP's ``broadcast_buffers`` leaves them (rank 0's);
    * checkpoints are sharded (``save_sharded``): the parameters and the optimizer's per-parameter
      state go through ``torch.distributed.checkpoint`` into a folder every process writes its part
      of (a file system shared by the nodes), the rest into rank 0's checkpoint file as before.

    A launch of one process (``torchrun --nproc_per_node 1``) shards over a mesh of one process.
    """

    def __init__(self, context: distributed.Context):
        super().__init__(context)
        self.mesh: Any = None

    def check_config(self, cfg: ExperimentConfig) -> None:
        super().check_config(cfg)
        if cfg.train.channels_last:
            raise ConfigError("config key train.channels_last: FSDP shards contiguous parameters only (PyTorch "
                              "refuses channels-last convolution weights): set train.channels_last=false with "
                              "train.strategy=fsdp")

    def wrap(self, model: nn.Module, device: torch.device, per_member: bool) -> tuple[nn.Module, nn.Module | None]:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

        from ..models.bayes import is_bayesian
        from ..models.units import fsdp_units

        if is_bayesian(model):  # every rank finds it: rank 0 reports it, before any collective
            raise ConfigError(f"config key train.strategy: fsdp does not train Bayesian models ({self.cfg.model.name}) "
                              "yet: their weight samples and KL term read the parameters outside the forward pass, "
                              "where FSDP holds only each process's shard; use train.strategy=ddp")
        distributed.ensure_group()  # a torchrun launch of one process has none yet
        if self.cfg.train.sync_batchnorm:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.mesh = init_device_mesh(device.type, (self.world_size,))
        for unit in fsdp_units(model):
            fully_shard(unit, mesh=self.mesh)
        fully_shard(model, mesh=self.mesh)
        if per_member:  # the per-member loss runs member_logits, not forward: FSDP must gather for it too
            register_fsdp_forward_method(model, "member_logits")
        return model, None

    def optimizer_seed(self) -> int | None:
        """Dropout and Bayesian weight samples draw from a per-rank stream; the optimizer's noise is
        one draw for the whole model (the ascent is global under FSDP): ``train.seed`` everywhere."""
        torch.manual_seed(_rank_seed(self.cfg.train.seed, self.rank))
        return None

    def sync_buffers(self, model: nn.Module) -> None:
        distributed.sync_buffers(model)

    def model_state(self, model: nn.Module) -> dict[str, Any]:
        """The model's state dict of sharded tensors (global shapes; no communication): for checks."""
        return model.state_dict()

    def load_model_state(self, model: nn.Module, state: dict[str, Any]) -> None:
        raise CheckpointError("a sharded model loads from a sharded checkpoint (load_sharded)")

    def summary(self) -> dict[str, Any] | None:
        return {"strategy": "fsdp", "world_size": self.world_size}

    def save_sharded(self, model: nn.Module, optimizer: torch.optim.Optimizer, checkpoints: Path,
                     name: str) -> dict[str, Any] | None:
        """Every process writes its shards of the model and the optimizer state into
        ``checkpoints/.NAME.partial``, which rank 0 renames to ``checkpoints/NAME`` once all have
        written; returns the checkpoint file's ``sharded`` and ``optimizer`` entries."""
        import torch.distributed.checkpoint as dcp

        self.sync_buffers(model)  # the saved (replicated) buffers are rank 0's, whichever process writes them
        target, partial = checkpoints / name, checkpoints / f".{name}.partial"

        def prepare() -> None:  # leftovers of a write a kill interrupted (never named by a checkpoint file)
            remove_sharded(checkpoints, {target.name, partial.name})
            partial.mkdir(parents=True)

        distributed.from_rank0(prepare)
        if distributed.any_rank(not partial.is_dir()):  # else each node would write its shards on its own disk
            unshared = CheckpointError(f"{checkpoints} is not on a file system every process sees: under "
                                       "train.strategy=fsdp every process writes its shards into the run folder, so "
                                       "put --out on a file system every node shares")
            unshared.otmdr_from_rank0 = True  # type: ignore[attr-defined]  # every process raises it: rank 0 says it
            raise unshared
        skeleton, tensors, layout = split_optimizer_state(optimizer.state_dict())
        dcp.save({"model": model.state_dict(), "optimizer": tensors}, checkpoint_id=str(partial))

        def publish() -> None:  # dcp.save returned: every process's part and the metadata are written
            partial.rename(target)
            _fsync_directory(checkpoints)  # the rename itself survives a power loss

        distributed.from_rank0(publish)
        return {"sharded": {"folder": name, "layout": layout}, "optimizer": skeleton}

    def load_sharded(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, checkpoints: Path,
                     checkpoint: dict[str, Any]) -> None:
        """Every process reads its shards of the checkpoint's folder into the model (and the
        optimizer, whose other entries are in the file); the same world size as the writer's."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

        sharded = checkpoint["sharded"]
        model_state = model.state_dict()
        state: dict[str, Any] = {"model": model_state}
        tensors: dict[str, Tensor] = {}
        if optimizer is not None:
            params = [p for group in optimizer.param_groups for p in group["params"]]
            tensors = {".".join(str(part) for part in path): torch.zeros_like(params[index])
                       for path, index in sharded["layout"]}
            state["optimizer"] = tensors
        folder = checkpoints / sharded["folder"]
        try:
            dcp.load(state, checkpoint_id=str(folder))
        except (Exception, CheckpointException) as error:  # DCP gathers every process's failure: all raise it
            failure = sharded_read_error(folder, error)
            failure.otmdr_from_rank0 = True  # type: ignore[attr-defined]  # rank 0 reports it for all
            raise failure from None
        model.load_state_dict(model_state)
        if optimizer is not None:
            optimizer.load_state_dict(join_optimizer_state(checkpoint["optimizer"], tensors, sharded["layout"]))


class _MemberLogits(nn.Module):
    """``forward`` = the ensemble's ``member_logits``: DDP only synchronises what runs through
    its own forward."""

    def __init__(self, ensemble: nn.Module):
        super().__init__()
        self.ensemble = ensemble

    def forward(self, x: Tensor) -> Tensor:
        member_logits: Callable[[Tensor], Tensor] = self.ensemble.member_logits  # type: ignore[assignment]
        return member_logits(x)


def _fsync_directory(folder: Path) -> None:
    import os

    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. a platform without directory descriptors
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def _rank_seed(seed: int, rank: int) -> int:
    """A process's own seed in a distributed run; reproducible, and different on every rank."""
    from ..data.loader import derive_seed

    return derive_seed(seed, rank, 0x0DD9) & 0x7FFF_FFFF_FFFF


def current_strategy() -> SingleProcess:
    """The strategy of this process's launch (:func:`otmdr.train.distributed.init` ran), before
    a run's config is known: what every strategy shares (rank, file-system work)."""
    context = distributed.current()
    return DataParallel(context) if context.enabled else SingleProcess()


def strategy_for(cfg: ExperimentConfig) -> SingleProcess:
    """The strategy of this launch for the run ``cfg``: ``train.strategy`` under torchrun."""
    context = distributed.current()
    if cfg.train.strategy == "fsdp":
        if not context.enabled and not distributed.torchrun_launched():
            raise ConfigError("config key train.strategy: fsdp shards the model over the processes of a torchrun "
                              "launch, and this is one process without torchrun: launch it with torchrun "
                              "--nproc_per_node N -m otmdr ... (docs/distributed.md), or set train.strategy=ddp")
        return FullyShard(context)
    return DataParallel(context) if context.enabled else SingleProcess()
