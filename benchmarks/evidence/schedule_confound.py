"""How much of the paper's OT-MDR - SAM gap can the learning-rate schedule alone explain?
(issue 24, item 8)

The authors' logs (github anh-ntv/OT_MDR, log_files/cifar100/wrn and pyramid) show their SAM
baseline trained with a step schedule (lr 0.1, times 0.2 at 30%, 60% and 80% of training) and
OT-MDR with cosine. This runs, at the scale a 2-core CPU allows (CIFAR-10 ResNet-20, the tuned
study's budget: configs/cifar10-resnet20-study.yaml), SAM with that step schedule, SAM with cosine
and OT-MDR with cosine at the radii the committed clean study chose on validation (SAM 0.02, OT-MDR
[0.005, 0.01]; --sam-rho / --otmdr-rho to change), over the same seeds, and writes one report with
paired intervals and TOST/Holm verdicts against SAM-step, plus the share of the OT-MDR-cosine -
SAM-step gap that SAM-cosine - SAM-step already accounts for.

    python benchmarks/evidence/schedule_confound.py PATH/cifar10-jpeg.tar.gz [--jobs 2] [--seeds 3] [--smoke]

Resumable: rerun the same command (finished runs are reused). Writes runs/evidence/schedule-confound/.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))

from otmdr.report.compare import comparison_tables  # noqa: E402
from otmdr.report.stats import paired_difference  # noqa: E402

#: the paper's step schedule (lr x0.2 at epochs 60, 120, 160 of 200), as fractions of training
STEP_FRACTIONS = (0.3, 0.6, 0.8)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--sam-rho", default="0.02")
    parser.add_argument("--otmdr-rho", default="[0.005,0.01]")
    parser.add_argument("--smoke", action="store_true", help="toy size: a check of the script, not evidence")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "evidence" / "schedule-confound")
    parser.add_argument("--otmdr", default=str(ROOT / ".venv" / "bin" / "otmdr"))
    args = parser.parse_args()
    epochs = 2 if args.smoke else 30
    size = ["data.train_limit=300", "data.test_limit=200", f"train.epochs={epochs}"] if args.smoke else []
    milestones = [round(f * epochs, 3) for f in STEP_FRACTIONS]
    studies = {"cosine": ("sam,otmdr", []),
               "step": ("sam", ["schedule.name=step", f"schedule.milestones={milestones}", "schedule.gamma=0.2"])}
    for name, (methods, schedule) in studies.items():
        command = [args.otmdr, "compare", "--config", str(ROOT / "configs" / "cifar10-resnet20-study.yaml"),
                   "--data-dir", args.data, "--methods", methods, "--seeds", str(args.seeds), "--jobs", str(args.jobs),
                   "--resume", "--quiet", "--out", str(args.out / name)]
        for override in [f"sam.rho={args.sam_rho}", f"otmdr.rho={args.otmdr_rho}", *size, *schedule]:
            command += ["--set", override]
        print("$ " + " ".join(command), flush=True)
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    cosine = json.loads((args.out / "cosine" / "summaries.json").read_text())
    step = json.loads((args.out / "step" / "summaries.json").read_text())
    summaries = {"sam-step": step["sam"], "sam-cosine": cosine["sam"], "otmdr-cosine": cosine["otmdr"]}
    accuracy = {m: [100 * s["test"]["accuracy"] for s in runs] for m, runs in summaries.items()}
    schedule = paired_difference(accuracy["sam-cosine"], accuracy["sam-step"], higher_is_better=True, margin=0.5)
    total = paired_difference(accuracy["otmdr-cosine"], accuracy["sam-step"], higher_is_better=True, margin=0.5)
    share = (f"{100 * schedule.mean / total.mean:.0f}%" if abs(total.mean) > 1e-9 else "n/a (no gap)")
    lines = ["# The schedule confound of the paper's SAM baseline, at CIFAR-10 ResNet-20 scale", "",
             f"Command: `python benchmarks/evidence/schedule_confound.py {' '.join(sys.argv[1:])}`; SAM rho "
             f"{args.sam_rho}, OT-MDR rho {args.otmdr_rho}; step schedule: lr x0.2 at epochs {milestones} of {epochs} "
             f"(the paper's 60/120/160 of 200); {args.seeds} seeds, the same for every variant.", "",
             comparison_tables(summaries, ["sam-step"], markdown=True), "",
             f"Gap OT-MDR-cosine − SAM-step: {total.mean:+.2f} points [{total.low:+.2f}, {total.high:+.2f}] "
             f"({total.verdict}); SAM-cosine − SAM-step (the schedule alone): {schedule.mean:+.2f} "
             f"[{schedule.low:+.2f}, {schedule.high:+.2f}] ({schedule.verdict}); share of the gap the schedule "
             f"accounts for (ratio of the means, no interval): {share}. Mean test accuracy: "
             + ", ".join(f"{m} {statistics.fmean(v):.2f}%" for m, v in accuracy.items()) + "."]
    (args.out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[-1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
