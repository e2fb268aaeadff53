"""How close ``otmdr.data.corruptions`` is to the published CIFAR-10-C generator, per corruption and severity.

The reference here is our own transcription of what ``make_cifar_c.py`` (hendrycks/robustness)
does, calling the libraries it calls -- scikit-image, OpenCV, scipy, Pillow and ImageMagick through
Wand -- in their current versions (``multichannel=True`` becomes ``channel_axis=-1``; impulse
noise uses scikit-image's 2018 salt-and-pepper draws, ``np.random.choice``). Both sides draw from
the same legacy ``np.random`` stream (the reference's global state, reseeded per corruption and
severity; ours through a Generator-shaped wrapper around the same RandomState), so random
corruptions are compared pixel by pixel, not only in distribution. The reference's frost reads the
generator's photographs with ``cv2.imread`` from ``--frost-dir`` (the published files; ours reads
the copies shipped in ``assets/frost``).

    PYTHONPATH=src python benchmarks/corruption_fidelity.py --data ../shared/datasets/cifar10-jpeg.tar.gz \\
        --images 200 --frost-dir ../shared/datasets/cifar-c-frost --out benchmarks/results/corruption_fidelity

Needs scikit-image, opencv-python-headless, Wand and the ImageMagick library (libmagickwand);
corruptions whose reference library is missing are reported as not measured.
"""

from __future__ import annotations

import argparse
import ctypes
import io
import json
import platform
import shlex
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from otmdr.data.corruptions import CORRUPTIONS, FROST_FILES, SEVERITY_CONSTANTS, corrupt, frost_photo_dir


class LegacyDraws:
    """The Generator methods ``corrupt`` calls, drawn from a legacy RandomState (the reference's stream)."""

    def __init__(self, state: np.random.RandomState):
        self.state = state
        self.normal, self.uniform, self.poisson = state.normal, state.uniform, state.poisson
        self.integers, self.random = state.randint, state.random_sample


def load_images(archive: Path, n: int) -> np.ndarray:
    """The first n/10 test images of each class (sorted names) from the CIFAR-10 JPEG tarball, uint8."""
    per_class = max(1, n // 10)
    chosen: dict[str, list[str]] = {}
    with tarfile.open(archive) as tar:
        members = sorted(m.name for m in tar.getmembers() if m.isfile() and m.name.split("/")[-3:-2] == ["test"])
        for name in members:
            cls = name.split("/")[-2]
            if len(chosen.setdefault(cls, [])) < per_class:
                chosen[cls].append(name)
        names = [m for cls in sorted(chosen) for m in chosen[cls]][:n]
        return np.stack([np.asarray(Image.open(io.BytesIO(tar.extractfile(m).read())).convert("RGB")) for m in names])


# ---------------------------------------------------------------------------- reference transcription
def _shown(path: Path | str) -> str:
    """``path`` relative to the current folder when it lies below it (no machine's absolute path
    in a committed report), else as given."""
    resolved = Path(path).resolve()
    try:
        return str(resolved.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def reference_functions(frost_dir: Path | None = None) -> tuple[dict[str, Callable[[Image.Image, Any], np.ndarray]],
                                                                 dict[str, str]]:
    """name -> f(PIL image, severity constant) returning the reference's image before ``np.uint8``,
    and name -> why it is missing, for the corruptions whose library (or, for frost, the folder of
    photographs ``frost_dir``, default the copies shipped with otmdr) is not available."""
    missing: dict[str, str] = {}
    try:
        import cv2
    except ImportError:
        cv2 = None
    try:
        import skimage
        from skimage.filters import gaussian
    except ImportError:
        skimage = gaussian = None
    try:
        from wand.api import library as wand_library
        from wand.image import Image as WandImage

        wand_library.MagickMotionBlurImage.argtypes = (ctypes.c_void_p, ctypes.c_double, ctypes.c_double,
                                                       ctypes.c_double)
    except (ImportError, OSError, AttributeError):
        WandImage = None
    from scipy.ndimage import map_coordinates, zoom as scizoom

    def wand_motion(png: bytes, radius: float, sigma: float, angle: float) -> np.ndarray:
        with WandImage(blob=png) as img:
            wand_library.MagickMotionBlurImage(img.wand, radius, sigma, angle)
            return cv2.imdecode(np.frombuffer(img.make_blob(), np.uint8), cv2.IMREAD_UNCHANGED)

    def crop_zoom(img, z):
        h = img.shape[0]
        ch = int(np.ceil(h / z))
        top = (h - ch) // 2
        out = scizoom(img[top:top + ch, top:top + ch], (z, z, 1), order=1)
        t = (out.shape[0] - h) // 2
        return out[t:t + h, t:t + h]

    def blur(x, s, **kw):
        return gaussian(x, sigma=s, channel_axis=-1, **kw)

    def plasma(decay, size=32):
        grid = np.empty((size, size))
        grid[0, 0] = 0
        step, amp = size, 100.0
        while step >= 2:
            h = step // 2
            c = grid[0:size:step, 0:size:step]
            acc = c + np.roll(c, -1, axis=0)
            acc += np.roll(acc, -1, axis=1)
            grid[h:size:step, h:size:step] = acc / 4 + amp * np.random.uniform(-amp, amp, acc.shape)
            dr, ul = grid[h:size:step, h:size:step], grid[0:size:step, 0:size:step]
            s1 = (dr + np.roll(dr, 1, axis=0)) + (ul + np.roll(ul, -1, axis=1))
            grid[0:size:step, h:size:step] = s1 / 4 + amp * np.random.uniform(-amp, amp, s1.shape)
            s2 = (dr + np.roll(dr, 1, axis=1)) + (ul + np.roll(ul, -1, axis=0))
            grid[h:size:step, 0:size:step] = s2 / 4 + amp * np.random.uniform(-amp, amp, s2.shape)
            step //= 2
            amp /= decay
        grid -= grid.min()
        return grid / grid.max()

    f: dict[str, Callable] = {
        "gaussian_noise": lambda p, c: np.clip(
            np.array(p) / 255. + np.random.normal(size=np.array(p).shape, scale=c), 0, 1) * 255,
        "shot_noise": lambda p, c: np.clip(np.random.poisson(np.array(p) / 255. * c) / c, 0, 1) * 255,
        "speckle_noise": lambda p, c: (lambda x: np.clip(x + x * np.random.normal(size=x.shape, scale=c), 0, 1) * 255)(
            np.array(p) / 255.),
        "contrast": lambda p, c: (lambda x, m: np.clip((x - m) * c + m, 0, 1) * 255)(
            np.array(p) / 255., np.mean(np.array(p) / 255., axis=(0, 1), keepdims=True)),
        "jpeg_compression": lambda p, c: (lambda b: (p.save(b, "JPEG", quality=c), Image.open(b))[1])(io.BytesIO()),
        "pixelate": lambda p, c: p.resize((int(32 * c), int(32 * c)), Image.BOX).resize((32, 32), Image.BOX),
    }

    def impulse(p, c):  # scikit-image 0.14's random_noise(mode='s&p')
        x = np.array(p) / 255.
        out = x.copy()
        flipped = np.random.choice([True, False], size=x.shape, p=[c, 1 - c])
        salted = np.random.choice([True, False], size=x.shape, p=[0.5, 0.5])
        out[flipped & salted] = 1
        out[flipped & ~salted] = 0
        return np.clip(out, 0, 1) * 255

    f["impulse_noise"] = impulse

    def zoom_blur(p, c):
        x = (np.array(p) / 255.).astype(np.float32)
        out = np.zeros_like(x)
        for z in c:
            out += crop_zoom(x, z)
        return np.clip((x + out) / (len(c) + 1), 0, 1) * 255

    f["zoom_blur"] = zoom_blur

    def fog(p, c):
        x = np.array(p) / 255.
        top = x.max()
        x += c[0] * plasma(c[1])[:32, :32][..., np.newaxis]
        return np.clip(x * top / (top + c[0]), 0, 1) * 255

    f["fog"] = fog

    if gaussian is None:
        for name in ("gaussian_blur", "glass_blur", "brightness", "saturate", "elastic_transform", "spatter"):
            missing[name] = "scikit-image is not installed"
    else:
        f["gaussian_blur"] = lambda p, c: np.clip(blur(np.array(p) / 255., c), 0, 1) * 255

        def glass(p, c):
            x = np.uint8(blur(np.array(p) / 255., c[0]) * 255)
            for _ in range(c[2]):
                for hh in range(32 - c[1], c[1], -1):
                    for ww in range(32 - c[1], c[1], -1):
                        dx, dy = np.random.randint(-c[1], c[1], size=(2,))
                        hp, wp = hh + dy, ww + dx
                        x[hh, ww], x[hp, wp] = x[hp, wp], x[hh, ww]  # the reference's view "swap", kept as is
            return np.clip(blur(x / 255., c[0]), 0, 1) * 255

        f["glass_blur"] = glass

        def hsv_op(channel, fn):
            def op(p, c):
                x = skimage.color.rgb2hsv(np.array(p) / 255.)
                x[:, :, channel] = fn(x[:, :, channel], c)
                return np.clip(skimage.color.hsv2rgb(x), 0, 1) * 255
            return op

        f["brightness"] = hsv_op(2, lambda v, c: np.clip(v + c, 0, 1))
        f["saturate"] = hsv_op(1, lambda s, c: np.clip(s * c[0] + c[1], 0, 1))
    if cv2 is None:
        for name in ("defocus_blur", "elastic_transform", "spatter", "snow", "motion_blur"):
            missing[name] = "OpenCV is not installed"
    else:
        def defocus(p, c):
            x = np.array(p) / 255.
            grid = np.arange(-8, 9)
            xx, yy = np.meshgrid(grid, grid)
            disk = np.array(xx**2 + yy**2 <= c[0] ** 2, dtype=np.float32)
            disk /= disk.sum()
            k = cv2.GaussianBlur(disk, ksize=(3, 3), sigmaX=c[1])
            return np.clip(np.stack([cv2.filter2D(x[:, :, d], -1, k) for d in range(3)], -1), 0, 1) * 255

        f["defocus_blur"] = defocus
        if gaussian is not None:
            def elastic(p, c):
                img = np.array(p, dtype=np.float32) / 255.
                centre, sq = np.float32((32, 32)) // 2, 32 // 3
                pts1 = np.float32([centre + sq, [centre[0] + sq, centre[1] - sq], centre - sq])
                pts2 = pts1 + np.random.uniform(-c[2], c[2], size=pts1.shape).astype(np.float32)
                img = cv2.warpAffine(img, cv2.getAffineTransform(pts1, pts2), (32, 32),
                                     borderMode=cv2.BORDER_REFLECT_101)
                dx = (gaussian(np.random.uniform(-1, 1, size=(32, 32)), c[1], mode="reflect", truncate=3)
                      * c[0]).astype(np.float32)
                dy = (gaussian(np.random.uniform(-1, 1, size=(32, 32)), c[1], mode="reflect", truncate=3)
                      * c[0]).astype(np.float32)
                xs, ys, zs = np.meshgrid(np.arange(32), np.arange(32), np.arange(3))
                idx = (np.reshape(ys + dy[..., None], (-1, 1)), np.reshape(xs + dx[..., None], (-1, 1)),
                       np.reshape(zs, (-1, 1)))
                return np.clip(map_coordinates(img, idx, order=1, mode="reflect").reshape(img.shape), 0, 1) * 255

            f["elastic_transform"] = elastic

            def spatter(p, c):
                x = np.array(p, dtype=np.float32) / 255.
                liquid = gaussian(np.random.normal(size=(32, 32), loc=c[0], scale=c[1]), sigma=c[2])
                liquid[liquid < c[3]] = 0
                if c[5] == 0:
                    liquid = (liquid * 255).astype(np.uint8)
                    dist = cv2.distanceTransform(255 - cv2.Canny(liquid, 50, 150), cv2.DIST_L2, 5)
                    _, dist = cv2.threshold(dist, 20, 20, cv2.THRESH_TRUNC)
                    dist = cv2.equalizeHist(cv2.blur(dist, (3, 3)).astype(np.uint8))
                    dist = cv2.filter2D(dist, cv2.CV_8U, np.array([[-2, -1, 0], [-1, 1, 1], [0, 1, 2]]))
                    dist = cv2.blur(dist, (3, 3)).astype(np.float32)
                    m = cv2.cvtColor(liquid * dist, cv2.COLOR_GRAY2BGRA)
                    m /= np.max(m, axis=(0, 1))
                    m *= c[4]
                    ones = np.ones_like(m[..., :1])
                    color = cv2.cvtColor(
                        np.concatenate((175 / 255. * ones, 238 / 255. * ones, 238 / 255. * ones), axis=2),
                        cv2.COLOR_BGR2BGRA)
                    x = cv2.cvtColor(x, cv2.COLOR_BGR2BGRA)
                    return cv2.cvtColor(np.clip(x + m * color, 0, 1), cv2.COLOR_BGRA2BGR) * 255
                m = gaussian(np.where(liquid > c[3], 1, 0).astype(np.float32), sigma=c[4])
                m[m < 0.8] = 0
                ones = np.ones_like(x[..., :1])
                color = np.concatenate((63 / 255. * ones, 42 / 255. * ones, 20 / 255. * ones), axis=2) * m[..., None]
                x *= 1 - m[..., None]
                return np.clip(x + color, 0, 1) * 255

            f["spatter"] = spatter
        if WandImage is None:
            missing["motion_blur"] = missing["snow"] = "Wand or the ImageMagick library is not installed"
        else:
            def motion(p, c):
                buf = io.BytesIO()
                p.save(buf, format="PNG")
                x = wand_motion(buf.getvalue(), c[0], c[1], np.random.uniform(-45, 45))
                return x[..., [2, 1, 0]] if x.ndim == 3 else np.stack([x, x, x], -1)

            f["motion_blur"] = motion

            def snow(p, c):
                x = np.array(p, dtype=np.float32) / 255.
                layer = np.random.normal(size=(32, 32), loc=c[0], scale=c[1])
                layer = crop_zoom(layer[..., None], c[2])
                layer[layer < c[3]] = 0
                buf = io.BytesIO()
                Image.fromarray((np.clip(layer.squeeze(), 0, 1) * 255).astype(np.uint8), mode="L").save(
                    buf, format="PNG")
                layer = (wand_motion(buf.getvalue(), c[4], c[5], np.random.uniform(-135, -45)) / 255.)[..., None]
                gray = cv2.cvtColor(x, cv2.COLOR_RGB2GRAY).reshape(32, 32, 1)
                x = c[6] * x + (1 - c[6]) * np.maximum(x, gray * 1.5 + 0.5)
                return np.clip(x + layer + np.rot90(layer, k=2), 0, 1) * 255

            f["snow"] = snow
    frost_dir = frost_dir if frost_dir is not None else frost_photo_dir()
    if cv2 is None:
        missing["frost"] = "OpenCV is not installed"
    elif frost_dir is None or not all((Path(frost_dir) / f).is_file() for f in FROST_FILES[:5]):
        missing["frost"] = f"the frost photographs (frost1-5) are not in {frost_dir}"
    else:
        def frost(p, c):
            photo = cv2.imread(str(Path(frost_dir) / FROST_FILES[np.random.randint(5)]))
            photo = cv2.resize(photo, (0, 0), fx=0.2, fy=0.2)
            top, left = np.random.randint(0, photo.shape[0] - 32), np.random.randint(0, photo.shape[1] - 32)
            photo = photo[top:top + 32, left:left + 32][..., [2, 1, 0]]
            return np.clip(c[0] * np.array(p) + c[1] * photo, 0, 255)

        f["frost"] = frost
    return {k: v for k, v in f.items() if k not in missing}, missing


# ----------------------------------------------------------------------------------------- measure
def measure(images: np.ndarray, seed: int, frost_dir: Path | None = None) -> dict[str, Any]:
    reference, missing = reference_functions(frost_dir)
    results: dict[str, Any] = {}
    clean = images.astype(np.float64)
    for name in CORRUPTIONS:
        rows = []
        for severity in range(1, 6):
            state_seed = seed + 1000 * CORRUPTIONS.index(name) + severity
            started = time.perf_counter()
            ours = corrupt(images, name, severity, rng=LegacyDraws(np.random.RandomState(state_seed)))
            seconds = time.perf_counter() - started
            row: dict[str, Any] = {"severity": severity, "ours_change": float(np.abs(ours - clean).mean()),
                                   "ours_ms_per_image": 1000 * seconds / len(images)}
            if name in reference:
                np.random.seed(state_seed)
                c = SEVERITY_CONSTANTS[name][severity - 1]
                ref = np.stack([np.uint8(reference[name](Image.fromarray(img), c)) for img in images])
                diff = np.abs(ours.astype(np.int64) - ref.astype(np.int64))
                row.update(reference_change=float(np.abs(ref - clean).mean()), mean_abs_diff=float(diff.mean()),
                           max_abs_diff=int(diff.max()), fraction_differing=float((diff > 0).mean()),
                           values_differing=int((diff > 0).sum()), values=int(diff.size))
            rows.append(row)
        results[name] = {"severities": rows, **({"not_measured": missing[name]} if name in missing else {})}
        print(f"{name:18s} " + "  ".join(f"s{r['severity']}: {r.get('mean_abs_diff', float('nan')):.4f}" for r in rows),
              flush=True)
    return results


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "numpy": np.__version__}
    for module in ("scipy", "PIL", "skimage", "cv2", "wand"):
        try:
            out[module] = getattr(__import__(module), "__version__", "?")
        except ImportError:
            out[module] = "not installed"
    try:
        from wand.version import MAGICK_VERSION

        out["ImageMagick"] = MAGICK_VERSION
    except Exception:
        pass
    return out


def summary(results: dict[str, Any]) -> str:
    """One line: how many corruptions are identical at every severity, and how far the others are."""
    measured = {n: e["severities"] for n, e in results.items() if "not_measured" not in e}
    same = [n for n, rows in measured.items() if all(r["max_abs_diff"] == 0 for r in rows)]
    rest = [f"{n} (mean {min(r['mean_abs_diff'] for r in rows):.2f}-"
            f"{max(r['mean_abs_diff'] for r in rows):.2f} levels, "
            f"max {max(r['max_abs_diff'] for r in rows)})" for n, rows in measured.items() if n not in same]
    return (f"**{len(measured)} of {len(results)} corruptions measured; {len(same)} identical in every value at every "
            f"severity**" + (f"; not identical: {', '.join(rest)}." if rest else "."))


def write_report(results: dict[str, Any], meta: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    lines = ["# Corruption fidelity: otmdr.data.corruptions vs the published CIFAR-10-C generator", "",
             f"Command: `{meta['command']}`  ", f"Date: {meta['date']}; machine: {meta['machine']}  ",
             f"Images: {meta['images']} CIFAR-10 test images ({meta['data']}), every severity; both sides draw "
             "from the same legacy np.random stream.  ",
             "Library versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()), "",
             "Per severity: `identical` where every value equals the reference's; otherwise the mean absolute "
             "difference in uint8 levels (0-255) per pixel and channel, with the number of values that differ (of "
             f"{meta['images'] * 32 * 32 * 3:,}) and the largest difference. `change` is the mean |corrupted - clean| "
             "(reference / ours).", "", summary(results), "",
             "| corruption | s1 | s2 | s3 | s4 | s5 | change s1 (ref / ours) | change s5 (ref / ours) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, entry in results.items():
        rows = entry["severities"]
        cells = ["n/a" if "mean_abs_diff" not in r else "identical" if r["max_abs_diff"] == 0 else
                 f"{r['mean_abs_diff']:.3f} ({r['values_differing']:,} differ, max {r['max_abs_diff']})" for r in rows]
        change = [f"{r['reference_change']:.2f} / {r['ours_change']:.2f}" if "reference_change" in r
                  else f"- / {r['ours_change']:.2f}" for r in (rows[0], rows[-1])]
        lines.append(f"| {name} | " + " | ".join(cells + change) + " |")
    notes = [f"- {name}: not measured, {entry['not_measured']}"
             for name, entry in results.items() if "not_measured" in entry]
    out.with_suffix(".md").write_text("\n".join(lines + [""] + notes) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="../shared/datasets/cifar10-jpeg.tar.gz", help="the CIFAR-10 JPEG tarball")
    parser.add_argument("--images", type=int, default=200, help="test images (the first n/10 of each class)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--frost-dir", default="../shared/datasets/cifar-c-frost",
                        help="the published frost photographs the reference reads (default: ../shared/datasets/"
                             "cifar-c-frost, else the copies shipped with otmdr)")
    parser.add_argument("--out", default="benchmarks/results/corruption_fidelity", help="writes OUT.json and OUT.md")
    args = parser.parse_args()
    if not Path(args.data).is_file():
        print(f"{args.data}: no such file (the CIFAR-10 JPEG tarball; pass --data)", file=sys.stderr)
        sys.exit(2)
    frost_dir = Path(args.frost_dir) if Path(args.frost_dir).is_dir() else frost_photo_dir()
    images = load_images(Path(args.data), args.images)
    meta = {"command": "python benchmarks/corruption_fidelity.py " + shlex.join(sys.argv[1:]),
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": f"{platform.machine()}, {platform.system()}",
            "images": len(images), "data": Path(args.data).name, "seed": args.seed, "versions": versions(),
            "frost_photographs": _shown(frost_dir), "ours_frost_photographs": _shown(frost_photo_dir())}
    write_report(measure(images, args.seed, frost_dir), meta, Path(args.out))
    print(f"written: {args.out}.md, {args.out}.json")


if __name__ == "__main__":
    main()
