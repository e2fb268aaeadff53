"""Copy a finished ``otmdr compare`` directory's report into benchmarks/results/<name>/.

Only the report, its figures and the per-run summaries travel (no checkpoints):
    python benchmarks/collect_report.py runs/evidence-cifar10 cifar10-resnet20
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path


def main(source: str, name: str) -> None:
    src, dst = Path(source), Path(__file__).parent / "results" / name
    if not (src / "report.md").is_file():
        sys.exit(f"{src} has no report.md: is the comparison finished?")
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src / "report.md", dst / "report.md")
    shutil.copytree(src / "figures", dst / "figures", dirs_exist_ok=True)
    summaries = json.loads((src / "summaries.json").read_text())
    (dst / "summaries.json").write_text(json.dumps(summaries, indent=1))
    print(f"copied {src} -> {dst}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
