"""The perturbation radius in its two parts: OT-MDR's deterministic ascent move and its Langevin
noise (``StepResult.move_norm`` / ``noise_norm``, the runs' ``perturbation_move_norm`` /
``perturbation_noise_norm``), and the far-above-nominal warning that checks the move of noisy runs."""

from __future__ import annotations

import json
import math
import signal
from pathlib import Path

import pytest
import torch

from otmdr import OTMDR, SAM
from otmdr.config import load_config
from otmdr.train import Preempted, prepare_run_dir, train
from otmdr.train import loop
from otmdr.train.loop import _health_warnings, nominal_radius
from conftest import data, grad_at, norm, tiny_mlp

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
FAST = ["train.progress=false", "model.options={hidden: [32]}"]
PARTS = ("perturbation_move_norm", "perturbation_noise_norm")


def _cfg(*overrides):
    return load_config(DEMO, FAST + list(overrides))


def _chain(model, theta0, x, y, rho, std, draws):
    """One particle's ascent chain of the default preset (merged direction, divided by its own
    norm, on consecutive halves), with the noise ``std * draws[i]`` after step i, written out by
    hand; returns the end point, the summed ascent moves and the summed noise."""
    n = len(x)
    theta = [t.clone() for t in theta0]
    move = [torch.zeros_like(t) for t in theta0]
    noise = [torch.zeros_like(t) for t in theta0]
    d = None
    for i, r in enumerate(rho):
        lo, hi = round(i * n / len(rho)), round((i + 1) * n / len(rho))
        g = grad_at(model, theta, x[lo:hi], y[lo:hi])
        d = g if d is None else [a + b for a, b in zip(d, g)]
        step = [r * u / (norm(d) + 1e-12) for u in d]
        xi = [std * z for z in _unflatten(draws[i], theta0)]
        theta = [t + s + e for t, s, e in zip(theta, step, xi)]
        move = [m + s for m, s in zip(move, step)]
        noise = [a + e for a, e in zip(noise, xi)]
    return theta, move, noise


def _unflatten(flat, like):
    return [c.view(t.shape) for c, t in zip(torch.split(flat, [t.numel() for t in like]), like)]


@pytest.mark.parametrize("particles", [1, 2])
@pytest.mark.parametrize("foreach", [True, False])
def test_one_noisy_step_against_a_hand_computed_chain(particles, foreach):
    model = tiny_mlp()
    theta0 = [p.detach().clone() for p in model.parameters()]
    x, y = data(16, seed=3)
    rho, std, seed = (0.05, 0.1), 0.01, 7
    opt = OTMDR(model, torch.optim.SGD, rho=rho, noise_std=std, particles=particles, seed=seed, foreach=foreach,
                lr=0.0)
    result = opt.step(lambda b: torch.nn.functional.cross_entropy(model(b[0]), b[1]), batch=(x, y))

    # the optimizer's generator, replayed: per particle its split's order (after the first), then
    # one draw per ascent step
    generator = torch.Generator().manual_seed(seed)
    total = sum(t.numel() for t in theta0)
    distances, moves, noises = [], [], []
    for k in range(particles):
        order = None if k == 0 else torch.randperm(len(x), generator=generator)
        draws = [torch.randn(total, generator=generator, dtype=torch.float64) for _ in rho]
        xs, ys = (x, y) if order is None else (x[order], y[order])
        end, move, noise = _chain(model, theta0, xs, ys, rho, std, draws)
        distances.append(norm([a - b for a, b in zip(end, theta0)]))
        moves.append(norm(move))
        noises.append(norm(noise))
        assert float(norm(move)) <= sum(rho) + 1e-12  # merged normalisation: at most rho1 + rho2
    mean = lambda values: torch.stack(values).mean()  # noqa: E731
    torch.testing.assert_close(result.perturbation_norm, mean(distances), rtol=1e-10, atol=0)
    assert result.move_norm is not None and result.noise_norm is not None
    torch.testing.assert_close(result.move_norm, mean(moves), rtol=1e-10, atol=0)
    torch.testing.assert_close(result.noise_norm, mean(noises), rtol=1e-10, atol=0)
    # the parts are detached measurements in the radius's dtype
    assert result.noise_norm.dtype == result.perturbation_norm.dtype and not result.noise_norm.requires_grad


def test_the_parts_add_up_to_the_radius_and_the_noise_has_its_expected_size():
    model = tiny_mlp()
    std, steps = 0.02, 2
    opt = OTMDR(model, torch.optim.SGD, rho=(0.05, 0.1), noise_std=std, seed=0, lr=0.05)
    n = sum(p.numel() for p in model.parameters())
    noise = []
    for step in range(60):
        x, y = data(16, seed=step)
        r = opt.step(lambda b: torch.nn.functional.cross_entropy(model(b[0]), b[1]), batch=(x, y))
        assert r.move_norm is not None and r.noise_norm is not None
        # ||move + noise|| is the radius: between | ||move|| - ||noise|| | and their sum
        assert abs(float(r.move_norm - r.noise_norm)) - 1e-12 <= float(r.perturbation_norm)
        assert float(r.perturbation_norm) <= float(r.move_norm + r.noise_norm) + 1e-12
        assert 0.0 < float(r.move_norm) <= 0.15 + 1e-12
        noise.append(float(r.noise_norm))
    # ||xi|| of a sum of `steps` N(0, std^2) draws per coordinate: std sqrt(n steps) in expectation
    assert sum(noise) / len(noise) == pytest.approx(std * math.sqrt(n * steps), rel=0.03)


@pytest.mark.parametrize("make", [
    lambda m: OTMDR(m, torch.optim.SGD, rho=(0.05, 0.1), lr=0.1),
    lambda m: OTMDR(m, torch.optim.SGD, rho=(0.05, 0.1), particles=2, lr=0.1),
    lambda m: SAM(m, torch.optim.SGD, rho=0.05, lr=0.1),
    lambda m: OTMDR(m, torch.optim.SGD, rho=(0.05, 0.1), noise_std=0.0, ascent_interval=2, lr=0.1),
])
def test_without_noise_the_move_is_the_radius_and_the_noise_zero(make):
    model = tiny_mlp()
    opt = make(model)
    for step in range(3):
        x, y = data(16, seed=step)
        r = opt.step(lambda b: torch.nn.functional.cross_entropy(model(b[0]), b[1]), batch=(x, y))
        assert r.move_norm is r.perturbation_norm  # the same tensor: nothing measured twice
        assert r.noise_norm is not None and float(r.noise_norm) == 0.0
    assert not list(opt.scratch._stores.get("noise", {}))  # no noise buffers without noise


def test_a_noisy_plain_interval_step_reports_zeros():
    model = tiny_mlp()
    opt = OTMDR(model, torch.optim.SGD, rho=(0.05, 0.1), noise_std=0.01, ascent_interval=2, lr=0.1)
    results = [opt.step(lambda b: torch.nn.functional.cross_entropy(model(b[0]), b[1]), batch=data(16, seed=s))
               for s in range(2)]
    assert float(results[0].noise_norm) > 0 and float(results[0].move_norm) > 0
    assert float(results[1].perturbation_norm) == float(results[1].move_norm) == float(results[1].noise_norm) == 0.0


def test_a_bayesian_run_records_the_noise_apart_from_the_move(tmp_path):
    cfg = _cfg("model.name=bayes-mlp", "optim.method=otmdr", "otmdr.noise_std=0.01", "train.epochs=2")
    run = prepare_run_dir(tmp_path / "bnn", resume=False)
    summary = train(cfg, run, log=lambda _: None)
    move, noise = summary["perturbation_move_norm"], summary["perturbation_noise_norm"]
    assert 0.0 < move <= sum(cfg.otmdr.rho) + 1e-6  # merged normalisation: at most rho1 + rho2
    assert noise > 3 * move  # the noise dwarfs the move, as in the Bayesian studies
    # noise and move are nearly orthogonal in many dimensions: the radius is about sqrt(move^2 + noise^2)
    assert summary["perturbation_norm"] == pytest.approx(math.hypot(move, noise), rel=0.05)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(isinstance(row[key], float) for row in rows for key in PARTS)
    assert rows[-1]["perturbation_move_norm"] == move
    assert set(PARTS) <= set((run / "metrics.csv").read_text().splitlines()[0].split(","))
    # the radius (noise included) is far above the nominal 0.15, the move is not: no warning
    assert summary["perturbation_norm"] > 1.5 * nominal_radius(cfg) and "warnings" not in summary


@pytest.mark.parametrize("method", ["sgd", "sam"])
def test_noise_free_runs_record_the_radius_as_the_move(tmp_path, method):
    summary = train(_cfg(f"optim.method={method}", "train.epochs=1"), prepare_run_dir(tmp_path / method, resume=False),
                    log=lambda _: None)
    assert summary["perturbation_move_norm"] == summary["perturbation_norm"]
    assert summary["perturbation_noise_norm"] == 0.0


def test_the_radius_warning_checks_the_move_of_noisy_runs():
    row = {"epoch": 1, "train_accuracy": 0.9}
    noisy = _cfg("optim.method=otmdr", "otmdr.noise_std=0.01")
    nominal = nominal_radius(noisy)
    # the noise makes the radius large by design: the move decides
    assert _health_warnings(noisy, {**row, "perturbation_norm": 5.0, "perturbation_move_norm": 0.14}, nominal, 10) == {}
    fired = _health_warnings(noisy, {**row, "perturbation_norm": 5.0, "perturbation_move_norm": 0.4}, nominal, 10)
    assert "ascent move 0.400" in fired["radius"] and "nominal 0.150" in fired["radius"]
    # the release's normalisation allows rho1 + 2 rho2 (here 1.5 x 0.25 = 0.375)
    release = _cfg("optim.method=otmdr", "otmdr.noise_std=0.01", "otmdr.preset=release")
    nominal = nominal_radius(release)
    assert _health_warnings(release, {**row, "perturbation_norm": 5.0, "perturbation_move_norm": 0.3}, nominal,
                            10) == {}
    assert "radius" in _health_warnings(release, {**row, "perturbation_norm": 5.0, "perturbation_move_norm": 0.4},
                                        nominal, 10)
    # a row that does not know its parts (an epoch resumed from an older checkpoint): nothing to judge
    assert _health_warnings(noisy, {**row, "perturbation_norm": 5.0, "perturbation_move_norm": None}, nominal, 10) == {}
    assert _health_warnings(noisy, {**row, "perturbation_norm": 5.0}, nominal, 10) == {}
    # noise-free runs: the radius itself, as before
    plain = _cfg("optim.method=otmdr")
    assert "measured radius 0.400" in _health_warnings(plain, {**row, "perturbation_norm": 0.4},
                                                       nominal_radius(plain), 10)["radius"]


def test_a_noisy_run_whose_move_is_far_above_its_nominal_warns(tmp_path, monkeypatch):
    # a real run's move (about 0.15) against a nominal of 0.05: the warning reaches the summary
    monkeypatch.setattr(loop, "nominal_radius", lambda cfg, groups=1: 0.05)
    cfg = _cfg("optim.method=otmdr", "otmdr.noise_std=0.01", "train.epochs=1")
    summary = train(cfg, prepare_run_dir(tmp_path / "r", resume=False), log=lambda _: None)
    warnings = summary.get("warnings", [])
    assert any("ascent move" in w and "nominal 0.050" in w for w in warnings), warnings


def _stop_mid_epoch(monkeypatch, calls: int) -> None:
    """A stop request (as SIGTERM's) from the ``calls``-th check on: checks come once before the
    first epoch, after every step and after every epoch."""
    count = [0]

    def requested():
        count[0] += 1
        return signal.SIGTERM if count[0] >= calls else None

    monkeypatch.setattr(loop._signals, "requested", requested)


def _rows(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in ("seconds", "images_per_second")}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def noisy_reference(tmp_path_factory):
    cfg = _cfg("optim.method=otmdr", "otmdr.noise_std=0.01", "train.epochs=3")
    run = prepare_run_dir(tmp_path_factory.mktemp("uninterrupted") / "reference", resume=False)
    train(cfg, run, log=lambda _: None)
    return cfg, run


def _preempt(cfg, reference: Path, run: Path, monkeypatch) -> None:
    compute = json.loads((reference / "summary.json").read_text())["compute"]
    steps = compute["steps"] // cfg.train.epochs
    _stop_mid_epoch(monkeypatch, 1 + steps + 1 + 5)  # epoch 2, after its 5th step
    with pytest.raises(Preempted, match="in epoch 2 after step 5"):
        train(cfg, prepare_run_dir(run, resume=False), log=lambda _: None)
    monkeypatch.undo()


def test_a_mid_epoch_resume_keeps_the_parts_exactly(tmp_path, monkeypatch, noisy_reference):
    cfg, reference = noisy_reference
    run = tmp_path / "preempted"
    _preempt(cfg, reference, run, monkeypatch)
    partial = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["partial_epoch"]
    assert partial["perturbation_noise"] > partial["perturbation_move"] > 0
    summary = train(None, prepare_run_dir(run, resume=True), resume=True, log=lambda _: None)
    assert _rows(run) == _rows(reference)
    expected = json.loads((reference / "summary.json").read_text())
    assert [summary[k] for k in PARTS] == [expected[k] for k in PARTS]


def test_an_older_checkpoint_without_the_parts_still_resumes(tmp_path, monkeypatch, noisy_reference):
    cfg, reference = noisy_reference
    run = tmp_path / "old"
    _preempt(cfg, reference, run, monkeypatch)
    path = run / "checkpoints" / "last.pt"
    state = torch.load(path, weights_only=False)
    for key in ("perturbation_move", "perturbation_noise"):
        del state["partial_epoch"][key]
    for row in state["history"]:
        for key in PARTS:
            del row[key]
    torch.save(state, path)  # as an earlier otmdr wrote it (no checksum)
    summary = train(None, prepare_run_dir(run, resume=True), resume=True, log=lambda _: None)
    rows, expected = _rows(run), _rows(reference)
    # epoch 1 (saved without them) and epoch 2 (half of it) cannot know their parts; epoch 3 does
    assert [[row[k] for k in PARTS] for row in rows[:2]] == [[None, None], [None, None]]
    assert rows[2] == expected[2]
    assert [row["perturbation_norm"] for row in rows] == [row["perturbation_norm"] for row in expected]
    assert summary["perturbation_noise_norm"] == expected[2]["perturbation_noise_norm"]
