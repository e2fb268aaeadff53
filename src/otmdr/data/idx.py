"""MNIST-style IDX files (``train-images-idx3-ubyte[.gz]`` and friends).

IDX layout: two zero bytes, a dtype code (0x08 = unsigned byte, the only one these datasets
use), the number of dimensions, then each dimension as a big-endian uint32, then the data.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import torch

from ._io import corrupt_file_error, read_maybe_gzip
from ._types import DatasetError, DatasetSpec, ImageData

_PREFIX = {"train": "train", "test": "t10k"}


def read_idx(path: Path, how_to_get: str = "see the dataset's home page") -> np.ndarray:
    """Parse one IDX file (plain or gzip) into a uint8 array of the shape its header declares."""
    raw = read_maybe_gzip(path, how_to_get)
    if len(raw) < 4:
        raise corrupt_file_error(path, f"only {len(raw)} bytes, shorter than an IDX header", how_to_get)
    if raw[0] != 0 or raw[1] != 0:
        magic = int.from_bytes(raw[:4], "big")
        raise corrupt_file_error(path, f"bad IDX magic number 0x{magic:08x} (expected 0x000008NN)", how_to_get)
    code, ndim = raw[2], raw[3]
    if code != 0x08:
        raise corrupt_file_error(path, f"IDX dtype code 0x{code:02x}, expected 0x08 (unsigned byte)", how_to_get)
    if ndim == 0:
        raise corrupt_file_error(path, "IDX header declares 0 dimensions", how_to_get)
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise corrupt_file_error(path, "file ends inside the IDX header", how_to_get)
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(dims, dtype=np.int64))
    found = len(raw) - header
    if found != expected:
        shape = "x".join(map(str, dims))
        raise corrupt_file_error(path, f"header declares {shape} = {expected} bytes of data but {found} follow",
                                 how_to_get)
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _find(root: Path, stem: str, spec: DatasetSpec, torchvision_name: str) -> Path:
    candidates = [root, root / "raw", root / torchvision_name / "raw"]
    for folder in candidates:
        for name in (stem, stem + ".gz"):
            if (folder / name).is_file():
                return folder / name
    raise DatasetError(
        f"dataset '{spec.name}': missing file {root / stem}[.gz]. Expected layout: {spec.layout}. "
        f"How to get it: {spec.how_to_get}"
    )


def load_idx_split(spec: DatasetSpec, split: str, root: Path, torchvision_name: str, classes: list[str]) -> ImageData:
    if not root.is_dir():
        raise DatasetError(
            f"dataset '{spec.name}': {root} is not a directory. Expected layout: {spec.layout}. "
            f"How to get it: {spec.how_to_get}"
        )
    prefix = _PREFIX[split]
    img_path = _find(root, f"{prefix}-images-idx3-ubyte", spec, torchvision_name)
    lbl_path = _find(root, f"{prefix}-labels-idx1-ubyte", spec, torchvision_name)
    images = read_idx(img_path, spec.how_to_get)
    labels = read_idx(lbl_path, spec.how_to_get)
    size = spec.image_size
    if images.ndim != 3 or images.shape[1:] != (size, size):
        raise corrupt_file_error(img_path, f"holds an array of shape {images.shape}, expected (N, {size}, {size})",
                      spec.how_to_get)
    if labels.ndim != 1:
        raise corrupt_file_error(lbl_path, f"holds an array of shape {labels.shape}, expected (N,)", spec.how_to_get)
    if len(labels) != len(images):
        raise DatasetError(
            f"dataset '{spec.name}': {img_path} holds {len(images)} images but {lbl_path} holds {len(labels)} "
            f"labels; the files do not belong together. Re-obtain them ({spec.how_to_get})."
        )
    if len(labels) and int(labels.max()) >= len(classes):
        raise corrupt_file_error(lbl_path, f"label {int(labels.max())} out of range 0..{len(classes) - 1}",
                                 spec.how_to_get)
    return ImageData(
        images=torch.from_numpy(images.copy()).unsqueeze(1),
        labels=torch.from_numpy(labels.astype(np.int64)),
        classes=list(classes),
    )
