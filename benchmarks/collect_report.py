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
With ``--with-robustness`` the study's robustness evaluation (``STUDY/robustness``) travels too, and
a final run only once its evaluation is finished: the checkpoints it reads do not travel.

    python benchmarks/collect_report.py runs/evidence/fashion-mnist-mlp-noisy40 fashion-mnist-mlp-noisy40
    python benchmarks/collect_report.py --partial runs/evidence/cifar10-resnet20-noisy40 cifar10-resnet20-noisy40-rerun
"""

from __future__ import annotations

import datetime
import json
import shutil
import sys
from pathlib import Path

import results_policy
import robustness as robustness_runs

from otmdr.cli.parser import OneLineParser

RUN_FILES = ("config.yaml", "summary.json", "metrics.csv", "train.log")
IN_PROGRESS = "IN-PROGRESS.md"


def _evaluated(src: Path) -> tuple[set[Path], list[Path]]:
    """The final runs of ``src`` whose robustness evaluation (``src/robustness``, as
    benchmarks/robustness.py writes it) is finished, and the finished pieces to carry with them. A
    run needs its eval and sharpness JSON; its method's first seed, which the landscapes read, also
    needs every landscape to be done. A run that is not evaluated yet stays behind with its
    checkpoint: on another machine it trains again (its checkpoint is not carried) and is evaluated
    there, never evaluated from a model it was not."""
    robustness = src / "robustness"
    finals = robustness_runs.final_runs(src)
    landscapes = sorted(robustness.glob("landscape/*/"))
    landscapes_done = all((folder / "landscape.json").is_file() for folder in landscapes)
    ready, pieces = set(), []
    for runs in finals.values():
        for seed, run in runs.items():
            evaluation = [robustness / "runs" / run.name / name for name in ("eval.json", "sharpness.json")]
            first = seed == min(runs)
            if all(path.is_file() for path in evaluation) and (landscapes_done or not first):
                ready.add(run)
                pieces += evaluation
    if landscapes and landscapes_done:
        pieces += [path for folder in landscapes for path in sorted(folder.glob("landscape.*"))
                   if path.name in ("landscape.json", "landscape.png")]
    return ready, pieces


def _copy_finished_runs(src: Path, dst: Path, with_robustness: bool = False) -> tuple[list[str], list[str]]:
    """Each finished run's small files (those with a summary.json) under ``dst/runs/``: their names,
    and the robustness pieces that travelled (``with_robustness``: a final run travels only once
    its robustness evaluation is finished, with it)."""
    names = []
    ready, pieces = _evaluated(src) if with_robustness else (set(), [])
    for piece in pieces:
        target = dst / piece.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(piece, target)
    for summary in sorted(src.rglob("summary.json")):
        run = summary.parent
        if run == src or (with_robustness and run.parent == src and run not in ready):
            continue
        target = dst / "runs" / run.relative_to(src)
        target.mkdir(parents=True, exist_ok=True)
        for file in RUN_FILES:
            if (run / file).is_file():
                shutil.copy2(run / file, target / file)
        names.append(run.relative_to(src).as_posix())
    return names, [piece.relative_to(src).as_posix() for piece in pieces]


def _in_progress_note(src: Path, name: str, runs: list[str], pieces: list[str] | None) -> str:
    listed = "\n".join(f"- `{run}`" for run in runs)
    if pieces is not None:
        listed += (f"\n\nRobustness: {len(pieces)} finished evaluation file(s) under `robustness/`. A final run "
                   "travels only with its finished evaluation (its checkpoint does not travel): the others train "
                   "again where the study resumes.")
        figures = [piece for piece in pieces if piece.endswith(".png")]  # shown, so that the policy keeps them
        listed += "".join(f"\n\n![{Path(piece).parent.name}]({piece})" for piece in figures)
    return (f"# {name}: in progress\n\n"
            f"The study in `{src}` is still training; these are its {len(runs)} finished run(s) "
            f"(collected {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC), carried so "
            "that a new session or machine resumes without retraining them. No report yet: no numbers "
            "here are results.\n\n"
            f"Resume: `python benchmarks/restore_runs.py {name} {src}`, then rerun the study's command "
            "(its `--resume` reuses every run restored here).\n\n" + listed + "\n")


def _clear_carried(dst: Path) -> None:
    """Remove what an earlier ``--partial`` collect carried into ``dst`` (its runs, their archives and
    logs, the robustness pieces), so that the folder holds the study as it is now: a run the study
    has since moved (to ``superseded/``, when an extended grid changed the choice) is not carried
    twice, at its old place too."""
    if not (dst / IN_PROGRESS).is_file():
        return
    for folder in (dst, dst / "robustness"):
        shutil.rmtree(folder / "runs", ignore_errors=True)
        for archive in [*folder.glob("runs-*.tar.xz"), folder / results_policy.ARCHIVE]:
            archive.unlink(missing_ok=True)
    shutil.rmtree(dst / "robustness" / "landscape", ignore_errors=True)


def _refuse(message: str) -> None:
    """Bad input: one line on stderr, exit 2, nothing written."""
    print(f"collect_report: {message}", file=sys.stderr)
    sys.exit(2)


def main(source: str, name: str, *, partial: bool = False, with_robustness: bool = False,
         results: Path = results_policy.RESULTS) -> None:
    src, dst = Path(source), results / name
    if not src.is_dir():
        _refuse(f"{src} is not a folder: name an otmdr compare --out folder")
    if with_robustness and not partial:
        _refuse("--with-robustness goes with --partial (a finished study's robustness is copied with its report)")
    if not partial and not (src / "report.md").is_file():
        _refuse(f"{src} has no report.md: is the comparison finished? (--partial carries its finished runs)")
    if partial and not any(path.parent != src for path in src.rglob("summary.json")):
        _refuse(f"{src} has no finished run to carry")
    if partial and (dst / "report.md").is_file():
        _refuse(f"{dst} holds a finished study's report: --partial would not replace it")
    dst.mkdir(parents=True, exist_ok=True)
    _clear_carried(dst)
    runs, pieces = _copy_finished_runs(src, dst, with_robustness=with_robustness)
    if partial:
        (dst / IN_PROGRESS).write_text(_in_progress_note(src, name, runs, pieces if with_robustness else None))
    else:
        shutil.copy2(src / "report.md", dst / "report.md")
        shutil.copytree(src / "figures", dst / "figures", dirs_exist_ok=True)
        summaries = json.loads((src / "summaries.json").read_text())
        (dst / "summaries.json").write_text(json.dumps(summaries, indent=1))
        if (src / "search.json").is_file():
            shutil.copy2(src / "search.json", dst / "search.json")
        if (src / "robustness" / "robustness.md").is_file():  # its evaluation, finished, travels with it
            shutil.copytree(src / "robustness", dst / "robustness", dirs_exist_ok=True)
        (dst / IN_PROGRESS).unlink(missing_ok=True)
    for line in results_policy.apply(results):
        print(line)
    print(f"copied {len(runs)} finished run(s) of {src} -> {dst}" if partial else f"copied {src} -> {dst}")


if __name__ == "__main__":
    parser = OneLineParser(prog="collect_report.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="the study folder (otmdr compare --out)")
    parser.add_argument("name", help="the folder under benchmarks/results to copy it to")
    parser.add_argument("--partial", action="store_true", help="carry a study still training: its finished runs only")
    parser.add_argument("--with-robustness", action="store_true",
                        help="with --partial: the study's robustness is evaluated in SOURCE/robustness; a final run "
                             "travels only once its evaluation is finished, with it (its checkpoint cannot travel)")
    args = parser.parse_args()
    main(args.source, args.name, partial=args.partial, with_robustness=args.with_robustness)
