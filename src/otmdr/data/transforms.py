"""Pixel scaling and batched augmentation on the training device.

Everything here works on a whole batch at once with tensor ops (no Python loop over samples)
and draws its randomness from a caller-given ``torch.Generator`` on the batch's device, so the
same generator state gives the same output.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ._types import DatasetSpec

__all__ = ["Augment", "to_float"]


@functools.lru_cache(maxsize=64)
def _stats(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    m = torch.tensor(mean, dtype=torch.float32, device=device).view(-1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=device).view(-1, 1, 1)
    return m, s


def to_float(images_uint8: torch.Tensor, spec: DatasetSpec, device: torch.device | str | None = None) -> torch.Tensor:
    """uint8 images (..., C, H, W) -> float32 ``(x / 255 - mean) / std`` on ``device``."""
    if images_uint8.dtype != torch.uint8:
        raise TypeError(f"to_float expects uint8 images, got {images_uint8.dtype}")
    x = images_uint8.to(device) if device is not None else images_uint8
    channels = x.shape[-3]
    for what, values in (("mean", spec.mean), ("std", spec.std)):
        if len(values) not in (1, channels):
            raise ValueError(f"dataset '{spec.name}': {len(values)} {what} values for {channels}-channel images")
    mean, std = _stats(tuple(spec.mean), tuple(spec.std), x.device)
    return x.float().div_(255.0).sub_(mean).div_(std)


class Augment:
    """Random crop with zero padding, horizontal flip and cutout, per sample, on a batch.

    ``crop_padding=p``: pad by ``p`` zeros on each side and take a random H x W window, i.e.
    shift the content by -p..p pixels in each direction. ``flip``: mirror left-right with
    probability 1/2. ``cutout=s``: zero an s x s square (clipped at the border) at a uniformly
    random centre. On normalised inputs the zeros are the dataset's mean colour. The order is
    flip, crop, cutout. All randomness comes from ``generator``, which must be on ``x``'s device.
    """

    def __init__(self, crop_padding: int = 0, flip: bool = False, cutout: int = 0):
        if crop_padding < 0 or cutout < 0:
            raise ValueError("crop_padding and cutout must be >= 0")
        self.crop_padding = int(crop_padding)
        self.flip = bool(flip)
        self.cutout = int(cutout)

    def __repr__(self) -> str:
        return f"Augment(crop_padding={self.crop_padding}, flip={self.flip}, cutout={self.cutout})"

    @property
    def active(self) -> bool:
        return bool(self.crop_padding or self.flip or self.cutout)

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"Augment expects a batch (N, C, H, W), got shape {tuple(x.shape)}")
        if generator.device.type != x.device.type:
            raise ValueError(f"the generator is on {generator.device} but the batch is on {x.device}; "
                             "create the generator on the batch's device")
        if x.shape[0] == 0 or not self.active:
            return x
        if self.flip:
            x = self._flip(x, generator)
        if self.crop_padding:
            x = self._crop(x, generator)
        if self.cutout:
            x = self._cutout(x, generator)
        return x

    @staticmethod
    def _flip(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        mask = torch.rand(x.shape[0], generator=g, device=x.device) < 0.5
        return torch.where(mask.view(-1, 1, 1, 1), x.flip(3), x)

    def _crop(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        n, c, h, w = x.shape
        p = self.crop_padding
        padded = F.pad(x, (p, p, p, p))  # zeros
        offsets = torch.randint(0, 2 * p + 1, (2, n), generator=g, device=x.device)
        rows = offsets[0].view(n, 1) + torch.arange(h, device=x.device)  # (n, h) rows of the padded image
        cols = offsets[1].view(n, 1) + torch.arange(w, device=x.device)  # (n, w)
        out = padded.gather(2, rows.view(n, 1, h, 1).expand(n, c, h, w + 2 * p))
        return out.gather(3, cols.view(n, 1, 1, w).expand(n, c, h, w))

    def _cutout(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        n, _, h, w = x.shape
        s = self.cutout
        cy = torch.randint(0, h, (n, 1), generator=g, device=x.device)
        cx = torch.randint(0, w, (n, 1), generator=g, device=x.device)
        ys = torch.arange(h, device=x.device) - (cy - s // 2)  # position inside the square, per row
        xs = torch.arange(w, device=x.device) - (cx - s // 2)
        inside = ((ys >= 0) & (ys < s)).view(n, h, 1) & ((xs >= 0) & (xs < s)).view(n, 1, w)
        return x.masked_fill(inside.unsqueeze(1), 0)
