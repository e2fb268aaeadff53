"""Compute accounting: the gradient evaluations a step runs (measured by the optimizer and the
loop) equal what train.compute predicts from the config, and survive a resume."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from torch import nn

from otmdr.config import load_config
from otmdr.optim import OTMDR, SAM
from otmdr.optim.otmdr import passes_per_step
from otmdr.train import compute, prepare_run_dir, train
from otmdr.train.compute import gradient_evaluations_per_step, machine_info
from conftest import train_stopped_at

# 256 training images in 4 batches of 64: every part of the splits below is a whole number of images
TINY = ["data.name=digits", "data.train_limit=256", "data.val_fraction=0", "data.test_limit=128",
        "data.batch_size=64", "train.epochs=1", "train.progress=false", "train.threads=1",
        "model.options={hidden: [16]}", "optim.lr=0.05", "bayes.test_samples=2"]


@pytest.mark.parametrize(("overrides", "expected"), [
    (["optim.method=sgd"], 1.0),
    (["optim.method=sam"], 2.0),
    (["optim.method=asam"], 2.0),
    (["optim.method=otmdr", "otmdr.rho=[0.05]", "otmdr.noise_std=0.01"], 2.0),  # one noisy step (no noise: SAM)
    (["optim.method=otmdr", "otmdr.rho=[0.05,0.1]"], 2.0),
    (["optim.method=otmdr", "otmdr.particles=2"], 4.0),
    (["optim.method=otmdr", "otmdr.split=[0.25,0.5]"], 1.75),
    (["optim.method=sam", "model.name=mlp-x2", "ensemble.regime=per-member"], 2.0),
    (["optim.method=otmdr", "model.name=bayes-mlp"], 2.0),
], ids=["sgd", "sam", "asam", "otmdr-1", "otmdr-2", "particles", "split", "ensemble", "bayes"])
def test_the_predicted_count_is_the_measured_one(tmp_path, overrides, expected):
    cfg = load_config(None, TINY + overrides)
    assert gradient_evaluations_per_step(cfg) == expected
    run = prepare_run_dir(tmp_path / "run", resume=False)
    summary = train(cfg, run, log=lambda _: None)
    count = summary["compute"]
    assert count["steps"] == 4 and count["predicted_per_step"] == expected
    assert count["per_step"] == expected and count["gradient_evaluations"] == 4 * expected
    assert count["train_seconds"] == pytest.approx(summary["history"][0]["seconds"])
    with open(run / "metrics.csv", newline="") as table:
        rows = list(csv.DictReader(table))
    assert float(rows[-1]["gradient_evaluations"]) == 4 * expected
    assert set(summary["machine"]) == {"cpu", "machine", "torch", "threads", "device"}
    assert summary["machine"]["device"] == "cpu" and summary["machine"]["threads"] == 1


def _tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(8, 4, generator=generator), torch.randint(0, 3, (8,), generator=generator)


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_the_one_call_step_counts_its_parts_and_plain_steps(micro_batches):
    model = _tiny_model()
    opt = OTMDR(model, rho=(0.05, 0.1), split=(0.25, 0.5), particles=2, ascent_interval=2, lr=0.1)
    x, y = _batch()
    counts = [opt.step(lambda b: nn.functional.cross_entropy(model(b[0]), b[1]), batch=(x, y),
                       micro_batches=micro_batches).gradient_evaluations for _ in range(4)]
    assert counts == [2 * (1 + 0.75), 1.0] * 2  # perturbed steps: 2 particles x (parts + full pass)
    assert opt.gradient_evaluations == sum(counts) == 4 * passes_per_step(opt.config)


def test_the_closure_form_counts_each_call():
    model = _tiny_model()
    opt = OTMDR(model, rho=(0.05, 0.1), lr=0.1)
    x, y = _batch()
    calls = 0

    def closure() -> torch.Tensor:
        nonlocal calls
        calls += 1
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(closure)
    assert opt.gradient_evaluations == calls == 3 * passes_per_step(opt.config, closure_form=True) == 9
    assert opt.last_step is not None and opt.last_step.gradient_evaluations == 3


def test_first_and_second_step_count_and_the_state_dict_keeps_the_total():
    model = _tiny_model()
    opt = SAM(model.parameters(), lr=0.1)
    x, y = _batch()
    for _ in range(2):
        nn.functional.cross_entropy(model(x), y).backward()
        opt.first_step(zero_grad=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.second_step(zero_grad=True)
    assert opt.gradient_evaluations == 4.0
    state = opt.state_dict()
    other = SAM(_tiny_model().parameters(), lr=0.1)
    other.load_state_dict(state)
    assert other.gradient_evaluations == 4.0
    old = {**state, "otmdr": {k: v for k, v in state["otmdr"].items() if k != "gradient_evaluations"}}
    other.load_state_dict(old)  # saved before the count existed: loads, counting from 0
    assert other.gradient_evaluations == 0.0


def test_a_resumed_run_ends_with_the_uninterrupted_count(tmp_path):
    # 250 images: the last batch of 58 splits into parts of rounded sizes, so the count is no
    # multiple of the prediction, and only an exact continuation gives the same total
    cfg = load_config(None, TINY + ["data.train_limit=250", "train.epochs=2", "optim.method=otmdr",
                                    "otmdr.split=[0.3,0.3]"])
    full = train(cfg, prepare_run_dir(tmp_path / "full", resume=False), log=lambda _: None)

    part = train_stopped_at(cfg, tmp_path / "part", "epoch 1/2")
    resumed = train(None, prepare_run_dir(part, resume=True), resume=True, log=lambda _: None)
    assert resumed["compute"]["gradient_evaluations"] == full["compute"]["gradient_evaluations"]
    assert resumed["compute"]["steps"] == full["compute"]["steps"] == 8
    assert full["compute"]["per_step"] != full["compute"]["predicted_per_step"]  # the rounded parts
    assert full["compute"]["per_step"] == pytest.approx(full["compute"]["predicted_per_step"], rel=0.05)
    rows = [json.loads(line) for line in (part / "metrics.jsonl").read_text().splitlines()]
    assert [r["gradient_evaluations"] for r in rows] == [r["gradient_evaluations"] for r in full["history"]]


def test_the_cpu_model_falls_back_when_proc_cpuinfo_is_missing(monkeypatch):
    assert isinstance(compute.cpu_model(), str) and compute.cpu_model()
    real = compute.Path
    monkeypatch.setattr(compute, "Path", lambda _: real("/nonexistent/cpuinfo"))
    monkeypatch.setattr(compute.platform, "processor", lambda: "")
    assert compute.cpu_model() == "unknown"
    assert machine_info("cpu")["cpu"] == "unknown"


def test_a_report_names_every_cpu_model_its_runs_trained_on():
    """A study resumed on another machine (benchmarks/restore_runs.py) may hold runs of two CPU
    models; its report's header says so, with the count of each, since runs are bit-exact only
    within a model."""
    from otmdr.report.compare import _cpus

    def run(cpu: str) -> dict:
        return {"machine": {"cpu": cpu}}

    assert _cpus({"sgd": [run("EPYC A"), run("EPYC A")], "sam": [run("EPYC A")]}) == "CPU EPYC A"
    mixed = _cpus({"sgd": [run("EPYC A"), run("Xeon B")], "sam": [run("EPYC A")]})
    assert mixed.startswith("CPUs EPYC A (2 runs), Xeon B (1 run): ") and "bit-exact" in mixed
    assert _cpus({"sgd": [{}]}) == f"CPU {compute.cpu_model()}"  # runs from before the machine block
