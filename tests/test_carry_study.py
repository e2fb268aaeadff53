"""A study still training is carried to another machine: benchmarks/collect_report.py --partial
commits its finished runs (packed as a large study's are), benchmarks/restore_runs.py puts them back
into an empty study folder, and the study's --resume then trains only what was missing and ends
exactly where an uninterrupted study ends."""

from __future__ import annotations

import argparse
import importlib
import shutil
import sys
from pathlib import Path

import pytest

from otmdr.train.grid import parse_grid
from otmdr.train.study import Study, run_study

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"
FAST = ["train.epochs=2", "model.options={hidden: [16]}", "train.threads=1"]
METHODS = ["sgd", "sam"]


@pytest.fixture
def scripts(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    for name in ("results_policy", "collect_report", "restore_runs"):
        sys.modules.pop(name, None)
    modules = [importlib.import_module(name) for name in ("results_policy", "collect_report", "restore_runs")]
    monkeypatch.setattr(modules[0], "RUNS_THRESHOLD", 0)  # pack even this small study's runs
    return modules


def _module(name: str):
    sys.modules.pop(name, None)
    return importlib.import_module(name)


def _study(out: Path) -> Study:
    return Study(str(DEMO), FAST, METHODS, [0, 1], parse_grid(["sam.rho=0.01,0.05"], METHODS), out)


class Kill(Exception):
    pass


def _kill_after(count: int):
    finished: list[str] = []

    def log(line: str) -> None:
        if "val acc" in line:
            finished.append(line)
            if len(finished) == count:
                raise Kill
    return log


def _accuracies(result: dict) -> dict:
    return {method: [s["test"]["accuracy"] for s in result["summaries"][method]] for method in METHODS}


def test_a_partly_trained_study_resumes_elsewhere_from_its_committed_runs(tmp_path, scripts, capsys):
    results_policy, collect_report, restore_runs = scripts
    whole = run_study(_study(tmp_path / "whole"), log=lambda _: None)
    part = tmp_path / "part"
    with pytest.raises(Kill):
        run_study(_study(part), log=_kill_after(2))
    results = tmp_path / "results"
    collect_report.main(str(part), "carried", partial=True, results=results)
    carried = results / "carried"
    note = (carried / collect_report.IN_PROGRESS).read_text()
    assert "still training" in note and "restore_runs.py carried" in note
    assert note.count("\n- `search/") == 2  # the two finished search runs, nothing that was training
    assert not (carried / "runs").exists() and sorted(p.name for p in carried.glob("runs-*.tar.xz"))
    assert not results_policy.violations(results)

    elsewhere = tmp_path / "elsewhere"  # a new machine: the study folder is gone
    assert restore_runs.main([str(carried), str(elsewhere)]) == 0
    lines: list[str] = []
    resumed = run_study(_study(elsewhere), log=lines.append)
    assert "  2 run(s) finished earlier, reused" in lines
    assert resumed["chosen"] == whole["chosen"] and _accuracies(resumed) == _accuracies(whole)

    # a run the study has since moved aside (an extended grid changed the choice) is carried once, where it is now
    moved = sorted(elsewhere.glob("sam-seed*"))[0]
    collect_report.main(str(elsewhere), "moved", partial=True, results=results)
    assert moved.name in restore_runs.committed_runs(results / "moved")
    (elsewhere / "superseded").mkdir()
    moved.rename(elsewhere / "superseded" / moved.name)
    collect_report.main(str(elsewhere), "moved", partial=True, results=results)
    listed = sorted(restore_runs.committed_runs(results / "moved"))
    assert f"superseded/{moved.name}" in listed and moved.name not in listed
    moved.parent.joinpath("superseded", moved.name).rename(moved)
    shutil.rmtree(elsewhere / "superseded")

    # restoring again changes nothing that is there; the finished study replaces the note
    before = {p: p.read_bytes() for p in elsewhere.rglob("*") if p.is_file()}
    restored, kept = restore_runs.restore(carried, elsewhere)
    assert (restored, len(kept)) == ([], 2)
    assert {p: p.read_bytes() for p in elsewhere.rglob("*") if p.is_file()} == before
    (elsewhere / "report.md").write_text("# Study\n")
    (elsewhere / "figures").mkdir()
    (elsewhere / "summaries.json").write_text("{}")
    (elsewhere / "robustness" / "runs" / "sgd-seed0").mkdir(parents=True)  # its robustness, evaluated
    (elsewhere / "robustness" / "robustness.md").write_text("# Robustness\n")
    (elsewhere / "robustness" / "runs" / "sgd-seed0" / "eval.json").write_text("{}")
    (elsewhere / "robustness" / "runs" / "sgd-seed0" / "eval.log").write_text("log\n")
    collect_report.main(str(elsewhere), "carried", results=results)
    assert not (carried / collect_report.IN_PROGRESS).exists() and (carried / "report.md").is_file()
    assert (carried / "robustness" / "robustness.md").is_file()  # the robustness travels with the report
    assert list(restore_runs.committed_evaluations(carried)) == ["robustness/runs/sgd-seed0/eval.json"]  # maybe packed
    assert (carried / "robustness" / "logs.tar.xz").is_file() and not list(carried.rglob("*.log"))
    assert len(restore_runs.committed_runs(carried)) == len(list(elsewhere.rglob("summary.json")))
    with pytest.raises(SystemExit) as stop:
        collect_report.main(str(part), "carried", partial=True, results=results)
    assert stop.value.code == 2 and "finished study's report" in capsys.readouterr().err


def test_restore_refuses_what_holds_no_finished_run(tmp_path, scripts, capsys):
    _, collect_report, restore_runs = scripts
    assert restore_runs.main(["no-such-study", str(tmp_path / "x")]) == 2
    assert "no study 'no-such-study'" in capsys.readouterr().err
    empty = tmp_path / "empty"
    (empty / "runs" / "sgd-seed0").mkdir(parents=True)
    (empty / "runs" / "sgd-seed0" / "metrics.csv").write_text("epoch\n1\n")  # killed: no summary
    assert restore_runs.main([str(empty), str(tmp_path / "x")]) == 2
    assert "no finished run" in capsys.readouterr().err and not (tmp_path / "x").exists()
    for args, kwargs, message in (([str(empty), "nothing"], {"partial": True}, "no finished run to carry"),
                                  ([str(tmp_path / "nowhere"), "nothing"], {"partial": True}, "is not a folder"),
                                  ([str(empty), "nothing"], {"with_robustness": True}, "goes with --partial"),
                                  ([str(empty), "nothing"], {}, "has no report.md")):
        with pytest.raises(SystemExit) as stop:
            collect_report.main(*args, **kwargs, results=tmp_path / "results")
        err = capsys.readouterr().err
        assert stop.value.code == 2 and message in err and err.count("\n") == 1
    assert not (tmp_path / "results").exists()


def test_a_final_run_travels_only_with_its_finished_robustness_evaluation(tmp_path, scripts):
    """--with-robustness: the checkpoints that robustness.py reads do not travel, so a final run is
    carried only once its evaluation (eval and sharpness JSON; for its method's first seed every
    landscape too) is finished, with it; the others train again where the study resumes, and
    robustness.py then has only their evaluations left to do."""
    _, collect_report, restore_runs = scripts
    robustness = _module("robustness")
    part = tmp_path / "part"
    whole = run_study(_study(part), log=lambda _: None)
    evaluated = part / "robustness"
    for run, files in (("sgd-seed0", ("eval", "sharpness")), ("sgd-seed1", ("eval", "sharpness")),
                       ("sam-seed0", ("eval", "sharpness")), ("sam-seed1", ("eval",))):  # sam-seed1: half done
        (evaluated / "runs" / run).mkdir(parents=True)
        for name in files:
            (evaluated / "runs" / run / f"{name}.json").write_text(f'{{"{run}": "{name}"}}')
    for method in ("sgd", "sam"):
        (evaluated / "landscape" / method).mkdir(parents=True)
    (evaluated / "landscape" / "sgd" / "landscape.json").write_text("{}")
    (evaluated / "landscape" / "sgd" / "landscape.png").write_bytes(b"png")
    results = tmp_path / "results"

    def carried() -> list[str]:
        collect_report.main(str(part), "carried", partial=True, with_robustness=True, results=results)
        return sorted(restore_runs.committed_runs(results / "carried"))

    finals = ["sam-seed0", "sam-seed1", "sgd-seed0", "sgd-seed1"]
    search = [run for run in carried() if run not in finals]
    assert len(search) == 2 and carried() == sorted(search + ["sgd-seed1"])  # first seeds wait for the sam landscape
    assert sorted(restore_runs.committed_evaluations(results / "carried")) == [
        "robustness/runs/sgd-seed1/eval.json", "robustness/runs/sgd-seed1/sharpness.json"]
    (evaluated / "landscape" / "sam" / "landscape.json").write_text("{}")
    (evaluated / "landscape" / "sam" / "landscape.png").write_bytes(b"png")
    assert carried() == sorted(search + ["sam-seed0", "sgd-seed0", "sgd-seed1"])
    assert "Robustness: 10 finished evaluation file(s)" in (results / "carried" / "IN-PROGRESS.md").read_text()

    elsewhere = tmp_path / "elsewhere"
    restore_runs.restore(results / "carried", elsewhere)
    assert (elsewhere / "robustness/landscape/sam/landscape.png").read_bytes() == b"png"
    assert not (elsewhere / "robustness/runs/sam-seed1").exists()
    lines: list[str] = []
    resumed = run_study(_study(elsewhere), log=lines.append)
    assert lines.count("  2 run(s) finished earlier, reused") == 1  # the search
    assert lines.count("  3 run(s) finished earlier, reused") == 1  # the finals but sam-seed1, which trains again
    assert _accuracies(resumed) == _accuracies(whole)
    args = argparse.Namespace(data_dir=None, test_limit=10, corruptions="contrast", severities="1", eps="8/255",
                              pgd_steps=1, eot=1, corrupted_dir=None, sharpness_samples=8, sharpness_iterations=1,
                              sharpness_probes=1, landscape=True, landscape_samples=8, landscape_points=3,
                              predictive_samples=None)
    groups = robustness._find_runs([str(elsewhere)])
    left = robustness._tasks(args, groups, elsewhere / "robustness")
    assert sorted(result.relative_to(elsewhere).as_posix() for _, _, result in left) == [
        "robustness/runs/sam-seed1/eval.json", "robustness/runs/sam-seed1/sharpness.json"]


def test_restore_notes_runs_carried_from_another_cpu_model(tmp_path, scripts, capsys):
    """Runs are bit-exact within a CPU model only: restoring runs another model trained says so."""
    _, _, restore_runs = scripts
    study = tmp_path / "carried"
    for run, cpu in (("sgd-seed0", "Other CPU 9000"), ("sgd-seed1", restore_runs.cpu_model())):
        (study / "runs" / run).mkdir(parents=True)
        (study / "runs" / run / "config.yaml").write_text("{}\n")
        (study / "runs" / run / "summary.json").write_text(f'{{"machine": {{"cpu": "{cpu}"}}}}')
    assert restore_runs.main([str(study), str(tmp_path / "here")]) == 0
    out = capsys.readouterr().out
    assert "restored 2 finished run(s)" in out
    assert "note: 1 carried run(s) trained on CPU 'Other CPU 9000'; this machine's CPU is" in out
    other = restore_runs.other_cpus(restore_runs.committed_runs(study))
    assert other == "1 carried run(s) trained on CPU 'Other CPU 9000'"
