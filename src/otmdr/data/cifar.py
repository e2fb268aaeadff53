"""CIFAR-10 / CIFAR-100 in their official "python version" format (pickled dicts).

Accepted ``root``: a directory holding ``cifar-10-batches-py/`` (``cifar-100-python/``), that
folder itself, or the official ``cifar-10-python.tar.gz`` (``cifar-100-python.tar.gz``) archive.
"""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
import torch

from ._io import corrupt_file_error, get_key, is_archive, load_pickle
from ._types import DatasetError, DatasetSpec, ImageData

CIFAR10 = {
    "folder": "cifar-10-batches-py",
    "train": [f"data_batch_{i}" for i in range(1, 6)],
    "test": ["test_batch"],
    "meta": "batches.meta",
}
CIFAR100 = {"folder": "cifar-100-python", "train": ["train"], "test": ["test"], "meta": "meta"}


def _missing(spec: DatasetSpec, where: Path | str, name: str) -> DatasetError:
    return DatasetError(
        f"dataset '{spec.name}': missing file {name} in {where}. Expected layout: {spec.layout}. "
        f"How to get it: {spec.how_to_get}"
    )


def _read_members(spec: DatasetSpec, root: Path, layout: dict, names: list[str]) -> dict[str, tuple[bytes, str]]:
    """``{name: (bytes, path shown in messages)}`` for each wanted file, from a folder or an archive."""
    folder = layout["folder"]
    if is_archive(root):
        found: dict[str, tuple[bytes, str]] = {}
        try:
            with tarfile.open(root, "r:*") as tar:
                for member in tar:
                    parts = member.name.lstrip("./").split("/")
                    if member.isfile() and len(parts) >= 2 and parts[-2] == folder and parts[-1] in names:
                        data = tar.extractfile(member).read()  # type: ignore[union-attr]
                        found[parts[-1]] = (data, f"{root}:{member.name}")
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise corrupt_file_error(root, f"unreadable archive ({exc})", spec.how_to_get) from None
        for name in names:
            if name not in found:
                raise _missing(spec, f"{root} (under {folder}/)", name)
        return found
    if not root.is_dir():
        raise DatasetError(
            f"dataset '{spec.name}': {root} is neither a directory nor a .tar.gz archive. "
            f"Expected layout: {spec.layout}. How to get it: {spec.how_to_get}"
        )
    base = root / folder if (root / folder).is_dir() else root
    out = {}
    for name in names:
        path = base / name
        if not path.is_file():
            raise _missing(spec, base, name)
        try:
            out[name] = (path.read_bytes(), str(path))
        except OSError as exc:
            raise DatasetError(f"cannot read {path}: {exc.strerror or exc}") from None
    return out


def _batch(spec: DatasetSpec, blob: bytes, where: str, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    d = load_pickle(blob, where, spec.how_to_get)
    if not isinstance(d, dict):
        raise corrupt_file_error(where, f"pickle holds a {type(d).__name__}, expected a dict", spec.how_to_get)
    try:
        data, labels = get_key(d, "data"), get_key(d, label_key)
    except KeyError as exc:
        raise corrupt_file_error(where, f"no {exc.args[0]!r} entry in the pickled dict", spec.how_to_get) from None
    data = np.asarray(data)
    labels = np.asarray(labels)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise corrupt_file_error(where, f"'data' is {data.dtype} {data.shape}, expected uint8 (N, 3072)",
                                 spec.how_to_get)
    if labels.shape != (data.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise corrupt_file_error(where, f"{len(labels)} labels for {data.shape[0]} images", spec.how_to_get)
    if len(labels) and (labels.min() < 0 or labels.max() >= spec.num_classes):
        raise corrupt_file_error(where, f"labels outside 0..{spec.num_classes - 1}", spec.how_to_get)
    return data, labels


def load_cifar_split(spec: DatasetSpec, split: str, root: Path, layout: dict, label_key: str,
                     names_key: str) -> ImageData:
    files = layout[split] + [layout["meta"]]
    blobs = _read_members(spec, root, layout, files)
    parts = [_batch(spec, *blobs[name], label_key) for name in layout[split]]
    meta_blob, meta_where = blobs[layout["meta"]]
    meta = load_pickle(meta_blob, meta_where, spec.how_to_get)
    try:
        classes = [c.decode() if isinstance(c, bytes) else str(c) for c in get_key(meta, names_key)]
    except (KeyError, TypeError, AttributeError, UnicodeDecodeError):
        raise corrupt_file_error(meta_where, f"no readable {names_key!r} list", spec.how_to_get) from None
    if len(classes) != spec.num_classes:
        raise corrupt_file_error(meta_where, f"{len(classes)} class names, expected {spec.num_classes}",
                                 spec.how_to_get)
    data = np.concatenate([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
    labels = np.concatenate([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
    images = torch.from_numpy(np.ascontiguousarray(data).reshape(-1, 3, 32, 32).copy())
    return ImageData(images=images, labels=torch.from_numpy(labels.astype(np.int64)), classes=classes)
