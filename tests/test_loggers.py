"""``train.loggers``: the metrics stream to TensorBoard (and wandb, offline) inside the run folder,
equal to metrics.jsonl, without duplicates after a resume; a missing package is one line naming
the extra; the public helper for users' own loops; the Lightning guide's module runs as written."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from otmdr.cli import main
from otmdr.config import ConfigError, load_config
from otmdr.train import prepare_run_dir, train
from otmdr.train import loop
from otmdr.train.loggers import open_loggers

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"
FAST = ["train.epochs=3", "train.progress=false", "model.options={hidden: [32]}", "optim.method=otmdr"]


def _cfg(*overrides):
    return load_config(DEMO, FAST + list(overrides))


def _scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of ``folder``'s event files, as TensorBoard shows them (purged events dropped)."""
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    events = accumulator.EventAccumulator(str(folder), size_guidance={accumulator.SCALARS: 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _assert_epochs_equal_metrics(scalars, rows, steps_per_epoch):
    for key in rows[0]:
        assert [s for s, _ in scalars[key]] == [steps_per_epoch * r["epoch"] for r in rows], key  # once each
        assert [v for _, v in scalars[key]] == pytest.approx([r[key] for r in rows], rel=1e-6), key


def _steps_per_epoch(run: Path, rows) -> int:
    summary = json.loads((run / "summary.json").read_text())
    return summary["compute"]["steps"] // len(rows)


@pytest.fixture(autouse=True)
def _tensorboard():
    from conftest import require_oracle

    require_oracle("tensorboard", "train.loggers=[tensorboard], read back with TensorBoard's EventAccumulator")


def test_tensorboard_scalars_equal_the_metrics_files(tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "STEP_EVERY", 7)  # a few step losses in a tiny run (the default: every 50)
    run = prepare_run_dir(tmp_path / "run", resume=False)
    summary = train(_cfg("train.loggers=[tensorboard, csv]"), run, log=lambda _: None)
    rows = _rows(run)
    steps = _steps_per_epoch(run, rows)
    scalars = _scalars(run / "tensorboard")
    _assert_epochs_equal_metrics(scalars, rows, steps)
    assert [s for s, _ in scalars["train_loss_step"]] == list(range(7, 3 * steps + 1, 7))
    assert all(0 < v < 5 for _, v in scalars["train_loss_step"])
    assert scalars["test_accuracy"] == [(3 * steps, pytest.approx(summary["test"]["accuracy"], rel=1e-6))]
    # csv is the metrics.csv every run writes: no second file
    assert sorted(p.name for p in run.iterdir()) == [".lock", "checkpoints", "config.yaml", "metrics.csv",
                                                     "metrics.jsonl", "summary.json", "tensorboard"]


def test_no_loggers_by_default(tmp_path):
    run = prepare_run_dir(tmp_path / "run", resume=False)
    train(_cfg("train.epochs=1"), run, log=lambda _: None)
    assert not (run / "tensorboard").exists() and not (run / "wandb").exists()


class _Stop(Exception):
    pass


def _stop_at(prefix):
    def log(line: str) -> None:
        if line.startswith(prefix):
            raise _Stop

    return log


def test_a_resumed_run_logs_each_epoch_once(tmp_path):
    cfg = _cfg("train.loggers=[tensorboard]", "train.epochs=4")
    run = prepare_run_dir(tmp_path / "run", resume=False)
    with pytest.raises(_Stop):  # stopped after epoch 2's checkpoint, before its row was logged
        train(cfg, run, log=_stop_at("epoch 2/4"))
    train(None, prepare_run_dir(run, resume=True), resume=True, log=lambda _: None)
    rows = _rows(run)
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    _assert_epochs_equal_metrics(_scalars(run / "tensorboard"), rows, _steps_per_epoch(run, rows))


def test_what_a_killed_process_logged_past_its_checkpoint_is_replaced(tmp_path):
    """A process killed after logging epochs its checkpoint does not hold: the resumed run's
    values replace them (TensorBoard's purge_step), one per step."""
    from torch.utils.tensorboard import SummaryWriter

    cfg = _cfg("train.loggers=[tensorboard]", "train.epochs=3")
    run = prepare_run_dir(tmp_path / "run", resume=False)
    with pytest.raises(_Stop):
        train(cfg, run, log=_stop_at("epoch 1/3"))
    import torch

    done = torch.load(run / "checkpoints" / "last.pt", weights_only=False)["scheduler"]["last_epoch"]  # steps
    stale = SummaryWriter(str(run / "tensorboard"))  # what the lost process wrote after the checkpoint
    for step in range(done, 200, 3):
        stale.add_scalar("val_accuracy", -1.0, step)
        stale.add_scalar("train_loss_step", -1.0, step)
    stale.close()
    train(None, prepare_run_dir(run, resume=True), resume=True, log=lambda _: None)
    rows = _rows(run)
    scalars = _scalars(run / "tensorboard")
    _assert_epochs_equal_metrics(scalars, rows, _steps_per_epoch(run, rows))
    assert all(v > 0 for _, v in scalars["train_loss_step"])


def test_the_cli_streams_to_tensorboard(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = main(["train", "--config", str(DEMO), "--out", "runs/tb", "--epochs", "2",
                 "--set", "train.progress=false", "--set", "model.options={hidden: [32]}",
                 "--set", "train.loggers=[tensorboard]"])
    out = capsys.readouterr().out
    assert code == 0, out
    run = tmp_path / "runs" / "tb"
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    rows = _rows(run)
    _assert_epochs_equal_metrics(_scalars(run / "tensorboard"), rows, _steps_per_epoch(run, rows))
    # accuracy in percent on the epoch lines, as in the tables
    line = next(line for line in out.splitlines() if line.startswith("epoch 2/2:"))
    assert re.search(r"train loss \d\.\d{4} acc \d{1,3}\.\d\d% val acc \d{1,3}\.\d\d% nll ", line), line
    assert f"val acc {100 * rows[-1]['val_accuracy']:.2f}%" in line


def test_an_unknown_logger_is_a_config_error():
    with pytest.raises(ConfigError, match=r"train\.loggers: 'tb' is not one of csv, tensorboard, wandb"):
        _cfg("train.loggers=[tb]")
    assert _cfg("train.loggers=tensorboard").train.loggers == ["tensorboard"]  # one name without brackets


def _without(package: str, code: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter in which ``package`` cannot be imported."""
    block = f"import sys\nsys.modules[{package!r}] = None\n"
    return subprocess.run([sys.executable, "-c", block + code], capture_output=True, text=True, timeout=300,
                          check=False, cwd=cwd)


@pytest.mark.parametrize("command", ["train", "compare"])
def test_a_missing_package_is_one_line_naming_the_extra_before_training(tmp_path, command):
    args = [command, "--config", str(DEMO), "--out", "out", "--set", "train.loggers=[tensorboard]",
            "--set", "train.epochs=1"]
    if command == "compare":
        args += ["--methods", "sgd,otmdr", "--seeds", "1"]
    result = _without("tensorboard", f"from otmdr.cli import main\nsys.exit(main({args!r}))", tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    assert "train.loggers: tensorboard needs the tensorboard package" in result.stderr
    assert "pip install 'otmdr[tensorboard]'" in result.stderr
    assert list(tmp_path.iterdir()) == []  # nothing made


def test_the_python_api_checks_the_package_before_writing(tmp_path):
    code = ("from otmdr.config import config_from_dict\nfrom otmdr.train import prepare_run_dir, train\n"
            "cfg = config_from_dict({'train': {'loggers': ['tensorboard'], 'epochs': 1}})\n"
            "from otmdr.config import ConfigError\n"
            "try:\n    train(cfg, prepare_run_dir('run', resume=False), log=print)\n"
            "except ConfigError as error:\n    print('ConfigError:', error)\n")
    result = _without("tensorboard", code, tmp_path)
    assert "ConfigError: config key train.loggers: tensorboard needs" in result.stdout, result.stdout + result.stderr
    # no config.yaml: nothing was trained
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".lock", "checkpoints"]


def test_open_loggers_for_your_own_loop(tmp_path):
    with open_loggers(["tensorboard", "csv"], tmp_path) as loggers:
        for step in range(1, 6):
            loggers.log(step, {"loss": 1.0 / step, "note": "skipped", "flag": True})
    # a resumed loop from step 4: what the first one logged at 4 and later is dropped, not doubled
    with open_loggers(["tensorboard", "csv"], tmp_path, start_step=4) as loggers:
        for step in range(4, 8):
            loggers.log(step, {"loss": 10.0 * step})
    expected = [(1, 1.0), (2, 0.5), (3, 1 / 3), (4, 40.0), (5, 50.0), (6, 60.0), (7, 70.0)]
    assert _scalars(tmp_path / "tensorboard") == {"loss": [(s, pytest.approx(v)) for s, v in expected]}
    with open(tmp_path / "scalars.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert [(int(r["step"]), r["name"], float(r["value"])) for r in rows] == [(s, "loss", v) for s, v in expected]
    with pytest.raises(ConfigError, match="unknown logger 'mlflow'"):
        open_loggers(["mlflow"], tmp_path)


def test_wandb_writes_an_offline_run_in_the_run_folder(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="the wandb extra is not installed (pip install 'otmdr[wandb]')")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = prepare_run_dir(tmp_path / "run", resume=False)
    train(_cfg("train.loggers=[wandb]", "train.epochs=1"), run, log=lambda _: None)
    run_id = (run / "wandb" / "otmdr-run-id").read_text().strip()
    assert [p.name.rpartition("-")[2] for p in (run / "wandb").glob("offline-run-*")] == [run_id]  # wandb sync


def _lightning_block() -> str:
    text = (ROOT / "docs" / "optimizer.md").read_text(encoding="utf-8")
    section = text[text.index("## Lightning"):]
    section = section[:section.index("\n## ", 1)]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_lightning_guide_module_runs_as_written(tmp_path, monkeypatch):
    from conftest import require_oracle

    require_oracle("lightning", "the Lightning guide's LightningModule")
    monkeypatch.chdir(tmp_path)
    with contextlib.redirect_stdout(io.StringIO()) as out:
        exec(compile(_lightning_block(), "docs/optimizer.md", "exec"), {"__name__": "__main__"})
    accuracies = re.findall(r"(\w+): val accuracy ([0-9.]+)%", out.getvalue())
    assert [name for name, _ in accuracies] == ["OTMDRModule", "ManualOTMDRModule"], out.getvalue()
    assert all(float(value) > 70 for _, value in accuracies), out.getvalue()  # the toy problem is learnt
    assert (tmp_path / "lightning_logs" / "OTMDRModule").is_dir()
