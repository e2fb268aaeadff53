"""Per-rank training state under DDP and under FSDP2 (``fully_shard``), 1, 2 and 4 CPU processes:
SGD, SAM, OT-MDR and OT-MDR with LookSAM reuse on a ViT from the zoo.

For each world size, method and strategy, a fresh set of processes is spawned
(``torch.multiprocessing``, gloo on CPU as tests/test_ddp.py: ``file://`` rendezvous, loopback,
one torch thread per process, a bounded collective timeout, a final barrier and ``os._exit(0)``).
Every process builds the same model (``--model``, default ``vit-tiny``, 5.4M parameters), wraps it
in ``DistributedDataParallel`` or shards it with ``fully_shard`` on every transformer block
(``otmdr.models.vit.wrap_units``) and then the root, builds the optimizer and takes a few training
steps on one fixed random CIFAR-shaped batch of its own (``--batch-size`` per rank, default 32):

* ``SGD``           plain ``torch.optim.SGD`` (lr 0.01, momentum 0.9, weight decay 5e-4);
* ``SAM``           ``otmdr.SAM`` (rho 0.05) on that SGD;
* ``OT-MDR``        ``otmdr.OTMDR`` with its default options (K=1 particle) on that SGD;
* ``OT-MDR+reuse``  the same with ``ascent_interval=5, reuse=True`` (LookSAM: two more buffers).

The optimizers get the model (the DDP wrapper or the FSDP root) and use their one-call step.
Options are the defaults under both strategies: under DDP, OT-MDR's and SAM's ascent passes run
under ``no_sync()`` (each rank its own neighbour, one all-reduce per step); under FSDP the ascent
is global (one reduce-scatter per pass, docs/distributed.md, "FSDP2"), so the two strategies do not
run quite the same algorithm and the step-time ratio includes that extra communication.

What is counted, per rank, after the last step (bytes of the tensors' elements; a DTensor counts
its local shard, ``p.to_local()``):

* params: the parameters (DDP: the whole model on every rank; FSDP: the rank's shards);
* grads: the parameters' ``.grad`` (local shards under FSDP);
* optimizer state: the base optimizer's state (SGD's momentum buffers, local shards);
* otmdr buffers: the otmdr optimizer's own persistent buffers, ``opt.scratch.tensors()`` and the
  stored LookSAM components (``opt._reuse``), already local-shard sized;
* total: their sum. The JSON also holds ``allocated``: the bytes of the distinct storages behind
  the same tensors (FSDP2 pads each parameter's shard to ``ceil(dim 0 / world size)`` rows).

Not counted: DDP's gradient buckets (with the default ``gradient_as_bucket_view=False`` the reducer
keeps a flat copy of the gradients' size for its all-reduce), FSDP's transient all-gather and
reduce-scatter buffers, activations, and the temporaries inside a step. The process's peak resident
set (``resource.getrusage(...).ru_maxrss``) is reported as a coarse whole-process number: it
includes all of those, the activations, the Python runtime and torch's libraries, and the
allocator's slack. On CPU there is no per-tensor peak counter (``torch.cuda.max_memory_allocated``
has no CPU counterpart), so the exact part is the state counted above.

Step time: each step starts after a barrier; a step's time is the slowest rank's; the figure is the
median over ``--steps`` timed steps after ``--warmup`` steps (``OT-MDR+reuse``: the mean over the
timed steps, which with 5 of them is one whole cycle of one full and four reusing steps). Reported
relative to DDP with the same method at the same world size. On a shared, loaded 2-core CPU with
gloo and up to 4 single-thread processes this is not a performance claim: the load average before
and after and the CPU time other processes used are recorded next to it.

Results go to ``benchmarks/results/fsdp_memory.md`` and ``.json`` (not written for ``--quick``).
The last line printed is the results as one line of JSON (what tests/test_fsdp_memory_smoke.py reads).

    python benchmarks/fsdp_memory.py                                   # full run, writes the results
    python benchmarks/fsdp_memory.py --quick                           # vit-mini, 2 steps, writes nothing
    python benchmarks/fsdp_memory.py --quick --world-sizes 1 2         # the smoke test's run
    python benchmarks/fsdp_memory.py --model vit-mini --methods SGD OT-MDR --world-sizes 1 2
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import Tensor

from benchmark_env import machine_busy_s, run_environment
from otmdr import OTMDR, SAM
from otmdr.models import count_parameters, create_model
from otmdr.models.vit import wrap_units

SGD_KWARGS = dict(lr=0.01, momentum=0.9, weight_decay=5e-4)
SAM_RHO = 0.05
#: method -> (optimizer, options); None: plain torch.optim.SGD
METHODS: dict[str, tuple[str, dict[str, Any]] | None] = {
    "SGD": None,
    "SAM": ("SAM", {"rho": SAM_RHO}),
    "OT-MDR": ("OTMDR", {}),
    "OT-MDR+reuse": ("OTMDR", {"ascent_interval": 5, "reuse": True}),
}
#: methods whose steps alternate (full, cheap): their figure is the mean over the timed steps
CYCLIC = {"OT-MDR+reuse"}
STRATEGIES = ("DDP", "FSDP")
PARTS = ("params", "grads", "optimizer_state", "otmdr_buffers")
RESULTS = Path(__file__).resolve().parent / "results"
MB = 1e6


# ------------------------------------------------------------------------- in each process
def local_tensor(t: Tensor) -> Tensor:
    """A DTensor's local shard, or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def nbytes(tensors: list[Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in map(local_tensor, tensors))


def state_bytes(net: torch.nn.Module, opt: Any) -> dict[str, int]:
    """The rank's training state by part (see the module docstring), and the distinct storages."""
    params = list(net.parameters())
    grads = [p.grad for p in params if p.grad is not None]
    base = opt.base_optimizer if isinstance(opt, OTMDR) else opt
    state = [v for s in base.state.values() for v in s.values() if torch.is_tensor(v)]
    own = [*opt.scratch.tensors(), *opt._reuse.values()] if isinstance(opt, OTMDR) else []
    parts = {"params": nbytes(params), "grads": nbytes(grads), "optimizer_state": nbytes(state),
             "otmdr_buffers": nbytes(own)}
    parts["total"] = sum(parts.values())
    storages = {}
    for t in map(local_tensor, [*params, *grads, *state, *own]):
        storage = t.untyped_storage()
        if storage.nbytes():
            storages[storage.data_ptr()] = storage.nbytes()
    parts["allocated"] = sum(storages.values())
    return parts


def build_optimizer(method: str, net: torch.nn.Module) -> Any:
    spec = METHODS[method]
    if spec is None:
        return torch.optim.SGD(net.parameters(), **SGD_KWARGS)
    kind, options = spec
    cls = {"SAM": SAM, "OTMDR": OTMDR}[kind]
    return cls(net, torch.optim.SGD, seed=0, **SGD_KWARGS, **options)


def measure(rank: int, world: int, cfg: dict[str, Any]) -> dict[str, Any]:
    torch.manual_seed(0)  # the same initial weights on every rank
    model = create_model(cfg["model"], num_classes=10)
    if cfg["strategy"] == "FSDP":
        from torch.distributed.fsdp import fully_shard

        for unit in wrap_units(model):
            fully_shard(unit)
        fully_shard(model)
        net: torch.nn.Module = model
    else:
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(model)
    opt = build_optimizer(cfg["method"], net)
    gen = torch.Generator().manual_seed(1000 + rank)  # each rank its own fixed batch
    x = torch.randn(cfg["batch_size"], 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (cfg["batch_size"],), generator=gen)

    def loss_fn(batch: tuple[Tensor, Tensor]) -> Tensor:
        return F.cross_entropy(net(batch[0]), batch[1])

    times, kinds, losses = [], [], []
    for _ in range(cfg["warmup"] + cfg["steps"]):
        dist.barrier()
        start = time.perf_counter()
        if isinstance(opt, OTMDR):
            result = opt.step(loss_fn, batch=(x, y))
            kind, loss = result.kind, float(result.loss)
        else:
            opt.zero_grad(set_to_none=True)
            loss_t = loss_fn((x, y))
            loss_t.backward()
            opt.step()
            kind, loss = "plain", float(loss_t.detach())
        times.append(time.perf_counter() - start)
        kinds.append(kind)
        losses.append(loss)
    buckets = None
    if cfg["strategy"] == "DDP":  # the reducer's flat gradient buckets (not in the total; a private API)
        try:
            sizes = str(net._get_ddp_logging_data().get("bucket_sizes", ""))  # type: ignore[operator]
            buckets = sum(int(v) for v in sizes.split(",") if v.strip()) or None
        except Exception:  # noqa: BLE001 - only a note in the report
            buckets = None
    return {"rank": rank, "bytes": state_bytes(net, opt), "times_s": times, "kinds": kinds, "losses": losses,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # Linux: KiB
            "sharded": type(next(net.parameters())).__name__ == "DTensor", "ddp_bucket_bytes": buckets}


def _worker(rank: int, world: int, store: str, out: str, cfg: dict[str, Any]) -> None:
    # as tests/test_ddp.py: loopback only, one thread per process, a bounded wait, a barrier, and
    # no C++ teardown of the gloo group once everything is written
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=cfg["timeout"]))
        result = measure(rank, world, cfg)
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, result)
        if rank == 0:
            with open(out, "w") as f:
                json.dump(gathered, f)
        dist.barrier()
    except BaseException:  # noqa: BLE001 - report and leave at once: mp.spawn stops the other ranks
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# ----------------------------------------------------------------------------- the driver
def run_config(model: str, method: str, strategy: str, world: int, args: argparse.Namespace) -> dict[str, Any]:
    cfg = {"model": model, "method": method, "strategy": strategy, "batch_size": args.batch_size,
           "warmup": args.warmup, "steps": args.steps, "timeout": args.timeout}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        start = time.perf_counter()
        mp.spawn(_worker, args=(world, str(Path(tmp) / "store"), str(out), cfg), nprocs=world, join=True)
        wall = time.perf_counter() - start
        ranks = json.loads(out.read_text())
    per_step = [max(r["times_s"][i] for r in ranks) for i in range(len(ranks[0]["times_s"]))]
    timed = per_step[args.warmup:]
    step_s = statistics.fmean(timed) if method in CYCLIC else statistics.median(timed)
    largest = max(ranks, key=lambda r: r["bytes"]["total"])
    return {"model": model, "method": method, "strategy": strategy, "world_size": world,
            "bytes": largest["bytes"], "largest_rank": largest["rank"],
            "ranks": [{"rank": r["rank"], "bytes": r["bytes"], "peak_rss_bytes": r["peak_rss_bytes"],
                       "times_s": r["times_s"]} for r in ranks],
            "peak_rss_bytes": max(r["peak_rss_bytes"] for r in ranks),
            "ddp_bucket_bytes": ranks[0]["ddp_bucket_bytes"],
            "sharded": all(r["sharded"] for r in ranks),
            "kinds": ranks[0]["kinds"], "losses": ranks[0]["losses"],
            "step_times_s": per_step, "step_s": step_s, "wall_s": wall}


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Total against the same method and strategy at 1 process; step time against DDP."""
    index = {(r["method"], r["strategy"], r["world_size"]): r for r in rows}
    for r in rows:
        one = index.get((r["method"], r["strategy"], 1))
        r["total_x_1_process"] = r["bytes"]["total"] / one["bytes"]["total"] if one else None
        ddp = index.get((r["method"], "DDP", r["world_size"]))
        r["step_x_ddp"] = r["step_s"] / ddp["step_s"] if ddp else None
        r["fsdp_over_ddp_total"] = (r["bytes"]["total"] / ddp["bytes"]["total"]
                                    if ddp and r["strategy"] == "FSDP" else None)


def own_cpu_s() -> float:
    """CPU seconds this process and its finished children (the spawned ranks) have used."""
    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


def environment(args: argparse.Namespace) -> dict[str, Any]:
    return {
        **run_environment(),
        "threads_per_process": 1, "backend": "gloo (CPU), file:// rendezvous, loopback",
        "model": args.model, "batch_size_per_rank": args.batch_size, "warmup_steps": args.warmup,
        "timed_steps": args.steps, "input_data": "random synthetic CIFAR-shaped tensors, one fixed batch per rank",
        "sgd": SGD_KWARGS, "sam_rho": SAM_RHO,
        "methods": {m: (None if s is None else {"optimizer": s[0], **s[1]}) for m, s in METHODS.items()
                    if m in args.methods},
    }


def markdown(env: dict[str, Any], rows: list[dict[str, Any]], parameters: int) -> str:
    def mb(v: float) -> str:
        return f"{v / MB:.2f}"

    lines = [
        "# Per-rank training state: DDP against FSDP2",
        "",
        f"Command: `{env['command']}` at commit {env['git']}  ",
        f"Date: {env['date']}; torch {env['torch']}, Python {env['python']}; CPU {env['cpu']} "
        f"({env['cpu_count']} logical CPUs); {env['backend']}; 1 torch thread per process.  ",
        f"Load average before {env['loadavg_before']}, after {env['loadavg_after']}; total wall time "
        f"{env['wall_s']:.0f} s; CPU time used by other processes meanwhile {env.get('other_processes_cpu_s', '?')} s "
        f"({100 * env.get('other_processes_share', float('nan')):.0f}% of the machine).  ",
        f"Model {env['model']} ({parameters:,} parameters, {mb(4 * parameters)} MB in float32); batch "
        f"{env['batch_size_per_rank']} per rank ({env['input_data']}); {env['warmup_steps']} warm-up + "
        f"{env['timed_steps']} timed steps per configuration, each in freshly spawned processes; SGD "
        f"{env['sgd']}; SAM rho {env['sam_rho']}; OT-MDR default options (K=1); OT-MDR+reuse: "
        "`ascent_interval=5, reuse=True`.",
        "",
        "Bytes per rank after the last step, MB = 10^6 bytes; a sharded (DTensor) tensor counts its",
        "local shard. Where ranks differ (uneven shards) the row is the rank with the largest total.",
        "params, grads: the model's; optimizer state: the base SGD's momentum buffers; otmdr buffers:",
        "`opt.scratch` and LookSAM's stored component (`opt._reuse`). x 1 proc.: total against the same",
        "method and strategy in one process. Peak RSS: the largest rank's `ru_maxrss`, a coarse",
        "whole-process number that includes activations, the Python runtime and libraries, DDP's",
        "gradient buckets, FSDP's communication buffers and allocator slack (on CPU there is no",
        "per-tensor peak counter). Step time: median over the timed steps of the slowest rank's time",
        "(OT-MDR+reuse: mean over one 5-step cycle), relative to DDP with the same method at the same",
        "world size: **measured on a shared, loaded 2-core CPU with gloo, with up to 4 single-thread",
        "processes; not a performance claim.**",
        "",
        "| model | method | strategy | world size | params MB | grads MB | optimizer state MB | "
        "otmdr buffers MB | total MB | x 1 proc. | peak RSS MB | step ms | step x DDP |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        b = r["bytes"]
        rel = "-" if r["total_x_1_process"] is None else f"{r['total_x_1_process']:.3f}"
        step = "-" if r["step_x_ddp"] is None else f"{r['step_x_ddp']:.2f}"
        lines.append(f"| {r['model']} | {r['method']} | {r['strategy']} | {r['world_size']} | {mb(b['params'])} | "
                     f"{mb(b['grads'])} | {mb(b['optimizer_state'])} | {mb(b['otmdr_buffers'])} | "
                     f"{mb(b['total'])} | {rel} | {mb(r['peak_rss_bytes'])} | {1000 * r['step_s']:.0f} | {step} |")
    worlds = sorted({r["world_size"] for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    index = {(r["method"], r["strategy"], r["world_size"]): r for r in rows}
    lines += ["", "Per-rank total state, FSDP / DDP at the same world size (expected: about 1 / world size; "
              "DDP's own total stays flat):", "",
              "| method | " + " | ".join(f"{w} proc." for w in worlds) + " |", "|---|" + "---:|" * len(worlds)]
    for m in methods:
        cells = [f"{r['fsdp_over_ddp_total']:.3f}" if (r := index.get((m, "FSDP", w))) and r["fsdp_over_ddp_total"]
                 is not None else "-" for w in worlds]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    buckets = sorted({r["ddp_bucket_bytes"] for r in rows if r.get("ddp_bucket_bytes")})
    padded = [(r, x) for r in rows for x in r["ranks"] if x["bytes"]["allocated"] != x["bytes"]["total"]]
    lines += ["", "Not in the totals:", ""]
    if buckets:
        lines.append("- DDP's reducer keeps flat gradient buckets for its all-reduce (default "
                     "`gradient_as_bucket_view=False`): " + ", ".join(f"{mb(b)} MB" for b in buckets)
                     + " per rank (`_get_ddp_logging_data()['bucket_sizes']`), one more gradient-sized copy; "
                     "FSDP's all-gather and reduce-scatter buffers are transient.")
    if padded:
        extra = max(x["bytes"]["allocated"] - x["bytes"]["total"] for _, x in padded)
        lines.append(f"- FSDP2 pads each parameter's (and gradient's) shard to `ceil(dim 0 / world size)` rows: the "
                     f"storages behind the counted tensors exceed their elements by up to {mb(extra)} MB on a rank "
                     "(`allocated` in the JSON).")
    return "\n".join(lines) + "\n"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit-tiny", help="a ViT of the zoo (vit-mini, vit-tiny, vit-small)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--world-sizes", nargs="+", type=int, default=[1, 2, 4])
    parser.add_argument("--batch-size", type=int, default=32, help="images per rank")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (5: one whole cycle of OT-MDR+reuse)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds any collective may wait")
    parser.add_argument("--quick", action="store_true", help="vit-mini, 2 steps; writes no results")
    parser.add_argument("--output", type=Path, default=RESULTS / "fsdp_memory",
                        help="results path without suffix (.md and .json are written)")
    args = parser.parse_args()
    if args.quick:
        args.model, args.warmup, args.steps = "vit-mini", 1, 1
    if args.steps < 1 or args.warmup < 0 or args.batch_size < 1 or any(w < 1 for w in args.world_sizes):
        parser.error("--steps and --batch-size must be at least 1, --warmup at least 0, world sizes at least 1")
    return args


def main() -> None:
    args = parse_args()
    env = environment(args)
    parameters = count_parameters(create_model(args.model, num_classes=10))
    env["loadavg_before"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
    busy_before, own_before = machine_busy_s(), own_cpu_s()
    start = time.perf_counter()
    rows = []
    for world in args.world_sizes:
        for method in args.methods:
            for strategy in STRATEGIES:  # the pair compared side by side in time
                row = run_config(args.model, method, strategy, world, args)
                rows.append(row)
                print(f"{args.model} {method} {strategy} x{world}: total {row['bytes']['total'] / MB:.2f} MB/rank, "
                      f"step {1000 * row['step_s']:.0f} ms, wall {row['wall_s']:.0f} s", flush=True)
    wall_s = time.perf_counter() - start
    env["wall_s"] = round(wall_s, 1)
    env["loadavg_after"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
    busy_after, own_after = machine_busy_s(), own_cpu_s()
    if busy_before is not None and busy_after is not None:
        other = max(0.0, (busy_after - busy_before) - (own_after - own_before))
        env["other_processes_cpu_s"] = round(other, 1)
        env["other_processes_share"] = round(other / (wall_s * (os.cpu_count() or 1)), 3)
    add_ratios(rows)
    report = markdown(env, rows, parameters)
    payload = {"environment": env, "parameters": parameters, "results": rows}
    print()
    print(report)
    if not args.quick:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.with_suffix(".md").write_text(report)
        args.output.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {args.output.with_suffix('.md')} and {args.output.with_suffix('.json')}")
    print(json.dumps(payload, separators=(",", ":")))


if __name__ == "__main__":
    main()
