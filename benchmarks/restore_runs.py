"""Put a committed study's finished runs back into a study folder, so that ``--resume`` skips them.

benchmarks/collect_report.py carries each finished run's config.yaml, summary.json and metrics.csv
(packed into ``runs-*.tar.xz`` for a large study); ``otmdr compare --resume`` reuses a run folder
that holds a summary.json and the config it would train. This writes them back under the study
folder, loose or from the archives, so that a study collected with ``--partial`` on one machine
goes on on another without retraining what was done; likewise the finished pieces of its robustness
evaluation (``benchmarks/robustness.py`` skips each that exists). A run folder that already exists
is left as it is (it may be training, or newer); each run's summary.json is written last, so a
restore cut short leaves no run that looks finished without its files.

    python benchmarks/restore_runs.py cifar10-resnet20-noisy40-rerun runs/evidence/cifar10-resnet20-noisy40
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import results_policy

from otmdr.cli.parser import OneLineParser
from otmdr.train.compute import cpu_model

RESTORED = (".yaml", ".csv", ".json")  # what --resume reads; logs stay packed
#: a robustness evaluation's finished pieces (benchmarks/robustness.py reuses each that exists)
EVALUATED = ("eval.json", "sharpness.json", "landscape.json", "landscape.png")


def _committed_files(study: Path) -> dict[str, bytes]:
    """Every file of a committed study by its path in the study, loose or in a ``runs-*.tar.xz``
    (whose members are relative to the archive's folder)."""
    files: dict[str, bytes] = {}
    for archive in sorted(study.rglob("runs-*.tar.xz")):
        prefix = archive.parent.relative_to(study)
        for member, data in results_policy.read_archive(archive).items():
            files[(prefix / member).as_posix()] = data
    for path in sorted(study.rglob("*")):
        if path.is_file() and not path.name.endswith(".tar.xz"):
            files[path.relative_to(study).as_posix()] = path.read_bytes()
    return files


Runs = dict[str, dict[str, bytes]]


def committed(study: Path) -> tuple[Runs, dict[str, bytes]]:
    """A committed study's finished runs, by run folder (relative to its ``runs/``), and its
    finished robustness pieces (``robustness/runs/RUN/eval.json``, its ``sharpness.json``,
    ``robustness/landscape/METHOD/landscape.json`` and its figure), by path; the archives read once."""
    runs: Runs = {}
    evaluations: dict[str, bytes] = {}
    for member, data in _committed_files(study).items():
        parts = member.split("/")
        if parts[0] == "runs" and len(parts) > 2 and member.endswith(RESTORED):
            runs.setdefault("/".join(parts[1:-1]), {})[parts[-1]] = data
        elif member.startswith(("robustness/runs/", "robustness/landscape/")) and member.endswith(EVALUATED):
            evaluations[member] = data
    finished = {run: found for run, found in runs.items() if "summary.json" in found and "config.yaml" in found}
    return finished, evaluations


def committed_runs(study: Path) -> Runs:
    return committed(study)[0]


def committed_evaluations(study: Path) -> dict[str, bytes]:
    return committed(study)[1]


def restore(study: Path, target: Path,
            carried: tuple[Runs, dict[str, bytes]] | None = None) -> tuple[list[str], list[str]]:
    """Write ``study``'s finished runs under ``target`` (``carried``: what :func:`committed` read of
    it), and its finished robustness pieces that are not there yet; (restored runs, runs left as
    they were)."""
    runs, evaluations = carried or committed(study)
    restored, kept = [], []
    for run, found in sorted(runs.items()):
        folder = target / run
        if folder.exists():
            kept.append(run)
            continue
        folder.mkdir(parents=True)
        for name in sorted(found, key=lambda n: n == "summary.json"):  # the summary, the mark of done, last
            (folder / name).write_bytes(found[name])
        restored.append(run)
    for member, data in sorted(evaluations.items(), key=lambda item: item[0].endswith(".json")):
        path = target / member  # each piece is its own mark of done; a landscape's JSON after its figure
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
    return restored, kept


def other_cpus(runs: Runs) -> str:
    """The carried runs' CPU models other than this machine's, with their counts ('' if none)."""
    counts: dict[str, int] = {}
    for found in runs.values():
        cpu = json.loads(found["summary.json"]).get("machine", {}).get("cpu")
        if cpu and cpu != cpu_model():
            counts[cpu] = counts.get(cpu, 0) + 1
    return ", ".join(f"{n} carried run(s) trained on CPU {cpu!r}" for cpu, n in counts.items())


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="restore_runs.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("name", help="the study's folder under benchmarks/results (or a path to one)")
    parser.add_argument("target", help="the study folder to resume (otmdr compare --out)")
    args = parser.parse_args(argv)
    study = Path(args.name) if Path(args.name).is_dir() else results_policy.RESULTS / args.name
    if not study.is_dir():
        print(f"restore_runs: no study {args.name!r} under {results_policy.RESULTS}: name a folder there",
              file=sys.stderr)
        return 2
    carried = committed(study)
    if not carried[0]:
        print(f"restore_runs: {study} holds no finished run (config.yaml + summary.json) to restore", file=sys.stderr)
        return 2
    restored, kept = restore(study, Path(args.target), carried)
    print(f"restored {len(restored)} finished run(s) into {args.target}"
          + (f"; {len(kept)} already there, left as they were" if kept else ""))
    other = other_cpus(carried[0])
    if other:
        print(f"note: {other}; this machine's CPU is {cpu_model()!r}: the runs trained here will not be bit-identical "
              "to what that machine would have trained (docs/results.md, reproducibility); the report names both")
    return 0


if __name__ == "__main__":
    sys.exit(main())
