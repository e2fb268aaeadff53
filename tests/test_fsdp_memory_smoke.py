"""The FSDP memory benchmark still runs (benchmarks/fsdp_memory.py --quick: vit-mini, 2 steps, 1 and 2
gloo processes, nothing written) and its per-rank state numbers say what FSDP is for: sharded state
falls to about half per rank at 2 processes, DDP's does not move. Step times are not checked."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("SGD", "SAM", "OT-MDR", "OT-MDR+reuse")
#: the otmdr optimizer's own buffers in multiples of the (local) parameter bytes: SAM the centre,
#: OT-MDR the centre and the merged direction, with reuse also LookSAM's clean gradient and stored component
OWN_BUFFERS = {"SGD": 0, "SAM": 1, "OT-MDR": 2, "OT-MDR+reuse": 4}

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


@pytest.fixture(scope="module")
def quick() -> dict:
    before = sorted((ROOT / "benchmarks" / "results").glob("*"))
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fsdp_memory.py"), "--quick",
                           "--world-sizes", "1", "2"], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted((ROOT / "benchmarks" / "results").glob("*")) == before  # --quick writes nothing
    assert "| vit-mini | OT-MDR | FSDP | 2 |" in done.stdout  # the table
    payload = json.loads(done.stdout.strip().splitlines()[-1])
    return {(r["method"], r["strategy"], r["world_size"]): r for r in payload["results"]}


def rank_totals(row: dict) -> list[int]:
    return [r["bytes"]["total"] for r in sorted(row["ranks"], key=lambda r: r["rank"])]


@pytest.mark.parametrize("method", METHODS)
def test_fsdp_state_per_rank_halves_at_two_processes_and_ddp_stays(quick, method):
    fsdp1, fsdp2 = quick[(method, "FSDP", 1)], quick[(method, "FSDP", 2)]
    ddp1, ddp2 = quick[(method, "DDP", 1)], quick[(method, "DDP", 2)]
    assert fsdp2["sharded"] and not ddp2["sharded"]
    assert len(fsdp2["ranks"]) == len(ddp2["ranks"]) == 2
    # one process: the same state either way
    assert rank_totals(fsdp1) == rank_totals(ddp1)
    # 2 processes: each FSDP rank about half (uneven shards: vit-mini's position embedding, one row
    # along dim 0, lies on rank 0 only), every DDP rank the whole
    for total in rank_totals(fsdp2):
        assert 0.45 * rank_totals(fsdp1)[0] <= total <= 0.6 * rank_totals(fsdp1)[0], (method, rank_totals(fsdp2))
    assert rank_totals(ddp2) == rank_totals(ddp1) * 2
    assert fsdp2["total_x_1_process"] == pytest.approx(max(rank_totals(fsdp2)) / rank_totals(fsdp1)[0])
    assert 0.45 <= fsdp2["fsdp_over_ddp_total"] <= 0.6


@pytest.mark.parametrize("method", METHODS)
def test_each_part_is_counted_and_the_optimizer_buffers_are_shard_sized(quick, method):
    for strategy in ("DDP", "FSDP"):
        for world in (1, 2):
            for rank in quick[(method, strategy, world)]["ranks"]:
                parts = rank["bytes"]
                assert parts["params"] > 0 and parts["grads"] == parts["params"]
                assert parts["optimizer_state"] == parts["params"]  # SGD's momentum buffers
                assert parts["otmdr_buffers"] == OWN_BUFFERS[method] * parts["params"], (strategy, world, parts)
                assert parts["total"] == sum(parts[k] for k in ("params", "grads", "optimizer_state",
                                                                "otmdr_buffers"))
                assert rank["peak_rss_bytes"] > parts["total"]
    kinds = quick[(method, "FSDP", 2)]["kinds"]
    assert kinds == {"SGD": ["plain"] * 2, "OT-MDR+reuse": ["full", "reuse"]}.get(method, ["full"] * 2)
