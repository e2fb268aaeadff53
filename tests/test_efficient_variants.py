"""The cheaper sharpness-aware steps (issue 25) against references written out by hand:
interval and LookSAM reuse, the late phase, AE-SAM's trigger and MSAM's momentum ascent; their
cost accounting, exact resume, DDP and GradScaler behaviour, and the refusals."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from conftest import ce, data, grad_at, join_gloo_group, leave_gloo_group, norm, tiny_mlp
from otmdr import OTMDR, SAM
from otmdr.optim.otmdr import passes_per_step

LR, MOMENTUM = 0.1, 0.9


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def _batches(steps, n=16):
    return [data(n, seed=10 + t) for t in range(steps)]


def _sgd_step(model, base, grads):
    for p, g in zip(model.parameters(), grads):
        p.grad = g.clone()
    base.step()


def _sam_point(theta, g, rho):
    scale = rho / (norm(g) + 1e-12)
    return [t + scale * d for t, d in zip(theta, g)]


def _dot(a, b):
    return sum((x * y).sum() for x, y in zip(a, b))


def _run(opt, model, batches, kinds=None):
    results = [opt.step(ce(model), batch=b) for b in batches]
    if kinds is not None:
        kinds.extend(r.kind for r in results)
    return results


def _assert_same_weights(model, twin, exact=False):
    for p, q in zip(model.parameters(), twin.parameters()):
        if exact:
            assert torch.equal(p, q)
        else:
            torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------ references
def test_looksam_reuse_equals_the_hand_written_looksam():
    """Every k-th step SAM, storing g_v = g_s - (<g_s, g>/||g||^2) g; in between the plain
    gradient plus alpha ||g|| / ||g_v|| g_v (Liu et al. 2022)."""
    model, twin = tiny_mlp(), tiny_mlp()
    opt = SAM(model, torch.optim.SGD, rho=0.05, ascent_interval=3, reuse=True, reuse_alpha=0.7, lr=LR,
              momentum=MOMENTUM)
    base = torch.optim.SGD(twin.parameters(), lr=LR, momentum=MOMENTUM)
    batches = _batches(8)
    kinds: list[str] = []
    _run(opt, model, batches, kinds)
    stored = None
    for t, (x, y) in enumerate(batches):
        theta = _params(twin)
        g = grad_at(twin, theta, x, y)
        if t % 3 == 0:
            g_s = grad_at(twin, _sam_point(theta, g, 0.05), x, y)
            coefficient = _dot(g_s, g) / norm(g) ** 2
            stored = [a - coefficient * b for a, b in zip(g_s, g)]
            final = g_s
        else:
            scale = 0.7 * norm(g) / (norm(stored) + 1e-12)
            final = [a + scale * b for a, b in zip(g, stored)]
        _sgd_step(twin, base, final)
    _assert_same_weights(model, twin)
    assert kinds == ["full", "reuse", "reuse"] * 2 + ["full", "reuse"]
    assert opt.full_steps == 3


def test_late_phase_is_plain_sgd_then_sam():
    model, twin = tiny_mlp(), tiny_mlp()
    opt = SAM(model, torch.optim.SGD, rho=0.05, phase_start=0.5, total_steps=7, lr=LR, momentum=MOMENTUM)
    base = torch.optim.SGD(twin.parameters(), lr=LR, momentum=MOMENTUM)
    batches = _batches(7)
    kinds: list[str] = []
    _run(opt, model, batches, kinds)
    for t, (x, y) in enumerate(batches):
        theta = _params(twin)
        g = grad_at(twin, theta, x, y)
        _sgd_step(twin, base, g if t < 4 else grad_at(twin, _sam_point(theta, g, 0.05), x, y))  # ceil(3.5) plain
    _assert_same_weights(model, twin)
    assert kinds == ["plain"] * 4 + ["full"] * 3


def test_trigger_equals_the_hand_written_ae_sam():
    """AE-SAM: mean and variance of ||g||^2 updated first (decay delta), SAM when ||g||^2 >=
    mean + c_t std with c_t linear from lambda1 to lambda2 over the run, else SGD."""
    steps = 12
    model, twin = tiny_mlp(), tiny_mlp()
    opt = SAM(model, torch.optim.SGD, rho=0.05, trigger=(-1.0, 1.0), trigger_decay=0.8, total_steps=steps, lr=LR,
              momentum=MOMENTUM)
    base = torch.optim.SGD(twin.parameters(), lr=LR, momentum=MOMENTUM)
    batches = _batches(steps)
    kinds: list[str] = []
    results = _run(opt, model, batches, kinds)
    mean = var = 0.0
    expected = []
    for t, (x, y) in enumerate(batches):
        theta = _params(twin)
        g = grad_at(twin, theta, x, y)
        squared = float(norm(g)) ** 2
        mean = 0.8 * mean + 0.2 * squared
        var = 0.8 * var + 0.2 * (squared - mean) ** 2
        fire = squared >= mean + (-1.0 + 2.0 * t / (steps - 1)) * math.sqrt(var)
        expected.append("full" if fire else "plain")
        _sgd_step(twin, base, grad_at(twin, _sam_point(theta, g, 0.05), x, y) if fire else g)
    assert kinds == expected
    assert "full" in kinds and "plain" in kinds  # the test exercises both branches
    _assert_same_weights(model, twin)
    assert [r.gradient_evaluations for r in results] == [2.0 if k == "full" else 1.0 for k in kinds]


def test_otmdr_trigger_that_never_fires_is_sgd_on_the_whole_batch():
    """A declined OT-MDR step has seen half the batch: the other half completes the gradient."""
    model, twin = tiny_mlp(), tiny_mlp()
    opt = OTMDR(model, torch.optim.SGD, rho=(0.05, 0.1), trigger=1e6, lr=LR, momentum=MOMENTUM)
    base = torch.optim.SGD(twin.parameters(), lr=LR, momentum=MOMENTUM)
    batches = _batches(6, n=15)  # odd: parts of 7 and 8, weighted by their sizes
    results = _run(opt, model, batches)
    for x, y in batches:
        _sgd_step(twin, base, grad_at(twin, _params(twin), x, y))
    _assert_same_weights(model, twin)
    assert all(r.kind == "plain" for r in results)
    assert opt.gradient_evaluations == pytest.approx(6.0)


def test_otmdr_trigger_that_always_fires_is_otmdr_bit_for_bit():
    model, twin = tiny_mlp(), tiny_mlp()
    opt = OTMDR(model, torch.optim.SGD, rho=(0.05, 0.1), trigger=-1e6, lr=LR, momentum=MOMENTUM)
    plain = OTMDR(twin, torch.optim.SGD, rho=(0.05, 0.1), lr=LR, momentum=MOMENTUM)
    batches = _batches(5)
    _run(opt, model, batches)
    _run(plain, twin, batches)
    _assert_same_weights(model, twin, exact=True)
    assert opt.full_steps == 5


def test_msam_equals_the_hand_written_momentum_ascent():
    """MSAM (Becker et al. 2024): perturb to theta - rho m / ||m|| with the base optimizer's
    momentum m, one pass there; the first step (no momentum yet) is plain SGD."""
    model, twin = tiny_mlp(), tiny_mlp()
    opt = SAM(model, torch.optim.SGD, rho=0.3, momentum_ascent="all", lr=LR, momentum=MOMENTUM)
    base = torch.optim.SGD(twin.parameters(), lr=LR, momentum=MOMENTUM)
    batches = _batches(6)
    results = _run(opt, model, batches)
    for t, (x, y) in enumerate(batches):
        theta = _params(twin)
        if t == 0:
            point = theta
        else:
            m = [base.state[p]["momentum_buffer"] for p in twin.parameters()]
            point = [a - 0.3 / (norm(m) + 1e-12) * b for a, b in zip(theta, m)]
        _sgd_step(twin, base, grad_at(twin, point, x, y))
    _assert_same_weights(model, twin)
    assert [r.kind for r in results] == ["plain"] + ["full"] * 5
    assert all(r.gradient_evaluations == 1.0 for r in results)
    with_logits = opt.step(lambda b: (lambda logits: (F.cross_entropy(logits, b[1]), logits))(model(b[0])),
                           batch=data())
    assert with_logits.outputs is not None and with_logits.outputs.shape == (16, 4)  # the only pass's outputs
    assert float(results[-1].perturbation_norm) == pytest.approx(0.3)


def test_otmdr_momentum_first_step_then_a_gradient_step():
    """OT-MDR with momentum_ascent="first": step 1 against the momentum (no pass), step 2 along
    the second half's gradient there, then the full-batch gradient at the end point."""
    model, twin = tiny_mlp(), tiny_mlp()
    opt = OTMDR(model, torch.optim.SGD, rho=(0.05, 0.1), momentum_ascent="first", lr=LR, momentum=MOMENTUM)
    base = torch.optim.SGD(twin.parameters(), lr=LR, momentum=MOMENTUM)
    batches = _batches(5)
    results = _run(opt, model, batches)
    for t, (x, y) in enumerate(batches):
        theta = _params(twin)
        if t == 0:
            _sgd_step(twin, base, grad_at(twin, theta, x, y))
            continue
        m = [base.state[p]["momentum_buffer"] for p in twin.parameters()]
        first = [a - 0.05 / (norm(m) + 1e-12) * b for a, b in zip(theta, m)]
        g2 = grad_at(twin, first, x[8:], y[8:])
        _sgd_step(twin, base, grad_at(twin, _sam_point(first, g2, 0.1), x, y))
    _assert_same_weights(model, twin)
    assert [r.gradient_evaluations for r in results] == [1.0] + [1.5] * 4


# ------------------------------------------------------------------------------ accounting
VARIANTS = {
    "interval": dict(ascent_interval=5),
    "reuse": dict(ascent_interval=5, reuse=True),
    "late": dict(phase_start=0.5),
    "momentum all": dict(momentum_ascent="all"),
    "momentum first": dict(momentum_ascent="first"),
    "trigger": dict(trigger=(-1.0, 1.0)),
}


@pytest.mark.parametrize("options", VARIANTS.values(), ids=VARIANTS.keys())
def test_measured_cost_matches_the_prediction(options):
    steps = 20
    model = tiny_mlp()
    opt = OTMDR(model, torch.optim.SGD, rho=(0.05, 0.1), total_steps=steps, lr=LR, momentum=MOMENTUM, **options)
    results = _run(opt, model, _batches(steps))
    measured = [r.gradient_evaluations for r in results]
    predicted = passes_per_step(opt.config)
    if "trigger" in options:  # the prediction is the bound; each step is a full one or a plain one
        assert all(m in (1.0, 2.0) for m in measured) and sum(measured) <= predicted * steps
        assert opt.full_steps == sum(m == 2.0 for m in measured)
    elif "momentum_ascent" in options:  # the first step has no momentum yet: plain
        assert measured[0] == 1.0 and all(m == pytest.approx(predicted) for m in measured[1:])
    else:
        assert sum(measured) == pytest.approx(predicted * steps)
    assert opt.gradient_evaluations == pytest.approx(sum(measured))
    assert predicted < 2.0 or "trigger" in options


def test_looksam_keeps_two_buffers_and_never_writes_into_a_loaded_state():
    """The stored component is built in the clean gradient's buffer and the two trade places:
    after the first perturbed step no step allocates a parameter-sized tensor for it (the same
    two storages per parameter all run long), and a loaded state dict is copied, not overwritten."""
    model = tiny_mlp()
    opt = OTMDR(model, torch.optim.SGD, rho=(0.05, 0.1), ascent_interval=2, reuse=True, lr=LR, momentum=MOMENTUM)

    def storages():
        clean = opt.scratch.get("clean", list(opt._reuse))
        return {t.data_ptr() for t in [*opt._reuse.values(), *clean]}

    batches = _batches(12)
    _run(opt, model, batches[:3])
    held = storages()
    assert len(held) == 2 * len(opt._reuse) == 2 * len(list(model.parameters()))
    for batch in batches[3:]:
        _run(opt, model, [batch])
        assert storages() == held
    saved = opt.state_dict()
    kept = copy.deepcopy(saved)
    twin = tiny_mlp()
    twin.load_state_dict(model.state_dict())
    opt_twin = OTMDR(twin, torch.optim.SGD, rho=(0.05, 0.1), ascent_interval=2, reuse=True, lr=LR, momentum=MOMENTUM)
    opt_twin.load_state_dict(saved)
    _run(opt_twin, twin, _batches(4))
    for i, c in kept["otmdr"]["reuse"].items():
        assert torch.equal(saved["otmdr"]["reuse"][i], c)


@pytest.mark.parametrize("options", VARIANTS.values(), ids=VARIANTS.keys())
def test_resume_is_bit_exact(options):
    """Everything a variant carries between steps (stored component, trigger statistics, the
    step count its schedule reads) is in the state dict."""
    steps, cut = 10, 4
    batches = _batches(steps)

    def make(model):
        return OTMDR(model, torch.optim.SGD, rho=(0.05, 0.1), total_steps=steps, lr=LR, momentum=MOMENTUM,
                     **options)

    straight = tiny_mlp()
    opt = make(straight)
    _run(opt, straight, batches)

    first = tiny_mlp()
    opt_first = make(first)
    _run(opt_first, first, batches[:cut])
    saved = copy.deepcopy((first.state_dict(), opt_first.state_dict()))
    resumed = tiny_mlp(seed=5)
    resumed.load_state_dict(saved[0])
    opt_resumed = make(resumed)
    opt_resumed.load_state_dict(saved[1])
    _run(opt_resumed, resumed, batches[cut:])
    _assert_same_weights(straight, resumed, exact=True)
    assert (opt_resumed.full_steps, opt_resumed.step_count) == (opt.full_steps, opt.step_count)


def test_grad_scaler_sees_the_same_trigger_decisions():
    """The trigger compares the unscaled gradient norm: a GradScaler changes no decision."""
    kinds: dict[bool, list[str]] = {True: [], False: []}
    for scaled in (False, True):
        model = tiny_mlp(dtype=torch.float32)
        opt = SAM(model, torch.optim.SGD, rho=0.05, trigger=(-1.0, 1.0), total_steps=12, lr=LR, momentum=MOMENTUM)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10) if scaled else None
        for x, y in _batches(12):
            result = opt.step(ce(model), batch=(x.float(), y), scaler=scaler)
            kinds[scaled].append(result.kind)
            if scaler is not None:
                scaler.update()
    assert kinds[True] == kinds[False]
    assert "full" in kinds[True] and "plain" in kinds[True]


@pytest.mark.parametrize("options", VARIANTS.values(), ids=VARIANTS.keys())
def test_per_member_norm_groups_and_frozen_groups_work_with_every_variant(options):
    """Ensembles (one norm group per member) and Bayesian networks (sigma groups trained, not
    perturbed): every variant trains them, and no ascent moves a group with perturb=False."""
    members = torch.nn.ModuleList([tiny_mlp(seed=1), tiny_mlp(seed=2)])
    frozen_params = list(members[1][2].parameters())
    groups = [{"params": list(members[0].parameters()), "norm_group": 0},
              {"params": list(members[1][0].parameters()), "norm_group": 1},
              {"params": frozen_params, "perturb": False}]
    opt = OTMDR(groups, torch.optim.SGD, rho=(0.05, 0.1), total_steps=8, lr=LR, momentum=MOMENTUM,
                model=members, **options)
    frozen = [p.detach().clone() for p in frozen_params]
    moved_frozen = []
    original_ascend = opt._ascend

    def spy(plan, grads, *, merge):
        moved_frozen.append(any(p is q for p in plan.params for q in frozen_params))
        return original_ascend(plan, grads, merge=merge)

    opt._ascend = spy
    for b in _batches(8):
        opt.step(lambda batch: sum(F.cross_entropy(m(batch[0]), batch[1]) for m in members) / 2, batch=b)
    assert all(torch.isfinite(p).all() for p in members.parameters())
    assert moved_frozen and not any(moved_frozen)
    assert any(not torch.equal(p, q) for p, q in zip(frozen_params, frozen))  # trained all the same


# ------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize("options,words", [
    (dict(reuse=True), "ascent_interval"),
    (dict(phase_start=1.0), "phase_start"),
    (dict(trigger=(1.0, 2.0, 3.0)), "trigger"),
    (dict(trigger_decay=1.0), "trigger_decay"),
    (dict(momentum_ascent="half"), "momentum_ascent"),
    (dict(momentum_ascent="all", trigger=0.0), "clean gradient"),
    (dict(momentum_ascent="first", ascent_interval=2, reuse=True), "clean gradient"),
    (dict(momentum_ascent="all", particles=2), "same neighbour"),
    (dict(momentum_ascent="all", momentum=0.0), "momentum=0"),
])
def test_bad_options_are_refused_with_the_fix(options, words):
    kwargs = {"lr": LR, "momentum": MOMENTUM} | options
    with pytest.raises(ValueError, match=words):
        OTMDR(tiny_mlp(), torch.optim.SGD, rho=(0.05, 0.1), **kwargs)


def test_phase_without_total_steps_says_how_to_set_it():
    model = tiny_mlp()
    opt = SAM(model, torch.optim.SGD, rho=0.05, phase_start=0.5, lr=LR)
    with pytest.raises(ValueError, match="total_steps"):
        opt.step(ce(model), batch=data())
    assert opt.step_count == 0


def test_primitives_refuse_options_only_step_applies():
    model = tiny_mlp()
    opt = SAM(model, torch.optim.SGD, rho=0.05, ascent_interval=2, reuse=True, lr=LR)
    ce(model)(data()).backward()
    with pytest.raises(RuntimeError, match="only step"):
        opt.first_step()
    with torch.no_grad():
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), tiny_mlp().parameters()))


def test_momentum_ascent_works_with_adam():
    model = tiny_mlp()
    opt = SAM(model, torch.optim.Adam, rho=0.1, momentum_ascent="all", lr=1e-2)
    results = _run(opt, model, _batches(4))
    assert [r.kind for r in results] == ["plain", "full", "full", "full"]
    assert float(results[-1].perturbation_norm) == pytest.approx(0.1)


# ------------------------------------------------------------------------------ DDP
def _ddp_worker(rank: int, world: int, store: str, out: str, options: dict) -> None:
    join_gloo_group(rank, world, store)
    torch.manual_seed(0)
    model = DDP(tiny_mlp(dtype=torch.float32, batch_norm=True))
    opt = OTMDR(model, torch.optim.SGD, lr=0.1, momentum=0.9, seed=rank, total_steps=8, **options)
    kinds = []
    for step in range(8):
        x, y = data(32, seed=100 * step + rank, dtype=torch.float32)  # each replica its own shard
        kinds.append(opt.step(lambda b: F.cross_entropy(model(b[0]), b[1]), batch=(x, y)).kind)
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"identical": all(torch.equal(gathered[0], g) for g in gathered[1:]), "kinds": kinds}, f)
    leave_gloo_group()


@pytest.mark.parametrize("options", [dict(ascent_interval=2, reuse=True), dict(trigger=(-1.0, 1.0)),
                                     dict(momentum_ascent="first")], ids=["reuse", "trigger", "momentum"])
def test_ddp_replicas_stay_identical(tmp_path, options):
    """Skipped passes must not desynchronise the replicas: the trigger's decision and LookSAM's
    stored component come from the all-reduced first pass."""
    out = tmp_path / "result.json"
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "store"), str(out), options), nprocs=2, join=True)
    result = json.loads(out.read_text())
    assert result["identical"]
    assert "full" in result["kinds"] and len(set(result["kinds"])) == 2


@pytest.mark.parametrize("options", [o for o in VARIANTS.values() if o.get("momentum_ascent") != "all"],
                         ids=[k for k, o in VARIANTS.items() if o.get("momentum_ascent") != "all"])
def test_particles_with_every_variant_cost_what_is_predicted(options):
    """K = 2 particles: a full step costs 2 x (ascent parts + 1), plain and reused steps 1."""
    steps = 10
    model = tiny_mlp()
    opt = OTMDR(model, torch.optim.SGD, rho=(0.05, 0.1), particles=2, total_steps=steps, lr=LR, momentum=MOMENTUM,
                **options)
    results = _run(opt, model, _batches(steps))
    full = 2 * (1.0 + (0.5 if options.get("momentum_ascent") == "first" else 1.0))
    assert all(r.gradient_evaluations == (full if r.kind == "full" else 1.0) for r in results)
    assert opt.full_steps == sum(r.kind == "full" for r in results) > 0
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("momentum_ascent", ["first", "all"])
def test_batchnorm_statistics_come_from_the_steps_first_pass(momentum_ascent):
    """bn_policy="clean" updates the running statistics once per step, in the first pass that
    runs: with momentum ascent that pass is at the perturbed weights (the ascent part's, or with
    "all" the final pass's), never twice."""
    model = tiny_mlp(batch_norm=True)
    opt = OTMDR(model, torch.optim.SGD, rho=(0.05, 0.1), momentum_ascent=momentum_ascent, lr=LR, momentum=MOMENTUM,
                model=model)
    bn = model[1]
    for t, batch in enumerate(_batches(4)):
        before = bn.num_batches_tracked.item()
        opt.step(ce(model), batch=batch)
        assert bn.num_batches_tracked.item() == before + 1, t
