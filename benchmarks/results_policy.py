"""What benchmarks/results may hold (the policy in benchmarks/results/README.md), checked or applied.

    python benchmarks/results_policy.py            # list what breaks the policy; exit 1 if anything
    python benchmarks/results_policy.py --apply    # fix it: pack logs and large studies, drop leftovers

Committed per study: its reports (``*.md``), summary JSON (``summaries.json``, ``search.json``, the
robustness JSON), each run's config, metrics and summary (``config.yaml``, ``metrics.csv``,
``summary.json``), the figures its reports embed (``![...](path.png)``) and nothing else of the
figures, and its logs packed in one ``logs.tar.xz`` per report folder (the nearest folder above the
logs that holds a ``*.md`` report): ``tar -xJf logs.tar.xz`` in that folder puts them back. Never:
loose ``*.log``, leftovers (``*.stale``), checkpoints, figures no report embeds, files over 1 MB,
reports or JSON naming a path of the machine that made them (its checkout, a home or workspace folder;
``--apply`` writes the checkout's and the shared folder's beside it relative, as ``runs/...`` and
``../shared/...``).

Large studies: a ``runs/`` folder holding more than 2 MB of loose run files is packed, beside it, into
``runs-final.tar.xz`` (the runs directly under ``runs/``) and ``runs-<folder>.tar.xz`` for runs nested
one folder down (``runs-search.tar.xz`` for ``runs/search/*``, ``runs-superseded.tar.xz``, ...); one
that would pass 1 MB compressed is split into ``runs-<group>-1.tar.xz``, ``-2``, ... at run
boundaries (equal numbers of runs, as few parts as fit). A ``summaries.json`` over 1 MB is packed
into ``summaries.json.tar.xz`` beside it; one whose archive would pass 1 MB is split at run
boundaries into ``summaries-1.json.tar.xz``, ``-2``, ... (each ``summaries-<i>.json`` the same
methods-to-runs dictionary for its share of the runs, in order): ``--merge-summaries FOLDER``
writes ``summaries.json`` back from them. Members keep their paths relative to that folder, so
``tar -xJf ARCHIVE`` there puts ``runs/...`` or ``summaries.json`` back; loose files found beside an
archive (unpacked to read or resume, or added later) are merged into it by the next ``--apply``.

``--apply`` is idempotent and deterministic: packing the same files again gives the same bytes
(sorted members, no time stamps, owner or mode of this machine), so an unchanged study stays
unchanged in git; logs added later to a packed folder are merged into its archive.
"""

from __future__ import annotations

import argparse
import io
import json
import re
import subprocess
import sys
import tarfile
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
ARCHIVE = "logs.tar.xz"
SUMMARIES = "summaries.json"
SUMMARIES_ARCHIVE = "summaries.json.tar.xz"
_SUMMARIES_PART = re.compile(r"summaries-([0-9]+)\.json\.tar\.xz")
_SUMMARIES_PART_FILE = re.compile(r"summaries-[0-9]+\.json")  # a part unpacked beside its archive
RUN_FILES = (".json", ".yaml", ".csv")  # what a runs-*.tar.xz holds
RUNS_THRESHOLD = 2_000_000  # loose run files under one runs/ folder above this are packed
_RUNS_ARCHIVE = re.compile(r"runs-[A-Za-z0-9_.=+-]+\.tar\.xz")
ALLOWED = (".md", ".json", ".yaml", ".csv", ".png", ".tar.xz")
MAX_BYTES = 1_000_000
_IMAGE = re.compile(r"!\[[^\]]*\]\(([^)\s]+)\)|<img[^>]*\bsrc=\"([^\"]+)\"")
# A path of the machine that made a file (its home, a workspace): not reproducible elsewhere.
_MACHINE_PATH = re.compile(r"(?<![\w.~-])/(?:home|Users|root|work)/[^\s`'\"),]*")
_CHECKOUT = str(RESULTS.parent.parent) + "/"
_SHARED = str(RESULTS.parent.parent.parent / "shared") + "/"  # the shared folder beside the checkout
_TEXT = (".md", ".json", ".yaml", ".csv", ".log")


def _relativise(path: Path) -> bool:
    """Write this checkout's absolute paths relative to it (``runs/...``) and those of the shared
    folder beside it as ``../shared/...``, the way a command run from the checkout's root names
    them; True if the file changed. Other machine paths stay, for :func:`violations` to name."""
    text = path.read_text(errors="surrogateescape")
    fixed = text.replace(_CHECKOUT, "").replace(_SHARED, "../shared/")
    if fixed != text:
        path.write_text(fixed, errors="surrogateescape")
    return fixed != text


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


def _loose_runs(root: Path, all_files: list[Path]) -> dict[Path, list[Path]]:
    """The run files (``*.json``, ``*.yaml``, ``*.csv``) under each ``runs/`` folder, by the folder
    holding that ``runs/`` (the outermost ``runs`` in a path)."""
    found: dict[Path, list[Path]] = {}
    for path in all_files:
        parts = path.relative_to(root).parts
        if "runs" in parts[:-1] and path.name.endswith(RUN_FILES):
            at = parts.index("runs")
            found.setdefault(root.joinpath(*parts[:at]), []).append(path)
    return found


def _runs_archives(folder: Path) -> list[Path]:
    return sorted(path for path in folder.glob("runs-*.tar.xz") if _RUNS_ARCHIVE.fullmatch(path.name))


def read_archive(path: Path) -> dict[str, bytes]:
    """Every file in a .tar.xz, by its member name."""
    contents: dict[str, bytes] = {}
    with tarfile.open(path, "r:xz") as archive:
        for member in archive.getmembers():
            handle = archive.extractfile(member)
            if member.isfile() and handle is not None:
                contents[member.name] = handle.read()
    return contents


def _archive_bytes(contents: dict[str, bytes]) -> bytes:
    """``contents`` as a .tar.xz, deterministically: sorted members, mode 0644, time 0, no owner."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:xz", format=tarfile.PAX_FORMAT, preset=9) as archive:
        for name in sorted(contents):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(contents[name]), 0o644, 0
            archive.addfile(info, io.BytesIO(contents[name]))
    return buffer.getvalue()


def _write(target: Path, data: bytes) -> None:
    temporary = target.with_name(target.name + ".tmp")
    temporary.write_bytes(data)
    temporary.replace(target)


def _summaries_archives(folder: Path) -> list[Path]:
    """The archives ``summaries.json`` is packed in: the one, or its parts in order."""
    parts = [path for path in folder.glob("summaries-*.json.tar.xz") if _SUMMARIES_PART.fullmatch(path.name)]
    whole = folder / SUMMARIES_ARCHIVE
    return ([whole] if whole.is_file() else []) + sorted(parts, key=lambda p: int(p.name.split("-")[1].split(".")[0]))


def _pack_summaries(path: Path) -> list[str]:
    """``path`` (a summaries.json) into one archive, or split at run boundaries into as few
    ``summaries-<i>.json.tar.xz`` as keep each within MAX_BYTES; replaces the earlier archives."""
    for old in _summaries_archives(path.parent):
        old.unlink()
    whole = _archive_bytes({SUMMARIES: path.read_bytes()})
    written = {SUMMARIES_ARCHIVE: whole}
    if len(whole) > MAX_BYTES:
        data = json.loads(path.read_text())
        runs = [(method, run) for method, method_runs in data.items() for run in method_runs]
        parts = -(-len(whole) // MAX_BYTES)
        while True:
            written = {}
            for i in range(parts):
                chunk: dict[str, list] = {}
                for method, run in runs[i * len(runs) // parts:(i + 1) * len(runs) // parts]:
                    chunk.setdefault(method, []).append(run)
                member = f"summaries-{i + 1}.json"
                written[member + ".tar.xz"] = _archive_bytes({member: json.dumps(chunk, indent=1).encode()})
            if all(len(blob) <= MAX_BYTES for blob in written.values()) or parts >= len(runs):
                break
            parts += 1
    for name, blob in written.items():
        _write(path.parent / name, blob)
    path.unlink()
    return sorted(written, key=lambda name: (len(name), name))


def merge_summaries(folder: Path) -> Path:
    """Write ``folder/summaries.json`` back from its ``summaries-<i>.json.tar.xz`` parts (or its
    one archive): each method's runs concatenated in part order."""
    archives = _summaries_archives(folder)
    if not archives:
        raise FileNotFoundError(f"{folder} holds no {SUMMARIES_ARCHIVE} or summaries-<i>.json.tar.xz")
    merged: dict[str, list] = {}
    for archive in archives:
        for text in read_archive(archive).values():
            for method, runs in json.loads(text).items():
                merged.setdefault(method, []).extend(runs)
    target = folder / SUMMARIES
    target.write_text(json.dumps(merged, indent=1))
    return target


def _sized(total: int) -> str:
    return f"{total / 1e6:.1f} MB"


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
        elif path.name == SUMMARIES and _summaries_archives(path.parent):
            problems.append(f"{name}: beside {SUMMARIES_ARCHIVE}: merge it with --apply")
        elif _SUMMARIES_PART_FILE.fullmatch(path.name):
            problems.append(f"{name}: an unpacked summaries part: pack it back with --apply")
        elif path.suffix in (".md", ".json", ".yaml", ".csv") and (found := _machine_path(path)):
            problems.append(f"{name}: holds {found}, a path of the machine that made it: write it relative to the "
                            "repository (runs/..., ../shared/datasets/...)")
        if path.is_file() and path.stat().st_size > MAX_BYTES:
            hint = f": pack it with --apply (into {SUMMARIES_ARCHIVE})" if path.name == SUMMARIES else ""
            problems.append(f"{name}: {_sized(path.stat().st_size)}, over the 1 MB a results file may take{hint}")
    for folder, loose in sorted(_loose_runs(root, all_files).items()):
        total = sum(path.stat().st_size for path in loose)
        where = (folder / "runs").relative_to(root).as_posix()
        if total > RUNS_THRESHOLD:
            problems.append(f"{where}: {_sized(total)} of loose run files, over the {_sized(RUNS_THRESHOLD)} a runs "
                            "folder may hold unpacked: pack it with --apply (into runs-*.tar.xz)")
        elif _runs_archives(folder):
            problems.append(f"{where}: {len(loose)} loose run files beside runs-*.tar.xz: merge them with --apply")
    for image in sorted(images):
        if image.is_relative_to(root) and not image.is_file():
            problems.append(f"{image.relative_to(root).as_posix()}: embedded by a report but missing")
    return problems


def _machine_path(path: Path) -> str | None:
    """The first absolute path of this checkout, or of a home or workspace folder, in a text file."""
    text = path.read_text(errors="replace")
    if _CHECKOUT in text:
        return _CHECKOUT
    match = _MACHINE_PATH.search(text)
    return match.group(0) if match else None


def _archive_problems(root: Path, path: Path, all_files: list[Path]) -> list[str]:
    if path.name == ARCHIVE:
        if report_folder(root, path, all_files) != path.parent and path.parent.parent != root:
            return ["not in a report folder (a folder holding a *.md report, or a study's top folder)"]
        wanted, what = (lambda name: name.endswith(".log")), "only logs"
    elif path.name == SUMMARIES_ARCHIVE:
        wanted, what = (lambda name: name == SUMMARIES), f"only {SUMMARIES}"
    elif part := _SUMMARIES_PART.fullmatch(path.name):
        wanted, what = (lambda name: name == f"summaries-{part.group(1)}.json"), f"only summaries-{part.group(1)}.json"
    elif _RUNS_ARCHIVE.fullmatch(path.name):
        wanted, what = (lambda name: name.startswith("runs/") and name.endswith(RUN_FILES)), "only runs/*/ files"
    else:
        return [f"archives are named {ARCHIVE}, runs-<group>.tar.xz, {SUMMARIES_ARCHIVE} or summaries-<i>.json.tar.xz"]
    try:
        with tarfile.open(path, "r:xz") as archive:
            members = archive.getmembers()
    except (tarfile.TarError, EOFError, OSError) as error:
        return [f"unreadable ({error})"]
    bad = [m.name for m in members if not (m.isfile() and wanted(m.name) and not m.name.startswith("/")
                                          and ".." not in Path(m.name).parts)]
    return [f"holds {', '.join(bad[:3])}: {what} at relative paths belong there"] if bad else []


def _pack(folder: Path, logs: list[Path]) -> None:
    """Add ``logs`` to ``folder/logs.tar.xz`` (created or merged), deterministically; delete them."""
    target = folder / ARCHIVE
    contents = read_archive(target) if target.is_file() else {}
    for log in logs:
        contents[log.relative_to(folder).as_posix()] = log.read_bytes()
    _write(target, _archive_bytes(contents))
    for log in logs:
        log.unlink()


def _group(name: str) -> str:
    """A run file's archive group: ``final`` for ``runs/RUN/FILE``, ``X`` for ``runs/X/RUN/FILE``."""
    parts = name.split("/")
    return parts[1] if len(parts) >= 4 else "final"


def _split(group: str, contents: dict[str, bytes]) -> dict[str, bytes]:
    """``contents`` (one group) as ``runs-<group>.tar.xz``, or split at run folders into as few
    ``runs-<group>-<i>.tar.xz`` of equal numbers of runs as each stay within MAX_BYTES."""
    whole = _archive_bytes(contents)
    if len(whole) <= MAX_BYTES:
        return {f"runs-{group}.tar.xz": whole}
    runs = sorted({name.rsplit("/", 1)[0] for name in contents})
    parts = -(-len(whole) // MAX_BYTES)
    while True:
        chunks = [set(runs[i * len(runs) // parts:(i + 1) * len(runs) // parts]) for i in range(parts)]
        blobs = [_archive_bytes({n: c for n, c in contents.items() if n.rsplit("/", 1)[0] in chunk})
                 for chunk in chunks]
        if all(len(blob) <= MAX_BYTES for blob in blobs) or parts >= len(runs):
            return {f"runs-{group}-{i + 1}.tar.xz": blob for i, blob in enumerate(blobs)}
        parts += 1


def _pack_runs(folder: Path, loose: list[Path]) -> dict[str, bytes]:
    """Merge ``loose`` (run files under ``folder/runs``) with ``folder``'s runs-*.tar.xz into freshly
    split archives; delete the loose files and archives no longer produced."""
    old = _runs_archives(folder)
    contents: dict[str, bytes] = {}
    for archive in old:
        contents.update(read_archive(archive))
    for path in loose:
        contents[path.relative_to(folder).as_posix()] = path.read_bytes()
    groups: dict[str, dict[str, bytes]] = {}
    for name, data in contents.items():
        groups.setdefault(_group(name), {})[name] = data
    written: dict[str, bytes] = {}
    for group, members in sorted(groups.items()):
        written.update(_split(group, members))
    for name, data in written.items():
        target = folder / name
        if not target.is_file() or target.read_bytes() != data:
            _write(target, data)
    for archive in old:
        if archive.name not in written:
            archive.unlink()
    for path in loose:
        path.unlink()
    return written


def apply(root: Path = RESULTS) -> list[str]:
    """Bring ``root`` under the policy; returns what was done, one line each."""
    root = root.resolve()
    all_files = files(root)
    images = embedded(root, all_files)
    done: list[str] = []
    logs: dict[Path, list[Path]] = {}
    for path in all_files:
        if path.name.endswith(_TEXT) and _relativise(path):  # before anything is packed
            done.append(f"wrote the paths of this machine relative in {path.relative_to(root).as_posix()}")
    for path in all_files:
        name = path.relative_to(root).as_posix()
        if path.name.endswith(".stale") or (path.suffix == ".png" and path.resolve() not in images):
            path.unlink()
            done.append(f"deleted {name}")
        elif path.suffix == ".log":
            logs.setdefault(report_folder(root, path, all_files), []).append(path)
        elif path.name == SUMMARIES and (path.stat().st_size > MAX_BYTES or _summaries_archives(path.parent)):
            written = _pack_summaries(path)
            done.append(f"packed {name} into {', '.join(written)}")
        elif _SUMMARIES_PART_FILE.fullmatch(path.name):  # unpacked to read: back into its archive
            _write(path.with_name(path.name + ".tar.xz"), _archive_bytes({path.name: path.read_bytes()}))
            path.unlink()
            done.append(f"packed {name} into {path.name}.tar.xz")
    for folder, group in sorted(logs.items()):
        _pack(folder, sorted(group))
        done.append(f"packed {len(group)} logs into {(folder / ARCHIVE).relative_to(root).as_posix()}")
    for folder, loose in sorted(_loose_runs(root, all_files).items()):
        if sum(path.stat().st_size for path in loose) > RUNS_THRESHOLD or _runs_archives(folder):
            written = _pack_runs(folder, sorted(loose))
            into = ", ".join(f"{name} ({_sized(len(data))})" for name, data in sorted(written.items()))
            where = (folder / "runs").relative_to(root).as_posix()
            done.append(f"packed {len(loose)} run files of {where} into {into}")
    for folder in sorted({p.parent for p in all_files if not p.exists()}, key=lambda p: -len(p.parts)):
        while folder != root and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()  # folders left empty
            folder = folder.parent
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", nargs="?", default=str(RESULTS), help="the results folder (default: %(default)s)")
    parser.add_argument("--apply", action="store_true",
                        help="pack logs, large runs folders and summaries; delete unembedded figures, leftovers")
    parser.add_argument("--merge-summaries", metavar="FOLDER",
                        help="write FOLDER/summaries.json back from its packed summaries archives, and stop")
    args = parser.parse_args(argv)
    if args.merge_summaries:
        try:
            print(merge_summaries(Path(args.merge_summaries)))
        except FileNotFoundError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        return 0
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
