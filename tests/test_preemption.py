"""SIGTERM (a cluster's preemption notice) writes a resumable checkpoint at the next step
boundary; resuming gives the uninterrupted run's weights and metrics bit for bit."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from otmdr.config import load_config
from otmdr.train import prepare_run_dir, train

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
SLOW = ["train.epochs=3", "data.train_limit=800", "data.batch_size=4", "train.threads=1", "train.progress=false",
        "optim.method=otmdr",
        "otmdr.noise_std=0.001", "data.crop_padding=1"]
TIMING = {"seconds", "images_per_second"}


def _start_training(run: Path, extra: list[str] | None = None) -> subprocess.Popen:
    """``otmdr train`` of the SLOW config into ``run`` as a subprocess whose stdout we read."""
    command = [sys.executable, "-m", "otmdr", "train", "--config", str(DEMO), "--out", str(run)]
    for override in SLOW + list(extra or []):
        command += ["--set", override]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _sleep_into_training(process: subprocess.Popen, fraction: float) -> None:
    """Wait for the first epoch's line, then ``fraction`` of that epoch's duration more: a point
    inside the following epochs on a fast machine as on a loaded one."""
    for line in process.stdout:
        if line.startswith("epoch 1/"):
            seconds = float(re.search(r"\((\d+(?:\.\d+)?)s,", line).group(1))
            time.sleep(fraction * seconds)
            return
    raise AssertionError("the run printed no first epoch")


def _rows(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.parametrize("fraction", [0.0, random.Random(0).uniform(0.1, 1.5)])
def test_sigterm_then_resume_equals_an_uninterrupted_run(tmp_path, fraction):
    reference = prepare_run_dir(tmp_path / "reference", resume=False)
    train(load_config(DEMO, SLOW), reference, log=lambda _: None)

    run = tmp_path / "preempted"
    process = _start_training(run)
    _sleep_into_training(process, fraction)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    if process.returncode == 0:
        pytest.skip("the run finished before the signal arrived (machine faster than expected)")
    assert process.returncode == 143, err
    assert "preempted (SIGTERM)" in err and f"otmdr train --resume {run}" in err and "Traceback" not in err
    assert (run / "checkpoints" / "last.pt").is_file()
    resumed = subprocess.run([sys.executable, "-m", "otmdr", "train", "--resume", str(run)], capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    a = torch.load(reference / "checkpoints" / "last.pt", weights_only=False)
    b = torch.load(run / "checkpoints" / "last.pt", weights_only=False)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert _rows(run) == _rows(reference)
    assert json.loads((run / "summary.json").read_text())["test"] == json.loads(
        (reference / "summary.json").read_text())["test"]


def test_one_process_per_run_folder_and_a_killed_one_leaves_no_stale_lock(tmp_path, capsys):
    from otmdr._lock import folder_lock
    from otmdr.cli import main

    run = tmp_path / "run"
    process = _start_training(run, ["train.epochs=50"])
    for line in process.stdout:
        if line.startswith("epoch 1/"):
            break
    assert main(["train", "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert f"is in use by process {process.pid}" in err and len(err.strip().splitlines()) == 1
    process.kill()  # kill -9: the kernel releases the lock
    process.wait(timeout=60)
    with folder_lock(run):
        pass
    study = tmp_path / "study"
    with folder_lock(study):  # a compare already writing into the folder
        assert main(["compare", "--config", str(DEMO), "--methods", "sgd", "--seeds", "1", "--resume",
                     "--out", str(study), "--set", "train.epochs=1"]) == 2
    assert "is in use" in capsys.readouterr().err


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.parametrize("fraction", [random.Random(2).uniform(0.0, 1.0), random.Random(3).uniform(1.0, 1.5)])
def test_kill_9_at_a_random_point_then_resume_equals_an_uninterrupted_run(tmp_path, fraction):
    """SIGKILL cannot be caught: whatever write it interrupts, the resumed run ends with the
    uninterrupted run's checkpoints (last and best), metrics and summary."""
    reference = prepare_run_dir(tmp_path / "reference", resume=False)
    train(load_config(DEMO, SLOW), reference, log=lambda _: None)
    run = tmp_path / "killed"
    process = _start_training(run)
    _sleep_into_training(process, fraction)
    process.kill()
    process.wait(timeout=60)
    if (run / "summary.json").exists():
        pytest.skip("the run finished before the kill (machine faster than expected)")
    resumed = subprocess.run([sys.executable, "-m", "otmdr", "train", "--resume", str(run)], capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    for name in ("last.pt", "best.pt"):
        a = torch.load(reference / "checkpoints" / name, weights_only=False)
        b = torch.load(run / "checkpoints" / name, weights_only=False)
        assert a["epoch"] == b["epoch"] and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert _rows(run) == _rows(reference)
    assert json.loads((run / "summary.json").read_text())["test"] == json.loads(
        (reference / "summary.json").read_text())["test"]
    assert not list(run.rglob("*.tmp"))
