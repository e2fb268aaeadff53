"""``otmdr train`` and ``otmdr compare`` with ``train.strategy=fsdp`` (FSDP2, sharded checkpoints),
2 processes (gloo on CPU), the way torchrun runs them: every process calls the CLI entry point with
torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*).

Robust on a loaded 2-core CI machine as tests/test_distributed_cli.py (the same launcher, tests/torchrun_launch.py):
fresh processes forked from a forkserver that imported torch and otmdr once, loopback only, one
thread per process, a bounded --dist-timeout and a bounded join, tiny runs (digits, 192 training
images, an MLP or vit-mini).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from otmdr.cli import main
from otmdr.eval import evaluate_model
from otmdr.models import create_model
from otmdr.models.units import fsdp_units
from otmdr.train import CheckpointError, load_checkpoint, load_run
from otmdr.train.builders import build_data
from torchrun_launch import cli_worker, forkserver, launch, metric_rows, train_argv

pytestmark = pytest.mark.skipif(sys.platform == "win32" or not torch.distributed.is_available(),
                                reason="POSIX signals and torch.distributed")

# 256 images, a quarter for validation: 192 training images = 6 global batches of 32 (3 epochs)
TINY = ["data.name=digits", "data.train_limit=256", "data.val_fraction=0.25", "data.batch_size=32",
        "model.name=mlp", "model.options={hidden: [32], batch_norm: true}", "optim.lr=0.05", "train.epochs=3",
        "train.threads=1", "train.progress=false", "optim.method=otmdr", "train.strategy=fsdp"]
# per-rank crops and the optimizer's (shared) Langevin noise; LookSAM steps, whose stored component is
# a sharded tensor of the optimizer state: what a resume must restore
RANDOM = ["data.crop_padding=1", "otmdr.noise_std=0.001", "efficiency.interval=2", "efficiency.reuse=true"]
VIT = ["model.name=vit-mini", "model.options={patch_size: 4}"]


def _replica(model: torch.nn.Module) -> dict:
    """Each rank's shards (and their types) and buffers."""
    from otmdr.optim.sharding import local

    return {"params": [local(p).detach().clone() for p in model.parameters()],
            "sharded": [type(p).__name__ for p in model.parameters()],
            "buffers": [b.detach().clone() for b in model.buffers()]}


def _worker(rank: int, world: int, port: int, argv: list[str], out: str, hook: dict | None) -> None:
    cli_worker(rank, world, port, argv, out, hook, _replica)


# what a launch would import otherwise, seconds each on a loaded machine: FSDP and DCP, the
# digits dataset scikit-learn, a compare report matplotlib
PRELOAD = ["torch", "torch.distributed", "torch.distributed.fsdp", "torch.distributed.checkpoint",
           "torch.distributed.tensor", "torch.nn.parallel", "torch._dynamo", "sklearn.datasets",
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
    """The final weights, read whole in this process (sharded checkpoints: from their folder)."""
    return load_checkpoint(run / "checkpoints" / "last.pt")["model"]


def _tree(run: Path) -> dict[str, bytes]:
    """Every file of a run folder but its lock (which names the last process that held it)."""
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()
            and p.name != ".lock"}


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory) -> Path:
    """One uninterrupted 2-process FSDP run (batch norm, per-rank crops, noise, LookSAM steps)."""
    tmp = tmp_path_factory.mktemp("fsdp-cli")
    results = _launch(tmp / "procs", _train_argv(tmp / "run", RANDOM))
    assert [rc for rc, _ in results] == [0, 0], results
    return tmp


def test_fsdp_trains_with_sharded_parameters_and_writes_the_usual_outputs(fsdp_run):
    run = fsdp_run / "run"
    assert sorted(p.name for p in run.iterdir()) == [".lock", "checkpoints", "config.yaml", "metrics.csv",
                                                     "metrics.jsonl", "summary.json"]
    replicas = [torch.load(fsdp_run / "procs" / f"replica{r}.pt") for r in range(2)]
    assert set(replicas[0]["sharded"]) == {"DTensor"}  # every parameter sharded
    # each rank holds its own shard (together the whole weights), and rank 0's batch-norm statistics
    assert sum(p.numel() for p in replicas[0]["params"]) + sum(p.numel() for p in replicas[1]["params"]) == \
        sum(t.numel() for k, t in _weights(run).items() if "running" not in k and "num_batches" not in k)
    assert all(torch.equal(a, b) for a, b in zip(replicas[0]["buffers"], replicas[1]["buffers"]))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["distributed"] == {"strategy": "fsdp", "world_size": 2}
    rows = _rows(run)
    assert len(rows) == 3 and rows[-1]["train_loss"] < rows[0]["train_loss"]
    # the checkpoint files name a sharded folder each: last.pt's, and best.pt's if another one
    checkpoints = run / "checkpoints"
    last = torch.load(checkpoints / "last.pt", weights_only=True)
    assert "model" not in last and last["world_size"] == 2 and len(last["ranks"]) == 2
    assert last["sharded"]["folder"] == "state-0003-00000.dcp"
    assert any(path[:2] == ["otmdr", "reuse"] for path, _ in last["sharded"]["layout"])  # LookSAM's component
    named = {torch.load(checkpoints / f, weights_only=True)["sharded"]["folder"] for f in ("last.pt", "best.pt")}
    assert {p.name for p in checkpoints.iterdir() if p.is_dir()} == named  # earlier folders were removed
    assert not [p for p in checkpoints.iterdir() if p.name.startswith(".")]


def test_a_sharded_checkpoint_loads_whole_in_one_process_and_evaluates_the_same(fsdp_run):
    run = fsdp_run / "run"
    cfg, model, _ = load_run(run, device="cpu")  # what otmdr eval, sharpness and landscape read
    single = evaluate_model(cfg, model, build_data(cfg, torch.device("cpu")))
    assert json.loads((run / "summary.json").read_text())["test"] == single["test"]


def test_a_sharded_checkpoint_with_a_damaged_or_missing_folder_is_refused_in_one_line(fsdp_run, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(fsdp_run / "run", copy)
    last = copy / "checkpoints" / "last.pt"
    folder = copy / "checkpoints" / torch.load(last, weights_only=True)["sharded"]["folder"]
    shard = sorted(folder.glob("*.distcp"))[-1]
    shard.write_bytes(shard.read_bytes()[:100])  # a shard file cut short
    with pytest.raises(CheckpointError, match=f"sharded checkpoint {folder} cannot be read") as refused:
        load_checkpoint(last)
    assert "\n" not in str(refused.value)
    shutil.rmtree(folder)
    with pytest.raises(CheckpointError, match=f"sharded folder {folder} .* is missing or unreadable"):
        load_checkpoint(last)


def test_sigterm_mid_epoch_then_resume_equals_the_uninterrupted_run(fsdp_run, tmp_path):
    run = tmp_path / "run"
    # step 8 of 18: mid-epoch 2, after a full step (steps alternate full and LookSAM); the signal reaches
    # rank 1 only, both stop at the same step
    stopped = _launch(tmp_path / "stop", _train_argv(run, RANDOM), {"rank": 1, "step": 8, "what": "sigterm"})
    assert [rc for rc, _ in stopped] == [143, 143], stopped
    assert f"otmdr train --resume {run}" in stopped[0][1] and stopped[1][1] == ""  # rank 0 speaks for all
    last = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert "partial_epoch" in last and last["sharded"]["folder"] == "state-0001-00002.dcp"
    # what a kill between a sharded folder and the checkpoint file naming it leaves: removed on resume
    for stray in ("state-0001-00003.dcp", ".state-0001-00004.dcp.partial"):
        (run / "checkpoints" / stray).mkdir()
    resumed = _launch(tmp_path / "resume", ["train", "--resume", str(run)])
    assert [rc for rc, _ in resumed] == [0, 0], resumed
    assert not (run / "checkpoints" / "state-0001-00003.dcp").exists()
    assert not (run / "checkpoints" / ".state-0001-00004.dcp.partial").exists()
    reference = fsdp_run / "run"
    a, b = _weights(reference), _weights(run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _rows(run) == _rows(reference)
    assert json.loads((run / "summary.json").read_text())["test"] == json.loads(
        (reference / "summary.json").read_text())["test"]


def test_resuming_with_another_number_of_processes_is_one_line_and_changes_nothing(fsdp_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(fsdp_run / "run", run)
    (run / "summary.json").unlink()  # as if stopped before its end
    before = _tree(run)
    one = _launch(tmp_path / "one", ["train", "--resume", str(run)], world=1)  # torchrun --nproc_per_node 1
    assert one[0][0] == 2, one
    lines = one[0][1].strip().splitlines()
    assert len(lines) == 1 and "written by a run of 2 process(es) and this launch has 1" in lines[0], lines
    assert _tree(run) == before


def test_a_failing_rank_ends_the_whole_job_with_a_message(tmp_path):
    results = _launch(tmp_path / "procs", _train_argv(tmp_path / "run", []), {"rank": 1, "step": 2, "what": "raise"})
    (rc0, err0), (rc1, err1) = results
    assert rc1 != 0 and "injected failure" in err1
    assert rc0 == 2 and "otmdr [rank 0]: error: another process of this torchrun job failed" in err0
    assert "Traceback" not in err0


def test_a_run_folder_that_not_every_process_sees_stops_at_the_first_checkpoint_in_one_line(tmp_path):
    results = _launch(tmp_path / "procs", _train_argv(tmp_path / "run", ["train.epochs=1"]),
                      {"rank": 1, "step": 0, "what": "unshared"})
    assert [rc for rc, _ in results] == [2, 2], results
    assert "is not on a file system every process sees" in results[0][1] and results[1][1] == ""
    assert not (tmp_path / "run").exists()  # nothing was checkpointed: the fresh run leaves nothing


def test_vit_mini_trains_under_fsdp_and_one_process_runs_on_a_mesh_of_one(tmp_path):
    two = _launch(tmp_path / "two", _train_argv(tmp_path / "vit", VIT + ["train.epochs=2"]))
    assert [rc for rc, _ in two] == [0, 0], two
    rows = _rows(tmp_path / "vit")
    assert len(rows) == 2 and all(row["train_loss"] > 0 for row in rows)
    one = _launch(tmp_path / "one", _train_argv(tmp_path / "single", ["train.epochs=1"]), world=1)
    assert one[0][0] == 0, one
    assert json.loads((tmp_path / "single" / "summary.json").read_text())["distributed"] == {
        "strategy": "fsdp", "world_size": 1}


def test_fsdp_equals_ddp_with_sync_ascent_without_batch_norm(tmp_path):
    """Both take the one-process algorithm's global ascent on the same shards: the same weights to
    float tolerance (the sums run in other orders: reduce-scatter against all-reduce)."""
    plain = ["model.options={hidden: [32]}"]  # no batch norm, no per-rank randomness
    fsdp = _launch(tmp_path / "fsdp", _train_argv(tmp_path / "f", plain))
    ddp = _launch(tmp_path / "ddp", _train_argv(tmp_path / "d", plain + ["train.strategy=ddp",
                                                                         "otmdr.sync_ascent=true"]))
    assert [rc for rc, _ in fsdp + ddp] == [0, 0, 0, 0], fsdp + ddp
    a, b = _weights(tmp_path / "d"), _weights(tmp_path / "f")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5)
    f, d = _rows(tmp_path / "f"), _rows(tmp_path / "d")
    assert [r["val_accuracy"] for r in f] == [r["val_accuracy"] for r in d]
    for x, y in zip(f, d):
        assert x["train_loss"] == pytest.approx(y["train_loss"], rel=1e-4)


def test_compare_under_fsdp_trains_every_run_sharded_and_rank0_reports(tmp_path):
    out = tmp_path / "compare"
    argv = ["compare", "--methods", "sgd,otmdr", "--seeds", "1", "--out", str(out), "--quiet"]
    for item in TINY + ["train.epochs=2"]:
        argv += ["--set", item]
    results = _launch(tmp_path / "procs", argv)
    assert [rc for rc, _ in results] == [0, 0], results
    summaries = json.loads((out / "summaries.json").read_text())  # method -> its runs' summary.json
    assert (out / "report.md").is_file() and sorted(summaries) == ["otmdr", "sgd"]
    assert [s["distributed"] for runs in summaries.values() for s in runs] == [
        {"strategy": "fsdp", "world_size": 2}] * 2


# ---------------------------------------------------------------------------- no processes needed
def test_fsdp_without_torchrun_is_refused_in_one_line_and_leaves_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["train", "--out", str(run)]
    for item in TINY:
        argv += ["--set", item]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("otmdr: error: config key train.strategy: fsdp") and \
        "torchrun" in err[0], err
    assert not run.exists()


def test_channels_last_is_refused_under_fsdp_in_one_line():
    from otmdr.config import ConfigError, load_config
    from otmdr.train.distributed import Context
    from otmdr.train.strategy import FullyShard

    with pytest.raises(ConfigError, match="train.channels_last: FSDP shards contiguous parameters only"):
        FullyShard(Context(0, 2, 0)).check_config(load_config(None, TINY + ["train.channels_last=true"]))


@pytest.mark.parametrize("name,options,expected", [
    ("vit-mini", {"input_size": 8, "patch_size": 4}, ["Block"] * 4),
    ("resnet20", {}, ["Conv2d", "BatchNorm2d"] + ["BasicBlock"] * 9 + ["Linear"]),
    ("mlp", {"input_size": 8, "hidden": (32, 16), "batch_norm": True},
     ["Linear", "BatchNorm1d", "Linear", "BatchNorm1d", "Linear"]),
    ("lenet-x3", {}, ["LeNet"] * 3),
])
def test_fsdp_units_are_blocks_layers_or_members(name, options, expected):
    model = create_model(name, num_classes=10, in_channels=1 if name == "mlp" else 3, **options)
    units = fsdp_units(model)
    assert [type(unit).__name__ for unit in units] == expected
    ids = [id(p) for unit in units for p in unit.parameters()]
    assert len(ids) == len(set(ids))  # disjoint: no unit inside another
