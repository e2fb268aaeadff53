"""benchmarks/results holds what its README's policy allows: reports, JSON, per-run config, metrics
and summaries, the figures the reports embed, logs only packed in ``logs.tar.xz``; no leftovers,
checkpoints or loose logs. The checker is also run on a made-up folder with one violation of each
kind, so that it is shown to fail when it should, and ``--apply`` to fix them."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "results_policy.py"


def _policy():
    spec = importlib.util.spec_from_file_location("results_policy", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_committed_results_follow_the_policy():
    problems = _policy().violations(ROOT / "benchmarks" / "results")
    assert not problems, ("benchmarks/results breaks its policy (benchmarks/results/README.md); "
                          "fix with: python benchmarks/results_policy.py --apply\n" + "\n".join(problems))


def test_every_packed_log_archive_is_readable_and_holds_only_logs():
    archives = sorted((ROOT / "benchmarks" / "results").rglob("logs.tar.xz"))
    assert archives, "the studies' logs are packed in logs.tar.xz"
    for path in archives:
        with tarfile.open(path, "r:xz") as archive:
            names = archive.getnames()
        assert names and all(name.endswith(".log") and not name.startswith(("/", "..")) for name in names), path


def _study(root: Path) -> Path:
    """A made-up study that follows the policy: a report embedding one figure, run files, packed logs."""
    study = root / "study"
    (study / "figures").mkdir(parents=True)
    (study / "runs" / "sgd-seed0").mkdir(parents=True)
    (study / "report.md").write_text("# Study\n\n![accuracy](figures/accuracy.png)\n")
    (study / "figures" / "accuracy.png").write_bytes(b"\x89PNG embedded")
    for name, text in (("config.yaml", "a: 1\n"), ("summary.json", "{}"), ("metrics.csv", "epoch\n1\n")):
        (study / "runs" / "sgd-seed0" / name).write_text(text)
    (study / "summaries.json").write_text("[]")
    return study


def test_the_checker_finds_each_kind_of_violation_and_apply_fixes_them(tmp_path):
    policy = _policy()
    study = _study(tmp_path)
    assert policy.violations(tmp_path) == []
    (study / "runs" / "sgd-seed0" / "train.log").write_text("epoch 1/1: train loss 1.0\n")
    (study / "runs" / "sgd-seed0" / "sharpness.json.stale").write_text("{}")
    (study / "figures" / "unused.png").write_bytes(b"\x89PNG nobody embeds this")
    (study / "runs" / "sgd-seed0" / "last.pt").write_bytes(b"a checkpoint")
    (study / "huge.json").write_text("0" * 1_100_000)
    (study / "broken.md").write_text("![gone](figures/missing.png)\n")
    problems = "\n".join(policy.violations(tmp_path))
    for expected in ("train.log: a loose log", "sharpness.json.stale: a leftover", "unused.png: a figure no report",
                     "last.pt: not a report", "huge.json: 1.1 MB", "missing.png: embedded by a report but missing"):
        assert expected in problems, problems

    done = policy.apply(tmp_path)
    assert "packed 1 logs into study/logs.tar.xz" in done
    with tarfile.open(study / "logs.tar.xz", "r:xz") as archive:
        assert archive.getnames() == ["runs/sgd-seed0/train.log"]
        assert archive.extractfile("runs/sgd-seed0/train.log").read() == b"epoch 1/1: train loss 1.0\n"
    assert not (study / "figures" / "unused.png").exists() and (study / "figures" / "accuracy.png").exists()
    assert not (study / "runs" / "sgd-seed0" / "sharpness.json.stale").exists()
    left = "\n".join(policy.violations(tmp_path))  # apply never deletes data: these stay for a person
    assert "last.pt" in left and "huge.json" in left and "missing.png" in left and "train.log" not in left


def test_packing_is_deterministic_and_merges_later_logs(tmp_path):
    policy = _policy()
    study = _study(tmp_path)
    (study / "runs" / "sgd-seed0" / "train.log").write_text("first\n")
    policy.apply(tmp_path)
    packed = (study / "logs.tar.xz").read_bytes()
    (study / "runs" / "sgd-seed0" / "train.log").write_text("first\n")  # the same log again, later
    policy.apply(tmp_path)
    assert (study / "logs.tar.xz").read_bytes() == packed  # same bytes: no churn in git
    (study / "runs" / "sam-seed0").mkdir()
    (study / "runs" / "sam-seed0" / "train.log").write_text("second\n")
    policy.apply(tmp_path)
    with tarfile.open(study / "logs.tar.xz", "r:xz") as archive:
        assert archive.getnames() == ["runs/sam-seed0/train.log", "runs/sgd-seed0/train.log"]
    assert policy.violations(tmp_path) == []


def test_the_command_line_exits_1_listing_the_problems(tmp_path):
    study = _study(tmp_path)
    (study / "x.log").write_text("log\n")
    result = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path)], capture_output=True, text=True,
                            check=False)
    assert result.returncode == 1 and "study/x.log: a loose log" in result.stderr
    result = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), "--apply"], capture_output=True, text=True,
                            check=False)
    assert result.returncode == 0 and "packed 1 logs" in result.stdout
