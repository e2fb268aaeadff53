"""Frictions a new user hit on the command line (issue 28, item 6): each fixed, each pinned here."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from otmdr.cli import main

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "configs" / "demo.yaml")
FAST = ["train.epochs=2", "model.options={hidden: [16]}", "train.threads=1"]
#: six runs for two jobs: four of them queued when the first two train
RUNS = [f"{method}-seed{seed}" for method in ("sgd", "sam", "otmdr") for seed in (0, 1)]


# 1 ----------------------------------------------------- Ctrl-C to otmdr compare --jobs 2, as a terminal sends it
def _compare_args(out: Path, *extra: str) -> list[str]:
    args = ["compare", "--config", DEMO, "--methods", "sgd,sam,otmdr", "--seeds", "2", "--out", str(out), "--quiet",
            "--jobs", "2"]
    for override in FAST:
        args += ["--set", override]
    return args + list(extra)


def _start_in_own_group(args: list[str], pause: str) -> subprocess.Popen:
    """``python -m otmdr ARGS`` as the leader of its own process group, as a shell starts a job:
    a terminal's Ctrl-C is SIGINT to every process of the group, the workers included."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OTMDR_TEST_PAUSE_AT": pause}
    return subprocess.Popen([sys.executable, "-m", "otmdr", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, start_new_session=True)


def _wait_for(process: subprocess.Popen, marker: Path) -> None:
    deadline = time.monotonic() + 300
    while not marker.exists():
        assert process.poll() is None, f"ended ({process.returncode}) before its pause point: {process.stderr.read()}"
        assert time.monotonic() < deadline, "no pause point in 5 minutes"
        time.sleep(0.01)


def _workers_importing(process: subprocess.Popen) -> None:
    """Until both worker processes of the study are importing torch (its library mapped): past
    Python's start-up, where the SIGINT became a KeyboardInterrupt, not yet in ``_worker_init``."""
    deadline = time.monotonic() + 120
    while True:
        children = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
        workers = [pid for pid in children if "spawn_main" in _read(f"/proc/{pid}/cmdline")]
        if len(workers) == 2 and all("libtorch" in _read(f"/proc/{pid}/maps") for pid in workers):
            return
        assert time.monotonic() < deadline, "the workers did not import torch in 2 minutes"
        time.sleep(0.005)


def _read(path: str) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:  # gone meanwhile
        return ""


def _ctrl_c(process: subprocess.Popen, marker: Path) -> str:
    """Ctrl-C to the whole group; the stderr of the command, which must end within 3 minutes."""
    os.killpg(process.pid, signal.SIGINT)
    try:
        _, err = process.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the study hung (before: a dead worker broke the pool for good)
        _, err = process.communicate()
        pytest.fail(f"otmdr compare --jobs 2 did not end within 3 minutes of Ctrl-C: {err[-2000:]}")
    finally:
        marker.unlink(missing_ok=True)
    return err


def _stopped_with_one_line(process: subprocess.Popen, err: str, out: Path) -> str:
    assert process.returncode == 130, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("otmdr: interrupted (SIGINT)") and lines[0].endswith("--resume"), lines[0]
    assert not list(out.glob("*/summary.json")), "a run trained to completion after Ctrl-C"
    return lines[0]


def _resume(out: Path) -> None:
    resumed = subprocess.run([sys.executable, "-m", "otmdr", *_compare_args(out, "--resume")], capture_output=True,
                             text=True, timeout=600, env={k: v for k, v in os.environ.items()
                                                          if k != "OTMDR_TEST_PAUSE_AT"})
    assert resumed.returncode == 0, resumed.stderr
    assert all((out / name / "summary.json").is_file() for name in RUNS)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc to see the workers start")
def test_ctrl_c_while_the_workers_start_stops_the_study_with_one_line(tmp_path):
    """Before: the workers, still importing torch, died of the SIGINT (a traceback each), the pool
    broke, its manager thread crashed on the cancelled futures and the study waited forever.
    Now they start deaf to it until their handlers hold; no run starts, exit 130, one line."""
    out, marker = tmp_path / "study", tmp_path / "paused"
    process = _start_in_own_group(_compare_args(out), f"compare-workers:{marker}")
    _wait_for(process, marker)  # the runs are submitted, the workers are being spawned
    _workers_importing(process)
    err = _ctrl_c(process, marker)
    _stopped_with_one_line(process, err, out)  # no run finished; a worker that was already past its
    # start-up when the signal landed (a loaded machine can delay the test that long) may have begun a run
    # and stopped it at its first step: that folder resumes like any other, so it is not asserted away
    _resume(out)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX process groups")
def test_ctrl_c_while_the_first_runs_train_starts_no_queued_run(tmp_path):
    """Four runs queued behind two training ones (some already in the pool's call queue, where
    ``future.cancel()`` cannot reach them): Ctrl-C checkpoints the two, starts none of the four."""
    out, marker = tmp_path / "study", tmp_path / "paused"
    process = _start_in_own_group(_compare_args(out), f"1:3:{marker}")
    _wait_for(process, marker)  # a worker stands after its third step
    err = _ctrl_c(process, marker)
    _stopped_with_one_line(process, err, out)
    started = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert set(started) <= {"sgd-seed0", "sgd-seed1"}, started  # the queued sam and otmdr runs never began
    _resume(out)


# 2 ------------------------------------------------------------------------------ each default shown once
def _subparsers() -> dict[str, object]:
    import argparse

    from otmdr.cli.parser import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {"otmdr": parser, **{f"otmdr {name}": p for name, p in commands.choices.items()}}


def _option_helps(text: str) -> dict[str, str]:
    """An option (or positional) -> its help text, from a --help page."""
    blocks: dict[str, str] = {}
    name = None
    for line in text.splitlines():
        if re.match(r"^  \S", line):  # a new option: "  --out OUT   run directory ..."
            name = line.split()[0]
            blocks[name] = line
        elif line.startswith("    ") and name is not None:  # its help, continued
            blocks[name] += " " + line.strip()
        else:
            name = None
    return {key: " ".join(value.split()) for key, value in blocks.items()}


@pytest.mark.parametrize("command", list(_subparsers()))
def test_every_help_shows_each_default_once_and_never_none(command, monkeypatch):
    """Before: ``otmdr train --help`` printed "run directory (default runs/<config>-<method>-s<seed>-<time>)
    (default: None)", and a help that named its default in words got argparse's second one."""
    monkeypatch.setenv("COLUMNS", "120")
    text = _subparsers()[command].format_help()  # type: ignore[attr-defined]
    assert "(default: None)" not in text and "(default: False)" not in text and "(default: [])" not in text, text
    helps = _option_helps(text)
    assert helps, text
    twice = {option: help for option, help in helps.items() if help.lower().count("default") > 1}
    assert not twice, twice


def test_an_option_with_a_default_still_shows_it():
    text = " ".join(_subparsers()["otmdr eval"].format_help().split())  # type: ignore[attr-defined]
    assert "PGD steps (default: 10)" in text and "(default: linf)" in text, text


# 3 ------------------------------------------------------------------- misspelt options and commands
def _one_line(capsys, args: list[str]) -> str:
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("otmdr: error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("args, expected", [
    (["train", "--confg", "x.yaml"], "unrecognized option --confg (did you mean --config?)"),
    (["compare", "--seed", "3"], "unrecognized option --seed (did you mean --seeds?)"),
    (["compare", "--jbos=2"], "unrecognized option --jbos (did you mean --jobs?)"),
    (["trian", "--config", "x.yaml"], "unknown command 'trian' (did you mean train?)"),
    (["train", "--method", "otmrd"], "invalid choice: 'otmrd'"),
])
def test_a_misspelt_option_or_command_gets_a_did_you_mean(capsys, args, expected):
    """Before: "unrecognized arguments: --confg x.yaml" with no hint; ``--seed 3`` to compare was
    taken as ``--seeds 3`` (argparse's abbreviations): three evaluation seeds, not train.seed=3."""
    line = _one_line(capsys, args)
    assert expected in line, line
    if args[:2] == ["train", "--method"]:
        assert "(did you mean otmdr?)" in line, line


@pytest.mark.parametrize("args", [["compare", "--bogus"], ["train", "--xyz=1"]])
def test_an_option_like_none_gets_no_suggestion(capsys, args):
    """The shared leading dashes made ``--bogus`` "close" to ``--out`` (difflib ratio 0.67 with them,
    0.5 without): a wrong hint is worse than none."""
    line = _one_line(capsys, args)
    assert f"unrecognized option {args[1].split('=')[0]};" in line and "did you mean" not in line, line


def test_a_prefix_of_an_option_is_not_taken_for_it(capsys):
    """Decided: no abbreviations (``allow_abbrev=False`` on every parser). A prefix that happens to
    be unique today (``--conf`` for ``--config``) would change meaning the day an option sharing
    it is added, and ``compare --seed`` already meant ``--seeds``; a prefix is refused with the
    full name suggested."""
    assert "unrecognized option --conf (did you mean --config?)" in _one_line(capsys, ["train", "--conf", "x.yaml"])
    assert "(did you mean --seeds?)" in _one_line(capsys, ["compare", "--seed", "3"])


# 4 ------------------------------------------------------------ otmdr landscape A B: both surfaces
@pytest.fixture(scope="module")
def two_runs(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("two_runs")
    runs = []
    for method in ("sgd", "sam"):
        out = folder / method
        assert main(["train", "--config", DEMO, "--out", str(out), "--method", method, "--set", "train.epochs=1",
                     "--set", "train.progress=false", "--set", "model.options={hidden: [16]}", "--set",
                     "train.threads=1"]) == 0
        runs.append(out)
    return runs[0], runs[1]


def test_landscape_of_two_runs_draws_both_surfaces_side_by_side(two_runs, tmp_path, monkeypatch):
    """Before: RUN_B only gave the interpolation line; landscape.png and landscape.json held RUN_A's
    surface alone, so "compare the landscapes of SGD and SAM" drew one of them."""
    from matplotlib.figure import Figure

    saved: dict[str, list[str]] = {}
    real = Figure.savefig

    def spy(self, path, *args, **kwargs):
        saved[Path(path).name] = [ax.get_title() for ax in self.axes if ax.name == "3d"]
        return real(self, path, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", spy)
    a, b = two_runs
    out = tmp_path / "landscape"
    assert main(["landscape", str(a), str(b), "--out", str(out), "--points", "5", "--samples", "64"]) == 0
    surfaces = saved["landscape.png"]
    assert len(surfaces) == 2 and "sgd" in surfaces[0] and "sam" in surfaces[1], surfaces
    result = json.loads((out / "landscape.json").read_text())
    mine, theirs = result["surface_2d"], result["other"]["surface_2d"]
    assert len(mine) == len(theirs) == 5 and all(len(row) == 5 for row in mine + theirs)
    assert mine != theirs and result["other"]["run"] == str(b) and len(result["other"]["slice_1d"]) == 5
    assert (out / "interpolation.png").is_file() and len(result["interpolation"]["loss"]) == 5


def test_landscape_of_one_run_draws_one_surface(two_runs, tmp_path):
    out = tmp_path / "landscape"
    assert main(["landscape", str(two_runs[0]), "--out", str(out), "--points", "3", "--samples", "64"]) == 0
    assert "other" not in json.loads((out / "landscape.json").read_text())


# 5 ------------------------------------------------------- the radius column of a noisy OT-MDR run
def _summary(radius: float, **extra: float) -> dict:
    return {"test": {"accuracy": 0.9, "nll": 0.3, "brier": 0.1, "ece": 0.02}, "seconds_per_epoch": 1.0,
            "passes_per_step": 2.0, "epochs": 2, "perturbation_norm": radius, **extra}


def test_the_radius_column_says_it_includes_the_langevin_noise():
    """Before: "radius ‖θ̃−θ‖" showed Bayesian OT-MDR at 5.499 against SAM's 0.005, the Langevin
    noise (otmdr.noise_std) read as a perturbation 1000x SAM's. The summaries record only the
    sum (train/loop.py), so the title says what it holds."""
    from otmdr.report.tables import aggregate, format_table

    table = format_table(aggregate({"sam": [_summary(0.005)], "otmdr": [_summary(5.499)]}), markdown=True)
    header = table.splitlines()[0]
    assert "radius ‖θ̃−θ‖ incl. noise" in header and "ascent radius" not in header and "noise ‖ξ‖" not in header


def test_the_ascent_move_and_the_noise_get_columns_once_summaries_record_them():
    from otmdr.report.tables import aggregate, format_table

    rows = aggregate({"sam": [_summary(0.005)],
                      "otmdr": [_summary(5.499, perturbation_move_norm=0.012, perturbation_noise_norm=5.498)]})
    lines = format_table(rows, markdown=True).splitlines()
    assert "ascent radius (no noise)" in lines[0] and "noise ‖ξ‖" in lines[0], lines[0]
    assert lines[3].startswith("| otmdr") and "| 0.012 | 5.498 |" in lines[3], lines
    assert "| n/a | n/a |" in lines[2], lines  # SAM: no noise recorded apart
