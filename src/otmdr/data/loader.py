"""Splitting and an in-memory batch loader that lives on the training device."""

from __future__ import annotations

import hashlib
import math
import warnings
from collections.abc import Iterator

import torch

from ._types import DatasetSpec, ImageData
from .transforms import Augment, to_float

__all__ = ["train_val_split", "test_subset", "subset", "BatchLoader", "derive_seed"]


def train_val_split(n: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Disjoint, covering ``(train_indices, val_indices)`` of ``range(n)``, each sorted, from a
    seeded permutation: the same ``(n, val_fraction, seed)`` always gives the same split. The
    validation part has ``round(n * val_fraction)`` indices (at least 1 when the fraction is
    positive, and never all of them)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_val = int(round(n * val_fraction))
    if val_fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    return perm[n_val:].sort().values, perm[:n_val].sort().values


def test_subset(data: ImageData, size: int | None) -> ImageData:
    """A fixed subset of ``size`` test images (all of them when ``size`` is None or too large).

    The indices are a seeded random choice, sorted, independent of any run's seed: every model
    is evaluated on the same images, and a split stored in class order (image folders) still
    gives a subset with every class, which "the first N" would not.
    """
    if size is None or size >= len(data):
        return data
    if size < 1:
        raise ValueError(f"test subset size must be >= 1, got {size}")
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(20_231_210))
    return subset(data, order[:size].sort().values)


def subset(data: ImageData, indices: torch.Tensor) -> ImageData:
    """The samples of ``data`` at ``indices`` (a copy), with the same class list."""
    indices = torch.as_tensor(indices, dtype=torch.long).to(data.images.device)
    return ImageData(data.images[indices], data.labels[indices.to(data.labels.device)], list(data.classes))


def derive_seed(*values: int) -> int:
    """A 63-bit seed that depends on every value (a run's seed, an epoch, a batch, a rank...):
    independent streams from one seed, the same on every machine. Shared with the training loop,
    whose per-rank seeds must not collide with the loader's."""
    digest = hashlib.blake2b(",".join(map(str, values)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class BatchLoader:
    """Iterate ``(x, y)`` batches of an in-memory split: ``x`` float32 normalised (and augmented
    when ``augment`` is given), ``y`` int64, both on ``device``.

    The uint8 images are moved to ``device`` once, here; each batch is indexed, scaled and
    augmented there. Randomness comes from one ``torch.Generator`` on ``device``, re-seeded from
    ``(seed, epoch)`` for the shuffle and from ``(seed, epoch, batch)`` for each batch's
    augmentation, so any position can be reproduced: ``state_dict()`` records the epoch and the
    number of batches already handed out, and ``load_state_dict()`` makes the next iteration
    continue from exactly there, with the same batches (on the same kind of device).

    Each ``iter()`` runs one epoch. An epoch left unfinished (``break``) is not resumed by the
    next ``iter()``, which starts the next epoch, as with ``torch.utils.data.DataLoader``; only
    ``load_state_dict`` resumes mid-epoch.

    ``shard=(rank, world_size)`` (distributed training): ``batch_size`` stays the global batch,
    every process computes the same order and yields its strided part of each batch (samples
    ``rank, rank + world_size, ...``); the augmentation of that part is seeded from
    ``(seed, epoch, batch, rank)``, so ranks draw different crops and the run stays reproducible.
    """

    def __init__(self, data: ImageData, spec: DatasetSpec, batch_size: int, *, shuffle: bool,
                 device: torch.device | str = "cpu", augment: Augment | None = None, drop_last: bool = False,
                 seed: int = 0, shard: tuple[int, int] | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.images = data.images.to(self.device)
        self.labels = data.labels.to(self.device)
        self.classes = list(data.classes)
        self.spec = spec
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.augment = augment
        self.drop_last = bool(drop_last)
        self.seed = int(seed)
        self.shard = None if shard is None or shard[1] <= 1 else (int(shard[0]), int(shard[1]))
        self.generator = torch.Generator(device=self.device)
        self._epoch = 0  # the epoch in progress, or the next one to run
        self._batch = 0  # batches of that epoch already handed out
        self._resume = False

    @property
    def num_samples(self) -> int:
        return int(self.labels.shape[0])

    @property
    def epoch(self) -> int:
        """The epoch the next (or current) iteration runs."""
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration run ``epoch`` from its start."""
        self._epoch, self._batch, self._resume = int(epoch), 0, False

    def __len__(self) -> int:
        n = self.num_samples
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def _order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.num_samples, device=self.device)
        self.generator.manual_seed(derive_seed(self.seed, epoch))
        return torch.randperm(self.num_samples, generator=self.generator, device=self.device)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch, start = self._epoch, self._batch
        if start and not self._resume:  # the previous iteration stopped early: start a new epoch
            epoch, start = epoch + 1, 0
        self._resume = False
        self._epoch, self._batch = epoch, start
        return self._run(epoch, start)

    def _run(self, epoch: int, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self._order(epoch)
        bs = self.batch_size
        for b in range(start, len(self)):
            idx = order[b * bs:(b + 1) * bs]
            if self.shard is not None:
                idx = idx[self.shard[0]::self.shard[1]]
            x = to_float(self.images[idx], self.spec)
            if self.augment is not None and self.augment.active:
                self.generator.manual_seed(derive_seed(self.seed, epoch, b) if self.shard is None
                                           else derive_seed(self.seed, epoch, b, self.shard[0]))
                x = self.augment(x, self.generator)
            self._batch = b + 1
            yield x, self.labels[idx]
        self._epoch, self._batch = epoch + 1, 0

    def state_dict(self) -> dict:
        """Plain ints and bools: ``seed``, ``epoch`` and ``batch`` fix the generator's state at
        every draw (it is re-seeded from them), the rest are checked on load."""
        return {
            "epoch": self._epoch,
            "batch": self._batch,
            "seed": self.seed,
            "num_samples": self.num_samples,
            "batch_size": self.batch_size,
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
        }

    def load_state_dict(self, d: dict) -> None:
        for key in ("num_samples", "batch_size", "shuffle", "drop_last"):
            if key in d and d[key] != getattr(self, key):
                warnings.warn(f"BatchLoader.load_state_dict: {key} was {d[key]}, now {getattr(self, key)}; "
                              "the resumed batches will not match the original run", stacklevel=2)
        self.seed = int(d.get("seed", self.seed))
        self._epoch = int(d["epoch"])
        self._batch = min(int(d.get("batch", 0)), len(self))
        self._resume = self._batch > 0
