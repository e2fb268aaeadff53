"""Find a CIFAR-10 ResNet-20 budget at which SGD memorises the wrong labels (issue 24, item 5).

The committed noisy CIFAR-10 study (10,000 images, crop + flip, 30 epochs cosine) never reached
memorisation: SGD's validation accuracy was still near its best at the last epoch, so label noise
could not show what sharpness-aware training is for. This probe trains plain SGD with 40% symmetric
noise at a few budgets (fewer images, no augmentation, more epochs) and reports, for each, the
best and the last validation accuracy, the training accuracy on the noisy labels (above 60% means
wrong labels are being fitted) and a verdict: "memorises" when the last validation accuracy is at
least 2 points below the best and the training accuracy exceeds the clean fraction.

    python benchmarks/evidence/cifar10_memorisation.py PATH/cifar10-jpeg.tar.gz [--jobs 2] [--smoke]

Resumable (finished runs are reused, stopped ones resume). Writes runs/evidence/cifar10-memorisation/
(one run per budget and report.md).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
#: name -> overrides of configs/cifar10-resnet20-study.yaml (with 40% noise, SGD, seed 0)
BUDGETS = {
    "5k-noaug-60ep": ["data.train_limit=5000", "data.crop_padding=0", "data.flip=false", "train.epochs=60"],
    "10k-noaug-40ep": ["data.train_limit=10000", "data.crop_padding=0", "data.flip=false", "train.epochs=40"],
}
NOISE = 0.4
#: the committed study's budget (10,000 images, crop + flip, 30 epochs): its SGD run of seed 1
COMMITTED = ROOT / "benchmarks" / "results" / "cifar10-resnet20-noisy40" / "runs" / "sgd-seed1" / "summary.json"


def verdict(history: list[dict]) -> dict:
    """Best and last validation accuracy, last training accuracy, and whether SGD memorises."""
    best = max(history, key=lambda row: row["val_accuracy"])
    last = history[-1]
    memorises = last["val_accuracy"] <= best["val_accuracy"] - 0.02 and last["train_accuracy"] > 1 - NOISE
    return {"best_val": best["val_accuracy"], "best_epoch": best["epoch"], "last_val": last["val_accuracy"],
            "last_train": last["train_accuracy"], "memorises": memorises}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="toy size: a check of the script, not evidence")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "evidence" / "cifar10-memorisation")
    parser.add_argument("--otmdr", default=str(ROOT / ".venv" / "bin" / "otmdr"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    def run(name: str) -> None:
        folder = args.out / name
        if (folder / "summary.json").is_file():
            return
        extra = ["data.train_limit=300", "data.test_limit=200", "train.epochs=2"] if args.smoke else []
        command = [args.otmdr, "train", "--config", str(ROOT / "configs" / "cifar10-resnet20-study.yaml"),
                   "--data-dir", args.data, "--method", "sgd", "--seed", "0"]
        for override in [f"data.label_noise={NOISE}", "train.threads=1", "train.progress=false",
                         *BUDGETS[name], *extra]:
            command += ["--set", override]
        command += ["--out", str(folder)]
        if (folder / "checkpoints" / "last.pt").is_file():  # stopped earlier: continue it (its config is saved)
            command = [args.otmdr, "train", "--resume", str(folder)]
        with open(args.out / f"{name}.log", "a") as log:
            subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT)

    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(run, BUDGETS))
    lines = ["# SGD on CIFAR-10 ResNet-20 with 40% symmetric label noise: where does it memorise?", "",
             f"Command: `python benchmarks/evidence/cifar10_memorisation.py {' '.join(sys.argv[1:])}`; one seed per "
             "budget (a probe to choose the study's budget, not a comparison).", "",
             "| budget | overrides | best val acc (epoch) | last val acc | last train acc (noisy labels) | "
             "memorises |", "|---|---|---:|---:|---:|---|"]
    rows = [("10k-aug-30ep (committed study, seed 1)", ["data.train_limit=10000", "train.epochs=30"], COMMITTED)]
    rows += [(name, overrides, args.out / name / "summary.json") for name, overrides in BUDGETS.items()]
    for name, overrides, path in rows:
        if not path.is_file():
            continue
        v = verdict(json.loads(path.read_text())["history"])
        lines.append(f"| {name} | `{' '.join(overrides)}` | {100 * v['best_val']:.2f} ({v['best_epoch']}) | "
                     f"{100 * v['last_val']:.2f} | {100 * v['last_train']:.2f} | {'yes' if v['memorises'] else 'no'} |")
    (args.out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
