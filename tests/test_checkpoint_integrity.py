"""A damaged checkpoint is refused before anything of its run changes: a checksum written with
every checkpoint catches a flipped bit or a cut-off file, and one structural check, shared by
every reader (resume, eval, sharpness, landscape, ``load_run``), catches entries that are missing,
of the wrong kind, or do not fit the model and optimizer. Each case: ``otmdr train --resume DIR``
and ``otmdr eval DIR`` exit with status 2 and one line, no traceback, and every file of the run
is byte-identical afterwards.

The damaged files are made as damage happens: a real ``last.pt`` loaded, changed and saved back
with the project's own :func:`~otmdr.train.save_checkpoint` (a valid checksum: only the structural
check can refuse it), or a bit flipped inside the tensor data of the saved file, or the file cut
short (its checksum must refuse it)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from otmdr.cli import main
from otmdr.train import CheckpointError, load_checkpoint, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "configs" / "demo.yaml")
FAST = ["--set", "train.epochs=2", "--set", "train.progress=false", "--set", "model.options={hidden: [16]}",
        "--set", "data.train_limit=150", "--set", "train.threads=1"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("integrity") / "run"
    assert main(["train", "--config", DEMO, "--out", str(out)] + FAST) == 0
    return out


def _replace(path: Path, data: bytes) -> None:
    """Write ``data`` as a new file: last.pt may be a hard link to best.pt, which must stay as it is."""
    path.unlink()
    path.write_bytes(data)


def _resaved(change: Callable[[dict[str, Any]], None]) -> Callable[[Path], None]:
    """Load last.pt, change its state, save it back as otmdr saves (with a new, valid checksum)."""
    def damage(last: Path) -> None:
        state = torch.load(last, weights_only=True)
        change(state)
        save_checkpoint(state, last)
    return damage


def _wrong_momentum(state: dict[str, Any]) -> None:
    first = next(iter(state["optimizer"]["state"]))
    state["optimizer"]["state"][first]["momentum_buffer"] = torch.zeros(3)  # another model's buffer


def _flip_a_weight_bit(last: Path) -> None:
    """One bit flipped in the middle of a weight tensor's bytes inside the file (disk or copy error)."""
    data = bytearray(last.read_bytes())
    weight = torch.load(last, weights_only=True)["model"]["net.1.weight"]
    raw = weight.contiguous().numpy().tobytes()
    at = bytes(data).find(raw)
    assert at > 0 and bytes(data).count(raw) == 1
    data[at + len(raw) // 2] ^= 0x04
    _replace(last, bytes(data))
    assert not torch.equal(torch.load(last, weights_only=True)["model"]["net.1.weight"], weight)


def _truncate(keep: float) -> Callable[[Path], None]:
    def damage(last: Path) -> None:
        data = last.read_bytes()
        _replace(last, data[: int(len(data) * keep)] if keep < 1 else data[:-8])
    return damage


CASES: dict[str, Callable[[Path], None]] = {
    "optimizer-momentum-shape": _resaved(_wrong_momentum),
    "optimizer-not-a-state": _resaved(lambda s: s.update(optimizer={"garbage": 1})),
    "optimizer-groups-missing": _resaved(lambda s: s["optimizer"].pop("param_groups")),
    "loader-missing": _resaved(lambda s: s.pop("loader")),
    "rng-missing": _resaved(lambda s: s.pop("rng")),
    "rng-not-a-state": _resaved(lambda s: s["rng"].update(cpu=torch.zeros(7, dtype=torch.uint8))),
    "history-garbage": _resaved(lambda s: s.update(history=["garbage", 3])),
    "history-row-damaged": _resaved(lambda s: s["history"][1].pop("train_loss")),
    "model-weight-shape": _resaved(lambda s: s["model"].update({"net.1.bias": torch.zeros(5)})),
    "one-bit-flipped-in-a-weight": _flip_a_weight_bit,
    "truncated-half": _truncate(0.5),
    "truncated-end": _truncate(1.0),
}


def _files(run: Path) -> dict[str, str]:
    """Every file of the run and its SHA-256 (the .lock's content names the last process that held it)."""
    return {str(p.relative_to(run)): ("" if p.name == ".lock" else hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(run.rglob("*")) if p.is_file()}


def _otmdr(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "OTMDR_TEST_PAUSE_AT"}
    return subprocess.run([sys.executable, "-m", "otmdr", *args], capture_output=True, text=True, timeout=300,
                          env=env, check=False)


def _assert_one_line(result: subprocess.CompletedProcess, last: Path) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("otmdr: error: "), result.stderr
    assert str(last) in result.stderr and "damaged" in result.stderr, result.stderr


@pytest.mark.parametrize("case", list(CASES))
def test_a_damaged_checkpoint_is_refused_before_anything_changes(run, tmp_path, case):
    victim = tmp_path / "victim"
    shutil.copytree(run, victim)
    last = victim / "checkpoints" / "last.pt"
    CASES[case](last)
    before = _files(victim)
    _assert_one_line(_otmdr("train", "--resume", str(victim)), last)
    assert _files(victim) == before
    _assert_one_line(_otmdr("eval", str(victim)), last)
    assert _files(victim) == before


def test_intact_and_resaved_checkpoints_still_work(run, tmp_path):
    """The control: an unchanged copy and one loaded and saved back resume and evaluate."""
    for name, change in (("copy", None), ("resaved", _resaved(lambda s: None))):
        victim = tmp_path / name
        shutil.copytree(run, victim)
        if change is not None:
            change(victim / "checkpoints" / "last.pt")
        for command in (("eval", str(victim)), ("train", "--resume", str(victim))):
            result = _otmdr(*command)
            assert result.returncode == 0, result.stderr[-2000:]


def test_every_written_checkpoint_carries_a_checksum_and_old_ones_still_load(run, tmp_path):
    """What otmdr writes ends with its SHA-256; a checkpoint without one (written before checksums,
    or re-saved with plain torch.save) loads after the structural check alone."""
    for name in ("last.pt", "best.pt"):
        data = (run / "checkpoints" / name).read_bytes()
        assert b"otmdr-sha256:" in data[-100:]
        load_checkpoint(run / "checkpoints" / name)
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    plain = tmp_path / "plain.pt"
    torch.save(state, plain)
    assert b"otmdr-sha256:" not in plain.read_bytes()[-100:]
    assert torch.equal(load_checkpoint(plain)["model"]["net.1.weight"], state["model"]["net.1.weight"])
    state["history"] = "garbage"
    torch.save(state, plain)
    with pytest.raises(CheckpointError, match="damaged.*history"):
        load_checkpoint(plain)


@pytest.mark.parametrize("command", ["sharpness", "landscape"])
def test_the_other_readers_refuse_a_flipped_bit(run, tmp_path, command):
    victim = tmp_path / "victim"
    shutil.copytree(run, victim)
    last = victim / "checkpoints" / "last.pt"
    _flip_a_weight_bit(last)
    before = _files(victim)
    extra = ["--out", str(tmp_path / "landscape")] if command == "landscape" else ["--samples", "16"]
    _assert_one_line(_otmdr(command, str(victim), *extra), last)
    assert _files(victim) == before and not (tmp_path / "landscape").exists()


def test_a_damaged_best_pt_is_refused_by_a_resume_before_it_trains(run, tmp_path):
    """A resume ends by reading best.pt (the early-stopped model): a damaged one is found at the
    start, not after the remaining epochs, and nothing is changed."""
    victim = tmp_path / "victim"
    shutil.copytree(run, victim)
    best = victim / "checkpoints" / "best.pt"
    data = bytearray(best.read_bytes())
    data[len(data) // 2] ^= 0x01
    _replace(best, bytes(data))  # last.pt, a hard link to the old best.pt or not, stays intact
    before = _files(victim)
    _assert_one_line(_otmdr("train", "--resume", str(victim)), best)
    _assert_one_line(_otmdr("eval", str(victim), "--checkpoint", "best"), best)
    assert _files(victim) == before
    assert _otmdr("eval", str(victim)).returncode == 0  # last.pt itself is intact
