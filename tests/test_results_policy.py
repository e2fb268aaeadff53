"""benchmarks/results holds what its README's policy allows: reports, JSON, per-run config, metrics
and summaries, the figures the reports embed, logs only packed in ``logs.tar.xz``; no leftovers,
checkpoints or loose logs. The checker is also run on a made-up folder with one violation of each
kind, so that it is shown to fail when it should, and ``--apply`` to fix them."""

from __future__ import annotations

import importlib.util
import os
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


def _large_study(root: Path) -> Path:
    """A study whose runs/ (final runs and a search folder) holds 4 runs of made-up files."""
    study = _study(root)
    for run in ("sam-seed0", "search/sam-rho=0.1-seed1000", "search/sam-rho=0.2-seed1000"):
        (study / "runs" / run).mkdir(parents=True)
        (study / "runs" / run / "config.yaml").write_text(f"run: {run}\n")
        (study / "runs" / run / "summary.json").write_text('{"history": [' + ", ".join(map(str, range(300))) + "]}")
        (study / "runs" / run / "metrics.csv").write_text("epoch,loss\n" + "".join(f"{i},{1 / (i + 1)}\n"
                                                                                  for i in range(100)))
    return study


def _loose(study: Path) -> dict[str, bytes]:
    return {path.relative_to(study).as_posix(): path.read_bytes()
            for path in sorted((study / "runs").rglob("*")) if path.is_file()}


def _unpack(study: Path, pattern: str) -> None:
    for archive in sorted(study.glob(pattern)):
        subprocess.run(["tar", "-xJf", archive.name], cwd=study, check=True)  # what the README tells a reader


def test_an_oversized_runs_folder_is_flagged_then_packed_and_unpacks_to_the_same_bytes(tmp_path, monkeypatch):
    policy = _policy()
    monkeypatch.setattr(policy, "RUNS_THRESHOLD", 2_000)
    study = _large_study(tmp_path)
    before = _loose(study)
    problems = "\n".join(policy.violations(tmp_path))
    assert "study/runs: 0.0 MB of loose run files, over the 0.0 MB" in problems and "pack it with --apply" in problems
    done = policy.apply(tmp_path)
    assert done == ["packed 12 run files of study/runs into runs-final.tar.xz "
                    f"({(study / 'runs-final.tar.xz').stat().st_size / 1e6:.1f} MB), runs-search.tar.xz "
                    f"({(study / 'runs-search.tar.xz').stat().st_size / 1e6:.1f} MB)"]
    assert not (study / "runs").exists() and policy.violations(tmp_path) == []
    with tarfile.open(study / "runs-search.tar.xz", "r:xz") as archive:
        assert all(name.startswith("runs/search/") for name in archive.getnames())
        assert all(m.mtime == 0 and m.mode == 0o644 and not m.uname for m in archive.getmembers())
    _unpack(study, "runs-*.tar.xz")
    assert _loose(study) == before  # every run's config, summary and metrics back, byte for byte


def test_packing_runs_is_deterministic_and_merges_runs_added_later(tmp_path, monkeypatch):
    policy = _policy()
    monkeypatch.setattr(policy, "RUNS_THRESHOLD", 2_000)
    first, second = _large_study(tmp_path / "a"), _large_study(tmp_path / "b")
    for path in (second / "runs").rglob("*.csv"):  # another machine: other times and modes
        path.chmod(0o600)
        os.utime(path, (1e9, 1e9))
    policy.apply(tmp_path / "a")
    policy.apply(tmp_path / "b")
    packed = {p.name: p.read_bytes() for p in sorted(first.glob("*.tar.xz"))}
    assert packed == {p.name: p.read_bytes() for p in sorted(second.glob("*.tar.xz"))}
    _unpack(first, "runs-*.tar.xz")  # unpacked to resume, then packed again: the same bytes
    policy.apply(tmp_path / "a")
    assert {p.name: p.read_bytes() for p in sorted(first.glob("*.tar.xz"))} == packed and not (first / "runs").exists()
    (first / "runs" / "sgd-seed1").mkdir(parents=True)  # a run added later, under the threshold
    (first / "runs" / "sgd-seed1" / "summary.json").write_text("{}")
    assert "study/runs: 1 loose run files beside runs-*.tar.xz" in "\n".join(policy.violations(tmp_path / "a"))
    policy.apply(tmp_path / "a")
    with tarfile.open(first / "runs-final.tar.xz", "r:xz") as archive:
        names = archive.getnames()
    assert "runs/sgd-seed1/summary.json" in names and "runs/sam-seed0/summary.json" in names
    assert policy.violations(tmp_path / "a") == []


def test_a_runs_archive_over_the_limit_is_split_at_runs(tmp_path, monkeypatch):
    policy = _policy()
    monkeypatch.setattr(policy, "RUNS_THRESHOLD", 2_000)
    monkeypatch.setattr(policy, "MAX_BYTES", 3_000)
    study = _study(tmp_path)
    for seed in range(4):  # incompressible: 4 runs of 800 bytes cannot fit one 3,000-byte archive
        (study / "runs" / "search" / f"sam-seed{seed}").mkdir(parents=True)
        (study / "runs" / "search" / f"sam-seed{seed}" / "summary.json").write_bytes(os.urandom(800))
    before = _loose(study)
    policy.apply(tmp_path)
    parts = sorted(path.name for path in study.glob("runs-search*.tar.xz"))
    assert parts == ["runs-search-1.tar.xz", "runs-search-2.tar.xz"], parts
    assert all((study / name).stat().st_size <= 3_000 for name in parts)
    with tarfile.open(study / parts[0], "r:xz") as archive:  # a run's files stay together, in order
        assert archive.getnames() == ["runs/search/sam-seed0/summary.json", "runs/search/sam-seed1/summary.json"]
    _unpack(study, "runs-*.tar.xz")
    assert _loose(study) == before


def test_a_large_summaries_json_is_packed_beside_the_report(tmp_path):
    policy = _policy()
    study = _study(tmp_path)
    text = '{"runs": [' + ", ".join(f'{{"seed": {i}, "loss": {1 / (i + 1)}}}' for i in range(40_000)) + "]}"
    (study / "summaries.json").write_text(text)
    problems = "\n".join(policy.violations(tmp_path))
    assert "study/summaries.json: 1.9 MB, over the 1 MB" in problems and "summaries.json.tar.xz" in problems
    assert policy.apply(tmp_path) == ["packed study/summaries.json into summaries.json.tar.xz"]
    assert not (study / "summaries.json").exists() and (study / "report.md").exists()
    assert policy.violations(tmp_path) == []
    packed = (study / "summaries.json.tar.xz").read_bytes()
    _unpack(study, "summaries.json.tar.xz")
    assert (study / "summaries.json").read_text() == text
    assert "summaries.json: beside summaries.json.tar.xz" in "\n".join(policy.violations(tmp_path))
    policy.apply(tmp_path)
    assert (study / "summaries.json.tar.xz").read_bytes() == packed


def test_summaries_too_large_for_one_archive_are_split_and_merge_back(tmp_path):
    import json
    import random

    policy = _policy()
    study = _study(tmp_path)
    rng = random.Random(0)  # random digits: xz cannot shrink them below 1 MB
    data = {method: [{"seed": i, "curve": [rng.random() for _ in range(40)]} for i in range(2_000)]
            for method in ("sgd", "otmdr+momentum")}
    (study / "summaries.json").write_text(json.dumps(data, indent=1))
    done = policy.apply(tmp_path)
    parts = sorted(p.name for p in study.glob("summaries-*.json.tar.xz"))
    assert len(parts) >= 2 and not (study / "summaries.json.tar.xz").exists()
    assert done == [f"packed study/summaries.json into {', '.join(sorted(parts, key=lambda n: (len(n), n)))}"]
    assert all((study / name).stat().st_size <= 1_000_000 for name in parts)
    assert policy.violations(tmp_path) == []
    assert policy.main(["--merge-summaries", str(study)]) == 0
    assert json.loads((study / "summaries.json").read_text()) == data
    before = {name: (study / name).read_bytes() for name in parts}
    policy.apply(tmp_path)  # idempotent: the merged file packs into the same bytes
    assert {name: (study / name).read_bytes() for name in parts} == before
    assert not (study / "summaries.json").exists()  # packed again by that apply
    _unpack(study, "summaries-*.json.tar.xz")  # the parts unpacked to read: flagged, then packed back as they were
    assert "an unpacked summaries part" in "\n".join(policy.violations(tmp_path))
    policy.apply(tmp_path)
    assert policy.violations(tmp_path) == [] and not list(study.glob("summaries-*.json"))
    assert {name: (study / name).read_bytes() for name in parts} == before


def test_an_archive_holding_other_files_is_flagged(tmp_path):
    policy = _policy()
    study = _study(tmp_path)
    with tarfile.open(study / "runs-final.tar.xz", "w:xz") as archive:
        archive.add(study / "report.md", arcname="runs/sgd-seed0/last.pt")
    with tarfile.open(study / "other.tar.xz", "w:xz") as archive:
        archive.add(study / "report.md", arcname="report.md")
    problems = "\n".join(policy.violations(tmp_path))
    assert "runs-final.tar.xz: holds runs/sgd-seed0/last.pt: only runs/*/ files" in problems
    assert ("other.tar.xz: archives are named logs.tar.xz, runs-<group>.tar.xz, summaries.json.tar.xz or "
            "summaries-<i>.json.tar.xz") in problems


def test_a_path_of_the_machine_that_made_a_result_is_flagged(tmp_path):
    """A report or JSON naming this checkout's absolute path, or a home or workspace folder, would
    not reproduce on another machine; /tmp scratch folders and relative paths are fine."""
    policy = _policy()
    study = _study(tmp_path)
    embed = "![accuracy](figures/accuracy.png)\n"
    (study / "report.md").write_text("Command: `otmdr compare --out runs/evidence/x --corrupted-dir /tmp/c`\n" + embed)
    (study / "search.json").write_text('{"source": "../shared/datasets/fashion-mnist"}')
    assert policy.violations(tmp_path) == []
    (study / "report.md").write_text("Command: `otmdr compare --data-dir /home/alice/data --out runs/x`\n" + embed)
    (study / "search.json").write_text(f'{{"out": "{ROOT}/runs/evidence/x"}}')
    problems = policy.violations(tmp_path)
    assert [p.split(":")[0] for p in problems] == ["study/report.md", "study/search.json"], problems
    assert "holds /home/alice/data, a path of the machine that made it" in problems[0]
    assert f"holds {ROOT}/" in problems[1]


def test_apply_writes_this_checkouts_and_the_shared_folders_paths_relative(tmp_path):
    """A study trained with absolute paths (an absolute ``--data-dir`` from a queue
    script) named them in every config, summary and log; --apply rewrites them the way a command
    run from the checkout's root writes them, logs before they are packed, and leaves a stranger's
    path for violations() to name."""
    policy = _policy()
    study = _study(tmp_path)
    shared = str(ROOT.parent / "shared")
    run = study / "runs" / "sgd-seed0"
    (run / "config.yaml").write_text(f"data:\n  dir: {shared}/datasets/cifar10-jpeg.tar.gz\n")
    (run / "train.log").write_text(f"$ otmdr train --out {ROOT}/runs/evidence/x/sgd-seed0\n")
    (study / "search.json").write_text(f'{{"run_dir": "{ROOT}/runs/evidence/x/search/a", "home": "/home/alice/d"}}')
    done = policy.apply(tmp_path)
    assert sum("relative in" in line for line in done) == 3, done
    assert (run / "config.yaml").read_text() == "data:\n  dir: ../shared/datasets/cifar10-jpeg.tar.gz\n"
    assert (study / "search.json").read_text() == '{"run_dir": "runs/evidence/x/search/a", "home": "/home/alice/d"}'
    with tarfile.open(study / "logs.tar.xz", "r:xz") as archive:
        assert archive.extractfile("runs/sgd-seed0/train.log").read().decode() == (
            "$ otmdr train --out runs/evidence/x/sgd-seed0\n")
    assert [p.split(":")[0] for p in policy.violations(tmp_path)] == ["study/search.json"]
    assert policy.apply(tmp_path) == []  # idempotent
