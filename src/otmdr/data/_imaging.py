"""The library calls of the published CIFAR-10-C generator, rebuilt on numpy and scipy.

The reference generator (Hendrycks & Dietterich, ICLR 2019, ``make_cifar_c.py``) calls
scikit-image, OpenCV, scipy and ImageMagick (through Wand). Depending on all of them for a
benchmark's test set is heavy (OpenCV, a system ImageMagick), so each call is rebuilt here with the
semantics of the library at the time: the same kernel, boundary mode, fixed-point rounding and
order of operations. ``benchmarks/corruption_fidelity.py`` and the tests compare each function with
the real library where it is installed.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

__all__ = ["sk_gaussian", "rgb2hsv", "hsv2rgb", "disk_kernel", "filter2d", "motion_blur_im", "warp_affine_cv",
           "affine_from_points", "clipped_zoom", "plasma_fractal", "canny_cv", "distance_transform_cv",
           "equalize_hist_cv", "box_blur_cv", "filter2d_u8", "rgb2gray_cv", "resize_linear_cv"]


# ------------------------------------------------------------------------------------ scikit-image
def sk_gaussian(x: np.ndarray, sigma: float, *, channel_axis: bool = False, mode: str = "nearest",
                truncate: float = 4.0) -> np.ndarray:
    """``skimage.filters.gaussian``: scipy's ``gaussian_filter`` (default mode 'nearest'), the
    channel axis (last) left unfiltered when ``channel_axis``."""
    sig = [sigma] * (x.ndim - 1) + [0.0] if channel_axis else sigma
    return ndimage.gaussian_filter(x, sig, mode=mode, truncate=truncate)


def rgb2hsv(rgb: np.ndarray) -> np.ndarray:
    """``skimage.color.rgb2hsv`` on (..., 3) floats in [0, 1]: hue and saturation 0 where grey."""
    v = rgb.max(-1)
    delta = np.ptp(rgb, -1)
    with np.errstate(invalid="ignore", divide="ignore"):
        s = np.where(delta == 0, 0.0, delta / np.where(v == 0, 1.0, v))
        d = np.where(delta == 0, 1.0, delta)
        h = np.zeros_like(v)
        r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
        # the later rules win where two channels share the maximum, as in scikit-image
        h = np.where(r == v, (g - b) / d, h)
        h = np.where(g == v, 2.0 + (b - r) / d, h)
        h = np.where(b == v, 4.0 + (r - g) / d, h)
    h = (h / 6.0) % 1.0
    h[delta == 0] = 0.0
    return np.stack([h, s, v], axis=-1)


def hsv2rgb(hsv: np.ndarray) -> np.ndarray:
    """``skimage.color.hsv2rgb``: the sextant formula."""
    h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    hi = np.floor(h * 6)
    f = h * 6 - hi
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    hi = hi.astype(np.uint8) % 6
    table = np.stack([np.stack(c, axis=-1) for c in ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))])
    return np.take_along_axis(table, hi[None, ..., None].repeat(3, -1).astype(np.intp), 0)[0]


# ------------------------------------------------------------------------------------------ OpenCV
def _gaussian_taps(ksize: int, sigma: float) -> np.ndarray:
    """``cv2.getGaussianKernel(ksize, sigma)`` for sigma > 0."""
    i = np.arange(ksize) - (ksize - 1) / 2
    g = np.exp(-(i**2) / (2 * sigma * sigma))
    return g / g.sum()


def disk_kernel(radius: float, alias_blur: float) -> np.ndarray:
    """The reference's defocus kernel: a 17x17 (or larger) aliased disk, normalised, then smoothed
    by ``cv2.GaussianBlur`` (3x3 or 5x5, border reflect-101), in float32."""
    ax: np.ndarray
    if radius <= 8:
        ax, ksize = np.arange(-8, 8 + 1), 3
    else:
        ax, ksize = np.arange(-radius, radius + 1), 5
    xx, yy = np.meshgrid(ax, ax)
    disk = np.array(xx**2 + yy**2 <= radius**2, dtype=np.float32)
    disk /= disk.sum()
    g = _gaussian_taps(ksize, alias_blur).astype(np.float32)  # OpenCV filters a float32 image in float32
    out = ndimage.correlate1d(disk, g, axis=1, mode="mirror")
    return ndimage.correlate1d(out, g, axis=0, mode="mirror")


def filter2d(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """``cv2.filter2D(x, -1, kernel)`` on a 2-D float image: correlation, border reflect-101."""
    return ndimage.correlate(x, kernel.astype(np.float64), mode="mirror")


def _fma_f32(a: np.ndarray, b: np.ndarray | np.float32, c: np.ndarray) -> np.ndarray:
    """``a * b + c`` for float32 operands rounded once to float32, as a fused multiply-add does.

    The product of two float32 values is exact in float64; the float64 sum ``s`` is not always, and
    rounding ``s`` to float32 could then round twice. The two can only disagree when ``s`` lands
    exactly halfway between two float32 values while the exact sum does not: the sum's rounding error
    (Knuth's two-sum) then says which neighbour the exact value is nearer to.
    """
    prod = np.asarray(a, np.float32).astype(np.float64) * np.float64(b)
    addend = np.asarray(c, np.float32).astype(np.float64)
    total = prod + addend
    virtual = total - prod
    error = (prod - (total - virtual)) + (addend - virtual)  # exact: prod + addend = total + error
    out = total.astype(np.float32)
    other = np.nextafter(out, np.where(total > out, np.float32(np.inf), np.float32(-np.inf)).astype(np.float32))
    halfway = (total != out) & (total == (out.astype(np.float64) + other.astype(np.float64)) * 0.5) & (error != 0)
    if halfway.any():
        nearer = np.where(error > 0, np.maximum(out, other), np.minimum(out, other))
        out = np.where(halfway, nearer, out)
    return out


def rgb2gray_cv(x: np.ndarray, *, fused: bool = True) -> np.ndarray:
    """``cv2.cvtColor(x, cv2.COLOR_RGB2GRAY)`` on a float32 (..., W, 3) image, bit for bit.

    OpenCV hands float32 RGB-to-grey to Intel IPP (``ippiRGBToGray_32f_C3C1R``, in every
    opencv-python wheel), which computes in float32 with the coefficients 0.299f, 0.587f, 0.114f:
    ``y = G*0.587f``, then ``y = R*0.299f + y``, then ``y = B*0.114f + y``. IPP's AVX2 and AVX-512
    code (any x86-64 CPU with FMA, ``fused``) rounds each of the last two steps once (a fused
    multiply-add); its SSE4.2 code (``fused=False``) rounds product and sum separately. One quirk of
    the fused code is kept: when a row's width leaves a remainder of 4-7 after its 8-pixel blocks,
    the 1st and 3rd pixel of the next 4 add R before G (``y = G*0.587f + R*0.299f`` fused).
    Measured against opencv-python-headless 5.1 (IPP 2026.1) on all 256^3 RGB triples of
    ``uint8 / 255`` and random floats of widths 1-40 (``tests/test_fidelity.py``). The published
    generator's ``snow`` calls it on ``float32(image) / 255``.
    """
    x = np.asarray(x, dtype=np.float32)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    c_r, c_g, c_b = np.float32(0.299), np.float32(0.587), np.float32(0.114)
    if not fused:
        return (r * c_r + g * c_g) + b * c_b  # float32 throughout, each operation rounded
    y = _fma_f32(b, c_b, _fma_f32(r, c_r, g * c_g))
    width = x.shape[-2] if x.ndim >= 2 else 1
    start = width - width % 8
    if x.ndim >= 2 and width % 8 >= 4:  # the 4-pixel block after the 8-pixel ones
        cols = [start, start + 2]
        alt = _fma_f32(b[..., cols], c_b, _fma_f32(g[..., cols], c_g, r[..., cols] * c_r))
        y[..., cols] = alt
    return y


def resize_linear_cv(img: np.ndarray, fx: float, fy: float) -> np.ndarray:
    """``cv2.resize(img, (0, 0), fx=fx, fy=fy)`` (bilinear) for scales whose every sample falls on
    a whole source pixel, as 0.2 (the generator's frost photographs) does: the output is
    ``round(W fx)`` x ``round(H fy)`` (rounded half to even), output pixel ``d`` samples source
    ``(d + 0.5) / f - 0.5`` (pixel-centre alignment), clamped to the image. Other scales would need
    OpenCV's fixed-point interpolation weights and are refused."""
    h, w = img.shape[:2]
    out_h, out_w = round(h * fy), round(w * fx)
    if out_h < 1 or out_w < 1:
        raise ValueError(f"resize of a {h}x{w} image by ({fy}, {fx}) leaves no pixel")
    pos = [(np.arange(n) + 0.5) * (1.0 / f) - 0.5 for n, f in ((out_h, fy), (out_w, fx))]
    if any(np.any(p != np.floor(p)) for p in pos):
        raise ValueError(f"resize_linear_cv only rebuilds scales that sample whole pixels, not ({fy}, {fx})")
    rows = np.clip(pos[0].astype(np.int64), 0, h - 1)
    cols = np.clip(pos[1].astype(np.int64), 0, w - 1)
    return img[rows[:, None], cols[None, :]]


def _reflect101(i: np.ndarray, n: int) -> np.ndarray:
    if n == 1:
        return np.zeros_like(i)
    period = 2 * n - 2
    i = np.abs(i) % period
    return np.where(i >= n, period - i, i)


def affine_from_points(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """``cv2.getAffineTransform``: the 2x3 map taking three (x, y) points ``src`` to ``dst``."""
    a = np.c_[src.astype(np.float64), np.ones(3)]
    return np.linalg.solve(a, dst.astype(np.float64)).T


def warp_affine_cv(img: np.ndarray, m: np.ndarray) -> np.ndarray:
    """``cv2.warpAffine(img, m, (W, H), borderMode=BORDER_REFLECT_101)``, bilinear, as OpenCV 3/4
    computes it: the inverted map evaluated in 1/1024 fixed point and cut to 1/32 pixel, the four
    taps weighted by those 1/32 fractions. ``img`` is (H, W, C)."""
    h, w = img.shape[:2]
    det = m[0, 0] * m[1, 1] - m[0, 1] * m[1, 0]
    det = 1.0 / det if det != 0 else 0.0
    a11, a22, a12, a21 = m[1, 1] * det, m[0, 0] * det, -m[0, 1] * det, -m[1, 0] * det
    b1 = -a11 * m[0, 2] - a12 * m[1, 2]
    b2 = -a21 * m[0, 2] - a22 * m[1, 2]
    xs, ys = np.arange(w, dtype=np.float64), np.arange(h, dtype=np.float64)
    adelta, bdelta = np.rint(a11 * xs * 1024).astype(np.int64), np.rint(a21 * xs * 1024).astype(np.int64)
    x0 = np.rint((a12 * ys + b1) * 1024).astype(np.int64) + 16
    y0 = np.rint((a22 * ys + b2) * 1024).astype(np.int64) + 16
    fx_all = (x0[:, None] + adelta[None, :]) >> 5
    fy_all = (y0[:, None] + bdelta[None, :]) >> 5
    ix, iy = fx_all >> 5, fy_all >> 5
    ax, ay = (fx_all & 31) / 32.0, (fy_all & 31) / 32.0
    out = np.zeros(img.shape, dtype=np.float64)
    for dy, wy in ((0, 1 - ay), (1, ay)):
        for dx, wx in ((0, 1 - ax), (1, ax)):
            px = img[_reflect101(iy + dy, h), _reflect101(ix + dx, w)]
            out += (wy * wx).astype(np.float32)[..., None] * px
    return out.astype(img.dtype)


def _sobel_replicate(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = x.astype(np.int32)
    dx = ndimage.correlate(x, np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]]), mode="nearest")
    dy = ndimage.correlate(x, np.array([[-1, -2, -1], [0, 0, 0], [1, 2, 1]]), mode="nearest")
    return dx, dy


def canny_cv(img: np.ndarray, low: float, high: float) -> np.ndarray:
    """``cv2.Canny(img, low, high)`` on a uint8 2-D image (aperture 3, L1 gradient): Sobel with
    replicated borders, OpenCV's fixed-point non-maximum suppression, 8-connected hysteresis.
    Returns 255 on edges, 0 elsewhere."""
    low_i, high_i = math.floor(min(low, high)), math.floor(max(low, high))
    dx, dy = _sobel_replicate(img)
    mag = np.abs(dx) + np.abs(dy)
    pad = np.pad(mag, 1)  # magnitudes outside the image are 0
    h, w = mag.shape

    def at(oy: int, ox: np.ndarray | int) -> np.ndarray:
        rows = np.arange(h)[:, None] + 1 + oy
        cols = np.arange(w)[None, :] + 1 + ox
        return pad[rows, cols]

    tg22 = 13573  # tan(22.5 degrees) in 15-bit fixed point
    ax, ay = np.abs(dx).astype(np.int64), np.abs(dy).astype(np.int64) << 15
    tg22x = ax * tg22
    tg67x = tg22x + (ax << 16)
    s = np.where((dx ^ dy) < 0, -1, 1)
    horizontal = (mag > at(0, -1)) & (mag >= at(0, 1))
    vertical = (mag > at(-1, 0)) & (mag >= at(1, 0))
    diagonal = (mag > at(-1, -s)) & (mag > at(1, s))
    local_max = np.where(ay < tg22x, horizontal, np.where(ay > tg67x, vertical, diagonal))
    candidate = (mag > low_i) & local_max
    labels, count = ndimage.label(candidate, structure=np.ones((3, 3), dtype=int))
    strong = np.unique(labels[candidate & (mag > high_i)])
    return np.where(np.isin(labels, strong[strong > 0]), 255, 0).astype(np.uint8)


def _row_min_plus(c: np.ndarray, step: int) -> np.ndarray:
    """d[j] = min(c[j], d[j - 1] + step) along the last axis, exactly, in integers."""
    j = np.arange(c.shape[-1], dtype=np.int64) * step
    return np.minimum.accumulate(c - j, axis=-1) + j


def distance_transform_cv(src: np.ndarray) -> np.ndarray:
    """``cv2.distanceTransform(src, cv2.DIST_L2, 5)``: OpenCV's 5x5 chamfer distance (weights 1,
    1.4, 2.1969 in 16-bit fixed point) to the nearest zero pixel, two passes; float32."""
    hv, diag, long_ = round(1.0 * 65536), round(1.4 * 65536), round(2.1969 * 65536)
    init, dist_max = 2**31 - 1, (2**31 - 1) >> 2
    h, w = src.shape
    t = np.full((h + 4, w + 4), init, dtype=np.int64)
    forward = [(-2, -1, long_), (-2, 1, long_), (-1, -2, long_), (-1, -1, diag), (-1, 0, hv), (-1, 1, diag),
               (-1, 2, long_)]
    for i in range(h):
        r = i + 2
        c = np.min([t[r + oy, 2 + ox:2 + ox + w] + d for oy, ox, d in forward], axis=0)
        c = np.where(src[i] == 0, 0, c)
        c = _row_min_plus(c, hv)
        t[r, 2:2 + w] = np.where(src[i] == 0, 0, c)
    backward = [(2, 1, long_), (2, -1, long_), (1, 2, long_), (1, 1, diag), (1, 0, hv), (1, -1, diag), (1, -2, long_)]
    for i in range(h - 1, -1, -1):
        r = i + 2
        c = np.min([t[r, 2:2 + w]] + [t[r + oy, 2 + ox:2 + ox + w] + d for oy, ox, d in backward], axis=0)
        t[r, 2:2 + w] = _row_min_plus(c[::-1], hv)[::-1]
    return (np.minimum(t[2:2 + h, 2:2 + w], dist_max) * (1.0 / 65536)).astype(np.float32)


def equalize_hist_cv(img: np.ndarray) -> np.ndarray:
    """``cv2.equalizeHist`` on uint8: the cumulative histogram above the lowest level, scaled to
    0..255 and rounded; a one-level image is left at that level."""
    hist = np.bincount(img.ravel(), minlength=256)
    first = int(np.flatnonzero(hist)[0])
    total = img.size
    if hist[first] == total:
        return np.full_like(img, first)
    scale = 255.0 / (total - hist[first])
    lut = np.zeros(256, dtype=np.float64)
    lut[first + 1:] = np.cumsum(hist[first + 1:]) * scale
    return np.clip(np.rint(lut.astype(np.float32)), 0, 255).astype(np.uint8)[img]


def box_blur_cv(x: np.ndarray) -> np.ndarray:
    """``cv2.blur(x, (3, 3))`` (border reflect-101): float32 stays float32; uint8 is rounded."""
    p = np.pad(x.astype(np.float64), 1, mode="reflect")  # numpy's 'reflect' is OpenCV's reflect-101
    rows = p[:, :-2] + p[:, 1:-1] + p[:, 2:]
    total = rows[:-2] + rows[1:-1] + rows[2:]
    mean = total * (1.0 / 9)
    if x.dtype == np.uint8:
        return np.clip(np.rint(mean), 0, 255).astype(np.uint8)
    return mean.astype(x.dtype)


def filter2d_u8(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """``cv2.filter2D(x, cv2.CV_8U, kernel)`` on uint8: correlation, reflect-101, rounded and saturated."""
    out = ndimage.correlate(x.astype(np.float64), kernel.astype(np.float64), mode="mirror")
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------- ImageMagick
def motion_blur_im(img: np.ndarray, radius: float, sigma: float, angle: float) -> np.ndarray:
    """ImageMagick 6's ``MotionBlurImage`` (what Wand's motion blur calls) on a uint8 (H, W, C)
    image: a one-sided Gaussian of ``2 ceil(radius) + 1`` taps along ``angle`` degrees (taps at
    rounded integer offsets), edge virtual pixels, 16-bit quantum arithmetic cut back to 8 bits (checked
    pixel for pixel against ImageMagick 6.9.11 through Wand)."""
    h, w = img.shape[:2]
    width = int(2 * math.ceil(radius) + 1)
    i = np.arange(width, dtype=np.float64)
    k = np.exp(-(i * i) / (2.0 * sigma * sigma)) / (math.sqrt(2 * math.pi) * sigma)
    k /= k.sum()
    px, py = width * math.sin(math.radians(angle)), width * math.cos(math.radians(angle))
    hyp = math.hypot(px, py)
    ox = np.ceil(i * py / hyp - 0.5).astype(np.int64)
    oy = np.ceil(i * px / hyp - 0.5).astype(np.int64)
    rows, cols = np.arange(h)[:, None], np.arange(w)[None, :]
    acc = np.zeros(img.shape, dtype=np.float64)
    quantum = img.astype(np.float64) * 257.0
    for tap, dx, dy in zip(k, ox, oy):
        acc += tap * quantum[np.clip(rows + dy, 0, h - 1), np.clip(cols + dx, 0, w - 1)]
    q = np.clip(np.floor(acc + 0.5), 0, 65535)  # rounded to the 16-bit quantum
    return np.floor(q / 257).astype(np.uint8)  # and cut to 8 bits as ImageMagick 6.9 writes the PNG


# -------------------------------------------------------------------------------------- reference's
def clipped_zoom(img: np.ndarray, zoom_factor: float) -> np.ndarray:
    """Zoom the centre of (H, W, C) ``img`` by ``zoom_factor`` with scipy's linear ``zoom`` and cut
    back to (H, W), as the reference does (a ceil-sized centre crop, then a centred trim)."""
    h = img.shape[0]
    ch = int(np.ceil(h / zoom_factor))
    top = (h - ch) // 2
    img = ndimage.zoom(img[top:top + ch, top:top + ch], (zoom_factor, zoom_factor, 1), order=1)
    trim = (img.shape[0] - h) // 2
    return img[trim:trim + h, trim:trim + h]


def plasma_fractal(rng, mapsize: int = 32, wibbledecay: float = 3) -> np.ndarray:
    """The reference's diamond-square height map in [0, 1] (its quirks kept: each new point is the
    mean of its four neighbours plus ``wibble * U(-wibble, wibble)``, i.e. noise of amplitude
    wibble squared; squares, then the two diamond sets, drawn in that order)."""
    assert mapsize & (mapsize - 1) == 0
    m = np.zeros((mapsize, mapsize))
    step, wibble = mapsize, 100.0

    def wibbled_mean(a: np.ndarray) -> np.ndarray:
        return a / 4 + wibble * rng.uniform(-wibble, wibble, a.shape)

    while step >= 2:
        half = step // 2
        corners = m[0:mapsize:step, 0:mapsize:step]
        sq = corners + np.roll(corners, -1, axis=0)
        sq += np.roll(sq, -1, axis=1)
        m[half:mapsize:step, half:mapsize:step] = wibbled_mean(sq)
        dr = m[half:mapsize:step, half:mapsize:step]
        ul = m[0:mapsize:step, 0:mapsize:step]
        m[0:mapsize:step, half:mapsize:step] = wibbled_mean(
            (dr + np.roll(dr, 1, axis=0)) + (ul + np.roll(ul, -1, axis=1)))
        m[half:mapsize:step, 0:mapsize:step] = wibbled_mean(
            (dr + np.roll(dr, 1, axis=1)) + (ul + np.roll(ul, -1, axis=0)))
        step //= 2
        wibble /= wibbledecay
    m -= m.min()
    return m / m.max()
