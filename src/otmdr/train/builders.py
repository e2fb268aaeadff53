"""Turn a validated config into the objects of a run: device, data, model, optimizer, schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import ConfigError, ExperimentConfig, efficiency_options, otmdr_options, resolve_factory
from ..data import (Augment, BatchLoader, DatasetSpec, ImageData, dataset_from_factory, get_spec,
                    load_split, registered_loader, resolve_spec, subset, test_subset, train_val_split)
from ..data.noise import noisy_labels
from ..models import create_model, model_from_factory
from ..optim import ASAM, OTMDR, SAM, PerturbationConfig
from ..optim.config import sam_equivalent

__all__ = ["select_device", "RunData", "build_data", "build_model", "build_optimizer", "build_scheduler"]

BASES: dict[str, type[torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW,
}


def select_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device {name!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name} but CUDA is not available here: use train.device=cpu or auto "
                          "(--device cpu for eval)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device {name} does not exist here ({torch.cuda.device_count()} CUDA device(s))")
    return device


@dataclass
class RunData:
    spec: DatasetSpec
    train: BatchLoader
    val: BatchLoader | None
    test: BatchLoader
    classes: list[str]
    #: realised label noise: fraction of wrong labels in the training (and validation) split
    label_noise: dict[str, Any] | None = None


def build_data(cfg: ExperimentConfig, device: torch.device, shard: tuple[int, int] | None = None) -> RunData:
    """The run's splits as loaders; ``shard=(rank, world_size)`` gives this process its part of
    every global training batch (validation and test are never sharded: every process
    evaluates the whole split, see docs/distributed.md)."""
    d = cfg.data
    given_val: ImageData | None = None
    plugin = registered_loader(d.name) if d.factory is None else None
    if d.factory is not None or plugin is not None:  # the user's own splits (docs/your-model.md), checked
        factory = plugin or resolve_factory("data.factory", d.factory or "")
        spec, full, given_val, test = dataset_from_factory(factory(**d.options), d.factory or d.name)
    else:
        spec = get_spec(d.name)
        full = load_split(d.name, "train", d.dir, cache_dir=d.cache_dir)
        test = load_split(d.name, "test", d.dir, cache_dir=d.cache_dir)
        spec = resolve_spec(spec, full)  # image folders: classes, channels and size come from the data
    seed = cfg.train.seed
    clean = full.labels
    noisy = clean
    if d.label_noise > 0:  # drawn over the whole file, before any subset: independent of train.seed
        noisy = noisy_labels(clean, d.label_noise, d.label_noise_kind, spec.num_classes, d.label_noise_seed)
    kept = torch.arange(len(clean))
    if d.train_limit is not None and d.train_limit < len(clean):
        order = torch.randperm(len(clean), generator=torch.Generator().manual_seed(10_000 + seed))
        kept = order[: d.train_limit]
    test = test_subset(test, d.test_limit)
    val = val_clean = None
    if given_val is not None:  # the factory's own validation split: nothing is held out of train
        train_idx, val_clean = kept, given_val.labels
        val_labels = val_clean
        if d.noisy_val and d.label_noise > 0:  # its own draw (another seed): the split is another file
            val_labels = noisy_labels(val_clean, d.label_noise, d.label_noise_kind, spec.num_classes,
                                      d.label_noise_seed + 1)
        val = _with_labels(given_val, val_labels)
    elif d.val_fraction > 0:
        train_idx, val_idx = train_val_split(len(kept), d.val_fraction, seed)
        train_idx, val_idx = kept[train_idx], kept[val_idx]
        val_clean = clean[val_idx]
        val = _with_labels(subset(full, val_idx), (noisy if d.noisy_val else clean)[val_idx])
    else:
        train_idx = kept
    train = _with_labels(subset(full, train_idx), noisy[train_idx])
    noise = None
    if d.label_noise > 0:
        noise = {"rate": d.label_noise, "kind": d.label_noise_kind, "seed": d.label_noise_seed,
                 "train_noisy_fraction": float((noisy[train_idx] != clean[train_idx]).float().mean()),
                 "val_noisy_fraction": None if val is None or val_clean is None else float(
                     (val.labels != val_clean.to(val.labels.device)).float().mean())}
    augment = None
    if d.crop_padding or d.flip or d.cutout:
        augment = Augment(crop_padding=d.crop_padding, flip=d.flip, cutout=d.cutout)

    def loader(data: ImageData, training: bool) -> BatchLoader:
        return BatchLoader(data, spec, d.batch_size if training else d.eval_batch_size, shuffle=training,
                           device=device, augment=augment if training else None, seed=seed,
                           shard=shard if training else None)

    return RunData(spec, loader(train, True), None if val is None else loader(val, False), loader(test, False),
                   full.classes, noise)


def _with_labels(data: ImageData, labels: torch.Tensor) -> ImageData:
    return ImageData(data.images, labels.to(data.labels.device), data.classes)


def build_model(cfg: ExperimentConfig, spec: DatasetSpec) -> nn.Module:
    options = dict(cfg.model.options)
    if cfg.model.factory is not None:  # the user's own builder (docs/your-model.md), its result checked
        factory = resolve_factory("model.factory", cfg.model.factory)
        try:
            return model_from_factory(factory, cfg.model.factory, num_classes=spec.num_classes,
                                      in_channels=spec.in_channels, image_size=spec.image_size, options=options)
        except (TypeError, ValueError) as error:
            raise ConfigError(f"config key model.factory: {error}") from None
    name = cfg.model.name.lower().replace("_", "-")
    # flattening models need the image size, and ViTs (their grid of position embeddings)
    if name.split("-x")[0] in ("mlp", "bayes-mlp") or name.startswith("vit-"):
        options.setdefault("input_size", spec.image_size)
    try:
        return create_model(cfg.model.name, num_classes=spec.num_classes, in_channels=spec.in_channels, **options)
    except TypeError as error:  # an option the builder does not take
        raise ConfigError(f"config key model.options: {cfg.model.name} does not accept {options}: {error}") from None


def _base_kwargs(cfg: ExperimentConfig) -> dict[str, Any]:
    o = cfg.optim
    if o.base == "sgd":
        return {"lr": o.lr, "momentum": o.momentum, "nesterov": o.nesterov, "weight_decay": o.weight_decay}
    return {"lr": o.lr, "weight_decay": o.weight_decay}


def param_groups(cfg: ExperimentConfig, model: nn.Module) -> list[dict[str, Any]]:
    """Bayesian models: the means are perturbed, the scales (sigma) only trained. Ensembles in
    the per-member regime: one perturbation norm per member. Otherwise one group."""
    from ..models.bayes import bayes_param_groups, is_bayesian
    from ..models.ensemble import Ensemble, member_param_groups

    if is_bayesian(model):
        return bayes_param_groups(model, {"in_norm": True} if cfg.bayes.sigma_in_norm else None)
    if isinstance(model, Ensemble) and cfg.ensemble.regime == "per-member":
        return member_param_groups(model)
    return [{"params": list(model.parameters())}]


def build_optimizer(cfg: ExperimentConfig, model: nn.Module, *, wrapper: nn.Module | None = None,
                    seed: int | None = None) -> torch.optim.Optimizer:
    """SGD/Adam/AdamW itself for ``method: sgd``; otherwise SAM/ASAM/OT-MDR around that base.

    ``wrapper`` (a DistributedDataParallel around ``model``) is the module the optimizer runs its
    passes through: its ``no_sync()`` keeps the ascent passes local unless ``sync_ascent``.
    ``seed`` replaces ``train.seed`` for the optimizer's own generator (a per-process seed)."""
    o, base, kwargs = cfg.optim, BASES[cfg.optim.base], _base_kwargs(cfg)
    groups = param_groups(cfg, model)
    if o.method == "sgd":
        return base([{k: v for k, v in g.items() if k in ("params",)} for g in groups], **kwargs)
    common: dict[str, Any] = {"max_grad_norm": o.max_grad_norm, "seed": cfg.train.seed if seed is None else seed,
              "model": model if wrapper is None else wrapper,
              **efficiency_options(cfg.efficiency)}  # every sharpness-aware method's (SAM, ASAM, OT-MDR)
    if o.method == "sam":
        return SAM(groups, base, rho=cfg.sam.rho, bn_policy=cfg.sam.bn_policy, sync_ascent=cfg.sam.sync_ascent,
                   **common, **kwargs)
    if o.method == "asam":
        return ASAM(groups, base, rho=cfg.asam.rho, adaptive_eta=cfg.asam.adaptive_eta, bn_policy=cfg.asam.bn_policy,
                    sync_ascent=cfg.asam.sync_ascent, **common, **kwargs)
    options = otmdr_options(cfg.otmdr)
    same = sam_equivalent(PerturbationConfig(**options))
    if same is not None:  # a run saved before one-step OT-MDR was refused: it ran SAM (ASAM), so build that
        return SAM(groups, base, rho=options["rho"][0], adaptive=options["adaptive"],
                   adaptive_eta=options["adaptive_eta"], bn_policy=options["bn_policy"],
                   sync_ascent=options["sync_ascent"], **common, **kwargs)
    return OTMDR(groups, base, **options, **common, **kwargs)


def build_scheduler(cfg: ExperimentConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    """A per-step LambdaLR: linear warm-up, then cosine to 0, step decay, or constant."""
    s = cfg.schedule
    total = cfg.train.epochs * steps_per_epoch
    warmup = int(round(s.warmup_epochs * steps_per_epoch))
    milestones = sorted(int(round(m * steps_per_epoch)) for m in s.milestones)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if s.name == "cosine":
            progress = (step - warmup) / max(1, total - warmup)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        if s.name == "step":
            return s.gamma ** sum(step >= m for m in milestones)
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


