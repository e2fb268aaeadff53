"""benchmarks/evidence/efficiency.sh passes valid studies: every regime's methods and grids plan
(every config builds) with each variant's knob searched, the baselines' grids reaching only
their own method, and the variants' settings applied. Nothing trains: the script's `otmdr` is a
stand-in that records its arguments."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from otmdr.config import config_to_dict
from otmdr.train.grid import parse_grid
from otmdr.train.study import Study, plan

ROOT = Path(__file__).resolve().parents[1]


def _arguments(tmp_path: Path, *script_args: str, script: str = "efficiency.sh", **env_extra: str) -> list[str]:
    record = tmp_path / "args"
    fake = tmp_path / "otmdr"
    fake.write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$@" > {record}\n')
    fake.chmod(0o755)
    env = dict(os.environ, OTMDR=str(fake), PYTHON=sys.executable, EVIDENCE_DIR=str(tmp_path / "runs"))
    env.update(env_extra)
    subprocess.run(["bash", str(ROOT / "benchmarks/evidence" / script), *script_args], env=env, check=True,
                   capture_output=True, text=True)
    return record.read_text().splitlines()


def _study(tmp_path: Path, args: list[str], seeds: list[int]) -> Study:
    methods = _value(args, "--methods").split(",")
    grid = parse_grid([args[i + 1] for i, a in enumerate(args) if a == "--grid"], methods)
    overrides = [args[i + 1] for i, a in enumerate(args) if a == "--set"] + [f"data.dir={_value(args, '--data-dir')}"]
    return Study(config_path=str(ROOT / _value(args, "--config")), overrides=overrides, methods=methods, seeds=seeds,
                 grid=grid, out=Path(_value(args, "--out")))


def _value(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


REGIMES = ["digits", "fmnist-noisy", "ensembles-digits", "bnn-digits"]  # (fmnist-clean, cifar10-noisy: below)


@pytest.mark.parametrize("regime", REGIMES)
def test_every_regime_is_a_valid_study_with_the_variants_knobs_searched(tmp_path, regime):
    args = _arguments(tmp_path, regime, *(["DATA"] if regime != "digits" else []))
    assert args[0] == "compare"
    methods = _value(args, "--methods").split(",")
    grids = [args[i + 1] for i, a in enumerate(args) if a == "--grid"]
    overrides = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    grid = parse_grid(grids, methods)
    config = _value(args, "--config")
    study = Study(config_path=str(ROOT / config), overrides=overrides, methods=methods, seeds=[0, 1],
                  grid=grid, out=tmp_path / "study")
    search, _ = plan(study)  # builds every config
    configs = {(r.method, r.point.label): r.config for r in search}
    variants = ("interval", "reuse", "momentum", "momentum1") + (() if regime.startswith("fmnist") else
                                                                  ("late", "trigger"))
    for variant in variants:
        assert len(grid[f"otmdr+{variant}"]) >= 2  # the variant's own knob or radius is searched
    assert {c.efficiency.reuse for (m, _), c in configs.items() if m == "otmdr+reuse"} == {True}
    assert {c.efficiency.interval for (m, _), c in configs.items() if m == "otmdr+reuse"} == {2, 5}
    assert {c.efficiency.momentum_ascent for (m, _), c in configs.items() if m == "otmdr+momentum"} == {"all"}
    if "late" in variants:
        assert {c.efficiency.phase_start for (m, _), c in configs.items() if m == "otmdr+late"} == {0.5, 0.8}
    assert all(c.efficiency.interval == 1 and not c.efficiency.momentum_ascent != "none"
               for (m, _), c in configs.items() if "+" not in m)  # the baselines are full methods
    if regime == "digits":
        assert len(grid["sam"]) == 6 and len(grid["sam+momentum"]) == 4  # MSAM's larger radii searched apart
    elif regime.endswith("-digits"):
        model = "mlp-x3" if regime.startswith("ensembles") else "bayes-mlp"
        assert {c.model.name for c in configs.values()} == {model}
        assert len(grid["sgd"]) == 4 and len(grid["otmdr"]) == 4
    else:  # the baselines at the settings the issue-24 search chose: nothing of theirs is searched
        assert all(len(grid[m]) == 1 for m in ("sgd", "sgd@compute", "sam", "otmdr"))
        assert ("--set", "data.label_noise=0.4") in zip(args, args[1:])


def test_the_budget_regime_holds_every_variant_to_the_goal(tmp_path):
    """digits-budget: each variant's knob only at settings costing at most 1.3x SGD's gradient
    evaluations (the trigger's cost is measured: its thresholds start higher instead)."""
    from otmdr.train.compute import gradient_evaluations_per_step

    args = _arguments(tmp_path, "digits-budget")
    methods = _value(args, "--methods").split(",")
    grids = [args[i + 1] for i, a in enumerate(args) if a == "--grid"]
    study = Study(config_path=str(ROOT / _value(args, "--config")), overrides=[], methods=methods, seeds=[0],
                  grid=parse_grid(grids, methods), out=tmp_path / "study")
    search, _ = plan(study)
    for run in search:
        if "+" in run.method and "trigger" not in run.method:
            assert gradient_evaluations_per_step(run.config) <= 1.3, (run.method, run.point.label)
    assert _value(args, "--reference") == "otmdr" and _value(args, "--seeds") == "80"


def test_the_fashion_mnist_budget_regime_fixes_every_variant_within_the_goal(tmp_path):
    from otmdr.train.compute import gradient_evaluations_per_step

    args = _arguments(tmp_path, "fmnist-noisy-budget", "DATA")
    methods = _value(args, "--methods").split(",")
    grid = parse_grid([args[i + 1] for i, a in enumerate(args) if a == "--grid"], methods)
    overrides = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    study = Study(config_path=str(ROOT / _value(args, "--config")), overrides=overrides, methods=methods,
                  seeds=[0], grid=grid, out=tmp_path / "study")
    assert Path(_value(args, "--out")).name == "efficiency-fashion-mnist-mlp-noisy-budget"
    search, finals = plan(study)
    assert search == [] and all(len(points) == 1 for points in grid.values())  # nothing searched: fixed settings
    runs = finals({m: points[0] for m, points in grid.items()})
    for run in runs:
        if "+" in run.method:
            assert gradient_evaluations_per_step(run.config) <= 1.3, run.method


def test_the_fashion_mnist_budget_regime_starts_from_the_noisy_studys_runs(tmp_path):
    """The runs hard-linked (reused, not retrained); the study's report, figures and JSON not (the
    new study writes its own: a figure written in place through a link would change the original)."""
    noisy = tmp_path / "runs" / "efficiency-fashion-mnist-mlp-noisy"
    (noisy / "sgd-seed0").mkdir(parents=True)
    (noisy / "figures").mkdir()
    for name in ("sgd-seed0/summary.json", "figures/test_accuracy.png", "report.md", "summaries.json", "search.json"):
        (noisy / name).write_text("original")
    _arguments(tmp_path, "fmnist-noisy-budget", "DATA")
    copy = tmp_path / "runs" / "efficiency-fashion-mnist-mlp-noisy-budget"
    assert (copy / "sgd-seed0" / "summary.json").stat().st_ino == (noisy / "sgd-seed0" / "summary.json").stat().st_ino
    assert sorted(p.name for p in copy.iterdir()) == ["sgd-seed0"]


def test_an_unknown_regime_is_refused(tmp_path):
    env = dict(os.environ, OTMDR="false")
    result = subprocess.run(["bash", str(ROOT / "benchmarks/evidence/efficiency.sh"), "cifar"], env=env,
                            capture_output=True, text=True)
    assert result.returncode == 2 and "unknown regime cifar" in result.stderr


# regimes whose baselines are an issue-24 study's runs: (regime, that study's script, its
# environment, its folder, the settings its search chose, the variants this regime searches)
REUSING = [
    ("cifar10-noisy", "cifar10_resnet20.sh", {"REGIMES": "noisy40"}, "cifar10-resnet20-noisy40",
     {"sgd": "lr=0.05", "sgd@compute": "lr=0.1", "sam": "rho=0.01", "otmdr": "rho=[0.0025,0.005]"},
     {"otmdr+reuse": 2, "otmdr+momentum": 3}),
    ("fmnist-clean", "fashion_mnist_mlp.sh", {"REGIMES": "clean"}, "fashion-mnist-mlp-clean",
     {"sgd": "lr=0.1", "sgd@compute": "lr=0.2", "sam": "rho=0.1", "otmdr": "rho=[0.01,0.02]"},
     {"otmdr+interval": 2, "otmdr+reuse": 2, "otmdr+momentum": 4, "otmdr+momentum1": 2}),
]


@pytest.mark.parametrize("regime, script, env, folder, picked, searched", REUSING, ids=[r[0] for r in REUSING])
def test_a_reusing_regime_takes_the_studys_runs_at_its_chosen_settings(tmp_path, regime, script, env, folder, picked,
                                                                        searched):
    """The baselines are the issue-24 study's runs (its folder hard-linked, the same configs at the
    values its search chose, so --resume reuses them), the variants' knobs and momentum ascent's
    larger radii (multiples of OT-MDR's chosen one) searched on top."""
    from otmdr.train.compute import gradient_evaluations_per_step

    study_dir = tmp_path / "runs" / folder
    study_dir.mkdir(parents=True)
    (study_dir / "search.json").write_text(json.dumps([{"method": "sgd", "setting": picked["sgd"], "chosen": True}]))
    theirs_args = _arguments(tmp_path, "DATA", script=script, MATCHED="0", **env)  # the study's last compare
    base = _study(tmp_path, theirs_args, [0, 1, 2, 3, 4])
    search, base_finals = plan(base)
    chosen = {m: next(p for p in points if p.label == picked[m]) for m, points in base.grid.items()}
    (study_dir / "search.json").write_text(json.dumps(
        [{"method": r.method, "setting": r.point.label, "chosen": r.point == chosen[r.method]} for r in search]))
    args = _arguments(tmp_path, regime, "DATA")
    study = _study(tmp_path, args, [0, 1, 2, 3, 4])
    assert study.out.name == f"efficiency-{folder}"
    assert _value(args, "--reference") == "otmdr,sgd,sam"
    assert not (study.out / "search.json").exists()  # the new study writes its own report and JSON
    rho = json.loads(picked["otmdr"].removeprefix("rho="))
    radii = [json.loads(p.overrides[0].removeprefix("otmdr.rho=")) for p in study.grid["otmdr+momentum"]]
    assert [round(r[0] / rho[0], 6) for r in radii] == ([1, 5, 20] if regime == "cifar10-noisy" else [1, 5, 10, 20])
    assert all(r[1] / r[0] == pytest.approx(2) for r in radii)  # OT-MDR's two radii scaled together
    assert all(p.overrides[-1] == f"otmdr.rho={json.dumps(rho, separators=(',', ':'))}"
               for p in study.grid["otmdr+reuse"])  # LookSAM at OT-MDR's chosen radius
    mine, finals = plan(study)
    assert {m: sum(r.method == m for r in mine) for m in searched} == searched
    assert {r.method for r in mine} == set(searched)  # the baselines search nothing
    runs = finals({m: points[0] for m, points in study.grid.items()})
    theirs = {r.run_dir.name: config_to_dict(r.config) for r in base_finals(chosen)}
    baselines = [r for r in runs if "+" not in r.method]
    assert len(baselines) == 20 and all(theirs[r.run_dir.name] == config_to_dict(r.config) for r in baselines)
    assert baselines[0].run_dir.parent == study.out
    if regime == "cifar10-noisy":
        assert ("--set", "optim.lr=0.05") in zip(theirs_args, theirs_args[1:])  # SAM, OT-MDR at SGD's chosen rate
        for run in runs:
            if run.method in ("otmdr+interval", "otmdr+momentum"):
                assert gradient_evaluations_per_step(run.config) <= 1.3, run.method


@pytest.mark.parametrize("regime, folder", [("cifar10-noisy", "cifar10-resnet20-noisy40"),
                                            ("fmnist-clean", "fashion-mnist-mlp-clean")])
def test_a_reusing_regime_needs_its_study_first(tmp_path, regime, folder):
    env = dict(os.environ, OTMDR="false", PYTHON=sys.executable, EVIDENCE_DIR=str(tmp_path))
    result = subprocess.run(["bash", str(ROOT / "benchmarks/evidence/efficiency.sh"), regime, "DATA"], env=env,
                            capture_output=True, text=True)
    assert result.returncode == 2 and f"{folder}/search.json does not exist" in result.stderr
    assert not any(tmp_path.glob("efficiency-*"))


def test_the_extended_cifar_regime_widens_two_grids_and_reuses_every_run_of_the_first(tmp_path):
    """cifar10-noisy-extended searches momentum ascent at 0.2x and 10x OT-MDR's radius too and LookSAM at half
    its radius too, on top of cifar10-noisy: every run that study planned is planned again with the
    same folder name and configuration (so --resume reuses it), from a hard-linked copy of its folder."""
    study_dir = tmp_path / "runs" / "cifar10-resnet20-noisy40"
    study_dir.mkdir(parents=True)
    picked = {"sgd": "lr=0.05", "sgd@compute": "lr=0.1", "sam": "rho=0.01", "otmdr": "rho=[0.0025,0.005]"}
    (study_dir / "search.json").write_text(json.dumps([{"method": m, "setting": s, "chosen": True}
                                                       for m, s in picked.items()]))
    script = str(ROOT / "benchmarks/evidence/efficiency.sh")
    env = dict(os.environ, OTMDR="false", PYTHON=sys.executable, EVIDENCE_DIR=str(tmp_path / "runs"))
    refused = subprocess.run(["bash", script, "cifar10-noisy-extended", "DATA"], env=env, capture_output=True,
                             text=True)
    assert refused.returncode == 2 and "run cifar10-noisy first" in refused.stderr
    first = _study(tmp_path, _arguments(tmp_path, "cifar10-noisy", "DATA"), [0, 1, 2, 3, 4])
    (first.out / "otmdr+reuse-seed0").mkdir()
    (first.out / "otmdr+reuse-seed0" / "summary.json").write_text("{}")
    extended = _study(tmp_path, _arguments(tmp_path, "cifar10-noisy-extended", "DATA"), [0, 1, 2, 3, 4])
    assert extended.out.name == "efficiency-cifar10-resnet20-noisy40-extended"
    summary = "otmdr+reuse-seed0/summary.json"
    assert (extended.out / summary).stat().st_ino == (first.out / summary).stat().st_ino
    radii = {m: [json.loads(p.overrides[-1].split("=", 1)[1])[0] / 0.0025 for p in extended.grid[m]]
             for m in ("otmdr+momentum", "otmdr+reuse")}
    assert radii["otmdr+momentum"] == pytest.approx([0.2, 1, 5, 10, 20])
    assert sorted(set(radii["otmdr+reuse"])) == pytest.approx([0.5, 1])
    searched_first, finals_first = plan(first)
    searched, finals = plan(extended)
    mine = {r.run_dir.relative_to(extended.out): config_to_dict(r.config) for r in searched}
    assert len(mine) == len(searched_first) + 4  # momentum at 0.2x and 10x, LookSAM (k = 2, 5) at half the radius
    for run in searched_first:
        assert mine[run.run_dir.relative_to(first.out)] == config_to_dict(run.config), run.run_dir
    chosen = {m: points[0] for m, points in first.grid.items()}
    again = {r.run_dir.name: config_to_dict(r.config) for r in finals(chosen)}
    assert all(again[r.run_dir.name] == config_to_dict(r.config) for r in finals_first(chosen))
