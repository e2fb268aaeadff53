"""Grid search with validation-only selection, paired statistics, label noise, study resume."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from otmdr.cli import main
from otmdr.config import ConfigError, config_to_dict, load_config
from otmdr.data.noise import noisy_labels
from otmdr.report.stats import paired_difference, paired_table, t_half_width
from otmdr.train import study as study_module
from otmdr.train.builders import build_data
from otmdr.train.grid import GridPoint, parse_grid
from otmdr.train.study import Study, run_study

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
FAST = ["train.epochs=2", "model.options={hidden: [16]}", "train.threads=1"]


# ------------------------------------------------------------------------------------------ grids
def test_grid_parsing_targets_methods_and_forms_products():
    grid = parse_grid(["sam.rho=0.01,0.02", "otmdr.rho=[0.005,0.01],[0.05,0.1]", "optim.lr=0.05,0.1",
                       "otmdr:otmdr.normalize=step,merged"], ["sgd", "sam", "otmdr"])
    assert [p.overrides for p in grid["sgd"]] == [("optim.lr=0.05",), ("optim.lr=0.1",)]
    assert len(grid["sam"]) == 4 and len(grid["otmdr"]) == 8
    assert grid["otmdr"][0].overrides == ("otmdr.rho=[0.005,0.01]", "optim.lr=0.05", "otmdr.normalize=step")
    assert grid["sam"][0].label == "rho=0.01 lr=0.05"
    assert parse_grid([], ["sgd", "sam"]) == {"sgd": [GridPoint("sgd")], "sam": [GridPoint("sam")]}
    only = parse_grid(["sam:optim.lr=0.1,0.2"], ["sgd", "sam"])
    assert len(only["sgd"]) == 1 and len(only["sam"]) == 2
    per_member = parse_grid(["otmdr.rho=0.1,0.2"], ["otmdr/joint", "otmdr/per-member"])
    assert len(per_member["otmdr/joint"]) == len(per_member["otmdr/per-member"]) == 2


@pytest.mark.parametrize("spec, message", [
    ("sam.rho", "expected [METHOD:]section.key"),
    ("sam.rho=", "expected [METHOD:]section.key"),
    ("rho=0.1,0.2", "is not a section.key name"),
    ("sam.rho=0.1,,0.2", "an empty value"),
    ("sam.rho=0.1,", "an empty value"),
    ("sam.rho=0.1,0.1", "a value is repeated"),
    ("sam.rho=[0.1", "is not a valid value"),
    ("asam.rho=0.1,0.2", "read by method asam only, which is not in --methods"),
    ("sam:otmdr.rho=0.1,0.2", "does not apply to method sam"),
    ("adam:optim.lr=0.1,0.2", "method 'adam' is not compared"),
    ("optim.method=sgd,sam", "use --methods"),
    ("train.seed=0,1", "use --seeds"),
])
def test_bad_grids_are_one_clear_error(spec, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(".", r"\.")):
        parse_grid([spec], ["sgd", "sam", "otmdr"])


def test_a_key_given_twice_is_refused():
    with pytest.raises(ConfigError, match="given twice"):
        parse_grid(["sam.rho=0.1,0.2", "sam:sam.rho=0.3,0.4"], ["sam"])


@pytest.mark.parametrize("grid, message", [
    (["sam.rhoo=0.1,0.2"], "did you mean sam.rho"),
    (["sam.rho=0.1,-1"], "sam.rho: must be >= 0"),
    (["otmdr.normalize=step,sideways"], "otmdr.normalize"),
    (["optim.lr=0.1,fast"], "optim.lr: expected a number"),
])
def test_cli_rejects_a_bad_grid_before_anything_trains(tmp_path, capsys, grid, message):
    out = tmp_path / "study"
    args = ["compare", "--config", str(DEMO), "--methods", "sgd,sam,otmdr", "--out", str(out)]
    for g in grid:
        args += ["--grid", g]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and "Traceback" not in err
    assert not out.exists()


def test_cli_rejects_bad_study_options(tmp_path, capsys):
    base = ["compare", "--config", str(DEMO), "--out", str(tmp_path / "x")]
    assert main(base + ["--reference", "asam"]) == 2
    assert main(base + ["--jobs", "0"]) == 2
    assert main(base + ["--methods", "sgd,sgd"]) == 2
    assert main(base + ["--search-set", "train.epochs=1"]) == 2  # no grid to search
    assert len(capsys.readouterr().err.strip().splitlines()) == 4
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").iterdir())


# ------------------------------------------------------------------ selection uses validation only
def _fake_train(cfg, run_dir, *, resume=False, log=print, test=True):
    """A stand-in for training whose validation and test splits prefer opposite radii; with
    ``test=False`` it reports validation only, as train does."""
    rho = cfg.sam.rho if cfg.optim.method == "sam" else 0.0
    val = {0.01: 0.90, 0.1: 0.50}.get(rho, 0.7)
    accuracy = {0.01: 0.40, 0.1: 0.95}.get(rho, 0.7) + cfg.train.seed * 1e-3
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg)))
    metrics = {"accuracy": accuracy, "nll": 1 - accuracy, "ece": 0.1, "brier": 0.2, "ece_bins": 15}
    summary = {"method": cfg.optim.method, "seed": cfg.train.seed, "perturbation_norm": rho,
               **({"test": metrics} if test else {"validation_only": True}),
               "history": [{"epoch": 1, "val_accuracy": val, "val_nll": 1 - val}]}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    return summary


def test_selection_uses_the_validation_split_only(tmp_path, monkeypatch):
    monkeypatch.setattr(study_module, "train", _fake_train)
    study = Study(str(DEMO), FAST, ["sgd", "sam"], [0, 1, 2], parse_grid(["sam.rho=0.01,0.1"], ["sgd", "sam"]),
                  tmp_path / "s")
    result = run_study(study, log=lambda _: None)
    assert result["chosen"]["sam"].overrides == ("sam.rho=0.01",)  # validation's choice, not test's
    assert [s["test"]["accuracy"] for s in result["summaries"]["sam"]] == pytest.approx([0.40, 0.401, 0.402])
    # the search ran at its own seed (1000 above the first evaluation seed); every evaluation run is fresh
    assert sorted(p.name for p in (tmp_path / "s" / "search").iterdir()) == ["sam-rho=0.01-seed1000",
                                                                             "sam-rho=0.1-seed1000"]
    assert all((tmp_path / "s" / f"sam-seed{seed}").is_dir() for seed in (0, 1, 2))
    assert result["search_seeds"] == [1000] and result["reused_search_seeds"] == []
    for run in (tmp_path / "s" / "search").iterdir():  # no evaluation reuses them: the test split is never read
        assert json.loads((run / "summary.json").read_text())["validation_only"] is True
    by_nll = run_study(Study(str(DEMO), FAST, ["sam"], [0], parse_grid(["sam.rho=0.01,0.1"], ["sam"]),
                             tmp_path / "n", select="val_nll"), log=lambda _: None)
    assert by_nll["chosen"]["sam"].overrides == ("sam.rho=0.01",)  # lower NLL is better


def test_search_budget_of_its_own_trains_the_finals_anew(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(study_module, "train", lambda cfg, *a, **k: calls.append((cfg.train.seed, k["test"]))
                        or _fake_train(cfg, *a, **k))
    study = Study(str(DEMO), FAST, ["sam"], [0, 1], parse_grid(["sam.rho=0.01,0.1"], ["sam"]), tmp_path / "s",
                  search_overrides=["train.epochs=1"], search_seeds=[0])
    result = run_study(study, log=lambda _: None)
    assert (tmp_path / "s" / "sam-seed0" / "summary.json").is_file()
    search_config = (tmp_path / "s" / "search" / "sam-rho=0.01-seed0" / "config.yaml").read_text()
    assert yaml.safe_load(search_config)["train"]["epochs"] == 1
    assert yaml.safe_load((tmp_path / "s" / "sam-seed0" / "config.yaml").read_text())["train"]["epochs"] == 2
    assert len(result["summaries"]["sam"]) == 2
    # seed 0 searched and evaluated, but at the search's own budget no final reuses its search runs
    assert sorted(calls) == [(0, False), (0, False), (0, True), (1, True)]


# ------------------------------------------------------------------------------------ resume
def test_an_interrupted_search_resumes_without_redoing_finished_runs(tmp_path):
    grid = ["sam.rho=0.01,0.05", "otmdr.rho=[0.01,0.02],[0.05,0.1]"]
    methods = ["sgd", "sam", "otmdr"]

    def make(out):
        return Study(str(DEMO), FAST, methods, [0, 1], parse_grid(grid, methods), out)

    whole = run_study(make(tmp_path / "whole"), log=lambda _: None)

    class Kill(Exception):
        pass

    finished = []

    def kill_after_two(line: str) -> None:
        if "val acc" in line:
            finished.append(line)
            if len(finished) == 2:
                raise Kill

    with pytest.raises(Kill):
        run_study(make(tmp_path / "part"), log=kill_after_two)
    stale = tmp_path / "part" / "search" / "otmdr-rho=0.01_0.02-seed1000"  # killed before its first checkpoint
    stale.mkdir()
    (stale / "config.yaml").write_text("{}")
    lines: list[str] = []
    with pytest.raises(Exception, match="another config"):
        run_study(make(tmp_path / "part"), log=lines.append)  # a folder of another config is refused
    cfg = load_config(DEMO, FAST + ["optim.method=otmdr", "train.seed=1000", "otmdr.rho=[0.01,0.02]",
                                    "train.progress=false"])
    (stale / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg)))
    lines.clear()
    resumed = run_study(make(tmp_path / "part"), log=lines.append)
    assert "  2 run(s) finished earlier, reused" in lines
    assert resumed["chosen"] == whole["chosen"]
    for method in methods:
        assert [s["test"]["accuracy"] for s in resumed["summaries"][method]] == \
            [s["test"]["accuracy"] for s in whole["summaries"][method]]


def test_a_search_run_no_evaluation_reuses_never_reads_the_test_split(tmp_path, monkeypatch):
    """Real training: a search run at a seed apart from the evaluation seeds is scored on
    validation only (no test metrics, no early-stopped model, no test evaluation at all); when a
    later invocation makes its seed an evaluation seed, the study evaluates it on the test split
    from its last checkpoint, without training it again."""
    from otmdr.train import loop

    grid = parse_grid(["sam.rho=0.01,0.05"], ["sam"])
    evaluated = []
    evaluate = loop.evaluate_model
    monkeypatch.setattr(loop, "evaluate_model", lambda cfg, *a, **k: evaluated.append(cfg.train.seed) or
                        evaluate(cfg, *a, **k))
    first = run_study(Study(str(DEMO), FAST, ["sam"], [0], grid, tmp_path / "s", search_seeds=[1]),
                      log=lambda _: None)
    assert sorted(evaluated) == [0]  # the final run alone; neither search run
    chosen = first["chosen"]["sam"]
    searched = tmp_path / "s" / "search" / f"sam-{chosen.label.replace(' ', '_')}-seed1"
    before = json.loads((searched / "summary.json").read_text())
    assert before["validation_only"] is True and "test" not in before and "early_stopped" not in before
    assert before["history"][-1]["val_accuracy"] > 0.5 and before["compute"]["gradient_evaluations"] > 0
    evaluated.clear()
    lines: list[str] = []
    second = run_study(Study(str(DEMO), FAST, ["sam"], [0, 1], grid, tmp_path / "s", search_seeds=[1]),
                       log=lines.append)
    assert second["chosen"]["sam"] == chosen and sorted(evaluated) == [1]  # seed 0's final and the search reused
    after = json.loads((searched / "summary.json").read_text())
    assert "validation_only" not in after and 0 < after["test"]["accuracy"] <= 1 and after["early_stopped"]
    assert after["history"] == before["history"]  # evaluated, not trained again
    assert second["summaries"]["sam"][1]["test"] == after["test"]
    assert sum("(resuming)" in line for line in lines) == 1  # resumed at its last epoch: the search run
    # carried without its checkpoints (restore_runs.py): trained again, to the same run, and evaluated
    run_study(Study(str(DEMO), FAST, ["sam"], [0], grid, tmp_path / "c", search_seeds=[1]), log=lambda _: None)
    carried = tmp_path / "c" / "search" / searched.name
    shutil.rmtree(carried / "checkpoints")
    again = run_study(Study(str(DEMO), FAST, ["sam"], [0, 1], grid, tmp_path / "c", search_seeds=[1]),
                      log=lambda _: None)
    retrained = json.loads((carried / "summary.json").read_text())
    assert [row["val_accuracy"] for row in retrained["history"]] == [row["val_accuracy"] for row in before["history"]]
    assert again["summaries"]["sam"][1]["test"]["accuracy"] == after["test"]["accuracy"]


def test_an_extended_grid_resumes_and_sets_the_old_choices_final_runs_aside(tmp_path, monkeypatch):
    """Extending a grid with --resume keeps the finished search runs; if validation now picks
    another point, the earlier choice's final runs move to superseded/ (kept), not refused."""
    monkeypatch.setattr(study_module, "train", _fake_train)

    def make(grid):
        return Study(str(DEMO), FAST, ["sam"], [0, 1], parse_grid([grid], ["sam"]), tmp_path / "s")

    first = run_study(make("sam.rho=0.1,0.05"), log=lambda _: None)
    assert first["chosen"]["sam"].overrides == ("sam.rho=0.05",)
    lines: list[str] = []
    extended = run_study(make("sam.rho=0.1,0.05,0.01"), log=lines.append)
    assert extended["chosen"]["sam"].overrides == ("sam.rho=0.01",)
    assert "  2 run(s) finished earlier, reused" in lines  # the two earlier search runs
    assert (extended["runs"], extended["reused"]) == (5, 2)  # 3 search runs + the new final runs of seeds 0, 1
    aside = tmp_path / "s" / "superseded" / "sam-seed1"
    assert any("moved to" in line and str(aside) in line for line in lines)
    assert yaml.safe_load((aside / "config.yaml").read_text())["sam"]["rho"] == 0.05
    assert yaml.safe_load((tmp_path / "s" / "sam-seed1" / "config.yaml").read_text())["sam"]["rho"] == 0.01
    assert [s["test"]["accuracy"] for s in extended["summaries"]["sam"]] == pytest.approx([0.40, 0.401])
    # a final folder of a config that no grid point has is still refused, and left as it was
    other = load_config(DEMO, FAST + ["optim.method=sam", "train.seed=1", "sam.rho=0.3", "train.progress=false"])
    (tmp_path / "s" / "sam-seed1" / "config.yaml").write_text(yaml.safe_dump(config_to_dict(other)))
    with pytest.raises(Exception, match="another config"):
        run_study(make("sam.rho=0.1,0.05,0.01"), log=lambda _: None)
    assert (tmp_path / "s" / "sam-seed1" / "summary.json").is_file()


TIMING = {"seconds", "images_per_second", "seconds_per_epoch", "train_seconds"}


def _without_timing(value):
    if isinstance(value, dict):
        return {k: _without_timing(v) for k, v in value.items() if k not in TIMING}
    if isinstance(value, list):
        return [_without_timing(v) for v in value]
    return value


def test_parallel_jobs_give_the_same_study(tmp_path):
    """Seeded runs on one machine are deterministic, so two parallel processes must give the serial
    study bit for bit, timings aside. Both modes train each run on one intra-op thread (serial:
    train.threads=1; parallel: 2 threads split over 2 jobs): the thread count changes the order of
    the evaluation's reductions (the test NLL moves in the 8th digit with 2 threads)."""
    methods = ["sgd", "sam"]
    serial = run_study(Study(str(DEMO), FAST, methods, [0, 1], parse_grid(["sam.rho=0.01,0.05"], methods),
                             tmp_path / "a"), log=lambda _: None)
    overrides = [o for o in FAST if not o.startswith("train.threads")] + ["train.threads=2"]
    lines: list[str] = []
    parallel = run_study(Study(str(DEMO), overrides, methods, [0, 1], parse_grid(["sam.rho=0.01,0.05"], methods),
                               tmp_path / "b"), jobs=2, log=lines.append)
    assert sum("in 2 parallel processes, 1 thread(s) each" in line for line in lines) == 2  # search and finals
    assert parallel["chosen"] == serial["chosen"]
    assert (parallel["runs"], parallel["reused"]) == (serial["runs"], serial["reused"]) == (6, 0)
    assert _without_timing(parallel["summaries"]) == _without_timing(serial["summaries"])
    assert [{k: v for k, v in p.items() if k != "run_dir"} for p in parallel["points"]] == \
        [{k: v for k, v in p.items() if k != "run_dir"} for p in serial["points"]]
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*")
                   if p.name in ("summary.json", "metrics.jsonl"))
    assert len(files) == 2 * 6 and files == sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*")
                                                   if p.name in ("summary.json", "metrics.jsonl"))
    for name in files:
        a, b = ((tmp_path / side / name).read_text() for side in "ab")
        if name.suffix == ".jsonl":
            a, b = [json.loads(line) for line in a.splitlines()], [json.loads(line) for line in b.splitlines()]
        else:
            a, b = json.loads(a), json.loads(b)
        assert _without_timing(a) == _without_timing(b), name
    assert (tmp_path / "b" / "search" / "sam-rho=0.05-seed1000" / "train.log").read_text().count("epoch ") == 2


# ------------------------------------------------------------------------------- paired statistics
def test_paired_interval_matches_a_hand_computation():
    # differences 1, 2, 3: mean 2, sd 1, t(0.975, 2 dof) = 4.302652729911275 (printed tables)
    d = paired_difference([11.0, 12.0, 13.0], [10.0, 10.0, 10.0], higher_is_better=True)
    half = 4.302652729911275 / math.sqrt(3)
    assert (d.mean, d.low, d.high, d.n) == pytest.approx((2.0, 2.0 - half, 2.0 + half, 3))
    assert d.verdict == "no difference detectable with 3 seeds"  # [-0.48, 4.48] contains 0
    five = paired_difference([1.0, 1.2, 0.8, 1.1, 0.9], [0.0] * 5, higher_is_better=True)
    sd = math.sqrt(sum((x - 1.0) ** 2 for x in [1.0, 1.2, 0.8, 1.1, 0.9]) / 4)
    assert five.high - five.mean == pytest.approx(2.7764451051977987 * sd / math.sqrt(5))
    assert five.verdict == "better"
    assert paired_difference([1.0, 1.2, 0.8], [0.0] * 3, higher_is_better=False).verdict == "worse"
    assert paired_difference([1.0], [0.0], higher_is_better=True).low is None
    assert t_half_width([1.0, 2.0, 3.0]) == pytest.approx(half) and t_half_width([5.0]) == 0.0  # the figures' bars


def test_paired_table_pairs_by_seed():
    def run(seed, acc, nll=0.5):
        return {"seed": seed, "test": {"accuracy": acc, "nll": nll, "ece": 0.05}}

    summaries = {"sgd": [run(0, 0.80), run(1, 0.90), run(2, 0.70)],
                 "sam": [run(2, 0.72), run(0, 0.82), run(1, 0.92)]}  # listed in another order
    row = paired_table(summaries, "sgd")[0]
    acc = row["accuracy (pp)"]
    assert acc.mean == pytest.approx(2.0) and acc.low == pytest.approx(2.0) and acc.verdict.startswith("better")
    assert row["NLL"].mean == 0.0 and row["NLL"].verdict == "equivalent within ±0.0200"  # NLL margin 0.02
    with pytest.raises(ValueError, match="reference"):
        paired_table(summaries, "otmdr")


# ------------------------------------------------------------------------------------ label noise
@pytest.mark.parametrize("kind", ["symmetric", "pairflip"])
def test_label_noise_flips_an_exact_seeded_count(kind):
    labels = torch.arange(1000) % 10
    noisy = noisy_labels(labels, 0.4, kind, 10, seed=3)
    changed = noisy != labels
    assert int(changed.sum()) == 400  # exactly round(rate * n), every one to a wrong class
    assert torch.equal(noisy, noisy_labels(labels, 0.4, kind, 10, seed=3))
    assert not torch.equal(noisy, noisy_labels(labels, 0.4, kind, 10, seed=4))
    if kind == "pairflip":
        assert torch.equal(noisy[changed], (labels[changed] + 1) % 10)
    else:  # uniform over the 9 other classes
        shift = (noisy[changed] - labels[changed]) % 10
        counts = torch.bincount(shift, minlength=10)
        assert counts[0] == 0 and counts[1:].min() > 20
    assert torch.equal(noisy_labels(labels, 0.0, kind, 10, seed=3), labels)


def test_label_noise_touches_the_training_split_only():
    clean = build_data(load_config(DEMO, ["train.seed=1"]), torch.device("cpu"))
    noisy = build_data(load_config(DEMO, ["train.seed=1", "data.label_noise=0.4"]), torch.device("cpu"))
    assert torch.equal(noisy.train.images, clean.train.images)
    wrong = (noisy.train.labels != clean.train.labels).float().mean().item()
    assert 0.35 < wrong < 0.45 and noisy.label_noise["train_noisy_fraction"] == pytest.approx(wrong)
    assert torch.equal(noisy.val.labels, clean.val.labels) and noisy.label_noise["val_noisy_fraction"] == 0.0
    assert torch.equal(noisy.test.labels, clean.test.labels)
    both = build_data(load_config(DEMO, ["train.seed=1", "data.label_noise=0.4", "data.noisy_val=true"]),
                      torch.device("cpu"))
    assert 0.3 < both.label_noise["val_noisy_fraction"] < 0.5
    assert torch.equal(both.test.labels, clean.test.labels)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_training_split_gets_the_requested_noise_rate_for_every_seed(seed):
    """The noise stream must not coincide with the validation split's: with both seeded by 0, the
    validation split once took the first noisy labels and the training split got 29% instead of 40%."""
    data = build_data(load_config(DEMO, [f"train.seed={seed}", "data.label_noise=0.4"]), torch.device("cpu"))
    assert abs(data.label_noise["train_noisy_fraction"] - 0.4) < 0.04


def test_label_noise_does_not_depend_on_the_model_seed():
    """An image's noisy label is the same whichever seed splits the data."""
    def noisy_by_image(seed):
        data = build_data(load_config(DEMO, [f"train.seed={seed}", "data.label_noise=0.4", "data.val_fraction=0"]),
                          torch.device("cpu"))
        return {bytes(img.flatten().tolist()): int(y) for img, y in zip(data.train.images, data.train.labels)}

    a, b = noisy_by_image(0), noisy_by_image(5)
    shared = set(a) & set(b)
    assert len(shared) > 1000 and all(a[k] == b[k] for k in shared)


def test_bad_label_noise_is_a_config_error():
    with pytest.raises(ConfigError, match="data.label_noise: must be in"):
        load_config(DEMO, ["data.label_noise=1.0"])
    with pytest.raises(ConfigError, match="data.label_noise_kind"):
        load_config(DEMO, ["data.label_noise_kind=asymmetric"])


# ---------------------------------------------------------------------------------- end to end
def test_cli_search_report_shows_grid_radius_plot_and_paired_verdicts(tmp_path, capsys):
    out = tmp_path / "study"
    args = ["compare", "--config", str(DEMO), "--methods", "sgd,sam", "--seeds", "2", "--out", str(out),
            "--grid", "sam.rho=0.01,0.05", "--set", "data.label_noise=0.2", "--reference", "sgd"]
    for o in FAST:
        args += ["--set", o]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "Paired differences against sgd, final model" in printed
    assert "Paired differences against sgd, early-stopped model" in printed
    report = (out / "report.md").read_text()
    assert "## Hyper-parameter search" in report and "rho=0.05" in report and "Label noise: 20% symmetric" in report
    assert (out / "figures" / "search_radius.png").stat().st_size > 10_000
    search = json.loads((out / "search.json").read_text())
    assert sum(p["chosen"] for p in search) == 1 and all(p["radius"] is not None for p in search)
    assert {p["seed"] for p in search} == {1000} and "search seed(s) 1000" in report
    assert "Evaluation seeds: 0, 1 (2)" in report and "none of them a search run" in report
    chosen = next(p["setting"] for p in search if p["chosen"])
    assert f"- sam: `optim.method=sam sam.{chosen}`" in report and "- sgd: `optim.method=sgd`" in report
    assert "**Bottom line** (test accuracy, verdicts after Holm's correction over the 12 tests above)" in report
    assert "sam vs sgd: " in report and "at 2.00x sgd's gradient evaluations" in report
    summaries = json.loads((out / "summaries.json").read_text())
    assert all(s["early_stopped"]["epoch"] in (1, 2) for runs in summaries.values() for s in runs)
    assert summaries["sam"][0]["label_noise"]["rate"] == 0.2
    assert "reused" not in report.splitlines()[3]
    assert main(args + ["--resume"]) == 0  # everything reused: the report says so
    assert "trained 0 of the runs (6 finished earlier and reused" in (out / "report.md").read_text()


def test_the_make_demo_command_is_a_valid_study(tmp_path, monkeypatch):
    """`make demo` (the README's first command) parses, and every config of its grid is valid."""
    import shlex

    makefile = (Path(__file__).resolve().parents[1] / "Makefile").read_text()
    recipe = makefile.split("\ndemo:", 1)[1].split("\n\n", 1)[0].replace("\\\n", " ")
    words = shlex.split(recipe.split("$(VENV)/bin/otmdr", 1)[1].replace("$$(date +%Y%m%d-%H%M%S)", "x"))
    words[words.index("--out") + 1] = str(tmp_path / "demo")
    words[words.index("--config") + 1] = str(Path(__file__).resolve().parents[1] / words[words.index("--config") + 1])
    seen = {}

    class Planned(Exception):
        pass

    def fake_run_study(study, **_):
        seen["study"] = study
        raise Planned

    monkeypatch.setattr(study_module, "run_study", fake_run_study)
    with pytest.raises(Planned):
        main(words)
    study = seen["study"]
    assert study.methods == ["sgd", "sam", "otmdr"] and len(study.seeds) == 5
    assert len(study.grid["sam"]) == 4 and len(study.grid["otmdr"]) == 4
    assert load_config(words[words.index("--config") + 1]).data.label_noise == 0.4


def test_a_choice_at_the_edge_of_the_grid_is_flagged():
    from otmdr.report import edge_notes

    def points(chosen):
        return [{"method": "sam", "setting": f"rho={r}", "chosen": r == chosen} for r in (0.01, 0.05, 0.1)]

    assert "last of its grid" in edge_notes(points(0.1))[0] and "first of its grid" in edge_notes(points(0.01))[0]
    assert edge_notes(points(0.05)) == []
    assert edge_notes([{"method": "sgd", "setting": "default", "chosen": True}]) == []
    # with measured radii the grid is read in radius order: an extended grid lists new values last
    extended = [{"method": "sam", "setting": f"rho={r}", "radius": r, "chosen": r == chosen}
                for r, chosen in ((0.05, 0.3), (0.2, 0.3), (0.5, 0.3), (0.3, 0.3))]
    assert edge_notes(extended) == []
    extended[2]["chosen"], extended[3]["chosen"] = True, False
    assert "largest radius of its grid" in edge_notes(extended)[0]
    # a two-key grid (rho x noise, as the Bayesian study's) puts several points at one radius: any of
    # them chosen is at that edge, whatever its place in the listing; radii within 5% count as one
    two_keys = [{"method": "otmdr", "setting": f"rho={rho} noise={noise}", "radius": radius, "chosen": False}
                for rho, noise, radius in ((1, 0, 0.003), (1, 1e-3, 0.55), (2, 0, 0.007), (2, 1e-3, 0.551),
                                           (3, 0, 0.014), (3, 1e-4, 0.057), (3, 1e-3, 0.55))]
    for index, edge in ((1, "largest"), (3, "largest"), (6, "largest"), (0, "smallest"), (2, None), (5, None)):
        for point in two_keys:
            point["chosen"] = point is two_keys[index]
        notes = edge_notes(two_keys)
        assert (f"is at the {edge} radius of its grid" in notes[0]) if edge else notes == [], (index, notes)
    # a grid that does not move the radius (SGD's learning rate, weight decay) is read key by key
    sgd = [{"method": "sgd", "setting": f"lr={lr} weight_decay={wd}", "radius": 0.0, "chosen": False}
           for lr in (0.025, 0.05, 0.1) for wd in (5e-4, 5e-3)]
    for index, edge in ((0, "at the smallest lr of its grid"), (5, "at the largest lr of its grid"), (2, None),
                        (3, None)):  # two weight decays: no interior to speak of
        for point in sgd:
            point["chosen"] = point is sgd[index]
        notes = edge_notes(sgd)
        assert (edge in notes[0]) if edge else notes == [], (index, notes)
    for point in sgd:
        point["chosen"] = False
    sgd.append({"method": "sgd", "setting": "lr=0.025 weight_decay=2e-2", "radius": 0.0, "chosen": True})
    assert "at the smallest lr and the largest weight_decay of its grid" in edge_notes(sgd)[0]


def test_one_batch_norm_policy_for_every_method_unless_per_method(tmp_path):
    from otmdr.train.study import plan

    methods = ["sam", "otmdr"]
    for policy, expected in (("clean", {"sam": "clean", "otmdr": "clean"}),
                             ("ascent", {"sam": "ascent", "otmdr": "ascent"}),
                             (None, {"sam": "clean", "otmdr": "ascent"})):  # each method's own (the release's)
        study = Study(str(DEMO), FAST + ["otmdr.preset=release"], methods, [0],
                      parse_grid(["sam.rho=0.1,0.2"], methods), tmp_path, bn_policy=policy)
        search, _ = plan(study)
        for run in search:
            section = getattr(run.config, run.method)
            assert section.bn_policy == expected[run.method], (policy, run.method)


def test_figures_name_each_methods_radius_and_reference_levels(tmp_path, monkeypatch):
    """A matched-radius comparison must read from its test-accuracy figure alone, and a reference
    level (SGD, no radius) is named in the search figure's legend, not on the plot."""
    from otmdr.report import plots

    assert plots._with_radius("sgd", [{"perturbation_norm": 0.0}]) == "sgd"
    assert plots._with_radius("sam", [{"perturbation_norm": 0.09}, {"perturbation_norm": 0.1}]) == "sam\nradius 0.095"
    legends = []
    monkeypatch.setattr(plots.plt.Axes, "legend", lambda ax, *a, **k: legends.append(ax.get_legend_handles_labels()[1]))
    points = [{"method": "sgd", "setting": "default", "score": 0.8, "radius": 0.0, "chosen": True},
              {"method": "sam", "setting": "rho=0.05", "score": 0.82, "radius": 0.05, "chosen": True},
              {"method": "sam", "setting": "rho=0.1", "score": 0.81, "radius": 0.1, "chosen": False}]
    plots.plot_search(points, tmp_path / "search.png", metric="val_accuracy")
    assert legends == [["sgd (no radius)", "sam (rho)"]]
    # a grid over two keys: one line per noise level along rho, not one zigzag through all points
    two = [{"method": "otmdr", "setting": f"rho={rho} noise_std={noise}", "score": 0.8, "radius": r,
            "chosen": False} for rho, noise, r in [("[0.1,0.2]", 0, 0.2), ("[0.2,0.4]", 0, 0.4),
                                                   ("[0.1,0.2]", "1e-3", 0.5), ("[0.2,0.4]", "1e-3", 0.6)]]
    series = plots._search_series("otmdr", two)
    assert [(name, labels) for name, _, labels in series] == [
        ("otmdr (rho, noise_std=0)", ["[0.1,0.2]", "[0.2,0.4]"]),
        ("otmdr (rho, noise_std=1e-3)", ["[0.1,0.2]", "[0.2,0.4]"])]
    assert [name for name, _, _ in plots._search_series("sgd", [points[0]])] == ["sgd"]


# ------------------------------------------------------- search seeds apart from evaluation seeds
#: SAM's true per-seed edge over SGD (points): small and not consistent
SAM_EDGE = {0: -0.3, 1: 0.3, 2: 0.2, 3: 0.25, 4: 0.15}
#: a lucky (seed, radius) pair: its run is better on validation *and* test, as a lucky
#: initialisation is; the luck makes that radius win a search at that seed
LUCK = {(0, 0.1): 0.9, (1000, 0.05): 0.9, (1001, 0.1): 0.5}


def _lucky_train(cfg, run_dir, *, resume=False, log=print, test=True):
    seed, rho = cfg.train.seed, cfg.sam.rho if cfg.optim.method == "sam" else None
    luck = LUCK.get((seed, rho), 0.0)
    accuracy = 0.80 + ((SAM_EDGE.get(seed, 0.0) + luck) / 100 if rho is not None else 0.0)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg)))
    metrics = {"accuracy": accuracy, "nll": 0.5, "ece": 0.1, "brier": 0.2, "ece_bins": 15}
    summary = {"method": cfg.optim.method, "seed": seed, "perturbation_norm": rho or 0.0,
               **({"test": metrics} if test else {"validation_only": True}),
               "history": [{"epoch": 1, "val_accuracy": 0.5 + luck / 100}]}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    return summary


def test_a_search_seed_reused_for_evaluation_would_flip_the_verdict(tmp_path, monkeypatch):
    """The luck that wins a search stays with its run: evaluated at the search's seed, a method with
    no real edge reads as "better"; with the search at its own seed (the default) it does not."""
    monkeypatch.setattr(study_module, "train", _lucky_train)
    grid = parse_grid(["sam.rho=0.05,0.1"], ["sgd", "sam"])

    def verdict(out, **seeds):
        result = run_study(Study(str(DEMO), FAST, ["sgd", "sam"], [0, 1, 2, 3, 4], grid, tmp_path / out, **seeds),
                           log=lambda _: None)
        return result, paired_table(result["summaries"], "sgd")[0]["accuracy (pp)"]

    reused, biased = verdict("reused", search_seeds=[0])
    assert reused["reused_search_seeds"] == [0] and reused["chosen"]["sam"].overrides == ("sam.rho=0.1",)
    assert biased.verdict.startswith("better") and biased.mean == pytest.approx(0.3)
    apart, fair = verdict("apart")
    assert apart["search_seeds"] == [1000] and apart["reused_search_seeds"] == []
    assert apart["chosen"]["sam"].overrides == ("sam.rho=0.05",)  # seed 1000's lucky point
    assert fair.mean == pytest.approx(0.12) and fair.verdict == "equivalent within ±0.50"  # no luck carried over


def test_search_scores_average_over_search_seeds_and_flag_close_calls(tmp_path, monkeypatch):
    monkeypatch.setattr(study_module, "train", _lucky_train)
    grid = parse_grid(["sam.rho=0.05,0.1"], ["sam"])
    result = run_study(Study(str(DEMO), FAST, ["sam"], [0], grid, tmp_path / "s", search_seed_count=3),
                       log=lambda _: None)
    assert result["search_seeds"] == [1000, 1001, 1002]
    points = {p["setting"]: p for p in result["points"]}
    assert points["rho=0.05"]["seed_scores"] == pytest.approx([0.509, 0.5, 0.5])
    assert points["rho=0.05"]["score"] == pytest.approx(0.503) and points["rho=0.05"]["chosen"]
    # 0.13 points apart on average, 0.9 and -0.5 at two of the seeds: within noise
    notes = study_module.close_calls(result["points"], "val_accuracy")
    assert len(notes) == 1 and "less than one standard error" in notes[0] and "rho=0.05" in notes[0]
    assert notes[0].endswith("(--search-seeds 6)")  # more seeds than the 3 it already averaged
    assert len(list((tmp_path / "s" / "search").iterdir())) == 6


def test_one_search_seed_is_judged_by_how_much_its_finals_move_with_the_seed():
    """Noisy CIFAR-10: SAM's single-seed search scored 36.3-50.4% without order across radii while
    SGD's evaluation seeds spread 35-50%; the binomial error of 1,000 validation images (about 1.6
    points) called a 6-point gap a clear choice. The finals measure the seed noise the search ran
    blind to."""
    def point(setting, score):
        return {"method": "sam", "setting": setting, "seeds": [1000], "seed_scores": [score], "score": score,
                "standard_error": math.sqrt(score * (1 - score) / 1000)}

    points = [point("rho=0.05", 0.442), point("rho=0.1", 0.504)]
    assert study_module.close_calls(points, "val_accuracy") == []  # 6.2 points > the binomial 2.2
    noisy = {"sam": [0.40, 0.47, 0.36, 0.50, 0.44]}  # std 5.55 points: two runs differ by ~7.85
    (note,) = study_module.close_calls(points, "val_accuracy", final_scores=noisy)
    assert "rho=0.1" in note and "by 6.20 on val_accuracy, less than the 7.85 by which two runs" in note
    assert "over its 5 evaluation runs" in note and note.endswith("(--search-seeds 3)")
    steady = {"sam": [0.500, 0.505, 0.498, 0.503, None]}  # a diverged final is left out
    assert study_module.close_calls(points, "val_accuracy", final_scores=steady) == []
    averaged = [{**p, "seeds": [1000, 1001], "seed_scores": [p["score"]] * 2, "standard_error": 0.0} for p in points]
    assert study_module.close_calls(averaged, "val_accuracy", final_scores=noisy) == []  # its own seeds decide
    summaries = {"sam": [{"history": [{"val_accuracy": 0.3}, {"val_accuracy": v}]} for v in (0.40, 0.47)] + [{}]}
    assert study_module.final_scores(summaries, "val_accuracy") == {"sam": [0.40, 0.47, None]}


def test_equal_compute_scales_epochs_and_schedule_to_the_most_expensive_method(tmp_path):
    methods = ["sgd", "sgd@compute", "sam"]
    study = Study(str(DEMO), FAST + ["schedule.name=step", "schedule.milestones=[1]"], methods, [0],
                  parse_grid([], methods), tmp_path / "s")
    _, finals = study_module.plan(study)
    runs = {r.method: r.config for r in finals({m: GridPoint(m) for m in methods})}
    assert (runs["sgd"].train.epochs, runs["sgd@compute"].train.epochs, runs["sam"].train.epochs) == (2, 4, 2)
    assert runs["sgd@compute"].schedule.milestones == [2.0] and runs["sgd"].schedule.milestones == [1.0]
    result = run_study(study, log=lambda _: None)
    spent = {m: runs_[0]["compute"]["gradient_evaluations"] for m, runs_ in result["summaries"].items()}
    assert spent["sgd@compute"] == spent["sam"] == 2 * spent["sgd"] > 0  # measured, not only planned
    everyone = Study(str(DEMO), FAST, ["sgd", "sam"], [0], parse_grid([], ["sgd", "sam"]), tmp_path / "t",
                     budget="compute")
    _, finals = study_module.plan(everyone)
    assert [r.config.train.epochs for r in finals({m: GridPoint(m) for m in ["sgd", "sam"]})] == [4, 2]
    with pytest.raises(ConfigError, match="budget 'fast' is not one of"):
        study_module.plan(Study(str(DEMO), FAST, ["sgd"], [0], parse_grid([], ["sgd"]), tmp_path / "u", budget="fast"))


def _run(method, seed, accuracy, ece=0.05, evaluations=100.0):
    return {"method": method, "seed": seed, "test": {"accuracy": accuracy, "nll": 0.5, "ece": ece},
            "compute": {"gradient_evaluations": evaluations}}


def test_the_bottom_line_states_each_pair_once_with_holm_and_compute():
    from otmdr.report.compare import bottom_line
    from otmdr.report.stats import paired_family

    summaries = {"sgd": [_run("sgd", s, 0.80 + 0.001 * s) for s in range(5)],
                 "sam": [_run("sam", s, 0.90 + 0.001 * s + 0.0002 * (s % 2), evaluations=200.0) for s in range(5)],
                 "otmdr": [_run("otmdr", s, 0.90 + 0.0012 * s, evaluations=200.0) for s in range(5)]}
    family, size = paired_family(summaries, ["sgd", "sam"])
    assert size == 3 * 3 * 2  # 3 distinct pairs (sam − sgd is sgd − sam) x 3 metrics x (difference, equivalence)
    against_sgd = {row["method"]: row["accuracy (pp)"] for row in family[0][2]}
    against_sam = {row["method"]: row["accuracy (pp)"] for row in family[1][2]}
    assert against_sam["sgd"].mean == pytest.approx(-against_sgd["sam"].mean)
    assert against_sam["sgd"].holm_p_difference == against_sgd["sam"].holm_p_difference is not None
    text = bottom_line(summaries, family, size, markdown=False)
    assert text.count("sam vs sgd") == 1 and "sgd vs sam" not in text  # the reverse pair is not repeated
    assert "sam vs sgd: better (+10.01 points" in text and "at 2.00x sgd's gradient evaluations" in text
    assert "otmdr vs sam: equivalent within ±0.50" in text and "at 1.00x sam's" in text
    assert "ECE is high" not in text  # no label noise
    noisy = {m: [{**r, "label_noise": {"rate": 0.4}, "test": {**r["test"], "ece": 0.35}} for r in runs]
             for m, runs in summaries.items()}
    family, size = paired_family(noisy, ["sgd"])
    assert "ECE is high for every method (35-35%) because 40% of the training labels are wrong" in \
        bottom_line(noisy, family, size, markdown=False)


@pytest.mark.parametrize("specs, chosen, expected", [
    (["optim.lr=0.05,0.1,0.2"], "optim.lr=0.2", ["optim.lr=0.4"]),  # top edge: the last step again
    (["optim.lr=0.05,0.1,0.2"], "optim.lr=0.05", ["optim.lr=0.025"]),  # bottom edge
    (["optim.lr=0.05,0.1,0.2"], "optim.lr=0.1", []),  # inside: nothing
    (["optim.weight_decay=5e-4,5e-3"], "optim.weight_decay=5e-3", ["optim.weight_decay=0.05"]),  # YAML's '5e-3'
    (["otmdr.rho=[0.0025,0.005],[0.005,0.01]"], "otmdr.rho=[0.0025,0.005]", ["otmdr.rho=[0.00125,0.0025]"]),
    (["otmdr.noise_std=0,1e-3,3e-3"], "otmdr.noise_std=0", []),  # zero cannot be stepped past geometrically
    (["otmdr.noise_std=0,1e-3,3e-3"], "otmdr.noise_std=3e-3", ["otmdr.noise_std=0.009"]),
    (["efficiency.interval=2,5"], "efficiency.interval=5", ["efficiency.interval=12"]),  # integers round
    (["efficiency.trigger=[-1.0,1.0],[0.0,2.0]"], "efficiency.trigger=[0.0,2.0]", []),  # not positive
    (["optim.lr=0.1"], "optim.lr=0.1", []),  # one value: no line to step along
])
def test_beyond_edges_steps_one_grid_step_past_the_chosen_value(specs, chosen, expected):
    from otmdr.train.grid import beyond_edges

    points = parse_grid(specs, ["otmdr"])["otmdr"]
    point = next(p for p in points if p.overrides == (chosen,))
    assert [p.overrides for p in beyond_edges(points, point)] == [(e,) for e in expected]


def test_beyond_edges_walks_the_chosen_line_of_a_product_grid():
    """lr x weight decay: the step is along each key the choice sits at an edge of, the other keys
    held at the chosen values; a value the line already holds is not searched again."""
    from otmdr.train.grid import beyond_edges

    points = parse_grid(["optim.lr=0.1,0.2", "optim.weight_decay=5e-4,5e-3,5e-2"], ["sgd"])["sgd"]
    chosen = GridPoint("sgd", ("optim.lr=0.2", "optim.weight_decay=5e-3"))
    assert [p.overrides for p in beyond_edges(points, chosen)] == [("optim.lr=0.4", "optim.weight_decay=5e-3")]
    grown = points + [GridPoint("sgd", ("optim.lr=0.4", "optim.weight_decay=5e-3"))]
    assert beyond_edges(grown, chosen) == []  # 0.2 is no longer the top of its line


def _peaked_train(cfg, run_dir, *, resume=False, log=print, test=True):
    """Validation accuracy peaks at lr 0.4 (0.1 and 0.2 climb towards it, 0.8 falls off, 1.6
    diverges); the test accuracy follows it."""
    lr = cfg.optim.lr
    val = {0.1: 0.70, 0.2: 0.75, 0.4: 0.80, 0.8: 0.72}.get(round(lr, 6), 0.6)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg)))
    if lr > 1:
        raise study_module.TrainingError("loss became NaN")
    summary = {"method": cfg.optim.method, "seed": cfg.train.seed, "perturbation_norm": 0.0,
               "test": {"accuracy": val, "nll": 0.5, "ece": 0.1, "brier": 0.2, "ece_bins": 15},
               "history": [{"epoch": 1, "val_accuracy": val}]}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    return summary


@pytest.mark.parametrize("rounds, chosen, searched", [
    (0, 0.2, [0.1, 0.2]),  # as given: the choice is capped by the grid
    (1, 0.4, [0.1, 0.2, 0.4]),  # one step past the edge, where the score still rises
    (5, 0.4, [0.1, 0.2, 0.4, 0.8]),  # 0.4 is then inside: the search stops by itself
])
def test_extend_edges_searches_past_an_edge_until_the_choice_is_inside(tmp_path, monkeypatch, rounds, chosen,
                                                                       searched):
    monkeypatch.setattr(study_module, "train", _peaked_train)
    grid = parse_grid(["sgd:optim.lr=0.1,0.2"], ["sgd", "sam"])
    study = Study(str(DEMO), FAST, ["sgd", "sam"], [0, 1], grid, tmp_path / "s", extend_edges=rounds)
    lines: list[str] = []
    result = run_study(study, log=lines.append)
    assert result["chosen"]["sgd"].overrides == (f"optim.lr={chosen}",)
    assert sorted(float(p["setting"].split("=")[1]) for p in result["points"]) == searched
    assert [p["setting"] for p in result["points"] if p["extended"]] == [f"lr={v}" for v in searched[2:]]
    expected = {0.2: 0.75, 0.4: 0.80}[chosen]  # the finals train at the chosen point
    assert [s["test"]["accuracy"] for s in result["summaries"]["sgd"]] == pytest.approx([expected, expected])
    assert (rounds > 0) == any("at an edge of its grid: also searching lr=0.4" in line for line in lines)


def test_extend_edges_resumes_to_the_same_study_without_retraining(tmp_path, monkeypatch):
    monkeypatch.setattr(study_module, "train", _peaked_train)
    make = lambda: Study(str(DEMO), FAST, ["sgd"], [0], parse_grid(["optim.lr=0.1,0.2"], ["sgd"]),  # noqa: E731
                         tmp_path / "s", extend_edges=3)
    first = run_study(make(), log=lambda _: None)
    calls = []
    monkeypatch.setattr(study_module, "train", lambda *a, **k: calls.append(a) or _peaked_train(*a, **k))
    again = run_study(make(), log=lambda _: None)
    assert calls == [] and again["chosen"] == first["chosen"] and again["points"] == first["points"]


def test_extend_edges_keeps_the_planned_compute_budget_and_skips_invalid_steps(tmp_path, monkeypatch):
    """A step past an edge that costs more (the sharpness-aware step every step instead of every
    second) does not change the epochs of the equal-compute baseline: its budget is the grid's as
    given. A step to an invalid config (LookSAM with nothing to reuse) is logged and left out."""
    def fewer_skips_score_higher(cfg, run_dir, **kwargs):
        summary = _peaked_train(cfg, run_dir, **kwargs)
        summary["history"][-1]["val_accuracy"] -= 0.01 * cfg.efficiency.interval
        (run_dir / "summary.json").write_text(json.dumps(summary))
        return summary

    monkeypatch.setattr(study_module, "train", fewer_skips_score_higher)
    methods = ["sgd@compute", "otmdr+interval", "otmdr+reuse"]
    grid = parse_grid(["otmdr+interval:efficiency.interval=4,2", "otmdr+reuse:efficiency.interval=4,2"], methods)
    study = Study(str(DEMO), FAST, methods, [0], grid, tmp_path / "s", extend_edges=1)
    _, finals = study_module.plan(study)
    planned = {r.method: r.config.train.epochs for r in finals({m: ps[0] for m, ps in grid.items()})}
    lines: list[str] = []
    result = run_study(study, log=lines.append)
    assert [(p["method"], p["setting"]) for p in result["points"] if p["extended"]] == [("otmdr+interval",
                                                                                         "interval=1")]
    assert result["chosen"]["otmdr+interval"].overrides == ("efficiency.interval=1",)  # 2.0x SGD, not 1.5x
    saved = yaml.safe_load((tmp_path / "s" / "sgd_compute-seed0" / "config.yaml").read_text())
    assert saved["train"]["epochs"] == planned["sgd@compute"] == 3  # 1.5x of 2 epochs, as planned
    assert any(line.startswith("  otmdr+reuse: not stepping past the edge to interval=1: ") for line in lines)
