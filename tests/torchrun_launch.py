"""Launching ``otmdr`` as torchrun would, in tests: every process calls the CLI entry point with
torchrun's environment, each started in milliseconds from a forkserver that imported torch and
otmdr once (never a fork of the threaded pytest process), with a bounded join. Shared by
tests/test_distributed_cli.py (DDP) and tests/test_fsdp_cli.py (FSDP); each brings its own worker
(its environment and test hooks) and its list of modules to preload."""

from __future__ import annotations

import json
import multiprocessing
import socket
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
