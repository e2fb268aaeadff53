"""benchmarks/evidence/chosen.py: the value a finished study chose, for the next study to use."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "evidence" / "chosen.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True)


@pytest.fixture
def study(tmp_path: Path) -> Path:
    seeds = (1000, 1001)  # two search seeds: each point listed once per seed
    rows = [{"method": "sgd", "setting": "lr=0.1 weight_decay=0.005", "seed": s, "chosen": False} for s in seeds]
    rows += [{"method": "sgd", "setting": "lr=0.05 weight_decay=0.0005", "seed": s, "chosen": True} for s in seeds]
    rows += [{"method": "otmdr", "setting": "rho=[0.005,0.01]", "seed": 1000, "chosen": True},
             {"method": "otmdr", "setting": "rho=[0.01,0.02]", "seed": 1000, "chosen": False}]
    (tmp_path / "search.json").write_text(json.dumps(rows))
    return tmp_path


@pytest.mark.parametrize("method, key, value", [("sgd", "optim.lr", "0.05"), ("sgd", "optim.weight_decay", "0.0005"),
                                                ("otmdr", "otmdr.rho", "[0.005,0.01]")])
def test_the_chosen_points_value_as_the_grid_wrote_it(study, method, key, value):
    done = _run(str(study), method, key)
    assert done.returncode == 0 and done.stdout == value + "\n"


@pytest.mark.parametrize("args, message", [
    (("sam", "sam.rho"), "sam has no chosen grid point"),
    (("sgd", "optim.momentum"), "the point chosen for sgd does not set optim.momentum"),
    (("sgd",), "usage: chosen.py STUDY_DIR METHOD SECTION.KEY"),
])
def test_what_cannot_be_read_is_one_line_and_exit_2(study, args, message):
    done = _run(str(study), *args)
    assert done.returncode == 2 and message in done.stderr and done.stdout == ""
    assert len(done.stderr.strip().splitlines()) == 1


def test_a_study_without_its_search_is_refused(tmp_path):
    done = _run(str(tmp_path), "sgd", "optim.lr")
    assert done.returncode == 2 and "search.json does not exist: run the study's search first" in done.stderr
