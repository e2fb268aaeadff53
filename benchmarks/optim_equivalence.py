"""Before/after check for optimizer refactors: digests of what every option does to a model.

Runs SAM, ASAM and OT-MDR under every preset and option (particles, noise, merge and
normalisation, reductions, splits, per-group radii and norm groups, batch-norm policies,
weight decay in the ascent, clipping, intervals, micro-batches, the closure form, the davda54
form, the low-level primitives, a GradScaler, a resume mid-run, Adam as base optimizer, the
per-tensor path) for a few steps on a small float64 network with batch norm, and records a
SHA-256 digest of the final weights, batch-norm buffers, optimizer state and reported step
values per case.

Run it on the code before a refactor and after it, on the same machine: identical digests mean
the refactor changed no bit of behaviour. Digests are not portable across CPUs or torch
versions (floating-point reductions may differ), so never compare with another machine's file.

    python benchmarks/optim_equivalence.py --out before.json     # on the old commit
    python benchmarks/optim_equivalence.py --compare before.json # on the new one
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from otmdr import ASAM, OTMDR, SAM

STEPS = 5


def network(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 12), nn.BatchNorm1d(12), nn.Tanh(), nn.Linear(12, 4)).double()


def batches(n: int = 24) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    return [(torch.randn(n, 6, generator=g, dtype=torch.float64), torch.randint(0, 4, (n,), generator=g))
            for _ in range(STEPS)]


def groups(model: nn.Module, **second: Any) -> list[dict[str, Any]]:
    """Two param groups: the first layer, and the rest with options ``second``."""
    first = list(model[0].parameters())
    rest = [p for p in model.parameters() if all(p is not q for q in first)]
    return [{"params": first}, {"params": rest, **second}]


#: bookkeeping in the state dict that no arithmetic reads: left out, so that digests made before
#: it existed still compare (the optimizer's numbers are what must stay bit-identical)
BOOKKEEPING = ("gradient_evaluations", "full_steps", "kind")


def _without_bookkeeping(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _without_bookkeeping(v) for k, v in obj.items() if k not in BOOKKEEPING}
    return obj


def digest(*objects: Any) -> str:
    buffer = io.BytesIO()
    torch.save(tuple(_without_bookkeeping(o) for o in objects), buffer)
    return hashlib.sha256(buffer.getvalue()).hexdigest()[:16]


def one_call(make: Callable[[nn.Module], OTMDR], *, micro_batches: int = 1, resume: bool = False,
             scaler: bool = False) -> str:
    model = network()
    opt = make(model)
    grad_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4) if scaler else None
    reported = []
    for i, (x, y) in enumerate(batches()):
        if resume and i == 2:
            state = opt.state_dict()
            model_state = {k: v.clone() for k, v in model.state_dict().items()}
            model = network(1)
            model.load_state_dict(model_state)
            opt = make(model)
            opt.load_state_dict(state)
        result = opt.step(lambda b, m=model: F.cross_entropy(m(b[0]), b[1]), batch=(x, y),
                          micro_batches=micro_batches, scaler=grad_scaler)
        if grad_scaler is not None:
            grad_scaler.update()
        reported.append((result.loss, result.perturbed_loss, result.perturbation_norm))
    return digest(model.state_dict(), opt.state_dict(), reported)


def closure_form(make: Callable[[nn.Module], OTMDR]) -> str:
    model = network()
    opt = make(model)
    losses = []
    for x, y in batches():
        def closure(x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss
        losses.append(opt.step(closure))
    return digest(model.state_dict(), opt.state_dict(), losses)


def davda54_form() -> str:
    model = network()
    opt = SAM(model, torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    for x, y in batches():
        F.cross_entropy(model(x), y).backward()
        opt.first_step(zero_grad=True)
        F.cross_entropy(model(x), y).backward()
        opt.second_step(zero_grad=True)
    return digest(model.state_dict(), opt.state_dict())


def primitives_form() -> str:
    model = network()
    opt = OTMDR(model, torch.optim.SGD, lr=0.1, momentum=0.9, particles=2, noise_std=1e-3)
    for x, y in batches():
        opt.zero_grad()
        for k in range(2):
            F.cross_entropy(model(x[:12]), y[:12]).backward()
            opt.perturb()
            F.cross_entropy(model(x[12:]), y[12:]).backward()
            opt.perturb()
            F.cross_entropy(model(x), y).backward()
            if k == 0:
                opt.next_particle()
        opt.descend()
    return digest(model.state_dict(), opt.state_dict())


SGD = dict(lr=0.1, momentum=0.9, weight_decay=5e-4)


def cases() -> dict[str, Callable[[], str]]:
    o = OTMDR
    c: dict[str, Callable[[], str]] = {
        "sam": lambda: one_call(lambda m: SAM(m, torch.optim.SGD, rho=0.05, **SGD)),
        "sam bn ascent": lambda: one_call(lambda m: SAM(m, torch.optim.SGD, bn_policy="ascent", **SGD)),
        "asam": lambda: one_call(lambda m: ASAM(m, torch.optim.SGD, **SGD)),
        "otmdr default": lambda: one_call(lambda m: o(m, torch.optim.SGD, **SGD)),
        "otmdr release": lambda: one_call(lambda m: o(m, torch.optim.SGD, preset="release", **SGD)),
        "otmdr release K=2 sum/mean": lambda: one_call(lambda m: o(
            m, torch.optim.SGD, preset="release", particles=2, particle_reduce="mean", **SGD)),
        "otmdr K=3 mean": lambda: one_call(lambda m: o(m, torch.optim.SGD, particles=3, reduce="mean", **SGD)),
        "otmdr noise": lambda: one_call(lambda m: o(m, torch.optim.SGD, noise_std=1e-3, **SGD)),
        "otmdr no merge": lambda: one_call(lambda m: o(m, torch.optim.SGD, merge=False, **SGD)),
        "otmdr step norm": lambda: one_call(lambda m: o(m, torch.optim.SGD, normalize="step", **SGD)),
        "otmdr adaptive": lambda: one_call(lambda m: o(m, torch.optim.SGD, adaptive=True, adaptive_eta=0.01, **SGD)),
        "otmdr 3 steps split": lambda: one_call(lambda m: o(
            m, torch.optim.SGD, rho=(0.01, 0.02, 0.03), split=(0.2, 0.3, 0.4), **SGD)),
        "otmdr rho_scale": lambda: one_call(lambda m: o(groups(m, rho_scale=0.5), torch.optim.SGD, model=m, **SGD)),
        "otmdr perturb False": lambda: one_call(lambda m: o(groups(m, perturb=False), torch.optim.SGD, model=m, **SGD)),
        "otmdr norm groups": lambda: one_call(lambda m: o(
            [{"params": g["params"], "norm_group": i} for i, g in enumerate(groups(m))], torch.optim.SGD,
            model=m, **SGD)),
        "otmdr in_norm merged": lambda: one_call(lambda m: o(
            groups(m, perturb=False, in_norm=True), torch.optim.SGD, model=m, **SGD)),
        "otmdr in_norm adaptive step": lambda: one_call(lambda m: o(
            groups(m, perturb=False, in_norm=True), torch.optim.SGD, model=m, normalize="step", adaptive=True,
            adaptive_eta=0.1, **SGD)),
        "otmdr bn all": lambda: one_call(lambda m: o(m, torch.optim.SGD, bn_policy="all", **SGD)),
        "otmdr bn none": lambda: one_call(lambda m: o(m, torch.optim.SGD, bn_policy="none", **SGD)),
        "otmdr bn ascent K=2": lambda: one_call(lambda m: o(m, torch.optim.SGD, bn_policy="ascent", particles=2,
                                                            **SGD)),
        "otmdr ascent wd": lambda: one_call(lambda m: o(m, torch.optim.SGD, ascent_weight_decay=True, **SGD)),
        "otmdr clip": lambda: one_call(lambda m: o(m, torch.optim.SGD, max_grad_norm=0.1, **SGD)),
        "otmdr interval 2": lambda: one_call(lambda m: o(m, torch.optim.SGD, ascent_interval=2, **SGD)),
        "otmdr micro-batches 3": lambda: one_call(lambda m: o(m, torch.optim.SGD, **SGD), micro_batches=3),
        "otmdr resume K=2 noise": lambda: one_call(lambda m: o(
            m, torch.optim.SGD, particles=2, noise_std=1e-3, **SGD), resume=True),
        "otmdr scaler": lambda: one_call(lambda m: o(m, torch.optim.SGD, **SGD), scaler=True),
        "otmdr scaler clip": lambda: one_call(lambda m: o(m, torch.optim.SGD, max_grad_norm=0.1, **SGD), scaler=True),
        "otmdr adam": lambda: one_call(lambda m: o(m, torch.optim.Adam, lr=1e-3)),
        "otmdr per-tensor": lambda: one_call(lambda m: o(
            m, torch.optim.SGD, foreach=False, particles=2, noise_std=1e-3, adaptive=True, **SGD)),
        "otmdr closure": lambda: closure_form(lambda m: o(m, torch.optim.SGD, **SGD)),
        "sam closure": lambda: closure_form(lambda m: SAM(m, torch.optim.SGD, **SGD)),
        "sam davda54": davda54_form,
        "otmdr primitives": primitives_form,
    }
    return c


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the digests to this JSON file")
    parser.add_argument("--compare", help="compare with digests written earlier on this machine")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    digests = {name: run() for name, run in cases().items()}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(digests, f, indent=1)
    if args.compare:
        with open(args.compare) as f:
            before = json.load(f)
        differ = [name for name in before if digests.get(name) != before[name]]
        missing = sorted(set(digests) - set(before))
        for name in digests:
            status = "new" if name in missing else ("DIFFERS" if name in differ else "identical")
            print(f"{name:32s} {status}")
        print(f"{len(before) - len(differ)} of {len(before)} cases identical")
        return 1 if differ else 0
    for name, value in digests.items():
        print(f"{name:32s} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
