"""What benchmarks/results may hold (the policy in benchmarks/results/README.md), checked or applied.

    python benchmarks/results_policy.py            # list what breaks the policy; exit 1 if anything
    python benchmarks/results_policy.py --apply    # fix it: pack logs, drop unembedded figures and leftovers

Committed per study: its reports (``*.md``), summary JSON (``summaries.json``, ``search.json``, the
robustness JSON), each run's config, metrics and summary (``config.yaml``, ``metrics.csv``,
``summary.json``), the figures its reports embed (``![...](path.png)``) and nothing else of the
figures, and its logs packed in one ``logs.tar.xz`` per report folder (the nearest folder above the
logs that holds a ``*.md`` report): ``tar -xJf logs.tar.xz`` in that folder puts them back. Never:
loose ``*.log``, leftovers (``*.stale``), checkpoints, figures no report embeds, files over 1 MB.

``--apply`` is idempotent and deterministic: packing the same logs again gives the same bytes
(sorted members, no time stamps, owner or mode of this machine), so an unchanged study stays
unchanged in git; logs added later to a packed folder are merged into its archive.
"""

from __future__ import annotations

import argparse
import io
import re
import subprocess
import sys
import tarfile
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
ARCHIVE = "logs.tar.xz"
ALLOWED = (".md", ".json", ".yaml", ".csv", ".png", ".tar.xz")
MAX_BYTES = 1_000_000
_IMAGE = re.compile(r"!\[[^\]]*\]\(([^)\s]+)\)|<img[^>]*\bsrc=\"([^\"]+)\"")


def files(root: Path) -> list[Path]:
    """The files under ``root`` that git holds or would add (what is not ignored), or every file
    where git is not available (an unpacked sdist, a copied folder)."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", "--", "."],
                                cwd=root, capture_output=True, check=True).stdout.decode()
        found = sorted({root / name for name in listed.split("\0") if name})
    except (OSError, subprocess.CalledProcessError):
        found = sorted(root.rglob("*"))
    return [path for path in found if path.is_file() and "__pycache__" not in path.parts]


def embedded(root: Path, all_files: list[Path]) -> set[Path]:
    """Every image a ``*.md`` under ``root`` embeds, resolved to a path."""
    found = set()
    for report in (path for path in all_files if path.suffix == ".md"):
        for match in _IMAGE.finditer(report.read_text(encoding="utf-8")):
            link = match.group(1) or match.group(2)
            if "://" not in link:
                found.add((report.parent / link.split("#")[0]).resolve())
    return found


def report_folder(root: Path, path: Path, all_files: list[Path]) -> Path:
    """The nearest folder above ``path`` (up to ``root``'s study folder) that holds a report."""
    reports = {p.parent for p in all_files if p.suffix == ".md"}
    folder = path.parent
    while folder != root and folder not in reports:
        folder = folder.parent
    parts = path.relative_to(root).parts
    if folder == root and len(parts) > 1:  # no report above: the study's top folder
        folder = root / parts[0]
    return folder


def violations(root: Path = RESULTS) -> list[str]:
    """What under ``root`` breaks the policy, one line each (empty when it holds)."""
    root = root.resolve()
    all_files = files(root)
    images = embedded(root, all_files)
    problems = []
    for path in all_files:
        name = path.relative_to(root).as_posix()
        if path.name.endswith(".stale"):
            problems.append(f"{name}: a leftover (.stale): delete it")
        elif path.suffix == ".log":
            problems.append(f"{name}: a loose log: pack it into its report folder's {ARCHIVE}")
        elif not path.name.endswith(ALLOWED):
            problems.append(f"{name}: not a report, JSON, config, metrics, figure or {ARCHIVE} (checkpoints and "
                            "other outputs are not committed)")
        elif path.suffix == ".png" and path.resolve() not in images:
            problems.append(f"{name}: a figure no report embeds: delete it (or embed it in the report)")
        elif path.name.endswith(".tar.xz"):
            problems += [f"{name}: {problem}" for problem in _archive_problems(root, path, all_files)]
        if path.is_file() and path.stat().st_size > MAX_BYTES:
            problems.append(f"{name}: {path.stat().st_size / 1e6:.1f} MB, over the 1 MB a results file may take")
    for image in sorted(images):
        if image.is_relative_to(root) and not image.is_file():
            problems.append(f"{image.relative_to(root).as_posix()}: embedded by a report but missing")
    return problems


def _archive_problems(root: Path, path: Path, all_files: list[Path]) -> list[str]:
    if path.name != ARCHIVE:
        return [f"archives are named {ARCHIVE}"]
    if report_folder(root, path, all_files) != path.parent and path.parent.parent != root:
        return ["not in a report folder (a folder holding a *.md report, or a study's top folder)"]
    try:
        with tarfile.open(path, "r:xz") as archive:
            members = archive.getmembers()
    except (tarfile.TarError, EOFError, OSError) as error:
        return [f"unreadable ({error})"]
    bad = [m.name for m in members if not (m.isfile() and m.name.endswith(".log") and not m.name.startswith("/")
                                          and ".." not in Path(m.name).parts)]
    return [f"holds {', '.join(bad[:3])}: only logs at relative paths belong there"] if bad else []


def _pack(folder: Path, logs: list[Path]) -> None:
    """Add ``logs`` to ``folder/logs.tar.xz`` (created or merged), deterministically; delete them."""
    contents: dict[str, bytes] = {}
    target = folder / ARCHIVE
    if target.is_file():
        with tarfile.open(target, "r:xz") as archive:
            for member in archive.getmembers():
                handle = archive.extractfile(member)
                if member.isfile() and handle is not None:
                    contents[member.name] = handle.read()
    for log in logs:
        contents[log.relative_to(folder).as_posix()] = log.read_bytes()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:xz", format=tarfile.PAX_FORMAT, preset=9) as archive:
        for name in sorted(contents):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(contents[name]), 0o644, 0
            archive.addfile(info, io.BytesIO(contents[name]))
    temporary = target.with_name(target.name + ".tmp")
    temporary.write_bytes(buffer.getvalue())
    temporary.replace(target)
    for log in logs:
        log.unlink()


def apply(root: Path = RESULTS) -> list[str]:
    """Bring ``root`` under the policy; returns what was done, one line each."""
    root = root.resolve()
    all_files = files(root)
    images = embedded(root, all_files)
    done: list[str] = []
    logs: dict[Path, list[Path]] = {}
    for path in all_files:
        name = path.relative_to(root).as_posix()
        if path.name.endswith(".stale") or (path.suffix == ".png" and path.resolve() not in images):
            path.unlink()
            done.append(f"deleted {name}")
        elif path.suffix == ".log":
            logs.setdefault(report_folder(root, path, all_files), []).append(path)
    for folder, group in sorted(logs.items()):
        _pack(folder, sorted(group))
        done.append(f"packed {len(group)} logs into {(folder / ARCHIVE).relative_to(root).as_posix()}")
    for folder in sorted({p.parent for p in all_files if not p.exists()}, key=lambda p: -len(p.parts)):
        while folder != root and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()  # folders left empty
            folder = folder.parent
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", nargs="?", default=str(RESULTS), help="the results folder (default: %(default)s)")
    parser.add_argument("--apply", action="store_true", help="pack logs, delete unembedded figures and leftovers")
    args = parser.parse_args(argv)
    root = Path(args.root)
    if not root.is_dir():
        print(f"error: {root} is not a folder: name the results folder", file=sys.stderr)
        return 2
    if args.apply:
        for line in apply(root):
            print(line)
    problems = violations(root)
    for line in problems:
        print(line, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
