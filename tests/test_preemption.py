"""SIGTERM (a cluster's preemption notice) writes a resumable checkpoint at the next step
boundary; resuming gives the uninterrupted run's weights and metrics bit for bit.

The signals land at chosen steps, not after a guessed sleep: the run is started with the
test-only ``OTMDR_TEST_PAUSE_AT=EPOCH:STEP:MARKER`` (otmdr/train/loop.py), which makes it create
MARKER right after that step and wait until the test deletes it. So no test depends on the
machine's speed, and none can skip because the run finished first.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from otmdr.config import load_config
from otmdr.train import prepare_run_dir, train
from conftest import start_otmdr, wait_for_pause

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
SLOW = ["train.epochs=3", "data.train_limit=800", "data.batch_size=4", "train.threads=1", "train.progress=false",
        "optim.method=otmdr",
        "otmdr.noise_std=0.001", "data.crop_padding=1"]
STEPS = 170  # training batches per epoch of SLOW (680 of the 800 images; 15% validate)
TIMING = {"seconds", "images_per_second"}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run every interrupted one must equal."""
    run = prepare_run_dir(tmp_path_factory.mktemp("uninterrupted") / "reference", resume=False)
    train(load_config(DEMO, SLOW), run, log=lambda _: None)
    return run


def _start_training(run: Path, extra: list[str] | None = None,
                    pause: tuple[int, int, Path] | tuple[str, Path] | None = None) -> subprocess.Popen:
    """``otmdr train`` of the SLOW config into ``run`` as a subprocess; with ``pause`` =
    ``(epoch, step, marker)`` it waits after that step until ``marker`` is deleted, with
    ``(name, marker)`` at that named point (otmdr._signals.pause_point)."""
    args = ["train", "--config", str(DEMO), "--out", str(run)]
    for override in SLOW + list(extra or []):
        args += ["--set", override]
    return start_otmdr(args, None if pause is None else ":".join(str(part) for part in pause))


def _wait_for_pause(process: subprocess.Popen, marker: Path) -> None:
    """Until the run stands at its pause point, which the marker says it is."""
    wait_for_pause(process, marker)
    assert marker.read_text() == str(process.pid)


def _assert_same_as(run: Path, reference: Path) -> None:
    """The resumed run ends with the uninterrupted run's weights, metrics rows and test summary."""
    a = torch.load(reference / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert _rows(run) == _rows(reference)
    assert json.loads((run / "summary.json").read_text())["test"] == json.loads(
        (reference / "summary.json").read_text())["test"]


def _resume(run: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "OTMDR_TEST_PAUSE_AT"}
    resumed = subprocess.run([sys.executable, "-m", "otmdr", "train", "--resume", str(run)], capture_output=True,
                             text=True, timeout=600, env=env, check=False)
    assert resumed.returncode == 0, resumed.stderr


def _rows(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.parametrize("epoch, step", [(2, 1), (1, STEPS), (3, random.Random(0).randint(2, STEPS - 1))],
                         ids=["first-step", "epoch-end", "random-step"])
def test_sigterm_then_resume_equals_an_uninterrupted_run(tmp_path, reference, epoch, step):
    """SIGTERM at step ``step`` of ``epoch``: mid-epoch it stops after that very step (the epoch's
    running sums saved with the checkpoint); at an epoch's last step, after that epoch's
    validation and checkpoint."""
    run, marker = tmp_path / "preempted", tmp_path / "paused"
    process = _start_training(run, pause=(epoch, step, marker))
    _wait_for_pause(process, marker)
    process.send_signal(signal.SIGTERM)
    marker.unlink()
    _, err = process.communicate(timeout=600)
    assert process.returncode == 143, err
    where = f"after epoch {epoch}" if step == STEPS else f"in epoch {epoch} after step {step}"
    assert f"preempted (SIGTERM) {where}" in err, err
    assert f"otmdr train --resume {run}" in err and "Traceback" not in err
    saved = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert saved["epoch"] == (epoch if step == STEPS else epoch - 1)
    if step < STEPS:  # stopped after exactly that step, its running sums kept
        assert saved["loader"]["batch"] == step and saved["partial_epoch"]["samples"] == 4 * step
    _resume(run)
    _assert_same_as(run, reference)


def test_one_process_per_run_folder_and_a_killed_one_leaves_no_stale_lock(tmp_path, capsys):
    from otmdr._lock import folder_lock
    from otmdr.cli import main

    run, marker = tmp_path / "run", tmp_path / "paused"
    process = _start_training(run, pause=(1, 1, marker))
    _wait_for_pause(process, marker)  # training, holding the folder's lock
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
@pytest.mark.parametrize("epoch, step", [(2, 1), (random.Random(2).choice([2, 3]), random.Random(3).randint(2, STEPS))],
                         ids=["after-a-checkpoint", "random-step"])
def test_kill_9_at_a_chosen_point_then_resume_equals_an_uninterrupted_run(tmp_path, reference, epoch, step):
    """SIGKILL cannot be caught: whatever it interrupts (right after an epoch, the previous
    epoch's checkpoint may still be being written by the background writer), the resumed run
    ends with the uninterrupted run's checkpoints (last and best), metrics and summary."""
    run, marker = tmp_path / "killed", tmp_path / "paused"
    process = _start_training(run, pause=(epoch, step, marker))
    _wait_for_pause(process, marker)
    process.kill()
    process.wait(timeout=60)
    assert not (run / "summary.json").exists()
    _resume(run)
    for name in ("last.pt", "best.pt"):
        a = torch.load(reference / "checkpoints" / name, weights_only=True)
        b = torch.load(run / "checkpoints" / name, weights_only=True)
        assert a["epoch"] == b["epoch"] and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert _rows(run) == _rows(reference)
    assert json.loads((run / "summary.json").read_text())["test"] == json.loads(
        (reference / "summary.json").read_text())["test"]
    assert not list(run.rglob("*.tmp"))


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_after_the_config_is_written_leaves_a_resumable_folder(tmp_path, reference, signum):
    """Issue 29 row 3: a scheduler's requeue signals a run whose config.yaml is written but which
    has not stepped yet. Before: the --out folder was deleted (exit 143) and --resume then exited
    2. Now it stays, as after kill -9 at that moment: 143 (130 for Ctrl-C), the resume line, and
    the resumed run equals an uninterrupted one bit for bit."""
    run, marker = tmp_path / "mine", tmp_path / "paused"
    run.mkdir()  # a folder the user made: never deleted
    process = _start_training(run, pause=("after-config", marker))
    _wait_for_pause(process, marker)
    process.send_signal(signum)
    marker.unlink()
    _, err = process.communicate(timeout=600)
    assert process.returncode == 128 + signum, err
    lines = err.strip().splitlines()
    kind = "preempted (SIGTERM)" if signum == signal.SIGTERM else "interrupted (SIGINT)"
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0] == f"otmdr: {kind} before training started; continue with: otmdr train --resume {run}"
    assert (run / "config.yaml").is_file() and not (run / "checkpoints" / "last.pt").exists()
    _resume(run)
    _assert_same_as(run, reference)
