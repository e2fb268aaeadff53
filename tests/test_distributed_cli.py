"""``otmdr train`` with 2 processes (gloo on CPU), the way torchrun runs it: every process calls
the CLI entry point with torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*).

Robust on a loaded 2-core CI machine (as tests/test_ddp.py): loopback only, one thread per
process, a bounded --dist-timeout and a bounded join, tiny runs (digits MLP, 192 training images).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from otmdr.cli import main
from otmdr.config import load_config
from otmdr.train import distributed
from otmdr.train.builders import build_data
from otmdr.eval import evaluate_model
from otmdr.train import load_run
from otmdr.train.strategy import DataParallel
from torchrun_launch import cli_worker, forkserver, launch, metric_rows, train_argv

pytestmark = pytest.mark.skipif(sys.platform == "win32" or not torch.distributed.is_available(),
                                reason="POSIX signals and torch.distributed")

# 256 images, a quarter for validation: 192 training images = 6 global batches of 32 (3 epochs)
TINY = ["data.name=digits", "data.train_limit=256", "data.val_fraction=0.25", "data.batch_size=32",
        "model.name=mlp", "model.options={hidden: [32], batch_norm: true}", "optim.lr=0.05", "train.epochs=3",
        "train.threads=1", "train.progress=false", "optim.method=otmdr"]
# per-rank randomness that a resume must restore: crops and the optimizer's Langevin noise
RANDOM = ["data.crop_padding=1", "otmdr.noise_std=0.001"]


def _replica(model: torch.nn.Module) -> torch.Tensor:
    """Every replica's weights and buffers, as one vector."""
    return torch.cat([t.detach().double().flatten() for t in model.state_dict().values()])


def _worker(rank: int, world: int, port: int, argv: list[str], out: str, hook: dict | None) -> None:
    cli_worker(rank, world, port, argv, out, hook, _replica)


# what a launch would import otherwise, seconds each on a loaded machine: DDP's constructor
# imports torch._dynamo, the digits dataset scikit-learn, a compare report matplotlib
PRELOAD = ["torch", "torch.distributed", "torch.nn.parallel", "torch._dynamo", "sklearn.datasets",
           "sklearn.model_selection", "otmdr.cli", "otmdr.train.loop", "otmdr.train.study", "otmdr.data",
           "otmdr.report.plots"]


def _launch(tmp: Path, argv: list[str], hook: dict | None = None, world: int = 2) -> list[tuple[int, str]]:
    """``world`` processes of ``otmdr ARGV``; each one's (exit status, stderr)."""
    return launch(forkserver(PRELOAD), _worker, tmp, argv, hook, world)


def _train_argv(run: Path, extra: list[str]) -> list[str]:
    return train_argv(run, TINY + extra)


def _rows(run: Path) -> list[dict]:
    return metric_rows(run)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints" / "last.pt", weights_only=False)["model"]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory) -> Path:
    """One uninterrupted 2-process run (local ascent passes, per-rank crops and noise, batch norm)."""
    tmp = tmp_path_factory.mktemp("ddp-cli")
    results = _launch(tmp / "procs", _train_argv(tmp / "run", RANDOM))
    assert [rc for rc, _ in results] == [0, 0], results
    return tmp


def test_two_processes_train_identical_replicas_and_rank0_writes(two_process_run):
    run = two_process_run / "run"
    replicas = [torch.load(two_process_run / "procs" / f"replica{r}.pt") for r in range(2)]
    assert torch.equal(replicas[0], replicas[1])  # parameters and batch-norm buffers
    checkpoint = torch.load(run / "checkpoints" / "last.pt", weights_only=False)
    assert checkpoint["world_size"] == 2 and len(checkpoint["ranks"]) == 2
    assert not torch.equal(checkpoint["ranks"][0]["rng"]["cpu"], checkpoint["ranks"][1]["rng"]["cpu"])
    assert sorted(p.name for p in run.iterdir()) == [".lock", "checkpoints", "config.yaml", "metrics.csv",
                                                     "metrics.jsonl", "summary.json"]
    rows = _rows(run)
    assert len(rows) == 3 and rows[-1]["train_loss"] < rows[0]["train_loss"]


def test_evaluation_equals_a_single_process_evaluation_of_the_weights(two_process_run):
    run = two_process_run / "run"
    cfg, model, _ = load_run(run, device="cpu")
    single = evaluate_model(cfg, model, build_data(cfg, torch.device("cpu")))
    assert json.loads((run / "summary.json").read_text())["test"] == single["test"]


def test_sigterm_to_one_rank_then_resume_equals_the_uninterrupted_run(two_process_run, tmp_path):
    run = tmp_path / "run"
    # step 8 of 18: mid-epoch 2; the signal reaches rank 1 only, both stop at the same step
    stopped = _launch(tmp_path / "stop", _train_argv(run, RANDOM), {"rank": 1, "step": 8, "what": "sigterm"})
    assert [rc for rc, _ in stopped] == [143, 143], stopped
    assert f"otmdr train --resume {run}" in stopped[0][1] and stopped[1][1] == ""  # rank 0 speaks for all
    assert "partial_epoch" in torch.load(run / "checkpoints" / "last.pt", weights_only=False)
    resumed = _launch(tmp_path / "resume", ["train", "--resume", str(run)])
    assert [rc for rc, _ in resumed] == [0, 0], resumed
    reference = two_process_run / "run"
    a, b = _weights(reference), _weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _rows(run) == _rows(reference)
    assert json.loads((run / "summary.json").read_text())["test"] == json.loads(
        (reference / "summary.json").read_text())["test"]


def test_sync_ascent_on_two_half_shards_equals_one_process_on_the_global_batch(tmp_path):
    sync = ["otmdr.sync_ascent=true", "model.options={hidden: [32]}"]  # no batch norm, no per-rank randomness
    results = _launch(tmp_path / "procs", _train_argv(tmp_path / "two", sync))
    assert [rc for rc, _ in results] == [0, 0], results
    assert main(_train_argv(tmp_path / "one", sync)) == 0
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5)
    one, two = _rows(tmp_path / "one"), _rows(tmp_path / "two")
    assert [r["val_accuracy"] for r in one] == [r["val_accuracy"] for r in two]


def test_a_failing_rank_ends_the_whole_job_with_a_message(tmp_path):
    results = _launch(tmp_path / "procs", _train_argv(tmp_path / "run", []), {"rank": 1, "step": 2, "what": "raise"})
    (rc0, err0), (rc1, err1) = results
    assert rc1 != 0 and "injected failure" in err1
    assert rc0 == 2 and "otmdr [rank 0]: error: another process of this torchrun job failed" in err0
    assert "Traceback" not in err0


def test_compare_trains_each_run_on_both_processes_and_rank0_reports(tmp_path):
    out = tmp_path / "compare"
    argv = ["compare", "--methods", "sgd,otmdr", "--seeds", "1", "--out", str(out), "--quiet"]
    for item in TINY:
        argv += ["--set", item]
    results = _launch(tmp_path / "procs", argv)
    assert [rc for rc, _ in results] == [0, 0], results
    assert (out / "report.md").is_file() and len(json.loads((out / "summaries.json").read_text())) == 2
    again = _launch(tmp_path / "again", argv + ["--resume"])  # every run reused: rank 0 decides for both
    assert [rc for rc, _ in again] == [0, 0], again
    refused = _launch(tmp_path / "jobs", argv + ["--resume", "--jobs", "2"])
    assert [rc for rc, _ in refused] == [2, 2] and "--jobs > 1 under torchrun" in refused[0][1], refused
    # rank 1 is silent about the refusal rank 0 reports, unless rank 0 refused and left while rank 1
    # was still joining the group (a race): then it says why it stops, in one line
    assert refused[1][1] == "" or _one_lost_peer_line(refused[1][1], rank=1), refused


def _one_lost_peer_line(stderr: str, rank: int) -> bool:
    noise = ("[W", "Exception raised", "<omitting", "frame #")
    lines = [line for line in stderr.splitlines() if not line.startswith(noise)]
    return len(lines) == 1 and lines[0].startswith(
        f"otmdr [rank {rank}]: error: another process of this torchrun job failed")


# ---------------------------------------------------------------------------- no processes needed
def test_launch_environment_and_strided_shards():
    assert distributed.launched({}) == distributed.Context(0, 1, 0)
    assert distributed.launched({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}).enabled
    with pytest.raises(distributed.DistributedError):
        distributed.launched({"RANK": "4", "WORLD_SIZE": "4"})
    x, y = torch.arange(10), torch.arange(10) * 2
    shards = [distributed.shard((x, y), distributed.Context(r, 2, r)) for r in range(2)]
    assert shards[0][0].tolist() == [0, 2, 4, 6, 8] and shards[1][1].tolist() == [2, 6, 10, 14, 18]
    # the first half of every shard together is the first half of the global batch (OT-MDR's parts)
    assert sorted(shards[0][0][:2].tolist() + shards[1][0][:2].tolist()) == [0, 1, 2, 3]


def test_sharded_loader_splits_each_global_batch_and_one_process_is_unchanged():
    cfg = load_config(None, TINY)
    whole = build_data(cfg, torch.device("cpu")).train
    parts = [build_data(cfg, torch.device("cpu"), shard=(r, 2)).train for r in range(2)]
    assert len(parts[0]) == len(whole)
    for (xw, yw), (x0, y0), (x1, y1) in zip(whole, *parts):
        assert torch.equal(yw[0::2], y0) and torch.equal(yw[1::2], y1)
        assert torch.equal(xw[0::2], x0) and torch.equal(xw[1::2], x1)


def test_distributed_config_problems_are_one_line_config_errors():
    from otmdr.config import ConfigError
    from otmdr.train import CheckpointError

    two = DataParallel(distributed.Context(0, 2, 0))
    with pytest.raises(ConfigError, match="data.batch_size: 33 is the global batch and must be divisible"):
        two.check_config(load_config(None, ["data.batch_size=33"]))
    with pytest.raises(ConfigError, match="cuda:LOCAL_RANK"):
        two.check_config(load_config(None, ["train.device=cuda:1"]))
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="SyncBatchNorm needs CUDA"):
            two.check_config(load_config(None, ["train.sync_batchnorm=true", "train.device=cpu"]))
    with pytest.raises(CheckpointError, match="written by a run of 1 process"):
        two.check_checkpoint({}, Path("last.pt"))
    with pytest.raises(ConfigError, match="otmdr.sync_ascent: expected true or false"):
        load_config(None, ["otmdr.sync_ascent=maybe"])


def test_commands_other_than_train_and_compare_refuse_torchrun(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert main(["config"]) == 2
    assert "otmdr config runs in one process" in capsys.readouterr().err


def test_a_peer_lost_while_joining_the_group_is_one_line_not_a_traceback(monkeypatch, capsys):
    # rank 0 refused bad input and exited while this rank still joined the gloo group: torch raises
    # DistNetworkError from init_process_group (seen 1 in 7 runs of the --jobs refusal above)
    def init(timeout):
        raise torch.distributed.DistNetworkError("Failed to recv, got 0 bytes. Connection was likely closed.")

    monkeypatch.setattr(distributed, "init", init)
    for key, value in {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}.items():
        monkeypatch.setenv(key, value)
    assert main(["train", "--set", "data.name=digits"]) == 2
    assert _one_lost_peer_line(capsys.readouterr().err, rank=1)
