"""The 19 CIFAR-10-C corruptions (Hendrycks & Dietterich, ICLR 2019) at severities 1..5.

Each corruption follows the published generator (``make_cifar_c.py`` of hendrycks/robustness)
step by step: the CIFAR-10 constants per severity, the same operations in the same order, axes,
interpolation and boundary modes, the same random draws per image (in the same order, so that a
generator with the reference's stream reproduces its images), and its final conversion to uint8
(``np.uint8`` of the clipped float image: truncation, not rounding). The library calls it makes
(scikit-image, OpenCV, ImageMagick) are rebuilt on numpy and scipy in :mod:`otmdr.data._imaging`.
``frost`` blends the generator's own frost photographs, shipped in ``otmdr/assets/frost`` (the
repository's ``assets/frost``; Apache-2.0, with their LICENSE and NOTICE; ``$OTMDR_FROST_DIR``
names another folder holding them, see :func:`frost_photo_dir`); a procedural ice texture stands in
only when they are missing.
docs/corruptions.md lists, per corruption, whether it is identical to the reference, with the
measured difference: all but ``elastic_transform`` (0.12-0.18 levels on average, OpenCV 5's warp)
are identical value for value.

``CORRUPTIONS`` are the 19 of the published CIFAR-10-C; ``BENCHMARK_CORRUPTIONS`` the 15 of the
main benchmark (the mCE of most papers), also selected by ``--corruptions benchmark``.

The constants are those of the 32x32 images and are applied unchanged (in pixels) to images of
other sizes; grayscale images go through the colour-only corruptions (brightness, saturate, snow,
spatter, frost) as grey RGB and come back as their luma.
"""

from __future__ import annotations

import functools
import io
import os
import warnings
import zlib
from importlib import resources
from pathlib import Path
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from . import _imaging as im
from ._types import DatasetError

__all__ = ["CORRUPTIONS", "BENCHMARK_CORRUPTIONS", "EXTRA_CORRUPTIONS", "SEVERITY_CONSTANTS", "FROST_DIR_ENV",
           "corrupt", "frost_photo_dir"]

BENCHMARK_CORRUPTIONS: tuple[str, ...] = (
    "gaussian_noise", "shot_noise", "impulse_noise",
    "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog", "brightness", "contrast",
    "elastic_transform", "pixelate", "jpeg_compression",
)  # fmt: skip
EXTRA_CORRUPTIONS: tuple[str, ...] = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
CORRUPTIONS: tuple[str, ...] = BENCHMARK_CORRUPTIONS + EXTRA_CORRUPTIONS

_IMSIZE = 32
# Severities 1..5 of the CIFAR-10 generation (make_cifar_c.py), not ImageNet-C's table.
SEVERITY_CONSTANTS: dict[str, list] = {
    "gaussian_noise": [0.04, 0.06, 0.08, 0.09, 0.10],  # std of additive noise (x in [0, 1])
    "shot_noise": [500, 250, 100, 75, 50],  # Poisson rate scale
    "impulse_noise": [0.01, 0.02, 0.03, 0.05, 0.07],  # salt-and-pepper amount
    "defocus_blur": [(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)],  # (disk radius, alias blur)
    "glass_blur": [(0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)],  # (sigma, delta, iterations)
    "motion_blur": [(6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)],  # ImageMagick (radius, sigma)
    "zoom_blur": [np.arange(1, 1.06, 0.01), np.arange(1, 1.11, 0.01), np.arange(1, 1.16, 0.01),
                  np.arange(1, 1.21, 0.01), np.arange(1, 1.26, 0.01)],  # zoom factors averaged
    "snow": [(0.1, 0.2, 1, 0.6, 8, 3, 0.95), (0.1, 0.2, 1, 0.5, 10, 4, 0.9), (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
             (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85), (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8)],
    # (loc, scale, zoom, threshold, blur radius, blur sigma, image weight)
    "frost": [(1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)],  # (image weight, frost weight)
    "fog": [(0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)],  # (strength, plasma decay)
    "brightness": [0.05, 0.1, 0.15, 0.2, 0.3],  # added to HSV value
    "contrast": [0.75, 0.5, 0.4, 0.3, 0.15],  # factor about each channel's mean
    "elastic_transform": [(_IMSIZE * 0, _IMSIZE * 0, _IMSIZE * 0.08),
                          (_IMSIZE * 0.05, _IMSIZE * 0.2, _IMSIZE * 0.07),
                          (_IMSIZE * 0.08, _IMSIZE * 0.06, _IMSIZE * 0.06),
                          (_IMSIZE * 0.1, _IMSIZE * 0.04, _IMSIZE * 0.05),
                          (_IMSIZE * 0.1, _IMSIZE * 0.03, _IMSIZE * 0.03)],
    # (alpha, sigma, affine jitter) in pixels: severity 1 is a pure affine jitter of up to 2.56 px and
    # the jitter shrinks as the elastic field grows, so the change *falls* with severity (as published)
    "pixelate": [0.95, 0.9, 0.85, 0.75, 0.65],  # downscale ratio
    "jpeg_compression": [80, 65, 58, 50, 40],  # JPEG quality
    "speckle_noise": [0.06, 0.1, 0.12, 0.16, 0.2],  # std of multiplicative noise
    "gaussian_blur": [0.4, 0.6, 0.7, 0.8, 1],  # sigma
    "spatter": [(0.62, 0.1, 0.7, 0.7, 0.5, 0), (0.65, 0.1, 0.8, 0.7, 0.5, 0), (0.65, 0.3, 1, 0.69, 0.5, 0),
                (0.65, 0.1, 0.7, 0.69, 0.6, 1), (0.65, 0.1, 0.5, 0.68, 0.6, 1)],
    # (loc, scale, sigma, threshold, intensity, mud): water drops for severities 1-3, mud for 4-5
    "saturate": [(0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2)],  # HSV saturation * a + b
}  # fmt: skip

# Each corruption takes one uint8 image (H, W, C), its severity constant and the random source,
# draws what the reference draws for that image in the same order, and returns what the
# reference's function returns (a float image in [0, 255], or uint8).
Op = Callable[[np.ndarray, Any, Any], np.ndarray]


def _gaussian_noise(img, c, rng):
    x = img / 255.0
    return np.clip(x + rng.normal(size=x.shape, scale=c), 0, 1) * 255


def _shot_noise(img, c, rng):
    x = img / 255.0
    return np.clip(rng.poisson(x * c) / c, 0, 1) * 255


def _impulse_noise(img, c, rng):
    # skimage.util.random_noise(mode='s&p', amount=c) as of 2018: each value is hit with
    # probability c (one uniform draw per value), then salt or pepper with probability 1/2 (another)
    x = img / 255.0
    flipped = rng.random(x.shape) < c
    salted = rng.random(x.shape) < 0.5
    out = x.copy()
    out[flipped & salted] = 1.0
    out[flipped & ~salted] = 0.0
    return np.clip(out, 0, 1) * 255


def _speckle_noise(img, c, rng):
    x = img / 255.0
    return np.clip(x + x * rng.normal(size=x.shape, scale=c), 0, 1) * 255


def _gaussian_blur(img, c, rng):
    return np.clip(im.sk_gaussian(img / 255.0, c, channel_axis=True), 0, 1) * 255


def _glass_blur(img, c, rng):
    sigma, delta, iterations = c
    x = (im.sk_gaussian(img / 255.0, sigma, channel_axis=True) * 255).astype(np.uint8)
    h, w = x.shape[:2]
    rows, cols = np.arange(h - delta, delta, -1), np.arange(w - delta, delta, -1)
    for _ in range(iterations):
        # The reference sweeps from the bottom-right drawing (dx, dy) in [-delta, delta) per pixel
        # and "swaps" with x[h, w], x[h', w'] = x[h', w'], x[h, w]. The right-hand side holds numpy
        # *views*, so the first assignment copies (h', w') into (h, w) and the second writes that
        # copy back: a copy, not a swap. With delta 1 the source lies up/left, not yet visited.
        d = rng.integers(-delta, delta, size=(len(rows), len(cols), 2))
        if delta == 1:
            src = x.copy()
            x[rows[:, None], cols[None, :]] = src[rows[:, None] + d[..., 1], cols[None, :] + d[..., 0]]
        else:  # later pixels may read earlier copies: sweep as the reference does
            for a, i in enumerate(rows):
                for b, j in enumerate(cols):
                    x[i, j] = x[i + d[a, b, 1], j + d[a, b, 0]]
    return np.clip(im.sk_gaussian(x / 255.0, sigma, channel_axis=True), 0, 1) * 255


def _defocus_blur(img, c, rng):
    x = img / 255.0
    kernel = im.disk_kernel(c[0], c[1])
    out = np.stack([im.filter2d(x[..., d], kernel) for d in range(x.shape[-1])], axis=-1)
    return np.clip(out, 0, 1) * 255


def _motion_blur(img, c, rng):
    return im.motion_blur_im(img, c[0], c[1], rng.uniform(-45, 45))


def _zoom_blur(img, c, rng):
    x = (img / 255.0).astype(np.float32)
    out = np.zeros_like(x)
    for zoom in c:
        out += im.clipped_zoom(x, zoom)
    return np.clip((x + out) / (len(c) + 1), 0, 1) * 255


def _snow(img, c, rng):
    x = np.array(img, dtype=np.float32) / 255.0
    h, w = x.shape[:2]
    layer = rng.normal(size=(h, w), loc=c[0], scale=c[1])
    layer = im.clipped_zoom(layer[..., None], c[2])
    layer[layer < c[3]] = 0
    layer8 = (np.clip(layer.squeeze(-1), 0, 1) * 255).astype(np.uint8)
    streaks = im.motion_blur_im(layer8[..., None], c[4], c[5], rng.uniform(-135, -45)) / 255.0
    x = c[6] * x + (1 - c[6]) * np.maximum(x, im.rgb2gray_cv(x).reshape(h, w, 1) * 1.5 + 0.5)
    return np.clip(x + streaks + np.rot90(streaks, k=2), 0, 1) * 255


# ------------------------------------------------------------------------------------------ frost
FROST_DIR_ENV = "OTMDR_FROST_DIR"
FROST_FILES: tuple[str, ...] = ("frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg", "frost6.jpg")
_FROST_DRAWN = 5  # the generator draws np.random.randint(5): frost6 is never used
_FROST_SCALE = 0.2  # cv2.resize(frost, (0, 0), fx=0.2, fy=0.2) for the 32x32 images


def _shipped_frost_dir() -> Path:
    """``otmdr/assets/frost`` in an installed package (the wheel maps the repository's ``assets/``
    there); in a source checkout (editable install, ``PYTHONPATH=src``) the repository's ``assets/frost``."""
    installed = Path(str(resources.files("otmdr").joinpath("assets", "frost")))
    checkout = Path(__file__).resolve().parents[3] / "assets" / "frost"
    return installed if installed.is_dir() or not checkout.is_dir() else checkout


def frost_photo_dir() -> Path | None:
    """The folder whose frost photographs ``frost`` blends, or None for the procedural fallback.

    ``$OTMDR_FROST_DIR`` when set (it must hold frost1.png ... frost5.jpg, else a DatasetError
    names what is missing); otherwise the copies shipped in the package (``otmdr/assets/frost``,
    Apache-2.0, see the NOTICE there). Only when those are absent too (a copy of otmdr stripped of
    its package data) does ``frost`` fall back to a procedural ice texture, with a warning.
    """
    wanted = FROST_FILES[:_FROST_DRAWN]
    named = os.environ.get(FROST_DIR_ENV)
    if named:
        folder = Path(named).expanduser()
        missing = [f for f in wanted if not (folder / f).is_file()]
        if missing:
            raise DatasetError(
                f"{FROST_DIR_ENV}={named}: no {', '.join(missing)} there; it must name a folder with the CIFAR-10-C "
                f"generator's frost photographs ({', '.join(wanted)}), or be unset to use the copies shipped with otmdr"
            )
        return folder
    folder = _shipped_frost_dir()
    if all((folder / f).is_file() for f in wanted):
        return folder
    if not _FALLBACK_WARNED:
        _FALLBACK_WARNED.append(True)
        warnings.warn(
            f"frost: the frost photographs are missing from {folder} (this copy of otmdr lacks its package data); "
            f"using a procedural ice texture instead, which is NOT the CIFAR-10-C frost. Set {FROST_DIR_ENV} to a "
            "folder holding frost1.png ... frost5.jpg to use the photographs.",
            stacklevel=4,
        )
    return None


_FALLBACK_WARNED: list[bool] = []


@functools.lru_cache(maxsize=16)
def _frost_photo(folder: str, index: int) -> np.ndarray:
    """Photograph ``index`` (0-based) as the generator holds it after ``cv2.imread`` and
    ``cv2.resize(fx=0.2, fy=0.2)``, in RGB: uint8 (H, W, 3). Pillow decodes the shipped PNG and
    JPEG files to the same pixels as ``cv2.imread`` (checked in tests/test_fidelity.py)."""
    from PIL import Image

    path = Path(folder) / FROST_FILES[index]
    try:
        with Image.open(path) as photo:
            rgb = np.asarray(photo.convert("RGB"))  # the alpha of the PNGs dropped, as IMREAD_COLOR does
    except (OSError, ValueError) as exc:
        raise DatasetError(f"cannot read the frost photograph {path}: {exc}") from None
    return np.ascontiguousarray(im.resize_linear_cv(rgb, _FROST_SCALE, _FROST_SCALE))


def _frost_texture(h: int, w: int, rng) -> np.ndarray:
    """Procedural ice, (H, W, 3) in [0, 255]: the fallback when the frost photographs are missing."""
    tex = np.zeros((h, w))
    for octave, amp in ((4.0, 0.5), (2.0, 0.3), (1.0, 0.2)):  # multi-scale smoothed noise
        tex += amp * ndimage.gaussian_filter(rng.random((h, w)), octave, mode="reflect")
    tex = (tex - tex.min()) / max(np.ptp(tex), 1e-12)
    ridges = 1 - np.abs(np.sin(6 * np.pi * tex))  # crystalline veins along the level sets
    ice = np.clip(0.55 * tex + 0.45 * ridges**3, 0, 1) ** 0.8
    ice += 0.15 * (rng.random((h, w)) > 0.93)  # sparkles
    return 255 * (0.35 + 0.65 * ice[..., None] * np.array([0.85, 0.93, 1.0]))


def _frost(img, c, rng):
    h, w = img.shape[:2]
    folder = frost_photo_dir()
    if folder is None:
        return np.clip(c[0] * np.asarray(img, dtype=np.float64) + c[1] * _frost_texture(h, w, rng), 0, 255)
    # the generator: one of the first five photographs, downscaled by 0.2, a crop at a random
    # (row, column), drawn in that order, blended as c[0] * image + c[1] * frost in float64
    photo = _frost_photo(str(folder), int(rng.integers(0, _FROST_DRAWN)))
    ph, pw = photo.shape[:2]
    if ph <= h or pw <= w:  # images larger than the photograph (not CIFAR's 32x32): mirror it out
        photo = np.pad(photo, ((0, max(0, h + 1 - ph)), (0, max(0, w + 1 - pw)), (0, 0)), mode="symmetric")
    top = int(rng.integers(0, photo.shape[0] - h))
    left = int(rng.integers(0, photo.shape[1] - w))
    return np.clip(c[0] * np.asarray(img) + c[1] * photo[top:top + h, left:left + w], 0, 255)


def _fog(img, c, rng):
    x = img / 255.0
    h, w = x.shape[:2]
    max_val = x.max()
    size = max(_IMSIZE, 1 << int(np.ceil(np.log2(max(h, w)))))
    x = x + c[0] * im.plasma_fractal(rng, size, c[1])[:h, :w][..., None]
    return np.clip(x * max_val / (max_val + c[0]), 0, 1) * 255


def _brightness(img, c, rng):
    x = im.rgb2hsv(img / 255.0)
    x[..., 2] = np.clip(x[..., 2] + c, 0, 1)
    return np.clip(im.hsv2rgb(x), 0, 1) * 255


def _saturate(img, c, rng):
    x = im.rgb2hsv(img / 255.0)
    x[..., 1] = np.clip(x[..., 1] * c[0] + c[1], 0, 1)
    return np.clip(im.hsv2rgb(x), 0, 1) * 255


def _contrast(img, c, rng):
    x = img / 255.0
    means = np.mean(x, axis=(0, 1), keepdims=True)  # per channel, as the reference
    return np.clip((x - means) * c + means, 0, 1) * 255


def _elastic_transform(img, c, rng):
    image = np.array(img, dtype=np.float32) / 255.0
    shape = image.shape
    center = np.float32(shape[:2]) // 2
    square = min(shape[:2]) // 3
    pts1 = np.float32([center + square, [center[0] + square, center[1] - square], center - square])
    pts2 = pts1 + rng.uniform(-c[2], c[2], size=pts1.shape).astype(np.float32)
    image = im.warp_affine_cv(image, im.affine_from_points(pts1, pts2))
    dx = (im.sk_gaussian(rng.uniform(-1, 1, size=shape[:2]), c[1], mode="reflect", truncate=3)
          * c[0]).astype(np.float32)
    dy = (im.sk_gaussian(rng.uniform(-1, 1, size=shape[:2]), c[1], mode="reflect", truncate=3)
          * c[0]).astype(np.float32)
    xs, ys, zs = np.meshgrid(np.arange(shape[1]), np.arange(shape[0]), np.arange(shape[2]))
    coords = [np.reshape(ys + dy[..., None], (-1, 1)), np.reshape(xs + dx[..., None], (-1, 1)), np.reshape(zs, (-1, 1))]
    return np.clip(ndimage.map_coordinates(image, coords, order=1, mode="reflect").reshape(shape), 0, 1) * 255


def _pil(img: np.ndarray):
    from PIL import Image

    return Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)


def _pixelate(img, c, rng):
    from PIL import Image

    h, w = img.shape[:2]
    x = _pil(img).resize((int(w * c), int(h * c)), Image.BOX).resize((w, h), Image.BOX)
    return np.asarray(x).reshape(img.shape)


def _jpeg_compression(img, c, rng):
    from PIL import Image

    buf = io.BytesIO()
    _pil(img).save(buf, "JPEG", quality=c)
    return np.asarray(Image.open(buf)).reshape(img.shape)


def _spatter(img, c, rng):
    x = np.array(img, dtype=np.float32) / 255.0
    liquid = rng.normal(size=x.shape[:2], loc=c[0], scale=c[1])
    liquid = im.sk_gaussian(liquid, c[2])
    liquid[liquid < c[3]] = 0
    if c[5] == 0:  # water drops: edges of the liquid, a distance map, equalised and embossed
        liquid8 = (liquid * 255).astype(np.uint8)
        dist = 255 - im.canny_cv(liquid8, 50, 150)
        dist = im.distance_transform_cv(dist)
        dist = np.minimum(dist, np.float32(20))  # cv2.threshold(dist, 20, 20, THRESH_TRUNC)
        dist = im.box_blur_cv(dist).astype(np.uint8)
        dist = im.equalize_hist_cv(dist)
        dist = im.filter2d_u8(dist, np.array([[-2, -1, 0], [-1, 1, 1], [0, 1, 2]]))
        dist = im.box_blur_cv(dist).astype(np.float32)
        m = (liquid8 * dist)[..., None]  # the colour channels of cv2's GRAY2BGRA; its alpha drops out
        with np.errstate(invalid="ignore", divide="ignore"):
            m = m / np.max(m) * np.float32(c[4])
        color = np.array([175 / 255.0, 238 / 255.0, 238 / 255.0], dtype=np.float32)  # pale turquoise
        return np.clip(x + m * color, 0, 1) * 255
    mud = np.where(liquid > c[3], 1, 0)
    mud = im.sk_gaussian(mud.astype(np.float32), c[4])
    mud[mud < 0.8] = 0
    color = np.array([63 / 255.0, 42 / 255.0, 20 / 255.0], dtype=np.float32) * mud[..., None]  # mud brown
    x *= 1 - mud[..., None]
    return np.clip(x + color, 0, 1) * 255


_OPS: dict[str, Op] = {name: globals()[f"_{name}"] for name in CORRUPTIONS}
_COLOUR_ONLY = frozenset({"brightness", "saturate", "snow", "spatter", "frost"})


def _to_uint8(value: np.ndarray) -> np.ndarray:
    """The reference's ``np.uint8(result)``: truncation of the (already clipped) float image."""
    value = np.asarray(value)
    if value.dtype == np.uint8:
        return value
    return np.nan_to_num(value, nan=0.0).astype(np.uint8)


def _apply(img: np.ndarray, name: str, severity: int, rng) -> np.ndarray:
    """One (H, W, C) uint8 image through one corruption, as uint8 (H, W, C)."""
    c = SEVERITY_CONSTANTS[name][severity - 1]
    if img.shape[-1] == 1 and name in _COLOUR_ONLY:
        rgb = _to_uint8(_OPS[name](np.repeat(img, 3, axis=-1), c, rng)).astype(np.float64)
        return np.rint(rgb @ np.array([0.299, 0.587, 0.114]))[..., None].astype(np.uint8)
    return _to_uint8(_OPS[name](img, c, rng))


# -------------------------------------------------------------------------------------------- API
def corrupt(images, name: str, severity: int, seed: int = 0, *, rng: Any = None):
    """Apply corruption ``name`` at ``severity`` (1..5) to a uint8 batch (N, H, W, C) or (N, C, H, W).

    C is 1 (grayscale) or 3 (RGB); the layout is read from where that axis is (channels-last when
    the last axis is 1 or 3). Returns the same type (numpy array or torch tensor), shape, layout
    and dtype (uint8). Deterministic given ``seed``: randomness comes from a numpy Generator seeded
    by (seed, name, severity), drawn image after image. ``rng`` replaces that generator with any
    object offering its ``normal``, ``uniform``, ``integers``, ``poisson`` and ``random`` methods
    (the fidelity benchmark passes one backed by the reference's legacy global stream).
    """
    if name not in _OPS:
        raise ValueError(f"unknown corruption {name!r}; valid names: {', '.join(CORRUPTIONS)}")
    if isinstance(severity, bool) or not isinstance(severity, (int, np.integer)) or not 1 <= severity <= 5:
        raise ValueError(f"severity must be one of 1, 2, 3, 4, 5; got {severity!r}")
    is_torch = isinstance(images, torch.Tensor)
    arr = images.detach().cpu().numpy() if is_torch else np.asarray(images)
    if arr.ndim != 4 or arr.dtype != np.uint8:
        raise ValueError(f"expected a uint8 array of shape (N, H, W, C) or (N, C, H, W), got {arr.dtype} {arr.shape}")
    if arr.shape[-1] in (1, 3):
        channels_last = True
    elif arr.shape[1] in (1, 3):
        channels_last = False
    else:
        raise ValueError(f"cannot find a channel axis of size 1 or 3 in shape {arr.shape}")
    x = arr if channels_last else arr.transpose(0, 2, 3, 1)
    if rng is None:
        rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(name.encode()), int(severity)])
    out = np.stack([_apply(np.ascontiguousarray(img), name, int(severity), rng) for img in x]) if len(x) else x.copy()
    if not channels_last:
        out = out.transpose(0, 3, 1, 2)
    out = np.ascontiguousarray(out)
    if is_torch:
        return torch.from_numpy(out).to(images.device)
    return out
