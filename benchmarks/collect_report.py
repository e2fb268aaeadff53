"""Copy a finished ``otmdr compare`` directory's report into benchmarks/results/<name>/.

The report, its figures, the per-run summaries, the search table, and each run's small files
(config.yaml, summary.json, metrics.csv, train.log; no checkpoints) travel, so that a later session
can rebuild the report or extend the study without retraining what is done: copy
``benchmarks/results/<name>/runs/*`` back into the study folder and rerun the same
``otmdr compare ... --resume`` (finished runs are recognised by their summary.json and config.yaml).
The copy then follows benchmarks/results/README.md's policy (``benchmarks/results_policy.py``):
the logs are packed into ``<name>/logs.tar.xz`` and figures the report does not embed are dropped;
a large study's ``runs/`` (over 2 MB) is packed into ``<name>/runs-*.tar.xz`` and a ``summaries.json``
over 1 MB into ``<name>/summaries.json.tar.xz``: unpack them first (``for a in runs-*.tar.xz; do
tar -xJf "$a"; done`` in ``<name>/``) to copy ``runs/*`` back. Collecting into a packed study again
merges the new files into its archives.

    python benchmarks/collect_report.py runs/evidence/fashion-mnist-mlp-noisy40 fashion-mnist-mlp-noisy40
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

RUN_FILES = ("config.yaml", "summary.json", "metrics.csv", "train.log")


def main(source: str, name: str) -> None:
    src, dst = Path(source), Path(__file__).parent / "results" / name
    if not (src / "report.md").is_file():
        sys.exit(f"{src} has no report.md: is the comparison finished?")
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src / "report.md", dst / "report.md")
    shutil.copytree(src / "figures", dst / "figures", dirs_exist_ok=True)
    summaries = json.loads((src / "summaries.json").read_text())
    (dst / "summaries.json").write_text(json.dumps(summaries, indent=1))
    if (src / "search.json").is_file():
        shutil.copy2(src / "search.json", dst / "search.json")
    for summary in src.rglob("summary.json"):
        run = summary.parent
        if run == src:
            continue
        target = dst / "runs" / run.relative_to(src)
        target.mkdir(parents=True, exist_ok=True)
        for file in RUN_FILES:
            if (run / file).is_file():
                shutil.copy2(run / file, target / file)
    sys.path.insert(0, str(Path(__file__).parent))
    import results_policy

    for line in results_policy.apply(dst.parent):
        print(line)
    print(f"copied {src} -> {dst}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
