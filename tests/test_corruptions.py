"""Tests for the CIFAR-10-C style common corruptions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from otmdr.data.corruptions import CORRUPTIONS, corrupt


def _structured(n: int, size: int, channels: int, seed: int) -> np.ndarray:
    """Smooth gradients plus a bright rectangle and a dark disk, uint8 (N, H, W, C), mid-range values."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
    out = np.empty((n, size, size, channels))
    for i in range(n):
        for ch in range(channels):
            a, b = rng.uniform(-0.3, 0.3, 2)
            img = 0.45 + a * (xx - 0.5) + b * (yy - 0.5)
            y0, x0 = rng.integers(2, size // 2, 2)
            img[y0 : y0 + size // 3, x0 : x0 + size // 4] += 0.25
            cy, cx = rng.uniform(size * 0.3, size * 0.7, 2)
            img[(yy * (size - 1) - cy) ** 2 + (xx * (size - 1) - cx) ** 2 < (size / 6) ** 2] -= 0.25
            out[i, ..., ch] = img
    return np.clip(np.rint(out * 255), 0, 255).astype(np.uint8)


RGB = _structured(8, 32, 3, 0)
GRAY = _structured(4, 28, 1, 1)


def _checkerboard(n: int, size: int, channels: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size]
    board = (60 + 140 * ((yy + xx) % 2)).astype(np.uint8)
    return np.ascontiguousarray(np.broadcast_to(board[None, ..., None], (n, size, size, channels)))


# Images on which the severity ordering is checked, where the structured images do not work:
# - glass_blur: severities 1-3 share one pixel-shuffle pass and only raise the blur sigma
#   (0.05 -> 0.4), and blurring *smooths away* shuffle errors on smooth images, so the change
#   falls from 1 to 3 there. On a pixel checkerboard the blur itself is the dominant change and
#   the paper's ordering holds.
# - frost: severities 3 -> 4 -> 5 lower the image weight (0.9 -> 0.85 -> 0.75) at a fixed or
#   barely larger frost weight, which *shrinks* |change| wherever frost brightens the image, i.e.
#   almost everywhere on mid-grey images. On dark images the frost weight dominates.
MONOTONE_IMAGES = {
    "glass_blur": (_checkerboard(8, 32, 3), _checkerboard(4, 28, 1)),
    "frost": ((RGB * 0.05).astype(np.uint8), (GRAY * 0.05).astype(np.uint8)),
}


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_shape_dtype_change_and_determinism(name: str) -> None:
    for images in (RGB, GRAY):
        out = corrupt(images, name, 1, seed=3)
        assert out.shape == images.shape and out.dtype == np.uint8
        assert not np.array_equal(out, images)
        np.testing.assert_array_equal(out, corrupt(images, name, 1, seed=3))
    # channels-first torch input, grayscale
    t = torch.from_numpy(GRAY).permute(0, 3, 1, 2).contiguous()
    out_t = corrupt(t, name, 2, seed=1)
    assert isinstance(out_t, torch.Tensor) and out_t.dtype == torch.uint8 and out_t.shape == t.shape
    np.testing.assert_array_equal(out_t.permute(0, 2, 3, 1).numpy(), corrupt(GRAY, name, 2, seed=1))


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_severity_monotone(name: str) -> None:
    # Mean absolute change vs the clean image, averaged over the batch, must not decrease with
    # severity (0.5 intensity levels of slack: the randomness differs between severities).
    for images in MONOTONE_IMAGES.get(name, (RGB, GRAY)):
        x = images.astype(np.float64)
        change = [np.abs(corrupt(images, name, s, seed=0).astype(np.float64) - x).mean() for s in range(1, 6)]
        if name == "elastic_transform":
            # Genuinely not increasing with the published CIFAR-10-C constants (ours are the same
            # (alpha, sigma, affine) tuples as the generation code of Hendrycks & Dietterich): the affine
            # jitter falls from 2.56 to 0.96 px while the smoothed field stays below ~0.5 px rms, so the
            # change *falls* with severity on every image type we tried (smooth, noise, checkerboard,
            # sinusoid). Check that by-construction ordering instead, and that every severity changes
            # the image.
            assert min(change) > 1.0, change
            assert all(b <= a + 0.5 for a, b in zip(change, change[1:])), (name, images.shape, change)
        else:
            assert all(b >= a - 0.5 for a, b in zip(change, change[1:])), (name, images.shape, change)
    assert change[-1] > change[0] or name == "elastic_transform", change


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="gaussian_noise"):
        corrupt(RGB, "not_a_corruption", 1)
    for severity in (0, 6):
        with pytest.raises(ValueError, match="1, 2, 3, 4, 5"):
            corrupt(RGB, "fog", severity)
