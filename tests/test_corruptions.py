"""The 19 CIFAR-10-C corruptions: names and constants, shapes and seeding, and values that an
independent computation gives on tiny hand-made images (deterministic corruptions) or change
statistics per severity (random ones)."""

from __future__ import annotations

import colorsys
import math

import numpy as np
import pytest
import torch

from otmdr.data import _imaging as im
from otmdr.data.corruptions import BENCHMARK_CORRUPTIONS, CORRUPTIONS, SEVERITY_CONSTANTS, corrupt
from otmdr.eval.corruption_grid import parse_corruptions


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


RGB = _structured(6, 32, 3, 0)
GRAY = _structured(3, 28, 1, 1)
GREY128 = np.full((4, 32, 32, 3), 128, dtype=np.uint8)


def _change(images: np.ndarray, name: str, severity: int, seed: int = 0) -> float:
    return float(np.abs(corrupt(images, name, severity, seed).astype(np.float64) - images).mean())


class Fixed:
    """A random source whose every draw is a constant (the draws' shapes as requested)."""

    def __init__(self, value: float):
        self.value = value

    def _full(self, size):
        return np.full(() if size is None else size, self.value)

    def integers(self, low, high, size=None):
        return self._full(size).astype(np.int64)

    def uniform(self, low=0.0, high=1.0, size=None):
        return self._full(size)

    def normal(self, loc=0.0, scale=1.0, size=None):
        return self._full(size)

    def random(self, size=None):
        return self._full(size)


# ----------------------------------------------------------------------------------- names and API
def test_the_19_names_the_benchmark_15_and_five_severities_each():
    assert len(CORRUPTIONS) == 19 == len(set(CORRUPTIONS))
    assert CORRUPTIONS[:15] == BENCHMARK_CORRUPTIONS
    assert set(CORRUPTIONS[15:]) == {"speckle_noise", "gaussian_blur", "spatter", "saturate"}
    assert all(len(SEVERITY_CONSTANTS[n]) == 5 for n in CORRUPTIONS) and set(SEVERITY_CONSTANTS) == set(CORRUPTIONS)
    assert parse_corruptions("all") == list(CORRUPTIONS)
    assert parse_corruptions("benchmark") == list(BENCHMARK_CORRUPTIONS)
    with pytest.raises(ValueError, match="not available here: frost"):
        parse_corruptions("benchmark", [n for n in CORRUPTIONS if n != "frost"])
    # the CIFAR table, not ImageNet-C's: motion blur (radius, sigma) and zoom factors up to 1.25
    assert SEVERITY_CONSTANTS["motion_blur"] == [(6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)]
    assert SEVERITY_CONSTANTS["zoom_blur"][-1].max() == pytest.approx(1.25)


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_shape_dtype_seeding_and_layouts(name: str) -> None:
    for images in (RGB, GRAY):
        out = corrupt(images, name, 3, seed=3)
        assert out.shape == images.shape and out.dtype == np.uint8
        np.testing.assert_array_equal(out, corrupt(images, name, 3, seed=3))
    assert not np.array_equal(corrupt(RGB, name, 3, seed=3), RGB)
    t = torch.from_numpy(GRAY).permute(0, 3, 1, 2).contiguous()  # channels-first torch input
    out_t = corrupt(t, name, 2, seed=1)
    assert isinstance(out_t, torch.Tensor) and out_t.dtype == torch.uint8 and out_t.shape == t.shape
    np.testing.assert_array_equal(out_t.permute(0, 2, 3, 1).numpy(), corrupt(GRAY, name, 2, seed=1))


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="gaussian_noise"):
        corrupt(RGB, "not_a_corruption", 1)
    for severity in (0, 6, True):
        with pytest.raises(ValueError, match="1, 2, 3, 4, 5"):
            corrupt(RGB, "fog", severity)
    with pytest.raises(ValueError, match="uint8"):
        corrupt(RGB.astype(np.float32), "fog", 1)


# ------------------------------------------------------------------- deterministic: exact values
def test_contrast_scales_about_each_channels_own_mean():
    img = np.zeros((1, 8, 8, 3), dtype=np.uint8)
    img[..., 0], img[..., 1], img[..., 2] = 40, 200, 120
    img[0, :4, :, :] += 30  # half of each channel brighter: channel means 55, 215, 135
    for severity, c in enumerate(SEVERITY_CONSTANTS["contrast"], 1):
        out = corrupt(img, "contrast", severity)[0].astype(np.float64)
        for ch, mean in enumerate((55, 215, 135)):
            expected_top = math.floor(((mean + 15) / 255 - mean / 255) * c * 255 + mean)  # (x - m) c + m
            assert abs(out[0, 0, ch] - expected_top) <= 1
            assert abs(out[..., ch].mean() - mean) <= 1  # each channel keeps its own mean


def test_brightness_and_saturate_follow_hsv():
    pixels = np.array([[[200, 40, 90], [10, 10, 10], [90, 160, 30], [255, 250, 0]]], dtype=np.uint8)[None]
    for name, channel in (("brightness", 2), ("saturate", 1)):
        for severity, c in enumerate(SEVERITY_CONSTANTS[name], 1):
            out = corrupt(pixels, name, severity)[0, 0]
            for got, rgb in zip(out, pixels[0, 0]):
                hsv = list(colorsys.rgb_to_hsv(*(rgb / 255.0)))
                hsv[channel] = min(1.0, hsv[2] + c) if channel == 2 else min(1.0, max(0.0, hsv[1] * c[0] + c[1]))
                expected = np.floor(np.clip(colorsys.hsv_to_rgb(*hsv), 0, 1) * 255)
                assert np.abs(got - expected).max() <= 1, (name, severity, rgb, got, expected)


def _impulse(size: int = 15) -> np.ndarray:
    img = np.zeros((1, size, size, 1), dtype=np.uint8)
    img[0, size // 2, size // 2] = 255
    return img


def test_gaussian_blur_of_an_impulse_is_the_truncated_gaussian():
    for severity, sigma in enumerate(SEVERITY_CONSTANTS["gaussian_blur"], 1):
        radius = int(4 * sigma + 0.5)  # scikit-image's truncate=4
        g = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
        g /= g.sum()
        out = corrupt(_impulse(), "gaussian_blur", severity)[0, 2:13, 2:13, 0].astype(int)
        expected = np.zeros((11, 11))
        expected[5 - radius:6 + radius, 5 - radius:6 + radius] = np.outer(g, g)
        assert np.abs(out - np.floor(expected * 255)).max() <= 1


def test_defocus_blur_severity_1_is_a_3x3_gaussian_of_sigma_0_4():
    g = np.exp(-np.array([1.0, 0.0, 1.0]) / (2 * 0.4**2))  # radius 0.3: the disk is one pixel
    g /= g.sum()
    out = corrupt(_impulse(), "defocus_blur", 1)[0, 6:9, 6:9, 0].astype(int)
    assert np.abs(out - np.floor(np.outer(g, g) * 255)).max() <= 1


def test_motion_blur_kernel_taps_lie_along_the_angle_with_imagemagick_weights():
    img = _impulse(31)[0]
    for radius, sigma in SEVERITY_CONSTANTS["motion_blur"]:
        width = 2 * math.ceil(radius) + 1
        k = np.exp(-np.arange(width) ** 2 / (2 * sigma**2))
        k /= k.sum()
        for angle, step in ((0.0, (0, -1)), (90.0, (-1, 0))):  # the output gathers from +angle
            out = im.motion_blur_im(img, radius, sigma, angle)[..., 0].astype(int)
            taps = np.array([out[15 + i * step[0], 15 + i * step[1]] for i in range(width)])
            assert np.abs(taps - k * 255).max() <= 1 and out.sum() == pytest.approx(taps.sum())


def test_glass_blur_copies_rather_than_swaps():
    """With every draw -1, the reference's view "swap" copies the up-left neighbour into each
    pixel of rows/columns 2..31; a true swap would move values the other way too."""
    img = np.random.default_rng(0).integers(0, 256, (1, 32, 32, 3)).astype(np.uint8)
    out = corrupt(img, "glass_blur", 1, rng=Fixed(-1))[0]  # sigma 0.05: a 1-tap blur, no smoothing
    base = (img[0] / 255.0 * 255).astype(np.uint8)  # the reference's truncating round trip
    expected = base.copy()
    expected[2:, 2:] = base[1:-1, 1:-1]
    np.testing.assert_array_equal(out, expected)


def test_elastic_transform_with_no_jitter_is_the_identity():
    img = RGB[:1]
    out = corrupt(img, "elastic_transform", 1, rng=Fixed(0.0))
    assert np.abs(out.astype(int) - img).max() <= 1


def test_warp_affine_shift_by_a_whole_pixel_reflects_101_at_the_border():
    x = np.arange(16, dtype=np.float32).reshape(4, 4, 1)
    shifted = im.warp_affine_cv(x, np.array([[1.0, 0, 1], [0, 1.0, 0]]))  # dst(x) = src(x - 1)
    np.testing.assert_array_equal(shifted[:, 1:, 0], x[:, :-1, 0])
    np.testing.assert_array_equal(shifted[:, 0, 0], x[:, 1, 0])  # reflect-101: index -1 -> 1


def test_pixelate_and_jpeg_are_pillow_round_trips():
    from io import BytesIO

    from PIL import Image

    img = RGB[0]
    out = corrupt(RGB[:1], "pixelate", 4)[0]
    small = Image.fromarray(img).resize((24, 24), Image.BOX).resize((32, 32), Image.BOX)
    np.testing.assert_array_equal(out, np.asarray(small))
    buf = BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=40)
    np.testing.assert_array_equal(corrupt(RGB[:1], "jpeg_compression", 5)[0], np.asarray(Image.open(buf)))


def test_fog_keeps_the_images_maximum_scale():
    # x' = (x + s * plasma) * max / (max + s) with plasma in [0, 1]: never above the image maximum
    for severity in range(1, 6):
        out = corrupt(RGB, "fog", severity, seed=2)
        assert (out.reshape(len(RGB), -1).max(1) <= RGB.reshape(len(RGB), -1).max(1)).all()


# ----------------------------------------------------------------------- random: change statistics
def test_noise_amplitudes_per_severity_match_their_distributions():
    x = 128 / 255
    for severity in range(1, 6):
        sigma = SEVERITY_CONSTANTS["gaussian_noise"][severity - 1]
        # E|N(0, s)| = s sqrt(2/pi), less half a level on average for truncating to uint8
        assert _change(GREY128, "gaussian_noise", severity) == pytest.approx(
            255 * sigma * math.sqrt(2 / math.pi), abs=0.8)
        s = SEVERITY_CONSTANTS["speckle_noise"][severity - 1]
        assert _change(GREY128, "speckle_noise", severity) == pytest.approx(
            255 * x * s * math.sqrt(2 / math.pi), abs=0.8)
        amount = SEVERITY_CONSTANTS["impulse_noise"][severity - 1]
        hit = (corrupt(GREY128, "impulse_noise", severity) != 128).mean()
        assert hit == pytest.approx(amount, abs=4 * math.sqrt(amount / GREY128.size) + 0.002)
        lam = x * SEVERITY_CONSTANTS["shot_noise"][severity - 1]  # Poisson(lam)/c: std sqrt(lam)/c
        assert _change(GREY128, "shot_noise", severity) == pytest.approx(
            255 * math.sqrt(lam) / SEVERITY_CONSTANTS["shot_noise"][severity - 1] * math.sqrt(2 / math.pi),
            rel=0.1, abs=0.8)


@pytest.mark.parametrize("name", ["gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise", "defocus_blur",
                                  "zoom_blur", "motion_blur", "fog", "brightness", "contrast", "pixelate", "spatter",
                                  "gaussian_blur", "snow"])
def test_change_grows_with_severity(name: str) -> None:
    change = [_change(RGB, name, s) for s in range(1, 6)]
    if name in ("snow", "spatter"):  # the published tables are not monotone step by step; the ends are
        assert change[-1] > change[0], change
    else:
        assert all(b >= a - 0.3 for a, b in zip(change, change[1:])), change
    assert change[-1] > change[0]


@pytest.mark.parametrize("name", ["snow", "spatter", "frost", "glass_blur", "elastic_transform", "motion_blur", "fog"])
def test_random_corruptions_depend_on_the_seed(name: str) -> None:
    assert not np.array_equal(corrupt(RGB, name, 4, seed=0), corrupt(RGB, name, 4, seed=1))


def test_grayscale_goes_through_colour_corruptions_as_grey_rgb():
    grey3 = np.repeat(GRAY, 3, axis=-1)
    for name in ("brightness", "snow"):
        out = corrupt(GRAY, name, 4, seed=5)[..., 0].astype(int)
        via_rgb = corrupt(grey3, name, 4, seed=5).astype(np.float64) @ np.array([0.299, 0.587, 0.114])
        assert np.abs(out - np.rint(via_rgb)).max() <= 1


# ------------------------------------------------------------------------------------------ frost
def _photo(folder, name: str) -> np.ndarray:
    from PIL import Image

    with Image.open(folder / name) as f:
        return np.asarray(f.convert("RGB"))


def test_frost_blends_the_shipped_photograph_at_the_drawn_crop(monkeypatch):
    """With every draw 0: photograph frost1, downscaled by 0.2 (every 5th pixel from the 3rd, the
    centres of cv2's bilinear samples), its top-left 32x32 crop, c0 * image + c1 * frost."""
    from otmdr.data import corruptions as module

    monkeypatch.delenv(module.FROST_DIR_ENV, raising=False)
    folder = module.frost_photo_dir()
    assert folder is not None and sorted(p.name for p in folder.iterdir() if p.suffix in (".png", ".jpg")) == sorted(
        module.FROST_FILES)
    assert {"LICENSE", "NOTICE"} <= {p.name for p in folder.iterdir()}
    frost = _photo(folder, "frost1.png")[2::5, 2::5][:32, :32].astype(np.float64)
    for severity in (1, 5):
        c = SEVERITY_CONSTANTS["frost"][severity - 1]
        expected = np.clip(c[0] * RGB.astype(np.float64) + c[1] * frost, 0, 255).astype(np.uint8)
        np.testing.assert_array_equal(corrupt(RGB, "frost", severity, rng=Fixed(0)), expected)


def test_frost_draws_photograph_then_row_then_column():
    class Draws(Fixed):
        def __init__(self):
            super().__init__(0)
            self.calls = []

        def integers(self, low, high, size=None):
            self.calls.append((low, high))
            return [3, 7, 11][len(self.calls) - 1]

    draws = Draws()
    out = corrupt(RGB[:1], "frost", 2, rng=draws)
    from otmdr.data import corruptions as module

    # frost4.jpg is 350 x 527, downscaled to 70 x 105: rows from [0, 70 - 32), columns from [0, 105 - 32)
    assert draws.calls == [(0, 5), (0, 38), (0, 73)]
    frost = _photo(module.frost_photo_dir(), "frost4.jpg")[2::5, 2::5][7:39, 11:43].astype(np.float64)
    np.testing.assert_array_equal(out[0], np.clip(RGB[0] + 0.3 * frost, 0, 255).astype(np.uint8))


def test_frost_of_larger_images_and_grey_ones():
    big = np.repeat(np.repeat(RGB[:2], 5, axis=1), 5, axis=2)  # 160 x 160, larger than every downscaled photograph
    out = corrupt(big, "frost", 3, seed=1)
    assert out.shape == big.shape and np.abs(out.astype(int) - big).mean() > 5
    assert corrupt(GRAY, "frost", 3, seed=1).shape == GRAY.shape


def test_frost_from_a_folder_the_user_names(monkeypatch, tmp_path):
    import shutil

    from otmdr.data import DatasetError
    from otmdr.data import corruptions as module

    shipped = corrupt(RGB, "frost", 4, seed=3)
    for name in module.FROST_FILES:
        shutil.copy(module.frost_photo_dir() / name, tmp_path / name)
    monkeypatch.setenv(module.FROST_DIR_ENV, str(tmp_path))
    assert module.frost_photo_dir() == tmp_path
    np.testing.assert_array_equal(corrupt(RGB, "frost", 4, seed=3), shipped)
    (tmp_path / "frost2.png").unlink()
    with pytest.raises(DatasetError, match=r"OTMDR_FROST_DIR=.*no frost2\.png there"):
        corrupt(RGB, "frost", 4, seed=3)


def test_frost_falls_back_to_the_procedural_texture_with_a_warning(monkeypatch, tmp_path):
    from otmdr.data import corruptions as module

    monkeypatch.delenv(module.FROST_DIR_ENV, raising=False)
    photographed = corrupt(RGB, "frost", 4, seed=3)
    monkeypatch.setattr(module, "_shipped_frost_dir", lambda: tmp_path)  # a copy stripped of its package data
    monkeypatch.setattr(module, "_FALLBACK_WARNED", [])
    with pytest.warns(UserWarning, match="procedural ice texture"):
        textured = corrupt(RGB, "frost", 4, seed=3)
    assert textured.shape == RGB.shape and not np.array_equal(textured, photographed)
    assert np.abs(textured.astype(int) - RGB).mean() > 10


# ------------------------------------------------------------------ snow's grey conversion (cv2's)
def _round_to_float32(value) -> np.float32:
    """The float32 nearest to the exact rational ``value`` (ties to an even mantissa)."""
    from fractions import Fraction

    guess = np.float32(float(value))
    candidates = [np.nextafter(guess, np.float32(-np.inf)), guess, np.nextafter(guess, np.float32(np.inf))]
    return min(candidates, key=lambda v: (abs(Fraction(float(v)) - value), int(np.array(v).view(np.uint32)) & 1))


def test_fused_multiply_add_rounds_once():
    from fractions import Fraction

    ulp = 2.0**-23
    a, b, c = np.float32(1 + ulp), np.float32((1 - ulp) * 2.0**-24), np.float32(1 + ulp)
    # a*b + c = c + 2^-24 - 2^-70, just below the midpoint between c and the next float32: rounding
    # through float64 lands on the midpoint and then rounds to the even neighbour, the wrong one
    assert im._fma_f32(a, b, c) == c
    assert np.float32(np.float64(a) * np.float64(b) + np.float64(c)) != c
    rng = np.random.default_rng(0)
    x = ((rng.random((3, 400)) * 2 - 0.5).astype(np.float32)
         * np.float32(2.0) ** rng.integers(-30, 30, (3, 400)).astype(np.float32))
    got = im._fma_f32(x[0], x[1], x[2])
    for i in range(x.shape[1]):
        exact = Fraction(float(x[0, i])) * Fraction(float(x[1, i])) + Fraction(float(x[2, i]))
        assert got[i] == _round_to_float32(exact), i


def test_rgb2gray_cv_sums_green_red_blue_with_float32_coefficients():
    x = np.float32(RGB[:2] / 255.0)
    r, g, b = (x[..., i].astype(np.float64) for i in range(3))
    cr, cg, cb = (np.float64(np.float32(v)) for v in (0.299, 0.587, 0.114))
    y = im.rgb2gray_cv(x)
    assert y.dtype == np.float32 and y.shape == x.shape[:-1]
    # each value is within one float32 step of the exact sum, and the fused result never rounds worse
    exact = r * cr + g * cg + b * cb
    assert np.abs(y - exact).max() <= 2.0**-24 * 2
    plain = im.rgb2gray_cv(x, fused=False)
    np.testing.assert_array_equal(
        plain, (x[..., 0] * np.float32(0.299) + x[..., 1] * np.float32(0.587)) + x[..., 2] * np.float32(0.114))
    assert (y != plain).any()
