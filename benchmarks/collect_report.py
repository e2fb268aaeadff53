"""Copy a finished ``otmdr compare`` directory's report into benchmarks/results/<name>/.

The report, its figures, the per-run summaries, the search table, and each run's small files
(config.yaml, summary.json, metrics.csv, train.log; no checkpoints) travel, so that a later session
can rebuild the report or extend the study without retraining what is done:
``python benchmarks/restore_runs.py <name> STUDY_DIR`` puts the finished runs back into the study
folder, then rerun the same ``otmdr compare ... --resume`` (finished runs are recognised by their
summary.json and config.yaml).
The copy then follows benchmarks/results/README.md's policy (``benchmarks/results_policy.py``):
the logs are packed into ``<name>/logs.tar.xz`` and figures the report does not embed are dropped;
a large study's ``runs/`` (over 2 MB) is packed into ``<name>/runs-*.tar.xz`` and a ``summaries.json``
over 1 MB into ``<name>/summaries.json.tar.xz``. Collecting into a packed study again merges the new
files into its archives.

``--partial`` carries a study that is still training: only its finished runs travel, with an
``IN-PROGRESS.md`` that lists them, so that a session ended (or a machine lost) mid-study costs only
the runs that were training, not the hours before. Collecting the finished study later removes it.

    python benchmarks/collect_report.py runs/evidence/fashion-mnist-mlp-noisy40 fashion-mnist-mlp-noisy40
    python benchmarks/collect_report.py --partial runs/evidence/cifar10-resnet20-noisy40 cifar10-resnet20-noisy40-rerun
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import sys
from pathlib import Path

import results_policy

RUN_FILES = ("config.yaml", "summary.json", "metrics.csv", "train.log")
IN_PROGRESS = "IN-PROGRESS.md"


def _copy_finished_runs(src: Path, dst: Path) -> list[str]:
    """Each finished run's small files (those with a summary.json) under ``dst/runs/``; their names."""
    names = []
    for summary in sorted(src.rglob("summary.json")):
        run = summary.parent
        if run == src:
            continue
        target = dst / "runs" / run.relative_to(src)
        target.mkdir(parents=True, exist_ok=True)
        for file in RUN_FILES:
            if (run / file).is_file():
                shutil.copy2(run / file, target / file)
        names.append(run.relative_to(src).as_posix())
    return names


def _in_progress_note(src: Path, name: str, runs: list[str]) -> str:
    listed = "\n".join(f"- `{run}`" for run in runs)
    return (f"# {name}: in progress\n\n"
            f"The study in `{src}` is still training; these are its {len(runs)} finished run(s) "
            f"(collected {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC), carried so "
            "that a new session or machine resumes without retraining them. No report yet: no numbers "
            "here are results.\n\n"
            f"Resume: `python benchmarks/restore_runs.py {name} {src}`, then rerun the study's command "
            "(its `--resume` reuses every run restored here).\n\n" + listed + "\n")


def main(source: str, name: str, *, partial: bool = False, results: Path = results_policy.RESULTS) -> None:
    src, dst = Path(source), results / name
    if not partial and not (src / "report.md").is_file():
        sys.exit(f"{src} has no report.md: is the comparison finished? (--partial carries its finished runs)")
    if partial and not any(path.parent != src for path in src.rglob("summary.json")):
        sys.exit(f"{src} has no finished run to carry")
    if partial and (dst / "report.md").is_file():
        sys.exit(f"{dst} holds a finished study's report: --partial would not replace it")
    dst.mkdir(parents=True, exist_ok=True)
    runs = _copy_finished_runs(src, dst)
    if partial:
        (dst / IN_PROGRESS).write_text(_in_progress_note(src, name, runs))
    else:
        shutil.copy2(src / "report.md", dst / "report.md")
        shutil.copytree(src / "figures", dst / "figures", dirs_exist_ok=True)
        summaries = json.loads((src / "summaries.json").read_text())
        (dst / "summaries.json").write_text(json.dumps(summaries, indent=1))
        if (src / "search.json").is_file():
            shutil.copy2(src / "search.json", dst / "search.json")
        (dst / IN_PROGRESS).unlink(missing_ok=True)
    for line in results_policy.apply(results):
        print(line)
    print(f"copied {len(runs)} finished run(s) of {src} -> {dst}" if partial else f"copied {src} -> {dst}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="the study folder (otmdr compare --out)")
    parser.add_argument("name", help="the folder under benchmarks/results to copy it to")
    parser.add_argument("--partial", action="store_true", help="carry a study still training: its finished runs only")
    args = parser.parse_args()
    main(args.source, args.name, partial=args.partial)
