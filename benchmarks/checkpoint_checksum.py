"""What the checkpoint checksum costs: for a model's full training state (weights, an optimizer
with momentum, the rest of a checkpoint), the time to serialise it (what the training thread
pays, unchanged), to seal it with its SHA-256 (paid on the CheckpointWriter's background thread,
or inline by ``save_checkpoint``), and to verify it when loading, next to the load itself.

    python benchmarks/checkpoint_checksum.py [--models mlp resnet18 wrn28-10] [--repeats 5]
"""

from __future__ import annotations

import argparse
import io
import statistics
import tempfile
import time
from pathlib import Path

import torch

from otmdr.config import config_to_dict, load_config
from otmdr.data import get_spec
from otmdr.train.builders import build_model, build_optimizer
from otmdr.train.checkpoint import _check_seal, _serialise, _write_sealed

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def _state(name: str) -> dict:
    dataset = "digits" if name.startswith("mlp") else "cifar10"
    cfg = load_config(DEMO, [f"model.name={name}", f"data.name={dataset}", "optim.method=otmdr"]
                      + (["model.options={}"] if dataset == "cifar10" else []))
    model = build_model(cfg, get_spec(dataset))
    optimizer = build_optimizer(cfg, model)
    for param in model.parameters():  # a momentum buffer per parameter, as after the first step
        optimizer.state[param]["momentum_buffer"] = torch.randn_like(param)
    return {"config": config_to_dict(cfg), "model": model.state_dict(), "optimizer": optimizer.state_dict()}


def _median(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mlp", "mlp-x3", "resnet18", "wrn28-10"])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; median of {args.repeats}")
    print("| model | checkpoint MB | serialise ms (training thread) | seal ms (writer thread) | "
          "verify ms (load) | torch.load ms |")
    print("|---|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models:
            state = _state(name)
            data = _serialise(state)
            path = Path(folder) / f"{name}.pt"
            with path.open("wb") as handle:
                _write_sealed(handle, data)
            serialise = _median(lambda: _serialise(state), args.repeats)  # noqa: B023 (called at once)
            seal = _median(lambda: _write_sealed(io.BytesIO(), data), args.repeats)  # noqa: B023
            write = _median(lambda: io.BytesIO().write(data), args.repeats)  # noqa: B023 (the copy alone)

            def verify() -> None:
                with path.open("rb") as handle:  # noqa: B023
                    _check_seal(handle, path)  # noqa: B023

            check = _median(verify, args.repeats)
            load = _median(lambda: torch.load(path, weights_only=True), args.repeats)  # noqa: B023
            print(f"| {name} | {len(data) / 1e6:.1f} | {1e3 * serialise:.1f} | {1e3 * max(seal - write, 0):.1f} | "
                  f"{1e3 * check:.1f} | {1e3 * load:.1f} |")


if __name__ == "__main__":
    main()
