"""The Python study API: the user's own training function through search, seeds, statistics, report."""

from __future__ import annotations

import json

import pytest

from otmdr.study import StudyError, compare

CALLS: list[tuple[str, float | None, int]] = []


def fake_train(config: dict, seed: int) -> dict:
    """Validation prefers rho 0.05; SAM is 1 point better than SGD on test, with a little seed noise;
    a SAM step costs two gradient evaluations."""
    CALLS.append((config["method"], config.get("rho"), seed))
    rho = config.get("rho")
    val = 0.80 + (0.05 if rho == 0.05 else 0.0)
    test = 0.80 + (0.01 if config["method"] == "sam" else 0.0) + 0.001 * (seed % 3)
    return {"val_accuracy": val, "test_accuracy": test, "test_nll": 0.5, "radius": rho or 0.0,
            "gradient_evaluations": 200.0 if config["method"] == "sam" else 100.0}


def test_a_users_training_function_gets_the_search_the_seeds_and_the_report(tmp_path):
    CALLS.clear()
    lines: list[str] = []
    result = compare(fake_train, methods={"sgd": {"method": "sgd"}, "sam": {"method": "sam", "rho": 0.1}},
                     grid={"sam": {"rho": [0.02, 0.05, 0.1]}}, seeds=4, out=tmp_path / "s", log=lines.append)
    assert result.chosen["sam"] == {"method": "sam", "rho": 0.05}  # validation's choice
    searched = [(m, r, s) for m, r, s in CALLS if s >= 1000]
    assert sorted(searched) == [("sam", 0.02, 1000), ("sam", 0.05, 1000), ("sam", 0.1, 1000)]  # SGD: no grid
    assert sorted(s for m, _, s in CALLS if m == "sgd") == [0, 1, 2, 3]
    report = (tmp_path / "s" / "report.md").read_text()
    assert "| sam | rho=0.05 |" in report and "Evaluation seeds: 0, 1, 2, 3" in report
    assert "sam vs sgd: better" in report and "(+1.00 points" in report
    assert "at 2.00x sgd's gradient evaluations" in report
    assert "NLL" in report and (tmp_path / "s" / "figures" / "test_accuracy.png").stat().st_size > 5000
    assert "| sam | 4 |" in report  # the paired table
    assert "within noise" not in report  # one search seed, scores apart: no close call
    assert "(figures/accuracy_vs_compute.png)" in report  # SAM spent twice SGD's gradient evaluations
    assert (tmp_path / "s" / "figures" / "accuracy_vs_compute.png").stat().st_size > 5000
    CALLS.clear()
    again = compare(fake_train, methods={"sgd": {"method": "sgd"}, "sam": {"method": "sam", "rho": 0.1}},
                    grid={"sam": {"rho": [0.02, 0.05, 0.1]}}, seeds=4, out=tmp_path / "s", log=lines.append)
    assert CALLS == [] and again.chosen == result.chosen  # resumed: every result reused


def _same_cost(config: dict, seed: int) -> dict:
    return {**fake_train(config, seed), "gradient_evaluations": 100.0}


def test_the_compute_figure_only_when_the_methods_spent_differently(tmp_path):
    """A cheaper variant is judged against what it spent: the figure of accuracy against compute
    is drawn when the gradient evaluations differ, and left out (a stale one removed) when not."""
    out = tmp_path / "s"
    compare(fake_train, methods=["sgd", "sam"], seeds=2, out=out, log=lambda _: None)
    assert (out / "figures" / "accuracy_vs_compute.png").exists()
    compare(_same_cost, methods=["sgd", "sam"], seeds=2, out=tmp_path / "t", log=lambda _: None)
    (tmp_path / "t" / "figures" / "accuracy_vs_compute.png").write_bytes(b"stale")
    compare(_same_cost, methods=["sgd", "sam"], seeds=2, out=tmp_path / "t", log=lambda _: None)
    assert not (tmp_path / "t" / "figures" / "accuracy_vs_compute.png").exists()
    assert "accuracy_vs_compute" not in (tmp_path / "t" / "report.md").read_text()


def _noisy_validation(config: dict, seed: int) -> dict:
    """rho 0.02 leads rho 0.05 on validation by 0.5 points on average over search seeds 1000-1002,
    with a paired standard error of 1.15 points: a choice within noise."""
    rho = config.get("rho") or 0.0
    val = 0.80 + 0.01 * ((seed * round(rho * 100)) % 5) + (0.015 if rho == 0.05 else 0.0)
    return {**fake_train(config, seed), "val_accuracy": val}


def test_a_choice_within_noise_is_flagged_as_in_otmdr_compare(tmp_path):
    result = compare(_noisy_validation, methods=["sgd", "sam"], grid={"sam": {"rho": [0.02, 0.05]}}, seeds=2,
                     search_seeds=3, out=tmp_path / "s", log=lambda _: None)
    assert result.chosen["sam"]["rho"] == 0.02
    report = (tmp_path / "s" / "report.md").read_text()
    assert "sam: the chosen point (rho=0.02) beats the next (rho=0.05) by 0.50 on val_accuracy" in report
    assert "less than one standard error (1.15)" in report and "(search_seeds=6)" in report  # more than the 3 it used


def test_parallel_jobs_give_the_same_study(tmp_path):
    kwargs = dict(methods=["sgd", "sam"], grid={"sam": {"rho": [0.02, 0.05]}}, seeds=2, log=lambda _: None)
    serial = compare(fake_train, out=tmp_path / "a", **kwargs)
    parallel = compare(fake_train, out=tmp_path / "b", jobs=2, **kwargs)
    assert parallel.summaries == serial.summaries and parallel.chosen == serial.chosen


def test_a_changed_config_in_an_existing_folder_is_refused(tmp_path):
    compare(fake_train, methods=["sgd"], seeds=1, out=tmp_path, log=lambda _: None)
    with pytest.raises(StudyError, match="holds a run of another config"):
        compare(fake_train, methods={"sgd": {"method": "sgd", "lr": 0.1}}, seeds=1, out=tmp_path, log=lambda _: None)
    assert json.loads((tmp_path / "sgd-seed0" / "result.json").read_text())["config"] == {"method": "sgd"}


@pytest.mark.parametrize("kwargs, message", [
    (dict(methods=[]), "at least one method"),
    (dict(methods=["sgd"], grid={"sam": {"rho": [0.1, 0.2]}}), "not in methods"),
    (dict(methods=["sam"], grid={"sam": {"rho": [0.1, 0.1]}}), "a value is repeated"),
    (dict(methods=["sgd"], references=["sam"]), "each must be one of methods"),
    (dict(methods=["sgd"], margin="accuracy=-1"), "margin"),
    (dict(methods=["sgd"], jobs=0), "jobs must be at least 1"),
])
def test_bad_studies_are_one_clear_error(tmp_path, kwargs, message):
    with pytest.raises(StudyError, match=message):
        compare(fake_train, out=tmp_path / "x", log=lambda _: None, **kwargs)
    assert not (tmp_path / "x").exists()


def test_what_train_returns_is_checked(tmp_path):
    with pytest.raises(StudyError, match="returned no test_accuracy"):
        compare(lambda c, s: {"val_accuracy": 0.5}, methods=["sgd"], seeds=1, out=tmp_path / "a", log=lambda _: None)
    with pytest.raises(StudyError, match="expected a dict of metrics"):
        compare(lambda c, s: 0.5, methods=["sgd"], seeds=1, out=tmp_path / "b", log=lambda _: None)
    with pytest.raises(StudyError, match="needs a train function defined at a module's top level"):
        compare(lambda c, s: {}, methods=["sgd"], seeds=1, jobs=2, out=tmp_path / "c", log=lambda _: None)


def test_the_lightning_example_runs_the_study_end_to_end(tmp_path):
    """examples/lightning_study.py: a LightningModule trained by SGD, SAM and OT-MDR through the
    Python study API; its report has the search, the paired verdicts and the compute column."""
    import subprocess
    import sys
    from pathlib import Path

    from conftest import require_oracle

    require_oracle("lightning", "the Lightning example of the study API")
    example = Path(__file__).resolve().parents[1] / "examples" / "lightning_study.py"
    done = subprocess.run([sys.executable, str(example), "--seeds", "2", "--epochs", "3", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    report = (tmp_path / "report.md").read_text()
    assert "| otmdr | rho=[0.05,0.1] |" in report and "chosen for" not in report
    assert "**Bottom line**" in report and "otmdr vs sam:" in report and "grad. evals (× ref)" in report
    summaries = json.loads((tmp_path / "summaries.json").read_text())
    ratio = summaries["otmdr"][0]["compute"]["gradient_evaluations"] / summaries["sgd"][0]["compute"][
        "gradient_evaluations"]
    assert ratio == 2.0  # OT-MDR's two ascent steps on halves of the batch, then the full final pass


def test_the_guide_example_of_the_study_api_runs(tmp_path):
    """docs/your-model.md's mystudy.py, run as a user would (python mystudy.py), smaller."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "your-model.md").read_text()
    code = re.search(r"```python\n# mystudy.py\n(.*?)```", text, re.S).group(1)
    code = code.replace("range(20)", "range(2)").replace("seeds=3", "seeds=2")  # a check of the example, not evidence
    (tmp_path / "mystudy.py").write_text(code)
    done = subprocess.run([sys.executable, "mystudy.py"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    report = (tmp_path / "runs" / "mystudy" / "report.md").read_text()
    assert "## Hyper-parameter search" in report and "otmdr vs sam:" in report and "**Bottom line**" in report


def _peaked(config: dict, seed: int) -> dict:
    """Validation peaks at rho 0.4, past the grid's 0.1, 0.2; the test accuracy follows it."""
    CALLS.append((config["method"], config.get("rho"), seed))
    val = {0.1: 0.70, 0.2: 0.75, 0.4: 0.80, 0.8: 0.72}.get(config.get("rho"), 0.6)
    return {"val_accuracy": val, "test_accuracy": val, "radius": config.get("rho") or 0.0}


@pytest.mark.parametrize("rounds, chosen, searched", [(0, 0.2, [0.1, 0.2]), (1, 0.4, [0.1, 0.2, 0.4]),
                                                      (4, 0.4, [0.1, 0.2, 0.4, 0.8])])
def test_extend_edges_searches_past_an_edge_as_otmdr_compare_does(tmp_path, rounds, chosen, searched):
    CALLS.clear()
    result = compare(_peaked, methods={"sgd": {"method": "sgd"}, "sam": {"method": "sam"}},
                     grid={"sam": {"rho": [0.1, 0.2]}}, seeds=2, extend_edges=rounds, out=tmp_path / "s",
                     log=lambda _: None)
    assert result.chosen["sam"] == {"method": "sam", "rho": chosen}
    assert sorted(r for m, r, s in CALLS if s >= 1000) == searched  # each point once, at the search seed
    assert [row["setting"] for row in result.search if row["extended"]] == [f"rho={r}" for r in searched[2:]]
    report = (tmp_path / "s" / "report.md").read_text()
    assert ("searched past the grid's edges" in report) == (rounds > 0)
    with pytest.raises(StudyError, match="extend_edges"):
        compare(_peaked, methods=["sgd"], extend_edges=-1, out=tmp_path / "t", log=lambda _: None)
