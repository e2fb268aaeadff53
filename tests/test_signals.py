"""One signal policy for every command (issue 29, rows 1, 2, 9, 10; row 3 is in test_preemption.py).

Every signal lands at a named point, never after a guessed sleep: the command runs with the
test-only ``OTMDR_TEST_PAUSE_AT`` (otmdr/_signals.py), creates a marker file there and waits until
the test deletes it; the test signals while it waits. So no test depends on the machine's speed
and none can skip because the command finished first.
"""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import start_otmdr, wait_for_pause

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
FAST = ["train.epochs=2", "model.options={hidden: [16]}", "train.threads=1"]
STEPS = 20  # training batches per epoch of the demo (1,221 digits, batches of 64)
TIMING = {"seconds", "images_per_second"}
RUNS = ("sgd-seed0", "sgd-seed1", "sam-seed0", "sam-seed1")  # the order they train in


def _compare_args(out: Path, *extra: str) -> list[str]:
    args = ["compare", "--config", str(DEMO), "--methods", "sgd,sam", "--seeds", "2", "--out", str(out), "--quiet"]
    for override in FAST:
        args += ["--set", override]
    return args + list(extra)


def _release_until_exit(process: subprocess.Popen, marker: Path) -> tuple[str, str, bool]:
    """Delete the marker (again whenever a later point re-creates it) until the command exits;
    returns its output and whether it paused again (it went on working after the signal)."""
    again = False
    marker.unlink()
    deadline = time.monotonic() + 600
    while process.poll() is None:
        if marker.exists():
            again = True
            marker.unlink()
        assert time.monotonic() < deadline, "the command did not end in 10 minutes"
        time.sleep(0.01)
    out, err = process.communicate()
    return out, err, again


def _tree(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """Every file under ``folder`` (but those under ``skip``) -> the hash of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()
            and not any(str(p.relative_to(folder)).startswith(s) for s in skip)}


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _rows(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def _same_study(a: Path, b: Path) -> None:
    """Every run of study ``b`` equals study ``a``'s bit for bit: weights, metrics rows, summary."""
    for name in RUNS:
        for checkpoint in ("last.pt", "best.pt"):
            x = torch.load(a / name / "checkpoints" / checkpoint, weights_only=True)
            y = torch.load(b / name / "checkpoints" / checkpoint, weights_only=True)
            assert x["epoch"] == y["epoch"] and all(torch.equal(x["model"][k], y["model"][k]) for k in x["model"])
        assert _rows(a / name) == _rows(b / name)
        sa, sb = (json.loads((s / name / "summary.json").read_text()) for s in (a, b))
        assert sa["test"] == sb["test"] and sa["early_stopped"] == sb["early_stopped"]

    def strip(summaries: dict) -> dict:  # without the timings (the compute block's wall-clock included)
        def run(r: dict) -> dict:
            kept = {k: v for k, v in r.items() if k not in ("history", "seconds_per_epoch")}
            kept["compute"] = {k: v for k, v in r["compute"].items() if k != "train_seconds"}
            return kept

        return {m: [run(r) for r in runs] for m, runs in summaries.items()}

    assert strip(json.loads((a / "summaries.json").read_text())) == strip(
        json.loads((b / "summaries.json").read_text()))
    assert (b / "report.md").is_file()


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted study every interrupted one must equal."""
    from otmdr.cli import main

    out = tmp_path_factory.mktemp("uninterrupted") / "study"
    assert main(_compare_args(out)) == 0
    return out


def _resume_study(out: Path, line: str, *extra: str) -> None:
    """The printed resume line names the same command with --resume; running it finishes the study."""
    assert "continue with: otmdr compare" in line and line.rstrip().endswith("--resume"), line
    resumed = start_otmdr(_compare_args(out, *extra, "--resume"))
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err


# -- rows 1 and 2: SIGTERM to otmdr compare ---------------------------------------------------

@pytest.mark.parametrize("point, signum", [("last-epoch", signal.SIGTERM), ("final-evaluation", signal.SIGTERM),
                                           ("between-runs", signal.SIGTERM), ("report", signal.SIGTERM),
                                           ("last-epoch", signal.SIGINT)],
                         ids=["last-epoch", "final-evaluation", "between-runs", "report", "last-epoch-SIGINT"])
def test_a_signal_to_compare_stops_it_with_the_resume_line(tmp_path, reference, point, signum):
    """In a run's last epoch or final evaluation (row 1: the signal was forgotten, the next runs
    trained, exit 0), between runs or before the report (row 2: killed silently): the study stops
    at the next safe point, exits 143 with the resume line, and the resume equals the
    uninterrupted study bit for bit."""
    out, marker = tmp_path / "study", tmp_path / "paused"
    pause = {"last-epoch": f"2:{STEPS}:{marker}", "final-evaluation": f"final-evaluation:{marker}",
             "between-runs": f"compare-run:{marker}", "report": f"compare-report:{marker}"}[point]
    process = start_otmdr(_compare_args(out), pause)
    wait_for_pause(process, marker)
    if point == "between-runs":  # the first pause is before the first run: let it train, stop before the second
        marker.unlink()
        wait_for_pause(process, marker)
        assert (out / RUNS[0] / "summary.json").is_file() and not (out / RUNS[1]).exists()
    running = () if point in ("between-runs", "report") else (RUNS[0],)
    before = _tree(out, skip=running)
    process.send_signal(signum)
    _, err, again = _release_until_exit(process, marker)
    assert not again, f"the study went on after the signal: {err}"
    assert process.returncode == 128 + signum, err
    line = _one_line(err)
    kind = "preempted (SIGTERM)" if signum == signal.SIGTERM else "interrupted (SIGINT)"
    assert line.startswith(f"otmdr: {kind}"), line
    assert _tree(out, skip=running) == before  # nothing else touched, no partial artefact
    assert not (out / "report.md").exists() and not list(out.rglob("*.tmp"))
    if running:  # the run that was stopped holds its last epoch's checkpoint
        assert torch.load(out / RUNS[0] / "checkpoints" / "last.pt", weights_only=True)["epoch"] == 2
    _resume_study(out, line)
    _same_study(reference, out)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_to_compare_jobs_2_stops_running_and_queued_runs(tmp_path, reference, signum):
    """Workers are processes: a SIGTERM (or SIGINT) to the study alone reaches them, the running
    runs checkpoint at their next step, the queued ones never start; exit 143 (130); resuming
    (also in parallel) equals the uninterrupted study."""
    out, marker = tmp_path / "study", tmp_path / "paused"
    process = start_otmdr(_compare_args(out, "--jobs", "2"), f"1:3:{marker}")
    wait_for_pause(process, marker)  # a worker stands after its third step
    process.send_signal(signum)
    # the marker stays: a worker held there goes on only once the study has passed the stop on
    _, err = process.communicate(timeout=600)
    marker.unlink(missing_ok=True)
    assert process.returncode == 128 + signum, err
    line = _one_line(err)
    kind = "preempted (SIGTERM)" if signum == signal.SIGTERM else "interrupted (SIGINT)"
    assert line.startswith(f"otmdr: {kind}"), line
    assert not list(out.glob("*/summary.json"))  # every run stopped in its first epoch
    started = [name for name in RUNS if (out / name / "checkpoints" / "last.pt").is_file()]
    assert 1 <= len(started) <= 2 and not (out / RUNS[2]).exists() and not (out / RUNS[3]).exists(), started
    _resume_study(out, line, "--jobs", "2")
    _same_study(reference, out)


def test_sigterm_to_train_during_its_final_evaluation_is_not_forgotten(tmp_path):
    """The final evaluation has no safe point: it finishes (the run is complete), then the signal
    still ends the command with 143 and one line instead of a silent exit 0."""
    run, marker = tmp_path / "run", tmp_path / "paused"
    args = ["train", "--config", str(DEMO), "--out", str(run), "--set", "train.progress=false"]
    for override in FAST:
        args += ["--set", override]
    process = start_otmdr(args, f"final-evaluation:{marker}")
    wait_for_pause(process, marker)
    before = _tree(run)
    process.send_signal(signal.SIGTERM)
    _, err, again = _release_until_exit(process, marker)
    assert process.returncode == 143 and not again, err
    line = _one_line(err)
    assert line.startswith("otmdr: preempted (SIGTERM) during the final evaluation") and "complete" in line, line
    after = _tree(run)
    assert set(after) - set(before) == {"summary.json"} and not list(run.rglob("*.tmp"))
    assert all(after[name] == digest for name, digest in before.items())


# -- row 9: NaN in the validation inputs ------------------------------------------------------

def test_nan_in_the_validation_inputs_is_one_line_and_keeps_the_checkpoints(tmp_path, monkeypatch, capsys):
    """Before: a traceback in temperature scaling at the end of training, no summary.json."""
    import otmdr.train.loop as loop
    from otmdr.cli import main

    real = loop.build_data

    class NaNInputs:
        """The validation loader with a NaN in the first image of every batch."""

        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def __len__(self):
            return len(self.inner)

        def __iter__(self):
            for x, y in self.inner:
                x = x.clone()
                x[0] = float("nan")
                yield x, y

    def nan_val(*args, **kwargs):
        data = real(*args, **kwargs)
        data.val = NaNInputs(data.val)
        return data

    monkeypatch.setattr(loop, "build_data", nan_val)
    run = tmp_path / "run"
    args = ["train", "--config", str(DEMO), "--out", str(run), "--set", "train.progress=false"]
    for override in FAST:
        args += ["--set", override]
    assert main(args) == 2
    err = capsys.readouterr().err
    line = _one_line(err)
    assert line.startswith("otmdr: error:") and "validation" in line and str(run) in line, line
    assert (run / "checkpoints" / "last.pt").is_file() and len(_rows(run)) == 2
    assert not (run / "summary.json").exists() and not list(run.rglob("*.tmp"))


# -- row 10: a kill -9 while --json F is written ----------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    from otmdr.config import load_config
    from otmdr.train import prepare_run_dir, train

    run = prepare_run_dir(tmp_path_factory.mktemp("trained") / "run", resume=False)
    train(load_config(DEMO, ["train.epochs=1", "model.options={hidden: [16]}", "train.threads=1"]), run,
          log=lambda _: None)
    return run


@pytest.mark.parametrize("command", [["eval"], ["sharpness", "--samples", "64", "--batch-size", "64",
                                                "--iterations", "2", "--probes", "1"]], ids=["eval", "sharpness"])
def test_a_json_write_killed_leaves_no_leftover_after_the_next_run(tmp_path, trained, command):
    """kill -9 while F is written leaves F as it was and a hidden ``.F.*.tmp`` beside it; the
    next run of the command removes it (before: it stayed, 4 of 4 tries)."""
    folder = tmp_path / "results"
    folder.mkdir()
    target, marker = folder / "out.json", tmp_path / "paused"
    target.write_text('{"old": true}')
    (folder / "notes.txt").write_text("mine")
    args = [command[0], str(trained), *command[1:], "--json", str(target), "--force"]  # replacing is asked for
    process = start_otmdr(args, f"write-out.json:{marker}")
    wait_for_pause(process, marker)
    process.kill()
    process.wait(timeout=60)
    marker.unlink()
    assert json.loads(target.read_text()) == {"old": True}
    assert len(list(folder.glob(".out.json.*.tmp"))) == 1  # what the kill left
    again = start_otmdr(args)
    _, err = again.communicate(timeout=600)
    assert again.returncode == 0, err
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt", "out.json"]
    assert "old" not in json.loads(target.read_text()) and (folder / "notes.txt").read_text() == "mine"


def test_sigterm_to_eval_while_it_writes_json_is_one_line_and_leaves_nothing(tmp_path, trained):
    """A command without safe points stops at once on SIGTERM: exit 143, one line, the old F
    intact and no temporary file."""
    folder = tmp_path / "results"
    folder.mkdir()
    target, marker = folder / "out.json", tmp_path / "paused"
    target.write_text('{"old": true}')
    before = _tree(folder)
    process = start_otmdr(["eval", str(trained), "--json", str(target), "--force"], f"write-out.json:{marker}")
    wait_for_pause(process, marker)
    process.send_signal(signal.SIGTERM)
    _, err, _ = _release_until_exit(process, marker)
    assert process.returncode == 143, err
    assert "SIGTERM" in _one_line(err)
    assert _tree(folder) == before and sorted(p.name for p in folder.iterdir()) == ["out.json"]
