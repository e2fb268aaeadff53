"""The ``efficiency`` config section (issue 25) and the ``METHOD+VARIANT`` names of ``otmdr compare``:
parsing, validation, the optimizer keyword arguments, the compare plan and the compute prediction."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from otmdr.cli import main
from otmdr.config import (ConfigError, comparable_config, config_to_dict, efficiency_options, load_config)
from otmdr.train.compute import gradient_evaluations_per_step
from otmdr.train.grid import parse_grid
from otmdr.train.study import (VARIANTS, Study, method_variant, plan, run_study, split_method,
                               variant_overrides)

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
TINY = ["train.epochs=1", "model.options={hidden: [16]}", "train.threads=1", "data.train_limit=200",
        "data.batch_size=20", "eval.temperature_scaling=false"]


# ------------------------------------------------------------------------------------ the section
def test_defaults_and_the_optimizer_keywords():
    cfg = load_config(None)
    assert config_to_dict(cfg)["efficiency"] == {"interval": 1, "reuse": False, "reuse_alpha": 0.7,
                                                 "phase_start": 0.0, "trigger": None, "trigger_decay": 0.9,
                                                 "momentum_ascent": "none"}
    assert efficiency_options(cfg.efficiency) == {"ascent_interval": 1, "reuse": False, "reuse_alpha": 0.7,
                                                  "phase_start": 0.0, "trigger": None, "trigger_decay": 0.9,
                                                  "momentum_ascent": "none"}


def test_every_key_is_read_and_mapped():
    cfg = load_config(None, ["efficiency.interval=4", "efficiency.reuse=true", "efficiency.reuse_alpha=1/2",
                             "efficiency.phase_start=0.25", "efficiency.trigger=[-1,1.5]",
                             "efficiency.trigger_decay=0.5"])
    e = cfg.efficiency
    assert (e.interval, e.reuse, e.reuse_alpha, e.phase_start, e.trigger, e.trigger_decay, e.momentum_ascent) == (
        4, True, 0.5, 0.25, [-1.0, 1.5], 0.5, "none")
    options = efficiency_options(e)
    assert options["ascent_interval"] == 4 and options["trigger"] == (-1.0, 1.5) and options["reuse"] is True
    assert efficiency_options(load_config(None, ["efficiency.trigger=0.5"]).efficiency)["trigger"] == (0.5,)
    for method in ("sam", "asam", "otmdr"):  # each sharpness-aware method takes them
        for ascent in ("first", "all"):
            chosen = load_config(None, [f"optim.method={method}", f"efficiency.momentum_ascent={ascent}"])
            assert efficiency_options(chosen.efficiency)["momentum_ascent"] == ascent


@pytest.mark.parametrize("override, message", [
    ("efficiency.interval=0", "efficiency.interval: must be >= 1"),
    ("efficiency.interval=2.5", "efficiency.interval: expected an integer"),
    ("efficiency.reuse=maybe", "efficiency.reuse: expected true or false"),
    ("efficiency.reuse_alpha=-0.1", "efficiency.reuse_alpha: must be >= 0"),
    ("efficiency.phase_start=1", "efficiency.phase_start: must be in [0, 1)"),
    ("efficiency.phase_start=-0.1", "efficiency.phase_start: must be in [0, 1)"),
    ("efficiency.trigger=[1,2,3]", "efficiency.trigger: [1.0, 2.0, 3.0] must hold one threshold"),
    ("efficiency.trigger=[]", "efficiency.trigger: [] must hold one threshold"),
    ("efficiency.trigger=[0,high]", "efficiency.trigger[1]: expected a number"),
    ("efficiency.trigger_decay=0", "efficiency.trigger_decay: must be in (0, 1)"),
    ("efficiency.trigger_decay=1", "efficiency.trigger_decay: must be in (0, 1)"),
    ("efficiency.momentum_ascent=some", "efficiency.momentum_ascent: 'some' is not one of none, first, all"),
    ("efficiency.reuse=true", "efficiency.reuse: true needs efficiency.interval >= 2"),
    ("efficiency.intervall=5", "did you mean efficiency.interval"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as caught:
        load_config(None, [override])
    assert message in str(caught.value) and len(str(caught.value).splitlines()) == 1


def test_combinations_the_optimizer_refuses_name_the_section():
    with pytest.raises(ConfigError, match="config section efficiency: .*momentum_ascent"):
        load_config(None, ["efficiency.interval=5", "efficiency.reuse=true", "efficiency.momentum_ascent=all"])


@pytest.mark.parametrize("override", ["efficiency.interval=5", "efficiency.reuse_alpha=0.5",
                                      "efficiency.phase_start=0.8", "efficiency.trigger=[-1.0,1.0]",
                                      "efficiency.trigger_decay=0.5", "efficiency.momentum_ascent=all"])
def test_sgd_with_an_efficiency_key_is_refused(override):
    key = override.partition("=")[0]
    with pytest.raises(ConfigError) as caught:
        load_config(None, ["optim.method=sgd", override])
    text = str(caught.value)
    assert text.startswith(f"config key {key}: ") and "not to optim.method=sgd" in text
    assert "METHOD+VARIANT" in text and len(text.splitlines()) == 1
    load_config(None, ["optim.method=sgd", override.partition("=")[0] + "=" + {  # the default is accepted
        "interval": "1", "reuse_alpha": "0.7", "phase_start": "0", "trigger": "null", "trigger_decay": "0.9",
        "momentum_ascent": "none"}[key.partition(".")[2]]])


def test_a_saved_config_without_the_section_is_the_same_run():
    """Runs saved before the section existed compare equal to the default (``--resume`` reuses them)."""
    data = config_to_dict(load_config(str(DEMO)))
    old = {section: values for section, values in data.items() if section != "efficiency"}
    assert comparable_config(old) == comparable_config(data)
    assert comparable_config(config_to_dict(load_config(str(DEMO), ["efficiency.interval=5"]))) != \
        comparable_config(data)


# ----------------------------------------------------------------------------- method names
@pytest.mark.parametrize("method, parts, variant", [
    ("otmdr", ("otmdr", "", ""), ""),
    ("otmdr+reuse", ("otmdr", "", ""), "reuse"),
    ("sam+interval@compute", ("sam", "", "compute"), "interval"),
    ("asam+late/per-member", ("asam", "per-member", ""), "late"),
    ("otmdr+reuse/joint@compute", ("otmdr", "joint", "compute"), "reuse"),
    ("otmdr/joint@compute", ("otmdr", "joint", "compute"), ""),
    ("sgd@compute", ("sgd", "", "compute"), ""),
    ("sam+momentum1", ("sam", "", ""), "momentum1"),
])
def test_split_method_and_method_variant(method, parts, variant):
    assert split_method(method) == parts
    assert method_variant(method) == variant


def test_the_variant_table():
    assert VARIANTS == {
        "interval": ["efficiency.interval=5"],
        "reuse": ["efficiency.interval=5", "efficiency.reuse=true"],
        "late": ["efficiency.phase_start=0.8"],
        "trigger": ["efficiency.trigger=[-1.0,1.0]"],
        "momentum": ["efficiency.momentum_ascent=all"],
        "momentum1": ["efficiency.momentum_ascent=first"],
    }
    for name, overrides in VARIANTS.items():  # every variant is a valid config for every perturbing method
        for method in ("sam", "asam", "otmdr"):
            load_config(str(DEMO), [f"optim.method={method}", *overrides])
        assert variant_overrides(f"sam+{name}/joint@compute") == overrides
    assert variant_overrides("sam") == variant_overrides("sgd@compute") == []
    with pytest.raises(ConfigError, match="'fast' is not a variant"):
        variant_overrides("sam+fast")
    with pytest.raises(ConfigError, match="plain SGD"):
        variant_overrides("sgd+reuse")


@pytest.mark.parametrize("methods, message", [
    ("sgd+reuse", "plain SGD has no sharpness-aware step"),
    ("sam,sgd+interval@compute", "plain SGD has no sharpness-aware step"),
    ("sam+fast", "unknown method(s) ['sam+fast']"),
    ("sam+", "unknown method(s) ['sam+']"),
    ("sam/joint+reuse", "unknown method(s) ['sam/joint+reuse']"),  # order: name, +variant, /regime, @budget
])
def test_cli_refuses_a_bad_variant_in_one_line(tmp_path, capsys, methods, message):
    out = tmp_path / "study"
    assert main(["compare", "--config", str(DEMO), "--methods", methods, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and "Traceback" not in err
    assert "momentum1" in err or "plain SGD" in err  # the variants are listed
    assert not out.exists()


def test_cli_refuses_an_efficiency_key_for_sgd(tmp_path, capsys):
    out = tmp_path / "study"
    assert main(["compare", "--config", str(DEMO), "--methods", "sgd,sam", "--set", "efficiency.interval=5",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "efficiency.interval" in err and "METHOD+VARIANT" in err
    assert not out.exists()


# ------------------------------------------------------------------------------ grids and plans
def test_grid_prefixes_with_a_variant_target_exactly_that_method():
    methods = ["sgd", "otmdr", "otmdr+reuse", "sam+late@compute"]
    grid = parse_grid(["otmdr+reuse:efficiency.interval=2,5,10", "otmdr:optim.lr=0.1,0.2",
                       "sam+late:efficiency.phase_start=0.5,0.9"], methods)
    assert [p.overrides for p in grid["otmdr+reuse"]] == [(f"efficiency.interval={k}",) for k in (2, 5, 10)]
    assert [p.overrides for p in grid["otmdr"]] == [("optim.lr=0.1",), ("optim.lr=0.2",)]
    assert len(grid["sam+late@compute"]) == 2 and len(grid["sgd"]) == 1
    only_variant = parse_grid(["otmdr:optim.lr=0.1,0.2"], ["sgd", "otmdr+reuse"])  # no plain otmdr: its variant
    assert len(only_variant["otmdr+reuse"]) == 2
    everyone = parse_grid(["efficiency.reuse_alpha=0.5,0.9"], methods)  # an efficiency key: never sgd
    assert len(everyone["sgd"]) == 1 and all(len(everyone[m]) == 2 for m in methods[1:])
    with pytest.raises(ConfigError, match="does not apply to method sgd"):
        parse_grid(["sgd:efficiency.interval=2,5"], methods)
    with pytest.raises(ConfigError, match="read by methods sam, asam and otmdr only"):
        parse_grid(["efficiency.interval=2,5"], ["sgd"])
    with pytest.raises(ConfigError, match="'otmdr\\+late' is not compared"):
        parse_grid(["otmdr+late:efficiency.phase_start=0.5,0.9"], methods)
    with pytest.raises(ConfigError, match="does not apply to method otmdr\\+reuse"):
        parse_grid(["otmdr+reuse:sam.rho=0.1,0.2"], methods)


def test_plan_applies_the_variant_before_the_grid_point(tmp_path):
    methods = ["sgd", "otmdr", "otmdr+reuse"]
    study = Study(str(DEMO), TINY, methods, [0, 1], parse_grid([], methods), tmp_path / "s")
    search, finals = plan(study)
    assert search == []
    runs = finals({m: study.grid[m][0] for m in methods})
    by = {(r.method, r.seed): r for r in runs}
    reuse = by[("otmdr+reuse", 0)].config
    assert reuse.optim.method == "otmdr" and reuse.efficiency.interval == 5 and reuse.efficiency.reuse is True
    plain = by[("otmdr", 0)].config
    assert plain.efficiency.interval == 1 and plain.efficiency.reuse is False
    assert by[("sgd", 1)].config.efficiency.interval == 1
    assert by[("otmdr+reuse", 1)].run_dir == tmp_path / "s" / "otmdr+reuse-seed1"  # `+` kept in folder names

    grid = parse_grid(["otmdr+reuse:efficiency.interval=2,5"], methods)
    study = Study(str(DEMO), TINY + ["efficiency.reuse_alpha=0.5"], ["otmdr", "otmdr+reuse"], [0],
                  {m: grid[m] for m in ("otmdr", "otmdr+reuse")}, tmp_path / "t")
    search, _ = plan(study)
    assert sorted(r.config.efficiency.interval for r in search) == [2, 5]  # the grid wins over the variant
    assert all(r.method == "otmdr+reuse" and r.config.efficiency.reuse for r in search)
    assert all(r.config.efficiency.reuse_alpha == 0.5 for r in search)  # the study's own --set stays
    assert {r.run_dir.name for r in search} == {"otmdr+reuse-interval=2-seed1000", "otmdr+reuse-interval=5-seed1000"}


def test_plan_refuses_sgd_with_a_variant(tmp_path):
    study = Study(str(DEMO), TINY, ["sgd+late"], [0], parse_grid([], ["sgd+late"]), tmp_path / "s")
    with pytest.raises(ConfigError, match="plain SGD"):
        plan(study)


# -------------------------------------------------- the optimizer's part (needs issue 25's optimizer)
def test_predicted_compute_covers_the_variants():
    sam_k5 = load_config(str(DEMO), ["optim.method=sam", *VARIANTS["interval"]])
    assert gradient_evaluations_per_step(sam_k5) == pytest.approx((2 + 4) / 5)
    asam_k5 = load_config(str(DEMO), ["optim.method=asam", *VARIANTS["interval"]])
    assert gradient_evaluations_per_step(asam_k5) == pytest.approx((2 + 4) / 5)
    assert gradient_evaluations_per_step(load_config(str(DEMO), ["optim.method=sam"])) == pytest.approx(2.0)


def test_a_study_with_a_variant_records_its_settings_and_full_steps(tmp_path):
    """A tiny compare of sam+interval: the report's settings name the variant's overrides, the
    grid point's value replacing the variant's; the summary counts the sharpness-aware steps."""
    methods = ["sam+interval"]
    grid = parse_grid(["sam+interval:efficiency.interval=2,4"], methods)
    result = run_study(Study(str(DEMO), TINY, methods, [0], grid, tmp_path / "s"), log=lambda _: None)
    chosen = result["chosen"]["sam+interval"].overrides[0]
    assert result["settings"]["sam+interval"] == ["optim.method=sam", chosen]
    summary = result["summaries"]["sam+interval"][0]
    k = int(chosen.partition("=")[2])
    compute = summary["compute"]
    assert compute["predicted_per_step"] == pytest.approx((2 + k - 1) / k)
    steps = compute["steps"]  # 170 training images in batches of 20: 9 steps, the 1st, (k+1)th, ... perturbed
    assert compute["full_steps"] == len(range(0, steps, k))
    assert compute["full_step_fraction"] == pytest.approx(compute["full_steps"] / steps)
    saved = json.loads((tmp_path / "s" / "sam+interval-seed0" / "summary.json").read_text())
    assert saved["compute"]["full_steps"] == compute["full_steps"]


def test_the_loop_gives_the_optimizer_the_run_length(tmp_path):
    """``phase_start`` reads ``total_steps``, which the loop sets: half the steps are plain."""
    from otmdr.train import train

    cfg = load_config(str(DEMO), TINY + ["optim.method=sam", "train.epochs=2", "efficiency.phase_start=0.5"])
    summary = train(cfg, tmp_path / "run", log=lambda _: None)
    compute = summary["compute"]
    assert compute["steps"] == 18
    assert compute["full_steps"] == 9 and compute["full_step_fraction"] == pytest.approx(0.5)
    assert compute["gradient_evaluations"] == pytest.approx(18 + 9)


def test_the_runs_first_line_names_the_cheaper_steps(tmp_path):
    """A wrong efficiency setting must show before an hour is spent, like every other choice."""
    from otmdr.config import load_config
    from otmdr.train.loop import _cheaper_steps

    cfg = load_config(None, ["optim.method=otmdr", "efficiency.interval=5", "efficiency.reuse=true",
                             "efficiency.phase_start=0.2"])
    assert _cheaper_steps(cfg) == " (LookSAM reuse between every 5th step; plain steps until 20% of training)"
    assert _cheaper_steps(load_config(None, ["optim.method=sam"])) == ""
    assert _cheaper_steps(load_config(None, ["optim.method=sam", "efficiency.momentum_ascent=all"])) == \
        " (all ascent steps along the momentum)"
    assert _cheaper_steps(load_config(None, ["optim.method=sam", "efficiency.trigger=[0.0,2.0]"])) == \
        " (AE-SAM trigger c [0.0, 2.0])"
