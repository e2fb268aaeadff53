"""The 15 CIFAR-10-C common corruptions (Hendrycks & Dietterich, ICLR 2019) at severities 1..5.

Own implementations written from the paper's descriptions, using numpy, torch and (for
``pixelate``/``jpeg_compression``) Pillow. Snow and frost use procedurally generated textures
instead of the photographs of the original release, so they are in the spirit of, not
pixel-identical to, CIFAR-10-C.

All constants are for 32x32 images (the CIFAR-10-C generation). For an image of another size the
*spatial* constants (blur radii and sigmas, displacement sizes, glass-blur sigmas) are multiplied by
``min(H, W) / 32``; photometric constants (noise levels, blend weights, qualities, ratios) are used
as they are.
"""

from __future__ import annotations

import io
import math
import zlib

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["CORRUPTIONS", "SEVERITY_CONSTANTS", "corrupt"]

CORRUPTIONS: tuple[str, ...] = (
    "gaussian_noise", "shot_noise", "impulse_noise",
    "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog", "brightness", "contrast",
    "elastic_transform", "pixelate", "jpeg_compression",
)  # fmt: skip

_IMSIZE = 32
# Severity constants, severities 1..5, for 32x32 images -- from the CIFAR-10-C generation of
# Hendrycks & Dietterich, "Benchmarking Neural Network Robustness to Common Corruptions and
# Perturbations", ICLR 2019. Snow's tuple (loc, scale, zoom, threshold, radius, sigma, blend) drives
# our procedural flakes; frost's (image weight, texture weight) blends our procedural ice.
SEVERITY_CONSTANTS: dict[str, list] = {
    "gaussian_noise": [0.04, 0.06, 0.08, 0.09, 0.10],  # std of additive noise (x in [0, 1])
    "shot_noise": [500, 250, 100, 75, 50],  # Poisson rate scale
    "impulse_noise": [0.01, 0.02, 0.03, 0.05, 0.07],  # salt-and-pepper amount
    "defocus_blur": [(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)],  # (radius, alias)
    # (sigma, max_delta, iterations)
    "glass_blur": [(0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)],
    "motion_blur": [(10, 1), (10, 1.5), (10, 2), (10, 2.5), (12, 3)],  # (radius, sigma)
    "zoom_blur": [
        np.arange(1, 1.06, 0.01), np.arange(1, 1.11, 0.01), np.arange(1, 1.16, 0.01),
        np.arange(1, 1.21, 0.01), np.arange(1, 1.26, 0.01),
    ],  # zoom factors averaged
    "snow": [
        (0.1, 0.2, 1, 0.6, 8, 3, 0.95), (0.1, 0.2, 1, 0.5, 10, 4, 0.9), (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
        (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85), (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8),
    ],  # (loc, scale, zoom, threshold, radius, sigma, blend)
    "frost": [(1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)],  # (image weight, frost weight)
    "fog": [(0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)],  # (strength, plasma decay)
    "brightness": [0.05, 0.1, 0.15, 0.2, 0.3],  # added to HSV value
    "contrast": [0.75, 0.5, 0.4, 0.3, 0.15],  # factor about the image mean
    "elastic_transform": [
        (_IMSIZE * 0, _IMSIZE * 0, _IMSIZE * 0.08), (_IMSIZE * 0.05, _IMSIZE * 0.2, _IMSIZE * 0.07),
        (_IMSIZE * 0.08, _IMSIZE * 0.06, _IMSIZE * 0.06), (_IMSIZE * 0.1, _IMSIZE * 0.04, _IMSIZE * 0.05),
        (_IMSIZE * 0.1, _IMSIZE * 0.03, _IMSIZE * 0.03),
    ],  # (alpha, sigma, affine jitter) in pixels. Checked against the published CIFAR-10-C generation
    # code: severity 1 is a pure affine jitter of up to 2.56 px and the jitter shrinks as the elastic
    # field grows, so the mean pixel change *falls* with severity. A property of the benchmark, kept.
    "pixelate": [0.95, 0.9, 0.85, 0.75, 0.65],  # downscale ratio
    "jpeg_compression": [80, 65, 58, 50, 40],  # JPEG quality
}  # fmt: skip


# ----------------------------------------------------------------------------------------- helpers
def _filter(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Convolve each channel of (N, H, W, C) x with a 2-D kernel, reflect (or replicate) padded."""
    n, h, w, c = x.shape
    kh, kw = kernel.shape
    t = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).reshape(n * c, 1, h, w)
    pad = (kw // 2, kw // 2, kh // 2, kh // 2)
    mode = "reflect" if kh // 2 < h and kw // 2 < w else "replicate"
    t = F.pad(t, pad, mode=mode)
    k = torch.from_numpy(np.ascontiguousarray(kernel[::-1, ::-1]))[None, None]
    out = F.conv2d(t, k).reshape(n, c, h, w).numpy()
    return out.transpose(0, 2, 3, 1)


def _gauss1d(sigma: float) -> np.ndarray:
    r = max(1, int(math.ceil(4 * sigma)))
    g = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    return g / g.sum()


def _gaussian(x: np.ndarray, sigma: float) -> np.ndarray:
    if sigma <= 0:
        return x
    g = _gauss1d(sigma)
    return _filter(_filter(x, g[None, :]), g[:, None])


def _gaussian_kernel2d(kernel: np.ndarray, sigma: float) -> np.ndarray:
    """Smooth a small kernel with a Gaussian (zero padded, so nothing leaks in from the borders)."""
    if sigma <= 0:
        return kernel
    g = _gauss1d(sigma)
    r = len(g) // 2
    k = np.pad(kernel, r)
    k = np.apply_along_axis(lambda v: np.convolve(v, g, mode="same"), 0, k)
    k = np.apply_along_axis(lambda v: np.convolve(v, g, mode="same"), 1, k)
    return k


def _motion_kernel(length: float, sigma: float, angle: float) -> np.ndarray:
    """A one-sided line kernel from the centre along ``angle`` (degrees), ``length`` pixels long,
    its weights a Gaussian of ``sigma`` in the distance from the centre (so larger sigma = longer
    effective streak, as in ImageMagick's motion blur used by the paper)."""
    r = int(math.ceil(length)) + 1
    k = np.zeros((2 * r + 1, 2 * r + 1))
    cos, sin = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    for t in np.linspace(0.0, length, max(2, int(4 * length) + 1)):
        weight = math.exp(-0.5 * (t / max(sigma, 1e-6)) ** 2)
        px, py = r + t * cos, r - t * sin
        x0, y0 = int(math.floor(px)), int(math.floor(py))
        fx, fy = px - x0, py - y0
        for dy, wy in ((0, 1 - fy), (1, fy)):
            for dx, wx in ((0, 1 - fx), (1, fx)):
                if 0 <= y0 + dy < k.shape[0] and 0 <= x0 + dx < k.shape[1]:
                    k[y0 + dy, x0 + dx] += weight * wy * wx
    return k / k.sum()


def _resize(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    t = F.interpolate(t, size=size, mode="bilinear", align_corners=False)
    return t.numpy().transpose(0, 2, 3, 1)


def _zoom(x: np.ndarray, z: float) -> np.ndarray:
    """Zoom in by z about the centre and crop back to the input size."""
    h, w = x.shape[1:3]
    zh, zw = max(h, int(math.ceil(h * z))), max(w, int(math.ceil(w * z)))
    big = _resize(x, (zh, zw))
    top, left = (zh - h) // 2, (zw - w) // 2
    return big[:, top : top + h, left : left + w]


def _plasma(size: int, decay: float, rng: np.random.Generator) -> np.ndarray:
    """A size x size (power of two) diamond-square plasma fractal in [0, 1], periodic."""
    m = np.zeros((size, size))
    step, scale = size, 100.0
    while step >= 2:
        half = step // 2
        c = m[0::step, 0::step]
        sq = (c + np.roll(c, -1, 0) + np.roll(c, -1, 1) + np.roll(c, (-1, -1), (0, 1))) / 4
        m[half::step, half::step] = sq + rng.uniform(-scale, scale, sq.shape)
        c, ctr = m[0::step, 0::step], m[half::step, half::step]
        top = (c + np.roll(c, -1, 1) + ctr + np.roll(ctr, 1, 0)) / 4
        m[0::step, half::step] = top + rng.uniform(-scale, scale, top.shape)
        left = (c + np.roll(c, -1, 0) + ctr + np.roll(ctr, 1, 1)) / 4
        m[half::step, 0::step] = left + rng.uniform(-scale, scale, left.shape)
        step, scale = half, scale / decay
    m -= m.min()
    return m / max(m.max(), 1e-12)


def _warp(x: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Bilinear sampling of (N, H, W, C) x at pixel coordinates (N, H, W), reflected at the borders."""
    n, h, w, c = x.shape
    grid = np.stack([2 * xs / max(w - 1, 1) - 1, 2 * ys / max(h - 1, 1) - 1], axis=-1)
    t = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    out = F.grid_sample(t, torch.from_numpy(grid), mode="bilinear", padding_mode="reflection", align_corners=True)
    return out.numpy().transpose(0, 2, 3, 1)


def _to_gray(x: np.ndarray) -> np.ndarray:
    if x.shape[-1] == 1:
        return x
    return x @ np.array([0.299, 0.587, 0.114])[:, None]


# ------------------------------------------------------------------------------------- corruptions
# Each takes float64 (N, H, W, C) in [0, 1], the severity constant, a Generator and the spatial
# scale s = min(H, W) / 32, and returns an unclipped float array of the same shape.
def _gaussian_noise(x, c, rng, s):
    return x + rng.normal(0.0, c, x.shape)


def _shot_noise(x, c, rng, s):
    return rng.poisson(x * c) / c


def _impulse_noise(x, c, rng, s):
    u = rng.random(x.shape)
    out = x.copy()
    out[u < c / 2] = 0.0
    out[(u >= c / 2) & (u < c)] = 1.0
    return out


def _defocus_blur(x, c, rng, s):
    radius, alias = c[0] * s, c[1] * s
    r = max(1, int(math.ceil(radius + 0.5)))
    sub = (np.arange(8) + 0.5) / 8 - 0.5  # 8x8 supersampling: each tap = area of its pixel inside the disk
    yy = (np.arange(-r, r + 1)[:, None] + sub[None, :]).reshape(-1)
    inside = (yy[:, None] ** 2 + yy[None, :] ** 2 <= radius**2).astype(np.float64)
    disk = inside.reshape(2 * r + 1, 8, 2 * r + 1, 8).sum(axis=(1, 3))
    disk /= disk.sum()
    k = _gaussian_kernel2d(disk, alias)
    return _filter(x, k / k.sum())


def _glass_blur(x, c, rng, s):
    sigma, delta, iterations = c[0] * s, max(1, round(c[1] * s)), c[2]
    x = _gaussian(x, sigma)
    n, h, w = x.shape[:3]
    idx = np.arange(n)
    for _ in range(iterations):  # locally shuffle pixels, sweeping from the bottom-right
        for i in range(h - 1 - delta, delta - 1, -1):
            for j in range(w - 1 - delta, delta - 1, -1):
                dy, dx = rng.integers(-delta, delta + 1, (2, n))
                a, b = x[idx, i, j].copy(), x[idx, i + dy, j + dx].copy()
                x[idx, i, j], x[idx, i + dy, j + dx] = b, a
    return _gaussian(x, sigma)


def _motion_blur(x, c, rng, s):
    out = np.empty_like(x)
    for i in range(x.shape[0]):
        k = _motion_kernel(c[0] * s, c[1] * s, rng.uniform(-45, 45))
        out[i : i + 1] = _filter(x[i : i + 1], k)
    return out


def _zoom_blur(x, c, rng, s):
    out = x.copy()
    for z in c:
        out += _zoom(x, float(z))
    return out / (len(c) + 1)


def _snow(x, c, rng, s):
    loc, scale, zoom, threshold, radius, sigma, blend = c
    n, h, w, ch = x.shape
    flakes = rng.normal(loc, scale, (n, h, w, 1))
    if zoom > 1:  # bigger flakes: nearest-neighbour zoom keeps the flake-value distribution
        zh, zw = int(math.ceil(h * zoom)), int(math.ceil(w * zoom))
        rows = np.minimum((np.arange(zh) / zoom).astype(int), h - 1)[(zh - h) // 2 :][:h]
        cols = np.minimum((np.arange(zw) / zoom).astype(int), w - 1)[(zw - w) // 2 :][:w]
        flakes = flakes[:, rows][:, :, cols]
    flakes[flakes < threshold] = 0.0
    layer = np.empty_like(flakes)
    for i in range(n):  # streak the flakes along a falling direction
        k = _motion_kernel(radius * s, sigma * s, rng.uniform(-135, -45))
        layer[i : i + 1] = _filter(flakes[i : i + 1], k)
    layer = np.clip(layer * 2.0, 0, 1)  # keep the spread-out streaks visible
    base = blend * x + (1 - blend) * np.maximum(x, _to_gray(x) * 1.5 + 0.5)
    return base * (1 - 0.1 * (1 - blend)) + layer + layer[:, ::-1, ::-1]


def _frost(x, c, rng, s):
    n, h, w, ch = x.shape
    tex = np.zeros((n, h, w, 1))
    for octave, amp in ((4.0, 0.5), (2.0, 0.3), (1.0, 0.2)):  # multi-scale smoothed noise
        tex += amp * _gaussian(rng.random((n, h, w, 1)), octave * s)
    tex = (tex - tex.min(axis=(1, 2, 3), keepdims=True)) / np.ptp(tex, axis=(1, 2, 3)).reshape(n, 1, 1, 1).clip(1e-12)
    ridges = 1 - np.abs(np.sin(6 * np.pi * tex))  # crystalline veins along the level sets
    ice = np.clip(0.55 * tex + 0.45 * ridges**3, 0, 1) ** 0.8
    ice += 0.15 * (rng.random((n, h, w, 1)) > 0.93)  # sparkles
    if ch == 3:
        ice = ice * np.array([0.85, 0.93, 1.0])
    return c[0] * x + c[1] * (0.35 + 0.65 * ice)


def _fog(x, c, rng, s):
    n, h, w, ch = x.shape
    size = 2 ** int(math.ceil(math.log2(max(h, w, 2))))
    fog = np.stack([_plasma(size, c[1], rng)[:h, :w] for _ in range(n)])[..., None]
    top = x.max(axis=(1, 2, 3), keepdims=True)
    return (x + c[0] * fog) * top / (top + c[0])


def _brightness(x, c, rng, s):
    v = x.max(axis=-1, keepdims=True)  # HSV value; hue and saturation are kept
    v_new = np.minimum(v + c, 1.0)
    ratio = np.where(v > 0, v_new / np.maximum(v, 1e-12), 0.0)
    return np.where(v > 0, x * ratio, v_new)


def _contrast(x, c, rng, s):
    m = x.mean(axis=(1, 2, 3), keepdims=True)
    return (x - m) * c + m


def _elastic_transform(x, c, rng, s):
    alpha, sigma, jitter = c[0] * s, c[1] * s, c[2] * s
    n, h, w, _ = x.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    # affine: move three reference points by up to `jitter` pixels and solve for the map
    cy, cx, d = h / 2, w / 2, min(h, w) / 3
    src = np.array([[cx + d, cy + d], [cx + d, cy - d], [cx - d, cy - d]])
    ys, xs = np.empty((n, h, w)), np.empty((n, h, w))
    for i in range(n):
        dst = src + rng.uniform(-jitter, jitter, src.shape)
        a = np.linalg.solve(np.c_[dst, np.ones(3)], src)  # output coords -> input coords
        xs[i] = a[0, 0] * xx + a[1, 0] * yy + a[2, 0]
        ys[i] = a[0, 1] * xx + a[1, 1] * yy + a[2, 1]
    x = _warp(x, ys, xs)
    if alpha > 0 and sigma > 0:
        disp = _gaussian(rng.uniform(-1, 1, (n, h, w, 2)), sigma) * alpha
        x = _warp(x, yy + disp[..., 0], xx + disp[..., 1])
    return x


def _pil_each(x8: np.ndarray, fn) -> np.ndarray:
    from PIL import Image

    out = np.empty_like(x8)
    for i in range(x8.shape[0]):
        img = Image.fromarray(x8[i, ..., 0] if x8.shape[-1] == 1 else x8[i])
        res = np.asarray(fn(img))
        out[i] = res[..., None] if x8.shape[-1] == 1 else res
    return out


def _pixelate(x, c, rng, s):
    from PIL import Image

    x8 = _to_uint8(x)
    h, w = x8.shape[1:3]
    small = (max(1, int(w * c)), max(1, int(h * c)))
    return _pil_each(x8, lambda im: im.resize(small, Image.BOX).resize((w, h), Image.BOX)) / 255.0


def _jpeg_compression(x, c, rng, s):
    from PIL import Image

    def roundtrip(im):
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=int(c))
        buf.seek(0)
        return Image.open(buf).convert(im.mode)

    return _pil_each(_to_uint8(x), roundtrip) / 255.0


_FUNCS = {name: globals()[f"_{name}"] for name in CORRUPTIONS}


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


# -------------------------------------------------------------------------------------------- API
def corrupt(images, name: str, severity: int, seed: int = 0):
    """Apply corruption ``name`` at ``severity`` (1..5) to a uint8 batch (N, H, W, C) or (N, C, H, W).

    C is 1 (grayscale) or 3 (RGB); the layout is read from where that axis is (channels-last when
    the last axis is 1 or 3). Returns the same type (numpy array or torch tensor), shape, layout
    and dtype (uint8). Deterministic given ``seed``: randomness comes from a numpy Generator seeded
    by (seed, name, severity).
    """
    if name not in _FUNCS:
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
    x = x.astype(np.float64) / 255.0
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(name.encode()), int(severity)])
    s = min(x.shape[1], x.shape[2]) / _IMSIZE
    out = _to_uint8(_FUNCS[name](x, SEVERITY_CONSTANTS[name][severity - 1], rng, s))
    if not channels_last:
        out = out.transpose(0, 3, 1, 2)
    out = np.ascontiguousarray(out)
    if is_torch:
        return torch.from_numpy(out).to(images.device)
    return out
