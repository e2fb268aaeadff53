"""Bring your own model and data (docs/your-model.md): ``model.factory`` / ``data.factory`` import
paths and ``--import`` plugin modules, through train, eval, compare (in worker processes too), and
every bad factory refused in one line, exit status 2, nothing created."""

from __future__ import annotations

import json
import re
import shlex
import textwrap
from pathlib import Path

import pytest

from otmdr.cli import main

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["--set", "train.progress=false", "--set", "train.threads=1"]
ONE_EPOCH = ["--set", "train.epochs=1"]

MODELS = '''
import torch
from torch import nn

def build(num_classes, in_channels, image_size, hidden=16):
    return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size * image_size, hidden), nn.ReLU(),
                         nn.Linear(hidden, num_classes))

def only_classes(num_classes):  # takes what it needs only: image size fixed at 8x8, one channel
    return nn.Sequential(nn.Flatten(), nn.Linear(64, num_classes))

def not_a_model(num_classes):
    return "a model"

def wrong_outputs(num_classes, in_channels, image_size):
    return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size * image_size, num_classes + 2))

def wrong_input(num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(100, num_classes))

def needs_depth(num_classes, depth):
    return build(num_classes, 1, 8)

NOT_CALLABLE = 3
'''

DATA = '''
import numpy as np
import torch

def _draw(n, g, centres):
    y = torch.randint(0, 3, (n,), generator=g)
    x = (centres[y] + 0.5 * torch.randn(n, 1, 8, 8, generator=g)).clamp(0, 1)
    return x, y

def splits(n_train=200, n_test=60):
    """Random 8x8 images of 3 classes, floats in [0, 1]."""
    g = torch.Generator().manual_seed(0)
    centres = torch.rand(3, 1, 8, 8, generator=g)
    return {"train": _draw(n_train, g, centres), "test": _draw(n_test, g, centres), "classes": ["a", "b", "c"]}

def numpy_splits():  # uint8 numpy arrays, (N, H, W), with a validation split of its own
    rng = np.random.default_rng(0)
    def draw(n):
        return rng.integers(0, 256, (n, 8, 8), dtype=np.uint8), rng.integers(0, 3, n)
    return {"train": draw(120), "val": draw(30), "test": draw(40)}

def a_list():
    return [1, 2]

def no_test():
    return {"train": splits()["train"]}

def float_labels():
    data = splits()
    x, y = data["train"]
    return {"train": (x, y.float()), "test": data["test"]}

def out_of_range():
    data = splits()
    return {**data, "classes": ["a", "b"]}

def unscaled():
    data = splits()
    x, y = data["train"]
    return {"train": (x * 255, y), "test": data["test"]}

def channels_last():
    data = splits()
    x, y = data["train"]
    return {"train": (x.permute(0, 2, 3, 1).expand(-1, -1, -1, 3), y), "test": data["test"]}

def unknown_key():
    return {**splits(), "labels": [0, 1]}
'''

PLUGIN = '''
from torch import nn
from otmdr.models import register_model
from otmdr.data import register_dataset
from tinydata import splits

@register_model("tiny-plugin-net")
def tiny(num_classes=10, in_channels=1, width=8):
    """A plugin's model."""
    return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * 64, width), nn.ReLU(), nn.Linear(width, num_classes))

@register_dataset("tiny-plugin-data")
def tiny_data(n_train=200, n_test=60):
    """Random 8x8 images of 3 classes."""
    return splits(n_train, n_test)
'''

FACTORIES = ["--set", "model.factory=tinymodels:build", "--set", "data.factory=tinydata:splits"]


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A user's folder holding their modules, the current folder (not on sys.path by itself: the
    ``otmdr`` command's own sys.path[0] is its script folder)."""
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "tinymodels.py").write_text(MODELS)
    (folder / "tinydata.py").write_text(DATA)
    (folder / "tinyplugin.py").write_text(PLUGIN)
    monkeypatch.chdir(folder)
    monkeypatch.delenv("OTMDR_IMPORT", raising=False)
    return folder


def _summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def test_train_then_eval_a_factory_model_on_factory_data(project, capsys):
    run = project / "run"
    assert main(["train", "--epochs", "1", "--out", str(run)] + FACTORIES + QUIET) == 0
    summary = _summary(run)
    assert summary["model"] == "tinymodels:build" and summary["dataset"] == "tinydata:splits"
    assert summary["parameters"] == 64 * 16 + 16 + 16 * 3 + 3  # built for 1 channel, 8x8, 3 classes
    assert "tinymodels:build" in (run / "config.yaml").read_text()
    capsys.readouterr()
    assert main(["eval", str(run), "--json", str(project / "eval.json")]) == 0
    evaluated = json.loads((project / "eval.json").read_text())
    assert evaluated["test"]["accuracy"] == pytest.approx(summary["test"]["accuracy"])
    assert main(["sharpness", str(run), "--samples", "32", "--iterations", "2", "--probes", "2"]) == 0


def test_a_factory_that_takes_fewer_arguments_and_numpy_data_with_its_own_validation_split(project, capsys):
    run = project / "run"
    assert main(["train", "--epochs", "1", "--out", str(run), "--set", "model.factory=tinymodels:only_classes",
                 "--set", "data.factory=tinydata:numpy_splits", "--set", "data.label_noise=0.2",
                 "--set", "data.noisy_val=true"] + QUIET) == 0
    # nothing held out of train: the factory's own validation split is used
    assert "(120 train / 30 val / 40 test" in capsys.readouterr().out
    assert _summary(run)["label_noise"]["val_noisy_fraction"] > 0


def test_model_options_reach_the_factory(project):
    run = project / "run"
    assert main(["train", "--epochs", "1", "--out", str(run), "--set", "model.options={hidden: 5}"]
                + FACTORIES + QUIET) == 0
    assert _summary(run)["parameters"] == 64 * 5 + 5 + 5 * 3 + 3


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_compare_with_factories_and_a_grid(project, jobs):
    out = project / "study"
    assert main(["compare", "--methods", "sgd,sam", "--seeds", "2", "--grid", "sam.rho=0.01,0.05",
                 "--out", str(out), "--jobs", jobs, "--quiet"] + FACTORIES + QUIET + ONE_EPOCH) == 0
    report = (out / "report.md").read_text()
    assert "rho=0.01" in report and "rho=0.05" in report
    summaries = sorted(out.rglob("summary.json"))
    assert len(summaries) == 2 + 2 * 2  # two grid points of sam, then 2 seeds of each method
    assert {_summary(p.parent)["dataset"] for p in summaries} == {"tinydata:splits"}


def test_a_plugin_module_registers_a_model_and_a_dataset(project, capsys):
    out = project / "study"
    assert main(["--import", "tinyplugin", "compare", "--methods", "sgd,otmdr", "--seeds", "1", *ONE_EPOCH,
                 "--jobs", "2", "--out", str(out), "--set", "model.name=tiny-plugin-net",
                 "--set", "data.name=tiny-plugin-data", "--set", "data.options={n_train: 150}", "--quiet"]
                + QUIET) == 0
    runs = sorted(p.parent for p in out.rglob("summary.json"))
    assert {_summary(r)["model"] for r in runs} == {"tiny-plugin-net"}
    assert "(135 train / 15 val / 60 test)" in (runs[0] / "train.log").read_text()
    capsys.readouterr()
    # re-read later: the same --import (after the command's name works too), else one line that says so
    assert main(["eval", str(runs[0]), "--import", "tinyplugin"]) == 0
    import otmdr.models.registry as registry

    builder = registry._REGISTRY.pop("tiny-plugin-net")  # a fresh process, which has not imported the plugin
    try:
        capsys.readouterr()
        assert main(["eval", str(runs[0])]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "unknown model 'tiny-plugin-net'" in err[0] and "--import MODULE" in err[0]
    finally:
        registry._REGISTRY["tiny-plugin-net"] = builder


BAD = [
    (["--set", "model.factory=tinymodels"], "must look like module:function"),
    (["--set", "model.factory=nosuchmodule:build"], "cannot import nosuchmodule"),
    (["--set", "model.factory=tinymodels:biuld"], "did you mean tinymodels:build"),
    (["--set", "model.factory=tinymodels:NOT_CALLABLE"], "not a function"),
    (["--set", "model.factory=tinymodels:not_a_model"], "returned str, expected a torch.nn.Module"),
    (["--set", "model.factory=tinymodels:wrong_outputs"], "expected float logits of shape (2, 3)"),
    (["--set", "model.factory=tinymodels:wrong_input"], "fails on a batch of shape (2, 1, 8, 8)"),
    (["--set", "model.factory=tinymodels:needs_depth"], "needs argument(s) depth"),
    (["--set", "model.factory=tinymodels:build", "--set", "model.options={depth: 3}"], "takes no argument 'depth'"),
    (["--set", "model.factory=tinymodels:build", "--set", "model.options={num_classes: 3}"], "come(s) from the data"),
    (["--set", "data.factory=tinydata:a_list"], "returned list, expected a dict with 'train' and 'test'"),
    (["--set", "data.factory=tinydata:no_test"], "returned no 'test' split"),
    (["--set", "data.factory=tinydata:float_labels"], "labels are torch.float32, expected integers"),
    (["--set", "data.factory=tinydata:out_of_range"], "outside 0..1 (2 classes)"),
    (["--set", "data.factory=tinydata:unscaled"], "scale them to [0, 1]"),
    (["--set", "data.factory=tinydata:channels_last"], "looks channels-last"),
    (["--set", "data.factory=tinydata:unknown_key"], "unknown key(s) 'labels'"),
    (["--set", "data.factory=tinydata:splits", "--set", "data.options={n: 3}"], "takes no argument 'n'"),
    (["--set", "data.options={n: 3}"], "data.options"),
    (["--import", "nosuchplugin"], "--import nosuchplugin: cannot import nosuchplugin"),
    (["--import", "broken"], "importing broken raised ZeroDivisionError"),
]


@pytest.mark.parametrize("extra, message", BAD, ids=[m for _, m in BAD])
@pytest.mark.parametrize("command", ["train", "compare"])
def test_a_bad_factory_is_one_line_and_creates_nothing(project, capsys, command, extra, message):
    (project / "broken.py").write_text("x = 1 / 0\n")
    out = project / "new-output"
    argv = [command, "--out", str(out)] + QUIET + ONE_EPOCH + extra
    if command == "compare":
        argv += ["--methods", "sgd", "--seeds", "1"]
    if not any("data." in a for a in extra):
        argv += ["--set", "data.factory=tinydata:splits"]
    before = sorted(p.name for p in project.iterdir())
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("otmdr: error: ") and message in lines[0], lines[0]
    assert "Traceback" not in captured.err + captured.out
    assert not out.exists()
    assert sorted(p.name for p in project.iterdir() if p.name != "__pycache__") == \
        [n for n in before if n != "__pycache__"]


def test_the_guide_example_runs_as_written(tmp_path, monkeypatch, capsys):
    """docs/your-model.md: its Python files written as named, its command lines run in order."""
    text = (ROOT / "docs" / "your-model.md").read_text()
    files = re.findall(r"```python\n# (\S+\.py)\n(.*?)```", text, re.S)
    assert {name for name, _ in files} >= {"mymodels.py", "mydata.py", "myplugin.py"}
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("OTMDR_IMPORT", raising=False)
    for name, code in files:
        (tmp_path / name).write_text(textwrap.dedent(code))
    commands = [line[2:] for line in text.splitlines() if line.startswith("$ otmdr ")]
    assert len(commands) >= 3
    for command in commands:
        code = main(shlex.split(command)[1:])
        assert code == 0, f"{command}\n{capsys.readouterr().err[-2000:]}"
    assert (tmp_path / "runs" / "mine" / "summary.json").is_file()
    assert (tmp_path / "runs" / "mine-compare" / "report.md").is_file()
