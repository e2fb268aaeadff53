"""Shared helpers for the tests: tiny models, data, and a hand-written OT-MDR reference."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call


def require_oracle(module: str, why: str) -> ModuleType:
    """Import an independent reference (oracle) package for a test.

    In CI (``CI`` set, as ``.ci/run`` runs) a missing oracle is a failure: a test that silently
    skips its reference proves nothing. Elsewhere it skips with the reason and the install hint.
    """
    try:
        return importlib.import_module(module)
    except ImportError as error:
        if os.environ.get("CI"):
            pytest.fail(f"oracle {module!r} is required in CI ({why}): {error}", pytrace=False)
        # allow_module_level: a test module may import its oracle at the top (it subclasses it)
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        pytest.skip(f"oracle {module!r} cannot be imported ({why}): {first} `make test` installs the Python "
                    "package; a system library it needs (Wand: Debian's libmagickwand) comes from .ci/run, as root",
                    allow_module_level=True)


def start_otmdr(args: list[str], pause: str | None = None) -> subprocess.Popen:
    """``python -m otmdr ARGS`` as a subprocess whose output the test reads; ``pause`` sets the
    test-only hook ``OTMDR_TEST_PAUSE_AT`` (otmdr._signals: the command creates the marker file
    at that point and waits until the test deletes it), so a signal lands at a known point."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("OTMDR_TEST_PAUSE_AT", None)
    if pause is not None:
        env["OTMDR_TEST_PAUSE_AT"] = pause
    return subprocess.Popen([sys.executable, "-m", "otmdr", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)


def wait_for_pause(process: subprocess.Popen, marker: Path) -> None:
    """Until the command stands at its pause point (it must not end first)."""
    deadline = time.monotonic() + 600
    while not marker.exists():
        if process.poll() is not None:
            raise AssertionError(f"the command ended (status {process.returncode}) before its pause point: "
                                 f"{process.stderr.read() if process.stderr else ''}")
        assert time.monotonic() < deadline, "the command did not reach its pause point in 10 minutes"
        time.sleep(0.01)


def train_stopped_at(cfg, folder: Path, line_prefix: str) -> Path:
    """Train ``cfg`` in a new run folder and stop it as a crash would, in-process, when the log
    prints a line starting with ``line_prefix`` (e.g. "epoch 1/2": right after that epoch's
    checkpoint); returns the folder, ready for ``train(None, ..., resume=True)``."""
    from otmdr.train import prepare_run_dir, train

    class Stop(Exception):
        pass

    def stop(line: str) -> None:
        if line.startswith(line_prefix):
            raise Stop

    run = prepare_run_dir(folder, resume=False)
    with pytest.raises(Stop):
        train(cfg, run, log=stop)
    return run


def tiny_mlp(seed: int = 0, dtype: torch.dtype = torch.float64, batch_norm: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(6, 12)]
    if batch_norm:
        layers.append(nn.BatchNorm1d(12))
    layers += [nn.Tanh(), nn.Linear(12, 4)]
    return nn.Sequential(*layers).to(dtype)


def data(n: int = 16, seed: int = 1, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g, dtype=dtype), torch.randint(0, 4, (n,), generator=g)


def ce(model: nn.Module):
    return lambda b: F.cross_entropy(model(b[0]), b[1])


def grad_at(model: nn.Module, theta: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    names = [n for n, _ in model.named_parameters()]
    theta = [t.detach().requires_grad_(True) for t in theta]
    loss = F.cross_entropy(functional_call(model, dict(zip(names, theta)), (x,)), y)
    return [g.detach() for g in torch.autograd.grad(loss, theta)]


def norm(ts: list[torch.Tensor]) -> torch.Tensor:
    return torch.sqrt(sum((t * t).sum() for t in ts))


def reference_final_gradient(model, theta0, x, y, *, rho, merge=True, normalize="step", reduce="sum",
                             eps=1e-12, particles_perms=(None,)):
    """method.md section 2 written out literally: the ascent chain on halves, then the full-batch
    gradient at the end point, summed (or averaged) over particles."""
    n = len(x)
    total = None
    for perm in particles_perms:
        xp, yp = (x, y) if perm is None else (x[perm], y[perm])
        steps = len(rho)
        bounds = [(round(i * n / steps), round((i + 1) * n / steps)) for i in range(steps)]
        theta = [t.clone() for t in theta0]
        d = None
        for i, (lo, hi) in enumerate(bounds):
            g = grad_at(model, theta, xp[lo:hi], yp[lo:hi])
            d = g if (d is None or not merge) else [a + b for a, b in zip(d, g)]
            direction = [t / (i + 1) for t in d] if (merge and reduce == "mean") else d
            denominator = norm(g) if normalize == "step" else norm(direction)
            theta = [t + rho[i] * u / (denominator + eps) for t, u in zip(theta, direction)]
        g = grad_at(model, theta, x, y)
        total = g if total is None else [a + b for a, b in zip(total, g)]
    if reduce == "mean":
        total = [t / len(particles_perms) for t in total]
    return total


def join_gloo_group(rank: int, world: int, store: str, timeout_s: float = 300) -> None:
    """A spawned test process joins a gloo group robustly on a loaded 2-core machine: loopback
    only (no hostname lookup), one thread per process (2 processes x 2 threads oversubscribe), and
    a bounded wait instead of gloo's 30-minute default, so a lost peer fails the test instead of
    hanging CI."""
    import datetime

    import torch.distributed as dist

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))


def leave_gloo_group() -> None:
    """End a spawned test process once every rank is past its collectives: a barrier, then
    ``os._exit(0)`` without gloo's C++ teardown, which aborted a rank about once in 12 runs under
    load (tests/test_ddp.py); everything the test reads is on disk by then."""
    import torch.distributed as dist

    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread: on the 2-core test machines two threads competing with another
    process make small convolutions 10-100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
