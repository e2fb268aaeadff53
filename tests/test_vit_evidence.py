"""benchmarks/evidence/vit_cifar10.sh passes valid studies: for both label regimes the methods and
grids plan (every config builds) on a ViT-Tiny with AdamW as every method's base, the base alone
being plain AdamW; the base's lr is searched first and SAM and OT-MDR wrap AdamW at the lr it
chose, the second stage reusing the first's runs; the noisy regime sets 40% noise without
augmentation; the search seed is 1000 apart from the evaluation seeds. Nothing trains: the
script's `otmdr` is a stand-in that records its arguments and writes a search.json choosing lr 3e-4."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from otmdr.train.grid import parse_grid
from otmdr.config import config_to_dict
from otmdr.train.study import Study, plan

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks/evidence/vit_cifar10.sh"


def _calls(tmp_path: Path, extra_env: dict[str, str] | None = None) -> tuple[list[list[str]], str]:
    """Each `otmdr` call's arguments (one per regime), and the script's output."""
    record = tmp_path / "calls"
    fake = tmp_path / "otmdr"
    chosen = json.dumps([{"method": "sgd", "setting": "lr=0.001", "chosen": False},
                         {"method": "sgd", "setting": "lr=0.0003", "chosen": True},
                         {"method": "sam", "setting": "lr=0.003", "chosen": True}])
    fake.write_text(f'#!/usr/bin/env bash\n{{ printf "%s\\n" "$@"; echo "--END--"; }} >> {record}\n'
                    'while [ $# -gt 0 ]; do [ "$1" = --out ] && mkdir -p "$2" && '
                    f"echo '{chosen}' > \"$2/search.json\"; shift; done\n")
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("REGIMES", "SMOKE", "VIT")}
    env.update(OTMDR=str(fake), PYTHON=sys.executable, EVIDENCE_DIR=str(tmp_path / "runs"))
    env.update(extra_env or {})
    result = subprocess.run(["bash", str(SCRIPT), "DATA"], env=env, check=True, capture_output=True, text=True)
    calls, current = [], []
    for line in record.read_text().splitlines():
        if line == "--END--":
            calls.append(current)
            current = []
        else:
            current.append(line)
    return calls, result.stdout


def _value(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


def _study(tmp_path: Path, args: list[str], seeds: list[int]) -> tuple[Study, dict]:
    methods = _value(args, "--methods").split(",")
    grids = [args[i + 1] for i, a in enumerate(args) if a == "--grid"]
    overrides = [args[i + 1] for i, a in enumerate(args) if a == "--set"] + [f"data.dir={_value(args, '--data-dir')}"]
    grid = parse_grid(grids, methods)
    study = Study(config_path=str(ROOT / _value(args, "--config")), overrides=overrides, methods=methods, seeds=seeds,
                  grid=grid, out=tmp_path / "study", search_seed_count=int(_value(args, "--search-seeds")))
    return study, grid


def test_both_regimes_plan_a_valid_tuned_study_of_adamw_sam_and_otmdr_on_vit_tiny(tmp_path):
    calls, out = _calls(tmp_path)
    assert len(calls) == 4  # noisy40, then clean: the base alone, then everything
    for (base_args, args), regime in zip((calls[:2], calls[2:]), ("noisy40", "clean")):
        assert base_args[0] == args[0] == "compare"
        assert _value(base_args, "--methods") == "sgd" and _value(base_args, "--reference") == "sgd"
        assert _value(args, "--methods") == "sgd,sgd@compute,sam,otmdr"
        assert _value(args, "--reference") == "sgd,sam" and "--resume" in args and "--resume" in base_args
        assert _value(args, "--out") == _value(base_args, "--out") and _value(args, "--out").endswith(
            f"cifar10-vit-tiny-{regime}")
        seeds = list(range(int(_value(args, "--seeds"))))
        assert seeds == [0, 1, 2]
        study, grid = _study(tmp_path / regime, args, seeds)
        assert {m: len(points) for m, points in grid.items()} == {"sgd": 4, "sgd@compute": 5, "sam": 3, "otmdr": 3}
        search, finals = plan(study)  # builds every config
        assert {r.seed for r in search} == {1000}  # one search seed, apart from the evaluation seeds
        assert len(search) == 15
        configs = [r.config for r in search]
        assert {c.model.name for c in configs} == {"vit-tiny"}
        assert {c.optim.base for c in configs} == {"adamw"}
        assert {c.data.train_limit for c in configs} == {5000}
        assert {c.train.label_smoothing for c in configs} == {0.0}
        assert {c.schedule.warmup_epochs for c in configs if c.train.epochs == 15} == {2}
        lrs = {m: sorted({r.config.optim.lr for r in search if r.method == m}) for m in grid}
        assert lrs["sgd"] == lrs["sgd@compute"][1:] == [0.0001, 0.0003, 0.001, 0.003] and lrs["sgd@compute"][0] == 3e-5
        assert lrs["sam"] == lrs["otmdr"] == [0.0003]  # the lr the base alone chose (search.json), not its rival's
        assert sorted({r.config.sam.rho for r in search if r.method == "sam"}) == [0.02, 0.05, 0.1]
        assert sorted(tuple(r.config.otmdr.rho) for r in search if r.method == "otmdr") == [
            (0.01, 0.02), (0.02, 0.04), (0.04, 0.08)]
        # sgd@compute trains AdamW at SAM's gradient evaluations: twice the epochs, the warm-up scaled
        assert {(r.config.train.epochs, r.config.schedule.warmup_epochs) for r in search
                if r.method == "sgd@compute"} == {(30, 4.0)}
        noisy = regime == "noisy40"
        for c in configs:
            assert c.data.label_noise == (0.4 if noisy else 0.0)
            assert (c.data.crop_padding, c.data.flip) == ((0, False) if noisy else (4, True))
        chosen = {method: points[0] for method, points in grid.items()}
        assert {(r.method, r.seed) for r in finals(chosen)} == {(m, s) for m in grid for s in seeds}
        # the first stage's runs are the second's (same folders, same configs): --resume reuses them
        base_search, base_finals = plan(_study(tmp_path / regime, base_args, seeds)[0])
        again = {r.run_dir: config_to_dict(r.config) for r in search}
        assert base_search and all(again[r.run_dir] == config_to_dict(r.config) for r in base_search)
        assert [config_to_dict(r.config) for r in base_finals({"sgd": grid["sgd"][0]})] == [
            config_to_dict(r.config) for r in finals(chosen) if r.method == "sgd"]
    assert "benchmarks/collect_report.py" in out and "cifar10-vit-tiny-noisy40 cifar10-vit-tiny-noisy40" in out
    assert "the base alone chose lr 0.0003" in out


def test_the_base_alone_is_plain_adamw(tmp_path):
    """optim.method=sgd with optim.base=adamw builds torch.optim.AdamW itself (nothing around it),
    at the searched lr and the config's decoupled weight decay; sam and otmdr wrap AdamW."""
    from otmdr.optim import OTMDR, SAM
    from otmdr.train.builders import build_optimizer
    from otmdr.train.compute import gradient_evaluations_per_step

    calls, _ = _calls(tmp_path, {"REGIMES": "noisy40", "VIT": "vit-mini"})  # vit-mini: the same code, faster
    study, _ = _study(tmp_path, calls[-1], [0])
    search, _ = plan(study)
    model = torch.nn.Linear(4, 2)
    for run in search:
        assert run.config.model.name == "vit-mini"
        optimizer = build_optimizer(run.config, model)
        if run.method.startswith("sgd"):
            assert type(optimizer) is torch.optim.AdamW
            assert optimizer.defaults["lr"] == run.config.optim.lr
            assert optimizer.defaults["weight_decay"] == 0.05
            assert gradient_evaluations_per_step(run.config) == 1.0
        else:
            assert type(optimizer) is (OTMDR if run.method == "otmdr" else SAM)
            assert isinstance(optimizer.base_optimizer, torch.optim.AdamW)
            assert gradient_evaluations_per_step(run.config) == 2.0


def test_smoke_runs_the_same_grids_at_a_toy_size(tmp_path):
    calls, _ = _calls(tmp_path, {"SMOKE": "1", "REGIMES": "clean", "SMOKE_DIR": str(tmp_path / "smoke")})
    (_, args) = calls
    assert _value(args, "--seeds") == "1"
    assert _value(args, "--out") == str(tmp_path / "smoke" / "cifar10-vit-mini-clean")  # not EVIDENCE_DIR
    study, grid = _study(tmp_path, args, [0])
    search, _ = plan(study)
    assert len(search) == 15 and [len(points) for points in grid.values()] == [4, 5, 3, 3]
    assert {(r.config.model.name, r.config.data.train_limit, r.config.data.test_limit) for r in search} == {
        ("vit-mini", 256, 256)}
    assert {r.config.train.epochs for r in search if r.method != "sgd@compute"} == {1}


def test_an_unknown_regime_is_refused(tmp_path):
    env = dict(os.environ, OTMDR="false", REGIMES="noisy20")
    result = subprocess.run(["bash", str(SCRIPT), "DATA"], env=env, capture_output=True, text=True)
    assert result.returncode == 2 and "unknown regime 'noisy20'" in result.stderr


def test_the_data_argument_is_required():
    result = subprocess.run(["bash", str(SCRIPT)], env=dict(os.environ, OTMDR="false"),
                            capture_output=True, text=True)
    assert result.returncode != 0 and "usage" in result.stderr
