"""Small helpers shared by the readers: reading (possibly gzip-compressed) files, corrupt-file
errors, archive detection, and a pickle loader that only builds numpy arrays."""

from __future__ import annotations

import gzip
import io
import pickle
import zlib
from pathlib import Path
from typing import Any

from ._types import DatasetError

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".tar.bz2", ".tar.xz")


def is_archive(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(ARCHIVE_SUFFIXES)


def corrupt_file_error(path: Path | str, why: str, how_to_get: str) -> DatasetError:
    """The error to raise for a damaged data file: its path, what is wrong, and how to re-obtain it."""
    return DatasetError(f"{path} is corrupt or truncated: {why}. Re-obtain the file ({how_to_get}).")


def read_maybe_gzip(path: Path, how_to_get: str) -> bytes:
    """The file's bytes, gunzipped when it starts with the gzip magic (whatever its name)."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DatasetError(f"cannot read {path}: {exc.strerror or exc}") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise corrupt_file_error(path, f"gzip data does not decompress ({exc})", how_to_get) from None
    return raw


# The CIFAR pickles hold dicts of lists, bytes and numpy arrays. Unpickling can run arbitrary
# code, so only the callables that rebuild numpy arrays (and py2-era bytes) are allowed.
_ALLOWED = {
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"), ("codecs", "encode"),
}


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} (only numpy arrays are expected)")


def load_pickle(data: bytes, path: Path | str, how_to_get: str) -> Any:
    try:
        return _ArrayUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as exc:  # truncated/garbled pickles raise many different types
        problem = f"not a readable python pickle ({type(exc).__name__}: {exc})"
        raise corrupt_file_error(path, problem, how_to_get) from None


def get_key(d: dict, key: str) -> Any:
    """``d[b'key']`` for python-2 pickles, ``d['key']`` for python-3 ones; KeyError otherwise."""
    if key.encode() in d:
        return d[key.encode()]
    return d[key]
