"""One process per folder: an advisory ``fcntl.flock`` on ``<folder>/.lock``.

The kernel drops the lock when its process dies, however it dies (``kill -9`` included), so a
crashed run never leaves a folder stuck; a second ``otmdr train`` or ``otmdr compare --resume``
on the same folder is refused while the first still runs. No-op where ``fcntl`` does not exist.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

__all__ = ["FolderBusy", "folder_lock"]


class FolderBusy(RuntimeError):
    """Another live process holds the folder."""


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike[str], what: str = "run") -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks here
        yield
        return
    path = Path(folder) / ".lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")
    try:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "another process"
            raise FolderBusy(f"{folder} is in use by {owner} (another otmdr {what} is writing to it); wait for it "
                             "to finish or stop it, or choose another folder") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"process {os.getpid()}")
        handle.flush()
        yield
    finally:
        handle.close()
