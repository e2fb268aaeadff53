"""Image folders (``<split>/<class>/*.{jpg,jpeg,png}``), given as a directory or a tar archive,
decoded once with Pillow and cached as a uint8 ``.npz``.

The cache lives in ``cache_dir``, else ``$OTMDR_CACHE_DIR``, else ``~/.cache/otmdr`` (the source
may be read-only). Each cache file stores a checksum of its source and is rebuilt when that no
longer matches: for an archive, its size, mtime and the sha256 of its first and last MiB; for a
directory, the sha256 of the sorted (relative path, size, mtime) list of its files. Writes go to
a temporary file in the cache directory and are renamed into place, so a crash never leaves a
half-written cache behind.
"""

from __future__ import annotations

import hashlib
import io
import os
import sys
import tarfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from .._atomic import atomic_write
from ._io import corrupt_file_error, is_archive
from ._types import DatasetError, DatasetSpec, ImageData

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
SPLITS = ("train", "test")
CACHE_VERSION = "1"
_MIB = 1 << 20
_GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")


def default_cache_dir(cache_dir: str | Path | None = None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("OTMDR_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "otmdr"


# ----------------------------------------------------------------------------- source checksums

def source_checksum(root: Path) -> str:
    h = hashlib.sha256()
    if root.is_file():
        st = root.stat()
        h.update(f"archive {st.st_size} {st.st_mtime_ns}\n".encode())
        with open(root, "rb") as f:
            h.update(hashlib.sha256(f.read(_MIB)).digest())
            f.seek(max(0, st.st_size - _MIB))
            h.update(hashlib.sha256(f.read(_MIB)).digest())
        return h.hexdigest()
    entries = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in filenames:
            path = os.path.join(dirpath, name)
            try:
                st = os.stat(path)
            except OSError:
                continue
            entries.append((os.path.relpath(path, root).replace(os.sep, "/"), st.st_size, st.st_mtime_ns))
    h.update(b"directory\n")
    for rel, size, mtime in sorted(entries):
        h.update(f"{rel}\0{size}\0{mtime}\n".encode())
    return h.hexdigest()


# ----------------------------------------------------------------------------- listing the source

def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES) and not name.startswith(".")


class _Listing:
    """The files of one split: ``files[class] = [(file name, bytes or Path)]``, plus the class
    folders of every split (for the train/test consistency check)."""

    def __init__(self) -> None:
        self.files: dict[str, list[tuple[str, bytes | Path]]] = {}
        self.split_classes: dict[str, set[str]] = {}
        self.where = ""  # the split folder, for messages


def _layout_error(spec: DatasetSpec, root: Path, what: str) -> DatasetError:
    return DatasetError(
        f"dataset '{spec.name}': {what} in {root}. Expected layout: {spec.layout}. How to get it: {spec.how_to_get}"
    )


def _list_directory(spec: DatasetSpec, root: Path, split: str) -> _Listing:
    base = root
    if not any((root / s).is_dir() for s in SPLITS):
        subdirs = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
        if len(subdirs) == 1 and any((subdirs[0] / s).is_dir() for s in SPLITS):
            base = subdirs[0]  # one top-level folder, as extracted from an archive
    listing = _Listing()
    for s in SPLITS:
        if (base / s).is_dir():
            listing.split_classes[s] = {
                p.name for p in (base / s).iterdir() if p.is_dir() and not p.name.startswith(".")
            }
    if split not in listing.split_classes:
        raise _layout_error(spec, root, f"no '{split}/' folder")
    listing.where = str(base / split)
    for cls in sorted(listing.split_classes[split]):
        folder = base / split / cls
        listing.files[cls] = [(p.name, p) for p in folder.iterdir() if p.is_file() and _is_image(p.name)]
    return listing


def _list_archive(spec: DatasetSpec, root: Path, split: str) -> _Listing:
    """One sequential pass over the archive: keep the bytes of the wanted split's images (they
    are small compared with the decoded array) and the class folders of every split."""
    by_prefix: dict[str, _Listing] = {}
    try:
        with tarfile.open(root, "r|*") as tar:
            for member in tar:
                parts = [p for p in member.name.split("/") if p not in ("", ".")]
                if not parts or parts[0] == "__MACOSX":
                    continue
                if parts[0] in SPLITS and len(parts) in (2, 3):
                    prefix, rest = "", parts
                elif len(parts) in (3, 4) and parts[1] in SPLITS:
                    prefix, rest = parts[0], parts[1:]
                else:
                    continue
                listing = by_prefix.setdefault(prefix, _Listing())
                s, cls = rest[0], rest[1]
                if cls.startswith("."):
                    continue
                if len(rest) == 2 and not member.isdir():
                    continue
                listing.split_classes.setdefault(s, set()).add(cls)
                if len(rest) == 3 and s == split and member.isfile() and _is_image(rest[2]):
                    data = tar.extractfile(member).read()  # type: ignore[union-attr]
                    listing.files.setdefault(cls, []).append((rest[2], data))
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise corrupt_file_error(root, f"unreadable archive ({exc})", spec.how_to_get) from None
    if not by_prefix:
        raise _layout_error(spec, root, "no train/<class>/ or test/<class>/ entries")
    if "" in by_prefix:
        prefix = ""
    elif len(by_prefix) == 1:
        prefix = next(iter(by_prefix))
    else:
        raise _layout_error(spec, root, f"several top-level folders ({', '.join(sorted(by_prefix))})")
    listing = by_prefix[prefix]
    if split not in listing.split_classes:
        raise _layout_error(spec, root, f"no '{split}/' folder")
    for cls in listing.split_classes[split]:
        listing.files.setdefault(cls, [])
    listing.where = f"{root}:{prefix + '/' if prefix else ''}{split}"
    return listing


# ----------------------------------------------------------------------------- decoding

def _decode_image(data: bytes | Path, mode: str | None) -> np.ndarray:
    """Decode one image with Pillow; ``mode`` None keeps 'L' for grayscale and 'RGB' otherwise.
    Returns (H, W, C) uint8."""
    from PIL import Image

    with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
        if mode is None:
            mode = "L" if im.mode in _GRAY_MODES else "RGB"
        arr = np.asarray(im.convert(mode) if im.mode != mode else im)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return arr


def _decode_all(spec: DatasetSpec, listing: _Listing, mode: str | None, limit_per_class: int | None) -> ImageData:
    from PIL import UnidentifiedImageError

    classes = sorted(listing.files)
    items: list[tuple[int, str, bytes | Path]] = []
    for label, cls in enumerate(classes):
        files = sorted(listing.files[cls], key=lambda t: t[0])
        if limit_per_class is not None:
            files = files[:limit_per_class]
        items += [(label, f"{listing.where}/{cls}/{name}", data) for name, data in files]
    if not items:
        raise DatasetError(
            f"dataset '{spec.name}': no .jpg/.jpeg/.png images under {listing.where}/<class>/. "
            f"Expected layout: {spec.layout}"
        )
    n = len(items)
    loud = n >= 2000
    start = time.monotonic()
    step = max(n // 5, 1)
    if loud:
        print(f"otmdr: decoding {n} images from {listing.where} (once; the result is cached)", file=sys.stderr)
    out: np.ndarray | None = None
    labels = np.empty(n, dtype=np.int64)
    first_name = ""
    for i, (label, name, data) in enumerate(items):
        try:
            arr = _decode_image(data, mode)
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
            raise DatasetError(f"{name} is not a readable image ({exc}); fix or remove it") from None
        if out is None:
            out = np.empty((n, *arr.shape), dtype=np.uint8)
            first_name = name
            mode = "L" if arr.shape[2] == 1 else "RGB"
        elif arr.shape != out.shape[1:]:
            h, w, c = out.shape[1:]
            raise DatasetError(
                f"{name} is {arr.shape[1]}x{arr.shape[0]} but the images must all share one size; the first "
                f"image ({first_name}) is {w}x{h}. Resize the odd images or remove them."
            )
        out[i] = arr
        labels[i] = label
        if loud and (i + 1) % step == 0 and i + 1 < n:
            print(f"otmdr:   {i + 1}/{n} images ({time.monotonic() - start:.0f} s)", file=sys.stderr)
    if loud:
        print(f"otmdr:   decoded {n} images in {time.monotonic() - start:.1f} s", file=sys.stderr)
    assert out is not None
    images = torch.from_numpy(np.ascontiguousarray(out.transpose(0, 3, 1, 2)))
    return ImageData(images=images, labels=torch.from_numpy(labels), classes=classes)


def _check_classes(spec: DatasetSpec, root: Path, listing: _Listing, split: str) -> None:
    """Both splits hold the same class folders, at least two, none of them empty: a class folder
    without images would shift every later label, a single class makes nothing to learn."""
    empty = sorted(cls for cls in listing.split_classes.get(split, ()) if not listing.files.get(cls))
    if empty and len(empty) < len(listing.split_classes.get(split, ())):
        raise DatasetError(f"dataset '{spec.name}': class folder(s) {', '.join(empty)} of {listing.where} hold no "
                           ".jpg/.jpeg/.png image: add images or remove the folder(s) (from train/ and test/)")
    if len(listing.split_classes.get(split, ())) == 1:
        raise DatasetError(f"dataset '{spec.name}': {listing.where} has {len(listing.files)} class folder(s); a "
                           "classifier needs at least 2 (one folder per class: <split>/<class>/*.png)")
    other = "test" if split == "train" else "train"
    if other not in listing.split_classes:
        return
    mine, theirs = listing.split_classes[split], listing.split_classes[other]
    if mine != theirs:
        only_mine, only_theirs = sorted(mine - theirs), sorted(theirs - mine)
        parts = []
        if only_mine:
            parts.append(f"only in {split}/: {', '.join(only_mine)}")
        if only_theirs:
            parts.append(f"only in {other}/: {', '.join(only_theirs)}")
        raise DatasetError(
            f"dataset '{spec.name}': the class folders of train/ and test/ in {root} differ ({'; '.join(parts)}). "
            "Both splits need the same class folders so that labels mean the same thing."
        )


# ----------------------------------------------------------------------------- the cache

def cache_path(cache_dir: Path, name: str, split: str, root: Path, limit_per_class: int | None) -> Path:
    key = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:16]
    limit = "" if limit_per_class is None else f"-limit{limit_per_class}"
    return cache_dir / f"{name}-{split}{limit}-{key}.npz"


def _read_cache(path: Path, checksum: str) -> ImageData | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["version"]) != CACHE_VERSION or str(z["checksum"]) != checksum:
                return None
            images, labels, classes = z["images"], z["labels"], [str(c) for c in z["classes"]]
    except FileNotFoundError:
        return None
    except Exception:  # a damaged cache file is rebuilt, never an error
        return None
    return ImageData(torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64)), classes)


def _write_cache(path: Path, data: ImageData, checksum: str) -> None:
    """Write the decoded split atomically; a cache that cannot be written only costs speed."""
    try:
        atomic_write(path, lambda f: np.savez(
            f, images=data.images.numpy(), labels=data.labels.numpy(), classes=np.array(data.classes, dtype=str),
            checksum=np.array(checksum), version=np.array(CACHE_VERSION)))
    except OSError as exc:
        warnings.warn(f"otmdr: cannot write the dataset cache {path} ({exc}); continuing without it", stacklevel=3)


# ----------------------------------------------------------------------------- entry point

def load_image_folder(spec: DatasetSpec, split: str, root: Path, *, cache_dir: str | Path | None = None,
                      mode: str | None = None, limit_per_class: int | None = None) -> ImageData:
    """Load one split of an image folder/archive, from the cache when it is current."""
    if not (root.is_dir() or is_archive(root)):
        raise DatasetError(
            f"dataset '{spec.name}': {root} is neither a directory nor a .tar/.tar.gz archive. "
            f"Expected layout: {spec.layout}. How to get it: {spec.how_to_get}"
        )
    checksum = source_checksum(root) + f"|mode={mode}"
    path = cache_path(default_cache_dir(cache_dir), spec.name, split, root, limit_per_class)
    cached = _read_cache(path, checksum)
    if cached is not None:
        return cached
    if root.is_file():
        print(f"otmdr: reading {root} for the '{split}' split of '{spec.name}' (cache: {path})", file=sys.stderr)
        listing = _list_archive(spec, root, split)
    else:
        listing = _list_directory(spec, root, split)
    _check_classes(spec, root, listing, split)
    data = _decode_all(spec, listing, mode, limit_per_class)
    _write_cache(path, data, checksum)
    return data
