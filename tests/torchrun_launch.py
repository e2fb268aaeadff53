"""Launching ``otmdr`` as torchrun would, in tests: every process calls the CLI entry point with
torchrun's environment, each started in milliseconds from a forkserver that imported torch and
otmdr once (never a fork of the threaded pytest process), with a bounded join. Shared by
tests/test_distributed_cli.py (DDP) and tests/test_fsdp_cli.py (FSDP); each brings what its
processes record of their replica and its list of modules to preload."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

JOIN_SECONDS = 240  # a lost peer must end the job well before this; a hang fails the test
TIMING = {"seconds", "images_per_second"}  # metrics that differ between identical runs

_CONTEXTS: dict[tuple[str, ...], Any] = {}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def forkserver(preload: Sequence[str]) -> Any:
    """The forkserver context that preloads ``preload`` (what a launch would import otherwise,
    seconds each on a loaded machine), made once per list."""
    key = tuple(preload)
    if key not in _CONTEXTS:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(list(key))
        _CONTEXTS[key] = context
    return _CONTEXTS[key]


def cli_worker(rank: int, world: int, port: int, argv: list[str], out: str, hook: dict | None,
               replica: Callable[[Any], Any]) -> None:
    """One torchrun process: its environment, then the CLI entry point in-process; it writes its exit
    status to ``out/rc<rank>``, its stderr to ``out/stderr<rank>`` and, at the final evaluation,
    ``replica(model)`` to ``out/replica<rank>.pt``. ``hook`` (for one rank only): ``{"rank", "step",
    "what"}`` sends SIGTERM to that rank (``"sigterm"``) or raises in it at that optimizer step, or
    (``"unshared"``) hides from it the folders rank 0 makes, as on another node's disk."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    import torch

    from otmdr.cli import main
    from otmdr.optim import OTMDR
    from otmdr.train import loop

    torch.set_num_threads(1)
    sys.stderr = open(Path(out) / f"stderr{rank}", "w", buffering=1)
    if hook and hook["rank"] == rank:
        if hook["what"] == "unshared":
            is_dir = Path.is_dir
            Path.is_dir = lambda self: not self.name.endswith(".partial") and is_dir(self)  # type: ignore[method-assign]
        else:
            original, calls = OTMDR.step, [0]

            def step(self, *args, **kwargs):
                calls[0] += 1
                if calls[0] == hook["step"]:
                    if hook["what"] == "sigterm":
                        os.kill(os.getpid(), signal.SIGTERM)
                    else:
                        raise RuntimeError("injected failure")
                return original(self, *args, **kwargs)

            OTMDR.step = step
    evaluate = loop._final_evaluation

    def final_evaluation(cfg, model, optimizer, data, history, **options):
        torch.save(replica(model), Path(out) / f"replica{rank}.pt")
        return evaluate(cfg, model, optimizer, data, history, **options)

    loop._final_evaluation = final_evaluation
    try:
        code = main(argv + ["--dist-timeout", "60"])
    except SystemExit as exit:
        code = exit.code
    (Path(out) / f"rc{rank}").write_text(str(code))


def launch(context: Any, worker: Callable[..., None], tmp: Path, argv: list[str], hook: dict | None = None,
           world: int = 2) -> list[tuple[int, str]]:
    """``world`` processes of ``worker(rank, world, port, argv, tmp, hook)``; each one's (exit
    status, stderr): the worker writes ``rc<rank>`` and ``stderr<rank>`` into ``tmp``."""
    tmp.mkdir(parents=True, exist_ok=True)
    port = free_port()
    processes = [context.Process(target=worker, args=(rank, world, port, argv, str(tmp), hook))
                 for rank in range(world)]
    for p in processes:
        p.start()
    for p in processes:
        p.join(JOIN_SECONDS)
    alive = [p for p in processes if p.is_alive()]
    for p in alive:
        p.kill()
    assert not alive, "a process hung instead of exiting"
    results = []
    for rank in range(world):
        rc = tmp / f"rc{rank}"
        results.append((int(rc.read_text()) if rc.is_file() else processes[rank].exitcode,
                        (tmp / f"stderr{rank}").read_text()))
    return results


def train_argv(run: Path, items: list[str]) -> list[str]:
    argv = ["train", "--out", str(run)]
    for item in items:
        argv += ["--set", item]
    return argv


def metric_rows(run: Path) -> list[dict]:
    """The run's metrics rows without the timing columns."""
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (run / "metrics.jsonl").read_text().splitlines()]
