"""Checkpoints load with ``torch.load(weights_only=True)``: a pickle whose unpickling would run code
is refused with one line and exit 2, and the code does not run; the checkpoints otmdr writes (every
model family and optimizer) load with the same safe loader. A preempted run's mid-epoch checkpoint
is resumed through the same loader in tests/test_preemption.py."""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from otmdr.config import load_config
from otmdr.train import CheckpointError, load_checkpoint, prepare_run_dir, train

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
TINY = ["train.epochs=1", "data.train_limit=150", "train.threads=1", "train.progress=false",
        "model.options={hidden: [16]}"]


class _Payload:
    """Unpickling this creates the file ``marker`` (as a real attack would run a shell command)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _malicious(path: Path, marker: Path, *, protocol: int | None = None) -> Path:
    """An otmdr-looking checkpoint (model and config entries) carrying the payload: torch's zip
    format, or (``protocol``) a plain pickle, which torch.load reads as its legacy format."""
    state = {"model": {}, "config": {}, "epoch": _Payload(marker)}
    if protocol is None:
        torch.save(state, path)
    else:
        path.write_bytes(pickle.dumps(state, protocol=protocol))
    return path


def _otmdr(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "otmdr", *args], capture_output=True, text=True, timeout=300,
                          check=False)


def _assert_refused(result: subprocess.CompletedProcess, marker: Path, path: Path, *, names: bool = True) -> None:
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("otmdr: error: "), result.stderr
    assert "Traceback" not in result.stderr and str(path) in result.stderr and "refused" in result.stderr
    if names:  # the refused global is named (a protocol >= 4 pickle is refused at an opcode, before any name)
        assert "posix.system" in result.stderr or "os.system" in result.stderr
    assert not marker.exists(), "the payload ran"


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = prepare_run_dir(tmp_path_factory.mktemp("safety") / "run", resume=False)
    train(load_config(DEMO, [*TINY, "optim.method=otmdr"]), out, log=lambda _: None)
    return out


@pytest.mark.parametrize("protocol", [None, 2, 5], ids=["torch-zip", "pickle-protocol-2", "pickle-protocol-5"])
def test_a_malicious_checkpoint_file_is_refused_by_eval(tmp_path, protocol):
    marker = tmp_path / "PAYLOAD_RAN"
    path = _malicious(tmp_path / "evil.pt", marker, protocol=protocol)
    _assert_refused(_otmdr("eval", str(path)), marker, path, names=protocol != 5)


def test_a_malicious_last_pt_in_a_run_is_refused_by_eval_and_resume(run, tmp_path):
    victim = tmp_path / "victim"
    shutil.copytree(run, victim)
    marker = tmp_path / "PAYLOAD_RAN"
    last = _malicious(victim / "checkpoints" / "last.pt", marker)

    def files() -> dict[Path, bytes]:  # the run's files (its .lock records the last process that held it)
        return {p: p.read_bytes() for p in victim.rglob("*") if p.is_file() and p.name != ".lock"}

    before = files()
    _assert_refused(_otmdr("eval", str(victim)), marker, last)
    _assert_refused(_otmdr("train", "--resume", str(victim)), marker, last)
    assert files() == before  # nothing changed


def test_load_checkpoint_refuses_before_unpickling_the_payload(tmp_path):
    marker = tmp_path / "PAYLOAD_RAN"
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(_malicious(tmp_path / "evil.pt", marker))
    assert not marker.exists()


@pytest.mark.parametrize("overrides", [
    ["optim.method=otmdr"],
    ["optim.method=asam", "train.precision=bf16"],
    ["optim.method=sam", "train.precision=fp16"],
    ["optim.method=otmdr", "model.name=mlp-x3", "ensemble.regime=per-member"],
    ["optim.method=otmdr", "model.name=bayes-mlp", "optim.base=adam"],
], ids=["otmdr", "asam-bf16", "sam-fp16-scaler", "ensemble-per-member", "bayes-adam"])
def test_what_otmdr_writes_loads_with_the_safe_loader(tmp_path, overrides):
    out = prepare_run_dir(tmp_path / "run", resume=False)
    train(load_config(DEMO, [*TINY, *overrides]), out, log=lambda _: None)
    for name in ("last.pt", "best.pt"):
        state = load_checkpoint(out / "checkpoints" / name)
        assert {"model", "optimizer", "rng", "loader", "config"} <= set(state)

