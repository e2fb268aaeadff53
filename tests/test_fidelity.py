"""``otmdr.data._imaging`` and the corruptions against the libraries the published CIFAR-10-C
generator calls: scikit-image, OpenCV and ImageMagick (through Wand).

The oracles are the real libraries (the ``test`` extra installs them; Wand also needs Debian's
libMagickWand, which ``.ci/run`` installs). In CI a missing oracle fails these tests; elsewhere it
skips them (``require_oracle``). Run only these with ``pytest -m fidelity``.

The images are 20 small deterministic ones that look like photographs more than noise does:
smooth shading, hard-edged shapes, texture, flat and saturated regions, grey and near-black ones.
"""

from __future__ import annotations

import ctypes
import importlib.util
import io
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import require_oracle
from PIL import Image

from otmdr.data import _imaging as im
from otmdr.data import corruptions as corruptions_module
from otmdr.data.corruptions import CORRUPTIONS, FROST_FILES, SEVERITY_CONSTANTS, corrupt

pytestmark = pytest.mark.fidelity
ROOT = Path(__file__).resolve().parents[1]


def _scene(rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """One uint8 (size, size, 3) picture: a shaded background, a few shapes, texture and noise."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / (size - 1)
    base = rng.uniform(0.1, 0.9, 3)
    tilt = rng.uniform(-0.5, 0.5, (2, 3))
    img = base + (xx[..., None] - 0.5) * tilt[0] + (yy[..., None] - 0.5) * tilt[1]
    for _ in range(rng.integers(1, 4)):  # disks and rectangles with their own colours
        colour = rng.uniform(0, 1, 3)
        if rng.random() < 0.5:
            cy, cx, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.08, 0.3)
            mask = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        else:
            y0, x0 = rng.uniform(0, 0.7, 2)
            mask = (yy >= y0) & (yy < y0 + rng.uniform(0.1, 0.4)) & (xx >= x0) & (xx < x0 + rng.uniform(0.1, 0.4))
        img[mask] = 0.3 * img[mask] + 0.7 * colour
    freq = rng.uniform(2, 8)
    img += rng.uniform(0, 0.1) * np.sin(2 * np.pi * freq * (xx + 0.3 * yy))[..., None]  # texture
    img += rng.normal(0, rng.uniform(0, 0.03), img.shape)  # sensor noise
    return np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)


def _images() -> np.ndarray:
    rng = np.random.default_rng(2019)
    out = [_scene(rng) for _ in range(16)]
    grey = _scene(rng)
    out.append(np.repeat(grey.mean(-1, keepdims=True).astype(np.uint8), 3, -1))  # a grey picture
    out.append((_scene(rng) // 6).astype(np.uint8))  # a dark one
    out.append(np.clip(_scene(rng).astype(int) + 120, 0, 255).astype(np.uint8))  # a bright, partly saturated one
    flat = np.empty((32, 32, 3), np.uint8)
    flat[:] = (200, 30, 90)
    flat[8:24, 8:24] = (30, 200, 90)  # flat regions with hard edges
    out.append(flat)
    return np.stack(out)


IMAGES = _images()  # (20, 32, 32, 3) uint8
FLOATS = IMAGES / 255.0


@pytest.fixture(scope="module")
def cv2():
    return require_oracle("cv2", "OpenCV, the generator's filters, colour conversion and warps")


@pytest.fixture(scope="module")
def skimage():
    require_oracle("skimage.filters", "scikit-image, the generator's gaussian and HSV conversion")
    return require_oracle("skimage.color", "scikit-image's HSV conversion")


@pytest.fixture(scope="module")
def wand():
    image = require_oracle("wand.image", "Wand (ImageMagick), the generator's motion blur")
    from wand.api import library

    library.MagickMotionBlurImage.argtypes = (ctypes.c_void_p, ctypes.c_double, ctypes.c_double, ctypes.c_double)
    return image, library


def test_the_images_are_twenty_varied_pictures():
    assert IMAGES.shape == (20, 32, 32, 3) and IMAGES.dtype == np.uint8
    assert len({img.tobytes() for img in IMAGES}) == 20
    assert IMAGES.std(axis=(1, 2, 3)).min() > 5 and IMAGES.max() == 255 and IMAGES[17].max() < 60


# ------------------------------------------------------------------------------------ scikit-image
@pytest.mark.parametrize("sigma", [0.05, 0.4, 1.0, 2.5])
def test_sk_gaussian_is_skimage_gaussian(skimage, sigma):
    from skimage.filters import gaussian

    for x in FLOATS:
        np.testing.assert_array_equal(im.sk_gaussian(x, sigma, channel_axis=True),
                                      gaussian(x, sigma=sigma, channel_axis=-1))
        grey = x[..., 0]
        np.testing.assert_array_equal(im.sk_gaussian(grey, sigma, mode="reflect", truncate=3),
                                      gaussian(grey, sigma=sigma, mode="reflect", truncate=3))


def test_rgb2hsv_and_hsv2rgb_are_skimages(skimage):
    from skimage.color import hsv2rgb, rgb2hsv

    for x in FLOATS:
        hsv = rgb2hsv(x)
        np.testing.assert_allclose(im.rgb2hsv(x), hsv, rtol=0, atol=1e-15)
        np.testing.assert_allclose(im.hsv2rgb(hsv), hsv2rgb(hsv), rtol=0, atol=1e-15)
        changed = hsv.copy()
        changed[..., 1] = np.clip(changed[..., 1] * 2.5 + 0.2, 0, 1)
        np.testing.assert_allclose(im.hsv2rgb(changed), hsv2rgb(changed), rtol=0, atol=1e-15)


# ------------------------------------------------------------------------------------------ OpenCV
def test_rgb2gray_cv_is_cvtColor_bit_for_bit(cv2):
    """The float32 conversion snow calls, on every image and on every uint8 triple (the values
    ``float32(image) / 255`` can hold), and on random floats of widths 1-40 (IPP's tails)."""
    fused = "SSE" not in cv2.ipp.getIppVersion()  # IPP's SSE4.2 code rounds each step; AVX2/AVX-512 fuse
    if not cv2.ipp.useIPP():
        pytest.fail("OpenCV runs without IPP here: its own SIMD code orders the sum differently (B last, R first)")
    x = np.asarray(IMAGES, dtype=np.float32) / 255.0
    for img in x:
        np.testing.assert_array_equal(im.rgb2gray_cv(img, fused=fused), cv2.cvtColor(img, cv2.COLOR_RGB2GRAY))
    v = np.arange(256, dtype=np.float32) / np.float32(255.0)
    triples = np.ascontiguousarray(np.stack(np.meshgrid(v, v, v, indexing="ij"), -1).reshape(4096, 4096, 3))
    np.testing.assert_array_equal(im.rgb2gray_cv(triples, fused=fused), cv2.cvtColor(triples, cv2.COLOR_RGB2GRAY))
    rng = np.random.default_rng(7)
    for width in range(1, 41):
        for scale in (1.0, 1e3):
            y = rng.random((16, width, 3), dtype=np.float32) * np.float32(scale)
            np.testing.assert_array_equal(im.rgb2gray_cv(y, fused=fused), cv2.cvtColor(y, cv2.COLOR_RGB2GRAY))


def test_the_plain_float_formula_is_not_cvtColor(cv2):
    """The comparison above can fail: the float32 sum in the textbook order misses some values."""
    v = np.arange(256, dtype=np.float32) / np.float32(255.0)
    triples = np.ascontiguousarray(np.stack(np.meshgrid(v, v, v, indexing="ij"), -1).reshape(4096, 4096, 3))
    plain = ((triples[..., 0] * np.float32(0.299) + triples[..., 1] * np.float32(0.587))
             + triples[..., 2] * np.float32(0.114))
    fused_here = "SSE" not in cv2.ipp.getIppVersion()
    assert (plain != cv2.cvtColor(triples, cv2.COLOR_RGB2GRAY)).any() == fused_here


@pytest.mark.parametrize("radius, alias", [(0.3, 0.4), (0.5, 0.6), (1, 0.2), (1.5, 0.1), (3, 0.5)])
def test_disk_kernel_and_filter2d_are_opencvs(cv2, radius, alias):
    grid = np.arange(-8, 9)
    xx, yy = np.meshgrid(grid, grid)
    disk = np.array(xx**2 + yy**2 <= radius**2, dtype=np.float32)
    disk /= disk.sum()
    kernel = cv2.GaussianBlur(disk, ksize=(3, 3), sigmaX=alias)
    # within one float32 rounding: OpenCV sums the symmetric taps in float32, scipy in float64
    # (the blurred images still agree to the last uint8 level: test_corruption_matches_the_generator)
    np.testing.assert_array_max_ulp(im.disk_kernel(radius, alias), kernel, maxulp=1)
    for x in FLOATS[:8]:
        for ch in range(3):
            ref = cv2.filter2D(x[..., ch], -1, kernel)  # float64 sums in another order: equal to 1e-15
            np.testing.assert_allclose(im.filter2d(x[..., ch], kernel), ref, rtol=0, atol=1e-13)


def test_affine_from_points_and_warp_affine(cv2):
    """The map is cv2.getAffineTransform's. The warp follows OpenCV 3/4's fixed-point bilinear
    interpolation (what the 2018 generator ran); OpenCV 5 interpolates at exact coordinates, so
    against it the images agree to within the 1/32-pixel rounding of the sample positions."""
    rng = np.random.default_rng(3)
    version = int(cv2.__version__.split(".")[0])
    for x in IMAGES[:10]:
        img = (x.astype(np.float32) / 255.0)
        pts1 = np.float32([[26, 26], [26, 6], [6, 6]])
        pts2 = pts1 + rng.uniform(-2.56, 2.56, size=pts1.shape).astype(np.float32)
        m = cv2.getAffineTransform(pts1, pts2)
        np.testing.assert_allclose(im.affine_from_points(pts1, pts2), m, rtol=0, atol=1e-12)
        ours = im.warp_affine_cv(img, m)
        ref = cv2.warpAffine(img, m, (32, 32), borderMode=cv2.BORDER_REFLECT_101)
        if version < 5:
            np.testing.assert_allclose(ours, ref, rtol=0, atol=2e-6)
        else:
            assert np.abs(ours - ref).max() < 0.04  # 1/32 px of a local slope of at most ~1 per pixel
            assert np.abs(ours - ref).mean() < 2e-3


def test_canny_distance_threshold_equalize_blur_filter_are_opencvs(cv2):
    """The water branch of spatter, stage by stage, on liquid layers made from the images."""
    rng = np.random.default_rng(11)
    emboss = np.array([[-2, -1, 0], [-1, 1, 1], [0, 1, 2]])
    version = int(cv2.__version__.split(".")[0])
    for x in IMAGES:
        liquid = im.sk_gaussian(rng.normal(size=(32, 32), loc=0.65, scale=0.2), rng.uniform(0.5, 1.2))
        liquid[liquid < 0.69] = 0
        layers = [(liquid * 255).astype(np.uint8), x[..., 1], (x.mean(-1)).astype(np.uint8)]
        for layer in layers:
            edges = cv2.Canny(layer, 50, 150)
            np.testing.assert_array_equal(im.canny_cv(layer, 50, 150), edges)
            dist = cv2.distanceTransform(255 - edges, cv2.DIST_L2, 5)
            if version < 5:  # OpenCV 3/4: 16-bit fixed-point chamfer weights, as ours
                np.testing.assert_array_equal(im.distance_transform_cv(255 - edges), dist)
            else:  # OpenCV 5 sums the float weights (1.4f, not 91750 / 65536) and leaves FLT_MAX where
                # no edge is: the same to 2e-5 up to the truncation at 20 that spatter applies next
                np.testing.assert_allclose(np.minimum(im.distance_transform_cv(255 - edges), 20), np.minimum(dist, 20),
                                           rtol=2e-5, atol=0)
            _, dist = cv2.threshold(dist, 20, 20, cv2.THRESH_TRUNC)
            np.testing.assert_array_equal(im.box_blur_cv(dist), cv2.blur(dist, (3, 3)))
            d8 = cv2.blur(dist, (3, 3)).astype(np.uint8)
            np.testing.assert_array_equal(im.equalize_hist_cv(d8), cv2.equalizeHist(d8))
            np.testing.assert_array_equal(im.equalize_hist_cv(layer), cv2.equalizeHist(layer))
            np.testing.assert_array_equal(im.filter2d_u8(layer, emboss), cv2.filter2D(layer, cv2.CV_8U, emboss))
            np.testing.assert_array_equal(im.box_blur_cv(layer), cv2.blur(layer, (3, 3)))


def test_resize_at_the_frost_scale_is_cv2_resize(cv2):
    for x in IMAGES[:5]:
        big = np.ascontiguousarray(np.tile(x, (4, 5, 1))[: 32 * 4 - 3, : 32 * 5 - 1])
        np.testing.assert_array_equal(im.resize_linear_cv(big, 0.2, 0.2), cv2.resize(big, (0, 0), fx=0.2, fy=0.2))
    with pytest.raises(ValueError, match="whole pixels"):
        im.resize_linear_cv(IMAGES[0], 0.5, 0.5)


def test_frost_photographs_decode_as_cv2_imread_does(cv2):
    folder = corruptions_module.frost_photo_dir()
    assert folder is not None, "the frost photographs are not shipped in assets/frost"
    for index, name in enumerate(FROST_FILES):
        bgr = cv2.imread(str(folder / name))
        ours = corruptions_module._frost_photo(str(folder), index)
        np.testing.assert_array_equal(ours, cv2.resize(bgr, (0, 0), fx=0.2, fy=0.2)[..., ::-1])


# ------------------------------------------------------------------------------------- ImageMagick
@pytest.mark.parametrize("radius, sigma", [(6, 1), (9, 2.5), (12, 6), (14, 12)])
def test_motion_blur_im_is_imagemagicks(wand, radius, sigma):
    wand_image, library = wand
    rng = np.random.default_rng(radius)
    for x in IMAGES[::2]:
        angle = float(rng.uniform(-135, 45))
        for img in (x, x[..., :1]):
            buf = io.BytesIO()
            Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(buf, format="PNG")
            with wand_image.Image(blob=buf.getvalue()) as w:
                library.MagickMotionBlurImage(w.wand, radius, sigma, angle)
                blob = w.make_blob("png")
            ref = np.asarray(Image.open(io.BytesIO(blob)))
            # ImageMagick writes a grey PNG when the blurred image is grey (one channel, or R = G = B)
            ref = np.repeat(ref[..., None], img.shape[-1], -1) if ref.ndim == 2 else ref[..., : img.shape[-1]]
            np.testing.assert_array_equal(im.motion_blur_im(img, radius, sigma, angle), ref)


# ------------------------------------------------------------------------------------ corruptions
def _benchmark():
    """The reference transcription of make_cifar_c.py in benchmarks/corruption_fidelity.py."""
    path = ROOT / "benchmarks" / "corruption_fidelity.py"
    spec = importlib.util.spec_from_file_location("corruption_fidelity_for_tests", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def reference(cv2, skimage, wand):
    bench = _benchmark()
    functions, missing = bench.reference_functions()
    assert not missing, missing
    return bench, functions


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_corruption_matches_the_generator(reference, name):
    """Every corruption at every severity on the 20 images, both sides drawing from the same legacy
    np.random stream: identical, except elastic_transform within one level (OpenCV 5's warp)."""
    bench, functions = reference
    for severity in range(1, 6):
        seed = 100 * CORRUPTIONS.index(name) + severity
        ours = corrupt(IMAGES, name, severity, rng=bench.LegacyDraws(np.random.RandomState(seed)))
        np.random.seed(seed)
        c = SEVERITY_CONSTANTS[name][severity - 1]
        ref = np.stack([np.uint8(functions[name](Image.fromarray(img), c)) for img in IMAGES])
        diff = np.abs(ours.astype(int) - ref.astype(int))
        if name == "elastic_transform":  # a few values by more where a sample sits on an edge
            assert diff.mean() < 0.3 and (diff > 1).mean() < 0.01, (
                severity, diff.max(), diff.mean(), (diff > 1).mean())
        else:
            assert diff.max() == 0, (severity, int((diff > 0).sum()), int(diff.max()))
