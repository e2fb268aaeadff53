"""Matched-radius runs after a finished comparison: SAM at the radius OT-MDR measured, and OT-MDR
scaled to the radius SAM used, each paired over the same seeds with the other method's own runs.

A comparison of SAM and OT-MDR at their tuned settings mixes two effects: the method and the size
of the perturbation (OT-MDR's measured radius ||theta~ - theta|| is up to rho1 + 2 rho2 with the
release's normalisation). Running each method at the other's radius separates them:

    python benchmarks/evidence/matched_radius.py STUDY_DIR [--jobs 2] [--otmdr CMD]

reads STUDY_DIR/summaries.json (written by ``otmdr compare``), then runs two comparisons into
STUDY_DIR-matched-sam (``--methods otmdr,sam`` with ``sam.rho`` = OT-MDR's mean measured radius)
and STUDY_DIR-matched-otmdr (``--methods sam,otmdr`` with OT-MDR's rho scaled by SAM's rho over
OT-MDR's measured radius: the radius grows linearly with rho). The runs of the method kept as it
was are copied from STUDY_DIR, so only the matched method trains. Resumable (``--resume``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import yaml


def _chosen(study: Path, method: str, seed: int) -> tuple[Path, dict]:
    """The run folder of ``method`` at ``seed`` in a finished study (a final run, or the search
    run it reused) and its config."""
    search = json.loads((study / "search.json").read_text()) if (study / "search.json").is_file() else []
    folders = [study / f"{method}-seed{seed}"] + [Path(p["run_dir"]) for p in search
                                                  if p["method"] == method and p["chosen"] and p["seed"] == seed]
    for folder in folders:
        if (folder / "summary.json").is_file():
            return folder, yaml.safe_load((folder / "config.yaml").read_text())
    raise SystemExit(f"{study} has no finished {method} run for seed {seed}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study", type=Path)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--seeds", type=int, help="only the first N seeds of the study (default: all)")
    parser.add_argument("--otmdr", default="otmdr", help="the otmdr command (default: otmdr on PATH)")
    args = parser.parse_args()
    summaries = json.loads((args.study / "summaries.json").read_text())
    seeds = [s["seed"] for s in summaries["otmdr"]][: args.seeds]
    otmdr_radius = statistics.fmean(s["perturbation_norm"] for s in summaries["otmdr"] if s["seed"] in seeds)
    sam_radius = statistics.fmean(s["perturbation_norm"] for s in summaries["sam"] if s["seed"] in seeds)
    _, otmdr_cfg = _chosen(args.study, "otmdr", seeds[0])
    _, sam_cfg = _chosen(args.study, "sam", seeds[0])
    scaled = [round(r * sam_radius / otmdr_radius, 6) for r in otmdr_cfg["otmdr"]["rho"]]
    print(f"OT-MDR {otmdr_cfg['otmdr']['rho']} measured radius {otmdr_radius:.4f}; SAM rho {sam_cfg['sam']['rho']} "
          f"(radius {sam_radius:.4f}); OT-MDR scaled to SAM's radius: rho {scaled}", flush=True)
    base = {**sam_cfg, "otmdr": otmdr_cfg["otmdr"]}  # the study's resolved config with both chosen points
    base["optim"] = {k: v for k, v in base["optim"].items() if k != "method"}
    config = args.study / "matched-base.yaml"
    config.write_text(yaml.safe_dump(base, sort_keys=False))
    jobs = [("matched-sam", "otmdr", [f"sam.rho={round(otmdr_radius, 6)}"]),
            ("matched-otmdr", "sam", [f"otmdr.rho={scaled}"])]
    for suffix, kept, overrides in jobs:
        out = args.study.parent / f"{args.study.name}-{suffix}"
        out.mkdir(exist_ok=True)
        for seed in seeds:  # the kept method's runs are reused, not retrained
            source, _ = _chosen(args.study, kept, seed)
            target = out / f"{kept}-seed{seed}"
            if not target.exists():
                shutil.copytree(source, target)
        other = "sam" if kept == "otmdr" else "otmdr"
        command = [*args.otmdr.split(), "compare", "--config", str(config), "--methods", f"{kept},{other}",
                   "--seeds", str(len(seeds)), "--set", f"train.seed={seeds[0]}", "--jobs", str(args.jobs),
                   "--bn-policy", "per-method",  # the study's resolved policies are in the base config
                   "--resume", "--out", str(out)]
        for override in overrides:
            command += ["--set", override]
        print("$ " + " ".join(command), flush=True)
        subprocess.run(command, check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
