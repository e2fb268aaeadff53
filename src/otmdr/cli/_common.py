"""What every command shares: its usage error, the resolved config of ``--config``/``--set``, the
trained run a command reads."""

from __future__ import annotations

import argparse
import time

EXIT_ERROR = 2


class UsageError(Exception):
    """A bad option or combination of options: one line, exit status 2."""


class Interrupted(Exception):
    """Ctrl-C during a command; the message says what was kept and how to continue."""


def timestamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def run_config(args: argparse.Namespace, extra: list[str] | None = None):
    from ..config import load_config

    shortcuts = [f"{key}={getattr(args, name)}" for name, key in
                 (("method", "optim.method"), ("epochs", "train.epochs"), ("seed", "train.seed"))
                 if getattr(args, name, None) is not None]
    overrides = list(extra or []) + list(args.set or []) + shortcuts
    if getattr(args, "data_dir", None):
        overrides.append(f"data.dir={args.data_dir}")
    return load_config(args.config, overrides)


def load_trained(args: argparse.Namespace):
    """The trained model of ``args.path`` and its data (from ``--data-dir`` if the data moved)."""
    from ..train import load_run
    from ..train.builders import build_data

    cfg, model, _ = load_run(args.path, device=args.device, which=args.checkpoint)
    if args.data_dir:
        cfg.data.dir = args.data_dir
    if getattr(args, "test_limit", None) is not None:
        if args.test_limit < 1:
            raise UsageError("--test-limit must be at least 1")
        cfg.data.test_limit = args.test_limit
    return cfg, model, build_data(cfg, next(model.parameters()).device)

