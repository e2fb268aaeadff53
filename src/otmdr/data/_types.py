"""The data package's value types and its one error type."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["DatasetError", "DatasetSpec", "ImageData"]


class DatasetError(Exception):
    """A dataset cannot be read. The message alone says which path, what was expected there and
    how to get it; callers (the CLI) print it without a traceback."""


@dataclass(frozen=True)
class DatasetSpec:
    """What a dataset is: enough to build a model for it and to normalise its pixels.

    ``mean``/``std`` are per channel on [0, 1]-scaled pixels (a single value is broadcast over
    the channels). For ``imagefolder`` the shape fields are 0 until known: use
    :func:`otmdr.data.resolve_spec` with the loaded data.
    """

    name: str
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    layout: str  # human description of the expected files under the data dir
    how_to_get: str  # where users obtain it (nothing is downloaded by this package)
    needs_root: bool  # False only for digits


@dataclass
class ImageData:
    """One split held in memory: uint8 images (N, C, H, W), int64 labels (N,), class names."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.dtype != torch.int64 or self.labels.shape != (self.images.shape[0],):
            raise ValueError(
                f"labels must be int64 of shape ({self.images.shape[0]},), got {self.labels.dtype} "
                f"{tuple(self.labels.shape)}"
            )

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def to(self, device: torch.device | str) -> ImageData:
        """The same split with both tensors on ``device`` (no copy when already there)."""
        return ImageData(self.images.to(device), self.labels.to(device), list(self.classes))
