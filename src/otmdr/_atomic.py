"""One atomic file write for the whole project: checkpoints, run logs, dataset caches and
corrupted copies are written to a temporary file in the target's folder, flushed to disk, then
renamed over the target, so an interrupted write never leaves a half-written file."""

from __future__ import annotations

import errno
import glob
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from ._signals import pause_point

__all__ = ["atomic_write", "atomic_link", "remove_stale_temporaries"]

#: what os.link raises where the filesystem has no hard links (FAT, some network mounts)
_NO_LINKS = {errno.EPERM, errno.EXDEV, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike[str], write: Callable[[BinaryIO], object], *, durable: bool = True) -> None:
    """Call ``write(handle)`` on a temporary file and rename it to ``path`` when it succeeded.

    The file gets the permissions an ordinary new file would (``0o666`` minus the umask), not the
    ``0o600`` of ``mkstemp``, so shared results stay readable. On failure nothing is left behind.
    ``durable=False`` skips the fsync: the rename still makes the write atomic against a killed
    process, only a power loss may lose it; for files rebuilt from a checkpoint anyway (the
    per-epoch metrics), where an fsync per epoch costs more than a small model's epoch.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the writer's pid in the name: remove_stale_temporaries tells a killed write from a live one
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            if hasattr(os, "fchmod"):
                os.fchmod(handle.fileno(), 0o666 & ~_umask())
            write(handle)
            handle.flush()
            if durable:
                os.fsync(handle.fileno())
        pause_point(f"write-{path.name}")  # test-only: a kill lands while the temporary file exists
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str, *, durable: bool = True) -> None:
    """:func:`atomic_write` of a string (UTF-8): a reader sees the old file or the whole new one."""
    atomic_write(path, lambda handle: handle.write(text.encode()), durable=durable)


def atomic_link(source: str | os.PathLike[str], path: str | os.PathLike[str]) -> None:
    """Make ``path`` hold what ``source`` holds, atomically, without writing the bytes again: a
    hard link under a temporary name renamed over ``path`` (a copy where links are refused).

    The two names then share one file until either is replaced by a new write, which never
    modifies a file in place; so the second of two identical checkpoints costs no serialisation
    and no second fsync.
    """
    source, path = Path(source), Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.link.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError as error:
        if error.errno not in _NO_LINKS:
            raise
        atomic_write(path, lambda handle: handle.write(source.read_bytes()))  # no hard links here: copy
        return
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def remove_stale_temporaries(path: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporary files that killed writes of ``path`` left beside it
    (``.<name>.<pid>.<random>.tmp``, :func:`atomic_write`; never renamed into place, so never
    needed), for files written outside a run folder, which ``run_dir.remove_leftovers`` cleans
    under its lock. A temporary file whose writer still lives is another process's write in
    progress and stays. Returns what was removed."""
    path = Path(path)
    removed: list[Path] = []
    try:
        candidates = list(path.parent.glob(f".{glob.escape(path.name)}.*.tmp"))
    except OSError:
        return removed
    for leftover in candidates:
        pid = leftover.name[len(path.name) + 2:].split(".", 1)[0]
        if pid.isdigit() and _alive(int(pid)):
            continue
        try:
            leftover.unlink()
            removed.append(leftover)
        except OSError:  # gone meanwhile, or not ours to remove: the command's own write is unaffected
            pass
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid() or os.name == "nt":  # Windows: os.kill(pid, 0) would send CTRL_C_EVENT
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):  # another user's process, or no way to tell: leave it
        return True
    return True
