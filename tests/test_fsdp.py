"""FSDP2 (``fully_shard``, DTensor parameters) with 2 CPU processes (gloo): OT-MDR, SAM and ASAM on
sharded parameters give the unsharded optimizer's steps.

One spawn of 2 processes runs every case (each a few steps of a 3-layer MLP) and rank 0 writes
what it measured; the tests below read it. References, in the same processes:

* single-process SAM on the global batch (SAM under FSDP is one global neighbour);
* DDP with ``sync_ascent=True`` on the same per-rank shards with the same seed, which is the
  one-process algorithm on the global batch (docs/distributed.md) and which FSDP must equal: FSDP
  reduce-scatters every pass (the ascent passes cannot be rank-local when every rank holds only a
  shard of the weights, docs/distributed.md "FSDP2"), so ``sync_ascent`` False and True are the
  same there. With batch norm, DDP is built with ``broadcast_buffers=False`` so that each rank's
  running statistics come from its own shard, as under FSDP.

Float64 everywhere except the GradScaler (float32) and bf16 mixed-precision cases: the sharded and
the replicated runs add the same numbers in different orders (a reduce-scatter against an
all-reduce, a norm from two partial sums), so they agree to about 1e-15 relative; 1e-10 absolute
on weights of order 1 after 4 steps leaves room for that and nothing else (a wrong norm, a noise
drawn for the wrong shard or a leaked ascent gradient moves weights by 1e-3 or more).
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from conftest import data, join_gloo_group, leave_gloo_group  # noqa: E402

from otmdr import ASAM, OTMDR, SAM  # noqa: E402

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

STEPS = 4
WORLD = 2
TOLERANCE = 1e-10  # float64, see the module docstring

#: name -> (optimizer class, options); every case runs under FSDP and under the DDP reference
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "sam": ("SAM", {"rho": 0.05}),
    "asam": ("ASAM", {"rho": 0.5, "adaptive_eta": 0.01}),
    "otmdr": ("OTMDR", {}),
    "otmdr sync_ascent": ("OTMDR", {"sync_ascent": True}),
    "otmdr release 3 steps": ("OTMDR", {"rho": (0.02, 0.03, 0.05), "preset": "release"}),
    "otmdr no merge mean": ("OTMDR", {"merge": False, "reduce": "mean"}),
    "otmdr noise": ("OTMDR", {"noise_std": 0.01}),
    "otmdr particles 2 noise": ("OTMDR", {"particles": 2, "noise_std": 0.01, "particle_reduce": "mean"}),
    "otmdr adaptive": ("OTMDR", {"adaptive": True, "adaptive_eta": 0.01, "rho": (0.2, 0.4)}),
    "otmdr ascent wd clip": ("OTMDR", {"ascent_weight_decay": True, "max_grad_norm": 0.5}),
    "otmdr micro-batches": ("OTMDR", {"micro_batches": 2}),
    "otmdr interval 2": ("OTMDR", {"ascent_interval": 2}),
    "otmdr reuse": ("OTMDR", {"ascent_interval": 2, "reuse": True}),
    "sam reuse": ("SAM", {"ascent_interval": 2, "reuse": True}),
    "otmdr late phase": ("OTMDR", {"phase_start": 0.5, "total_steps": STEPS}),
    "otmdr trigger": ("OTMDR", {"trigger": (-1.0, 1.0), "total_steps": STEPS}),
    "sam trigger": ("SAM", {"trigger": 1.0}),
    "otmdr momentum first": ("OTMDR", {"momentum_ascent": "first"}),
    "sam momentum all": ("SAM", {"momentum_ascent": "all"}),
    "otmdr bn clean": ("OTMDR", {"batch_norm": True}),
    "otmdr bn ascent K=2": ("OTMDR", {"batch_norm": True, "bn_policy": "ascent", "particles": 2}),
    "otmdr bn all": ("OTMDR", {"batch_norm": True, "bn_policy": "all"}),
    "otmdr per-tensor": ("OTMDR", {"foreach": False, "noise_std": 0.01}),
    "otmdr scaler": ("OTMDR", {"scaler": True, "dtype": torch.float32}),
    "otmdr adam": ("OTMDR", {"base": "Adam", "lr": 0.01}),
}
#: float32 with a GradScaler: the same sums in other orders, to float32 precision
TOLERANCES = {"otmdr scaler": 1e-5}


def mlp(dtype: torch.dtype, batch_norm: bool) -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(6, 12)]
    if batch_norm:
        layers.append(nn.BatchNorm1d(12))
    layers += [nn.Tanh(), nn.Linear(12, 5), nn.Tanh(), nn.Linear(5, 4)]  # 5 rows: uneven shards
    return nn.Sequential(*layers).to(dtype)


def sharded(model: nn.Module, **options: Any) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, **options)
    fully_shard(model, **options)
    return model


def shard_of(batch: tuple[torch.Tensor, torch.Tensor], rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rank's samples of a global batch, strided as the training loop takes them."""
    return batch[0][rank::WORLD], batch[1][rank::WORLD]


def build(kind: str, model: nn.Module, options: dict[str, Any]) -> OTMDR:
    options = dict(options)
    for key in ("batch_norm", "scaler", "dtype", "micro_batches"):
        options.pop(key, None)
    base = getattr(torch.optim, options.pop("base", "SGD"))
    lr = options.pop("lr", 0.1)
    base_options = {"momentum": 0.9, "weight_decay": 1e-3} if base is torch.optim.SGD else {}
    cls = {"SAM": SAM, "ASAM": ASAM, "OTMDR": OTMDR}[kind]
    return cls(model, base, lr=lr, seed=0, **base_options, **options)


def run(kind: str, options: dict[str, Any], model: nn.Module, rank: int,
        resume_at: int | None = None) -> dict[str, Any]:
    """STEPS steps on the rank's shards; the full parameters and buffers, the radii and kinds.
    ``resume_at``: a new optimizer loads the state dict of the first one before that step."""
    dtype = options.get("dtype", torch.float64)
    opt = build(kind, model, options)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8) if options.get("scaler") else None
    radii, kinds, saved_types = [], [], []
    for step in range(STEPS):
        if step == resume_at:
            state = opt.state_dict()
            saved_types = sorted({type(c).__name__ for c in state["otmdr"].get("reuse", {}).values()})
            opt = build(kind, model, options)
            opt.load_state_dict(state)
        x, y = shard_of(data(32, seed=100 + step, dtype=dtype), rank)
        result = opt.step(lambda b: F.cross_entropy(model(b[0]), b[1]), batch=(x, y), scaler=scaler,
                          micro_batches=options.get("micro_batches", 1))
        if scaler is not None:
            scaler.update()
        radii.append(float(result.perturbation_norm))
        kinds.append(result.kind)
    return {"params": full_parameters(model), "buffers": [b.clone() for b in model.buffers()],
            "radii": radii, "kinds": kinds, "full_steps": opt.full_steps, "saved": saved_types}


def full_parameters(model: nn.Module) -> list[torch.Tensor]:
    """Every parameter whole (the test's comparison only: a collective for each sharded one)."""
    return [(p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for p in model.parameters()]


def compare(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    return {
        "params": max(float((p - q).abs().max()) for p, q in zip(a["params"], b["params"])),
        "buffers": max([float((p.double() - q.double()).abs().max()) for p, q in zip(a["buffers"], b["buffers"])],
                       default=0.0),
        "radii": max(abs(r - s) for r, s in zip(a["radii"], b["radii"])),
        "kinds": a["kinds"] == b["kinds"],
        "moved": max(float((p - q).abs().max()) for p, q in zip(a["params"], a["initial"])),
        "radii_fsdp": a["radii"], "kinds_fsdp": a["kinds"],
    }


def _worker(rank: int, store: str, out: str) -> None:
    # as tests/test_ddp.py: loopback only, one thread per process, a bounded wait, and a barrier
    # then os._exit(0) instead of gloo's teardown
    join_gloo_group(rank, WORLD, store, timeout_s=120)
    from torch.distributed.fsdp import MixedPrecisionPolicy
    from torch.nn.parallel import DistributedDataParallel as DDP

    results: dict[str, Any] = {}
    for name, (kind, options) in CASES.items():
        try:
            dtype, batch_norm = options.get("dtype", torch.float64), options.get("batch_norm", False)
            initial = [p.detach().clone() for p in mlp(dtype, batch_norm).parameters()]
            fsdp = run(kind, options, sharded(mlp(dtype, batch_norm)), rank)
            ddp_options = {**options, "sync_ascent": True}
            ddp = run(kind, ddp_options, DDP(mlp(dtype, batch_norm), broadcast_buffers=False), rank)
            fsdp["initial"] = initial
            results[name] = compare(fsdp, ddp)
        except Exception:  # noqa: BLE001 - reported to the test, which fails with it
            results[name] = {"error": traceback.format_exc()}

    # resume between a full step and a reused one: the stored component is saved and loaded as
    # DTensors (each rank its shard) and the run continues as the uninterrupted one
    try:
        options = CASES["otmdr reuse"][1]
        dtype = torch.float64
        initial = [p.detach().clone() for p in mlp(dtype, False).parameters()]
        resumed = run("OTMDR", options, sharded(mlp(dtype, False)), rank, resume_at=1)
        whole = run("OTMDR", options, sharded(mlp(dtype, False)), rank)
        resumed["initial"] = initial
        results["otmdr reuse resumed"] = {**compare(resumed, whole), "saved": resumed["saved"]}
    except Exception:  # noqa: BLE001
        results["otmdr reuse resumed"] = {"error": traceback.format_exc()}

    # test 1 and 4: SAM under FSDP against single-process SAM on the whole global batch
    try:
        fsdp = run("SAM", {"rho": 0.05}, sharded(mlp(torch.float64, False)), rank)
        model = mlp(torch.float64, False)
        opt = SAM(model, torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=1e-3, rho=0.05, seed=0)
        radii = []
        for step in range(STEPS):
            x, y = data(32, seed=100 + step)
            radii.append(float(opt.step(lambda b: F.cross_entropy(model(b[0]), b[1]), batch=(x, y)).perturbation_norm))
        single = {"params": [p.detach() for p in model.parameters()], "buffers": [], "radii": radii,
                  "kinds": ["full"] * STEPS}
        fsdp["initial"] = [p.detach().clone() for p in mlp(torch.float64, False).parameters()]
        results["sam single-process"] = compare(fsdp, single)
        results["sam single-process"]["radii_single"] = radii
    except Exception:  # noqa: BLE001
        results["sam single-process"] = {"error": traceback.format_exc()}

    # bf16 compute (FSDP's MixedPrecisionPolicy), float32 sharded parameters: it runs and learns
    try:
        model = sharded(mlp(torch.float32, False), mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16))
        opt = OTMDR(model, torch.optim.SGD, lr=0.1, momentum=0.9, noise_std=0.001, seed=0)
        x, y = shard_of(data(32, seed=7, dtype=torch.float32), rank)
        losses = [float(opt.step(lambda b: F.cross_entropy(model(b[0]).float(), b[1]), batch=(x, y)).loss)
                  for _ in range(8)]
        results["bf16"] = {"losses": losses, "dtype": str(next(model.parameters()).dtype)}
    except Exception:  # noqa: BLE001
        results["bf16"] = {"error": traceback.format_exc()}

    # a non-finite input on rank 1 only: both ranks raise at the same step (none steps, none hangs);
    # DDP with sync_ascent too (each rank checks its own final loss: the flags must be OR-ed there as well)
    # with a GradScaler both skip the step and back off alike
    for name, wrap, sync_ascent, scaled in (("non-finite", sharded, False, False),
                                            ("non-finite ddp sync_ascent", DDP, True, False),
                                            ("non-finite scaler", sharded, False, True)):
        try:
            dtype = torch.float32 if scaled else torch.float64
            model = wrap(mlp(dtype, False))
            # the ascent passes use the first half, the final pass the whole batch
            opt = OTMDR(model, torch.optim.SGD, lr=0.1, seed=0, sync_ascent=sync_ascent, split=(0.25, 0.25))
            scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8) if scaled else None
            before = full_parameters(model)
            x, y = shard_of(data(32, seed=9, dtype=dtype), rank)
            if rank == 1:
                x[-1, 0] = float("nan")  # in the second half: only the final pass sees it
            try:
                opt.step(lambda b, model=model: F.cross_entropy(model(b[0]), b[1]), batch=(x, y), scaler=scaler)
                outcome = 2.0 if opt.skipped is not None and bool(opt.skipped) else 0.0
            except FloatingPointError:
                outcome = 1.0
            scale = 0.0
            if scaler is not None:
                scaler.update()
                scale = float(scaler.get_scale())
            flags = torch.tensor([outcome, scale], dtype=torch.float64)
            gathered = [torch.zeros_like(flags) for _ in range(WORLD)]
            dist.all_gather(gathered, flags)
            unchanged = all(torch.equal(p, q) for p, q in zip(full_parameters(model), before))
            results[name] = {"outcome": [["stepped", "raised", "skipped"][int(g[0])] for g in gathered],
                             "scales": [float(g[1]) for g in gathered], "unchanged": unchanged}
        except Exception:  # noqa: BLE001
            results[name] = {"error": traceback.format_exc()}

    # gradient sync turned off (FSDP would then add the ascent gradients to the final one): refused
    try:
        model = sharded(mlp(torch.float64, False))
        opt = OTMDR(model, torch.optim.SGD, lr=0.1, seed=0)
        model.set_requires_gradient_sync(False)
        x, y = shard_of(data(32, seed=9), rank)
        try:
            opt.step(lambda b: F.cross_entropy(model(b[0]), b[1]), batch=(x, y))
            message = ""
        except RuntimeError as error:
            message = str(error)
        model.set_requires_gradient_sync(True)
        kind = opt.step(lambda b: F.cross_entropy(model(b[0]), b[1]), batch=(x, y)).kind
        results["gradient sync off"] = {"message": message, "then": kind}
    except Exception:  # noqa: BLE001
        results["gradient sync off"] = {"error": traceback.format_exc()}

    if rank == 0:
        if os.environ.get("OTMDR_FSDP_DUMP"):
            print(json.dumps({k: {a: b for a, b in v.items()} for k, v in results.items()}, indent=None), flush=True)
        with open(out, "w") as f:
            json.dump(results, f)
    leave_gloo_group()


@pytest.fixture(scope="module")
def measured(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("fsdp")
    out = folder / "result.json"
    mp.spawn(_worker, args=(str(folder / "store"), str(out)), nprocs=WORLD, join=True)
    return json.loads(out.read_text())


def _ok(measured: dict[str, Any], name: str) -> dict[str, Any]:
    result = measured[name]
    assert "error" not in result, f"{name}: {result.get('error')}"
    return result


def test_sam_under_fsdp_equals_single_process_sam_on_the_global_batch(measured):
    result = _ok(measured, "sam single-process")
    assert result["moved"] > 1e-2  # it trained
    assert result["params"] < TOLERANCE


def test_perturbation_norm_under_fsdp_is_the_global_one(measured):
    """StepResult.perturbation_norm is the norm over every shard, on every rank: SAM's radius is
    rho, and it equals the single-process measurement."""
    result = _ok(measured, "sam single-process")
    assert result["radii"] < TOLERANCE
    assert result["radii_fsdp"] == pytest.approx([0.05] * STEPS, abs=1e-9)


@pytest.mark.parametrize("name", ["otmdr", "otmdr sync_ascent"])
def test_otmdr_under_fsdp_equals_ddp_with_sync_ascent(measured, name):
    """Default and sync_ascent=True: under FSDP both are the global ascent of DDP's sync_ascent."""
    result = _ok(measured, name)
    assert result["moved"] > 1e-2
    assert result["params"] < TOLERANCE
    assert result["radii"] < 1e-12
    assert result["kinds"]


@pytest.mark.parametrize("name", list(CASES))
def test_every_option_under_fsdp_equals_ddp(measured, name):
    """Chains, particles, noise, merge and normalisation, ASAM, batch-norm policies, the cheaper
    variants, GradScaler, Adam: run under FSDP and give the reference's weights, running statistics,
    radii and step kinds."""
    result = _ok(measured, name)
    tolerance = TOLERANCES.get(name, TOLERANCE)
    assert result["moved"] > 1e-3
    assert result["params"] < tolerance
    assert result["buffers"] < tolerance
    assert result["radii"] < tolerance
    assert result["kinds"], result["kinds_fsdp"]


def test_variants_really_skip_and_reuse(measured):
    """The cheaper variants were exercised, not silently full: their step kinds under FSDP."""
    assert _ok(measured, "otmdr interval 2")["kinds_fsdp"] == ["full", "plain", "full", "plain"]
    assert _ok(measured, "otmdr reuse")["kinds_fsdp"] == ["full", "reuse", "full", "reuse"]
    assert _ok(measured, "otmdr late phase")["kinds_fsdp"] == ["plain", "plain", "full", "full"]
    assert _ok(measured, "otmdr trigger")["kinds_fsdp"] == ["full", "full", "full", "plain"]  # declined
    assert _ok(measured, "sam trigger")["kinds_fsdp"] == ["full", "full", "full", "plain"]
    assert _ok(measured, "sam momentum all")["kinds_fsdp"][0] == "plain"  # no momentum before the first step
    assert _ok(measured, "sam momentum all")["kinds_fsdp"][1:] == ["full"] * (STEPS - 1)


def test_bf16_mixed_precision_runs_and_learns(measured):
    result = _ok(measured, "bf16")
    assert result["dtype"] == "torch.float32"  # the sharded parameters stay float32
    assert all(torch.isfinite(torch.tensor(result["losses"])))
    assert result["losses"][-1] < result["losses"][0]


@pytest.mark.parametrize("name,outcome", [("non-finite", "raised"), ("non-finite ddp sync_ascent", "raised"),
                                          ("non-finite scaler", "skipped")])
def test_a_non_finite_gradient_on_one_rank_stops_both(measured, name, outcome):
    """A NaN in rank 1's second half, which only the final pass sees: rank 0's final loss is finite,
    rank 1's is not; both ranks raise at that step (with a GradScaler: skip it and back off to the
    same scale) and neither moves."""
    result = _ok(measured, name)
    assert result["outcome"] == [outcome, outcome]
    assert result["unchanged"]
    assert result["scales"][0] == result["scales"][1]


def test_gradient_sync_turned_off_is_refused(measured):
    result = _ok(measured, "gradient sync off")
    assert "set_requires_gradient_sync(True)" in result["message"]
    assert result["then"] == "full"


def test_resume_under_fsdp_continues_exactly(measured):
    """LookSAM's stored component is in the state dict as DTensors and a resumed run equals the
    uninterrupted one bit for bit."""
    result = _ok(measured, "otmdr reuse resumed")
    assert result["saved"] == ["DTensor"]
    assert result["params"] == 0.0
    assert result["kinds_fsdp"] == ["full", "reuse", "full", "reuse"]
