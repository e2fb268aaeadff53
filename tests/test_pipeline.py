"""The training pipeline end to end on digits: runs, logs, checkpoints, resume, failures, CLI."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from otmdr.cli import main
from otmdr.config import load_config
from otmdr.train import RunDirError, load_run, prepare_run_dir, train
from conftest import train_stopped_at

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
FAST = ["train.epochs=3", "train.progress=false", "model.options={hidden: [32]}"]


def _cfg(*overrides):
    return load_config(DEMO, FAST + list(overrides))


@pytest.mark.parametrize("method", ["sgd", "sam", "asam", "otmdr"])
def test_a_run_writes_its_logs_checkpoints_and_summary(tmp_path, method):
    run = prepare_run_dir(tmp_path / method, resume=False)
    summary = train(_cfg(f"optim.method={method}"), run, log=lambda _: None)
    assert summary["test"]["accuracy"] > 0.5  # 3 epochs on digits already learn something
    assert (run / "config.yaml").is_file() and (run / "summary.json").is_file()
    assert (run / "checkpoints" / "last.pt").is_file() and (run / "checkpoints" / "best.pt").is_file()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert len((run / "metrics.csv").read_text().splitlines()) == 4
    assert summary["passes_per_step"] == (1.0 if method == "sgd" else 2.0)
    assert (summary["perturbation_norm"] > 0) == (method != "sgd")
    assert "temperature" in summary["test_temperature_scaled"]


def test_resume_continues_exactly(tmp_path):
    cfg = _cfg("optim.method=otmdr", "otmdr.noise_std=0.001", "data.crop_padding=1", "train.epochs=4")
    full = prepare_run_dir(tmp_path / "full", resume=False)
    train(cfg, full, log=lambda _: None)

    part = train_stopped_at(cfg, tmp_path / "part", "epoch 2/4")
    assert not (part / "summary.json").exists()
    train(None, prepare_run_dir(part, resume=True), resume=True, log=lambda _: None)
    a = torch.load(full / "checkpoints" / "last.pt", weights_only=False)["model"]
    b = torch.load(part / "checkpoints" / "last.pt", weights_only=False)["model"]
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert json.loads((part / "metrics.jsonl").read_text().splitlines()[-1])["epoch"] == 4


def test_run_directory_is_never_overwritten(tmp_path):
    run = prepare_run_dir(tmp_path / "run", resume=False)
    (run / "summary.json").write_text("{}")
    with pytest.raises(RunDirError, match="never overwritten"):
        prepare_run_dir(run, resume=False)
    with pytest.raises(RunDirError, match="nothing to resume"):
        prepare_run_dir(tmp_path / "empty", resume=True)


@pytest.mark.parametrize("method", ["sgd", "otmdr"])
def test_a_diverging_run_stops_with_a_clear_message_and_keeps_its_last_checkpoint(tmp_path, capsys, method):
    # the learning rate jumps by 1e30 when epoch 2 starts: epoch 1 trains normally, epoch 2 diverges
    blow_up = [f"optim.method={method}", "schedule.name=step", "schedule.milestones=[1]", "schedule.gamma=1e30"]
    good = prepare_run_dir(tmp_path / "good", resume=False)  # the same run stopped after epoch 1
    train(_cfg(*blow_up, "train.epochs=1"), good, log=lambda _: None)
    run = tmp_path / "diverge"
    args = ["train", "--config", str(DEMO), "--out", str(run)] + sum((["--set", s] for s in FAST + blow_up), [])
    assert main(args) == 2
    err = capsys.readouterr().err
    # SGD sees the loss of epoch 2 turn non-finite; OT-MDR refuses the first non-finite ascent gradient
    cause = r"the training loss became (nan|inf) \(epoch 2, step \d+\)" if method == "sgd" else \
        r"non-finite gradient in an ascent pass of step \d+: the weights were left unchanged.*"
    assert re.search(rf"training stopped: {cause}\. checkpoints/last\.pt holds epoch 1 \(in {re.escape(str(run))}\)",
                     err), err
    assert err.count("\n") == 1 and "Traceback" not in err
    # the diverging run's own folder keeps epoch 1: its checkpoint is the good run's, bit for bit
    assert not (run / "summary.json").exists()
    kept = torch.load(run / "checkpoints" / "last.pt", weights_only=False)
    reference = torch.load(good / "checkpoints" / "last.pt", weights_only=False)
    assert kept["epoch"] == 1 and kept["model"].keys() == reference["model"].keys()
    for key in reference["model"]:
        assert torch.equal(kept["model"][key], reference["model"][key]), key
    timing = {"seconds", "images_per_second"}

    def rows(history):
        return [{k: v for k, v in row.items() if k not in timing} for row in history]

    assert rows(kept["history"]) == rows(reference["history"]) and len(kept["history"]) == 1
    written = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows(written) == rows(reference["history"])
    assert main(["train", "--resume", str(run)]) == 2  # resuming diverges again at the same point...
    assert "holds epoch 1" in capsys.readouterr().err
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=False)["epoch"] == 1  # ...and keeps epoch 1


def test_a_run_diverging_before_its_first_checkpoint_says_so_and_leaves_nothing(tmp_path, capsys):
    run = tmp_path / "diverge"
    args = ["train", "--config", str(DEMO), "--out", str(run)] + sum(
        (["--set", s] for s in FAST + ["optim.method=otmdr", "optim.lr=1e30", "schedule.name=constant"]), [])
    assert main(args) == 2
    err = capsys.readouterr().err
    assert re.search(r"training stopped: non-finite gradient in an ascent pass of step 1: .*\. no checkpoint was "
                     r"written", err), err  # at lr 1e30 OT-MDR's first ascent pass already overflows
    assert not run.exists()  # a run that never checkpointed leaves no folder behind


def test_cli_train_eval_and_errors(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--config", str(DEMO), "--out", str(out)] + sum((["--set", s] for s in FAST), [])
    assert main(args) == 0
    assert main(args) == 2  # the same run directory again
    assert "never overwritten" in capsys.readouterr().err
    assert main(["eval", str(out), "--json", str(tmp_path / "eval.json"), "--attack", "pgd", "--eps", "0,8/255",
                 "--steps", "3", "--plot", str(tmp_path / "pgd.png")]) == 0
    evaluated = json.loads((tmp_path / "eval.json").read_text())
    assert evaluated["test"]["accuracy"] > 0.5
    robust = evaluated["attack"]["robust_accuracy"]
    assert robust["0.0"] == pytest.approx(evaluated["test"]["accuracy"])  # eps 0 is the clean accuracy
    assert robust[str(8 / 255)] <= robust["0.0"] and (tmp_path / "pgd.png").stat().st_size > 1000
    assert main(["eval", str(out), "--attack", "fgsm", "--eps", "big"]) == 2
    assert main(["landscape", str(out), str(out), "--out", str(tmp_path / "land"), "--samples", "64",
                 "--points", "3"]) == 0
    land = json.loads((tmp_path / "land" / "landscape.json").read_text())
    assert len(land["surface_2d"]) == 3 and land["slice_1d"][1] == pytest.approx(land["surface_2d"][1][1])
    assert land["interpolation"]["loss"][0] == pytest.approx(land["interpolation"]["loss"][-1])  # A to A
    assert (tmp_path / "land" / "landscape.png").stat().st_size > 5000
    cfg, model, _ = load_run(out)
    assert cfg.model.options == {"hidden": [32]}
    assert main(["sharpness", str(out), "--samples", "64", "--iterations", "5", "--probes", "2",
                 "--json", str(tmp_path / "sharp.json")]) == 0
    sharp = json.loads((tmp_path / "sharp.json").read_text())
    assert sharp["top_hessian_eigenvalue"] > 0 and sharp["worst_case_sharpness"] > 0 and sharp["samples"] == 64

    assert main(["train", "--config", str(DEMO), "--set", "optim.lrr=1", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "unknown config key optim.lrr; did you mean optim.lr" in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()

    broken = tmp_path / "broken.pt"
    broken.write_bytes((out / "checkpoints" / "last.pt").read_bytes()[:1000])
    assert main(["eval", str(broken)]) == 2
    assert "corrupted" in capsys.readouterr().err
    assert main(["train", "--config", str(DEMO), "--set", "data.name=fashion-mnist", "--out", str(tmp_path / "y")]) == 2
    assert "data" in capsys.readouterr().err.lower()
    assert not (tmp_path / "y").exists()  # a run that never started leaves no folder behind
    assert main(["train", "--config", str(DEMO), "--set", "model.name=resnet7", "--out", str(tmp_path / "z")]) == 2
    assert "unknown model 'resnet7'" in capsys.readouterr().err


def test_cli_compare_writes_a_table_and_a_report_with_plots(tmp_path, capsys):
    out = tmp_path / "cmp"
    args = ["compare", "--config", str(DEMO), "--methods", "sgd,otmdr", "--seeds", "2", "--out", str(out),
            "--set", "train.epochs=2", "--set", "model.options={hidden: [32]}"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "test acc (%)" in printed and "otmdr" in printed and "±" in printed
    report = (out / "report.md").read_text()
    assert "| sgd | 2 |" in report and "| otmdr | 2 |" in report
    for figure in ("learning_curves", "test_accuracy", "reliability"):
        assert (out / "figures" / f"{figure}.png").stat().st_size > 5000
    assert main(args) == 2  # an existing comparison is not overwritten...
    assert main(args + ["--resume"]) == 0  # ...but can be finished/reused
    assert "finished earlier, reused" in capsys.readouterr().out


def test_cli_compare_extends_a_grid_past_its_edge(tmp_path, capsys):
    """With two values the choice is always at an edge: --extend-edges 1 searches one more value,
    one step past it, and the report says which; a bad count is one line and exit 2."""
    out = tmp_path / "cmp"
    args = ["compare", "--config", str(DEMO), "--methods", "sgd", "--seeds", "1", "--out", str(out),
            "--grid", "optim.lr=0.02,0.05", "--set", "train.epochs=1", "--set", "model.options={hidden: [16]}"]
    assert main(args + ["--extend-edges", "-1"]) == 2 and not out.exists()
    assert "--extend-edges" in capsys.readouterr().err
    assert main(args + ["--extend-edges", "1"]) == 0
    searched = sorted(float(p["setting"].partition("=")[2]) for p in json.loads((out / "search.json").read_text()))
    assert len(searched) == 3 and {0.02, 0.05} < set(searched)
    assert (set(searched) - {0.02, 0.05}) in ({0.008}, {0.125})  # 0.02 / 2.5 or 0.05 x 2.5
    assert "Searched past the grid's edges (`--extend-edges`): sgd lr=" in (out / "report.md").read_text()


def test_a_failed_run_keeps_the_users_empty_folder(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    code = main(["train", "--config", str(DEMO), "--set", "data.name=fashion-mnist", "--set",
                 f"data.dir={tmp_path / 'missing'}", "--out", str(mine)])
    assert code == 2 and "Traceback" not in capsys.readouterr().err
    assert mine.is_dir() and not any(mine.iterdir())  # the user's folder stays, our files are gone
    fresh = tmp_path / "fresh"
    assert main(["train", "--config", str(DEMO), "--set", "data.name=fashion-mnist", "--set",
                 f"data.dir={tmp_path / 'missing'}", "--out", str(fresh)]) == 2
    assert not fresh.exists()  # a folder the run created is removed


def test_resume_of_a_run_stopped_before_its_first_checkpoint_starts_it_again(tmp_path, capsys):
    reference = tmp_path / "reference"
    args = ["train", "--config", str(DEMO)] + sum((["--set", o] for o in FAST), [])
    assert main(args + ["--out", str(reference)]) == 0
    stopped = tmp_path / "stopped"  # what a kill during the first epoch leaves: config.yaml only
    (stopped / "checkpoints").mkdir(parents=True)
    (stopped / "config.yaml").write_text((reference / "config.yaml").read_text())
    assert main(["train", "--resume", str(stopped)]) == 0
    a = torch.load(reference / "checkpoints" / "last.pt", weights_only=False)["model"]
    b = torch.load(stopped / "checkpoints" / "last.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert "starting it again" in capsys.readouterr().out


def test_ctrl_c_before_the_first_checkpoint_names_no_placeholder(tmp_path, capsys, monkeypatch):
    import otmdr.train as train_package

    def interrupted(*_, **__):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_package, "train", interrupted)
    out = tmp_path / "run"
    assert main(["train", "--config", str(DEMO), "--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert "nothing was kept" in err and "RUN_DIR" not in err and not out.exists()


def test_a_collapse_is_reported_while_training_and_in_the_summary(tmp_path):
    lines: list[str] = []
    cfg = _cfg("optim.method=otmdr", "otmdr.rho=[1.0,2.0]", "otmdr.normalize=merged")
    summary = train(cfg, prepare_run_dir(tmp_path / "run", resume=False), log=lines.append)
    assert any("radius" in line and "(nominal 3.000)" in line for line in lines if line.startswith("epoch"))
    chance = [line for line in lines if line.startswith("warning: training accuracy")]
    # once, at the first epoch it shows; then once more at the end, since the run never left chance
    assert len(chance) == 2 and "at chance after 2 epochs" in chance[0], chance
    assert "still at chance at the last epoch" in chance[1] and "did not learn" in chance[1]
    # the summary's copy also says how long it sat there: every epoch from the second (the first is exempt)
    epochs = len(summary["history"])
    assert summary["warnings"][-2:] == [chance[0].removeprefix("warning: ").replace(
        "after 2 epochs:", f"after 2 epochs ({epochs - 1} of its {epochs} epochs at chance, the last epoch {epochs}):"),
        chance[1].removeprefix("warning: ")]
    assert all("schedule.warmup_epochs" in line and "smaller rho" in line for line in chance)


def test_a_run_that_leaves_chance_is_not_told_it_ended_there_and_sgd_is_not_told_of_a_radius():
    from otmdr.train.loop import _chance_remedy, _health_warnings

    sgd, sam = _cfg("optim.method=sgd"), _cfg("optim.method=sam")
    assert "rho" not in _chance_remedy(sgd) and "radius" not in _chance_remedy(sgd)
    assert "smaller rho" in _chance_remedy(sam) and "schedule.warmup_epochs" in _chance_remedy(sgd)
    stuck = {"epoch": 3, "train_accuracy": 0.12, "perturbation_norm": 0.0}
    learnt = {**stuck, "train_accuracy": 0.5}
    assert "chance" in _health_warnings(sgd, stuck, 0.0, 10) and "chance" not in _health_warnings(sgd, learnt, 0.0, 10)


def test_the_summary_says_for_how_many_epochs_a_run_sat_at_chance():
    """A run that sat at chance for two epochs and recovered reads differently from one that lost
    half its budget there (SGD at lr 0.4 on noisy Fashion-MNIST: 20-41 of 80 epochs)."""
    from otmdr.train.loop import _chance_warning

    sgd = _cfg("optim.method=sgd")
    history = [{"epoch": e, "train_accuracy": a} for e, a in enumerate([0.1, 0.11, 0.6, 0.12, 0.14, 0.7], start=1)]
    first = _chance_warning(sgd, history[1], 10)
    assert first.startswith("training accuracy 11.0% is at chance after 2 epochs: ")
    whole = _chance_warning(sgd, history[1], 10, history)  # epoch 1 is exempt; 2, 4 and 5 sat at chance
    assert whole == first.replace("after 2 epochs:", "after 2 epochs (3 of its 6 epochs at chance, the last epoch 5):")


def test_radius_warning_thresholds():
    from otmdr.train.loop import _health_warnings, nominal_radius

    row = {"epoch": 1, "train_accuracy": 0.9, "perturbation_norm": 0.3}
    step = _cfg("optim.method=otmdr", "otmdr.preset=release")  # rho (0.05, 0.1), release normalisation: up to 0.25
    assert nominal_radius(step) == pytest.approx(0.15)
    assert _health_warnings(step, row, 0.15, 10) == {}  # 0.3 < 1.5 * 0.25
    assert "radius" in _health_warnings(step, {**row, "perturbation_norm": 0.4}, 0.15, 10)
    merged = _cfg("optim.method=otmdr", "otmdr.normalize=merged")
    assert "radius" in _health_warnings(merged, row, 0.15, 10)  # 0.3 > 1.5 * 0.15
    noisy = _cfg("optim.method=otmdr", "otmdr.noise_std=0.01")
    assert _health_warnings(noisy, {**row, "perturbation_norm": 5.0}, 0.15, 10) == {}  # noise dominates by design
    # an ensemble's per-member regime: 3 members, each moved by the full radius on its own weights
    assert nominal_radius(merged, 3) == pytest.approx(0.15 * 3 ** 0.5)
    assert _health_warnings(merged, {**row, "perturbation_norm": 0.26}, nominal_radius(merged, 3), 10) == {}
    assert "radius" in _health_warnings(merged, {**row, "perturbation_norm": 0.4}, nominal_radius(merged, 3), 10)
    assert _health_warnings(step, {**row, "perturbation_norm": 0.6}, nominal_radius(step, 3), 10) == {}
    still = _cfg("optim.method=otmdr", "otmdr.rho=[0,0]", "otmdr.normalize=step")  # a grid's "no perturbation"
    assert _health_warnings(still, {**row, "perturbation_norm": 0.0}, nominal_radius(still), 10) == {}
    sgd = _cfg("optim.method=sgd")
    assert nominal_radius(sgd) == 0 and _health_warnings(sgd, {**row, "train_accuracy": 0.1, "epoch": 1}, 0, 10) == {}
    assert "chance" in _health_warnings(sgd, {**row, "train_accuracy": 0.1, "epoch": 2}, 0, 10)
    warm = _cfg("optim.method=sgd", "schedule.warmup_epochs=2")  # the learning rate peaks at the end of epoch 2
    assert _health_warnings(warm, {**row, "train_accuracy": 0.15, "epoch": 2}, 0, 10) == {}
    assert "chance" in _health_warnings(warm, {**row, "train_accuracy": 0.15, "epoch": 3}, 0, 10)
    fraction = _cfg("optim.method=sgd", "schedule.warmup_epochs=0.5")
    assert "chance" in _health_warnings(fraction, {**row, "train_accuracy": 0.1, "epoch": 2}, 0, 10)


@pytest.mark.parametrize("where", ["after last.pt", "after best.pt"])
def test_a_kill_between_writes_resumes_to_the_artefacts_of_an_uninterrupted_run(tmp_path, monkeypatch, where):
    import otmdr.train.checkpoint as checkpoint

    cfg = _cfg("optim.method=sam", "train.epochs=3")
    full = prepare_run_dir(tmp_path / "full", resume=False)
    train(cfg, full, log=lambda _: None)

    class Killed(BaseException):
        pass

    # The writes happen in order on the checkpoint writer's thread; a "kill" there stops every
    # later write (as a real kill would) and reaches the training thread at its next write.
    real_link, real_text = checkpoint.atomic_link, checkpoint.atomic_write_text

    def link(source, path):
        if where == "after best.pt" and torch.load(source, weights_only=False)["epoch"] == 2:
            raise Killed  # best.pt of epoch 2 written, last.pt still epoch 1
        real_link(source, path)

    def text(path, content, *, durable=True):
        if where == "after last.pt" and Path(path).name == "metrics.jsonl" and len(content.splitlines()) == 2:
            raise Killed  # last.pt of epoch 2 written, metrics still end at epoch 1
        real_text(path, content, durable=durable)

    monkeypatch.setattr(checkpoint, "atomic_link", link)
    monkeypatch.setattr(checkpoint, "atomic_write_text", text)
    part = prepare_run_dir(tmp_path / "part", resume=False)
    with pytest.raises(Killed):
        train(cfg, part, log=lambda _: None)
    monkeypatch.setattr(checkpoint, "atomic_link", real_link)
    monkeypatch.setattr(checkpoint, "atomic_write_text", real_text)
    assert (torch.load(part / "checkpoints" / "last.pt", weights_only=False)["epoch"]
            == (1 if where == "after best.pt" else 2))
    (part / "checkpoints" / ".last.pt.x1y2.tmp").write_bytes(b"\0" * 1000)  # a killed write's leftover
    train(None, prepare_run_dir(part, resume=True), resume=True, log=lambda _: None)
    for name in ("last.pt", "best.pt"):
        a = torch.load(full / "checkpoints" / name, weights_only=False)
        b = torch.load(part / "checkpoints" / name, weights_only=False)
        assert a["epoch"] == b["epoch"] and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    timing = {"seconds", "images_per_second"}
    rows = [{k: v for k, v in json.loads(r).items() if k not in timing}
            for r in (part / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{k: v for k, v in json.loads(r).items() if k not in timing}
                    for r in (full / "metrics.jsonl").read_text().splitlines()]
    assert not list((part / "checkpoints").glob("*.tmp")) and not list(part.glob(".*.tmp"))


def test_checkpoint_writer_keeps_order_and_reports_a_failed_write(tmp_path):
    from otmdr.train.checkpoint import CheckpointWriter

    state = {"model": {"w": torch.ones(3)}, "config": {}}
    with CheckpointWriter() as writer:
        writer.save(state, tmp_path / "a.pt")
        state["model"]["w"] += 1  # training goes on: the queued write is the snapshot taken at save()
        writer.link(tmp_path / "a.pt", tmp_path / "b.pt")
        writer.write_text(tmp_path / "c.txt", "after", durable=False)
    assert torch.load(tmp_path / "b.pt")["model"]["w"].tolist() == [1.0, 1.0, 1.0]
    assert (tmp_path / "c.txt").read_text() == "after"
    with pytest.raises(FileNotFoundError), CheckpointWriter() as writer:
        writer.link(tmp_path / "missing.pt", tmp_path / "d.pt")  # fails on the writer's thread
        writer.write_text(tmp_path / "e.txt", "never")  # queued behind the failure: not written
        writer.flush()
    assert not (tmp_path / "d.pt").exists() and not (tmp_path / "e.txt").exists()
