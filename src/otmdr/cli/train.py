"""``otmdr train``: one run, fresh or resumed, leaving nothing behind when it fails before its first
checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .. import _signals
from ._common import Interrupted, UsageError, run_config, timestamp


def cmd_train(args: argparse.Namespace) -> int:
    """Train one run. Under torchrun every process runs this; rank 0 alone looks at and writes the
    file system (:func:`otmdr.train.distributed.from_rank0`), the others follow its decisions."""
    from ..config import config_from_dict
    from ..train import prepare_run_dir
    from ..train.run_dir import restart_config
    from ..train import Preempted
    from ..train.distributed import from_rank0

    if args.resume:
        if args.config or args.set or args.method or args.epochs is not None or args.seed is not None:
            raise UsageError("--resume continues a run with its saved config: drop --config/--set/--method/"
                              "--epochs/--seed")
        run_dir = Path(args.resume)

        def inspect() -> dict[str, Any] | None:
            saved = restart_config(run_dir)
            if saved is not None:
                print(f"{run_dir} was stopped before its first checkpoint: starting it again from its config.yaml")
                return saved
            prepare_run_dir(args.resume, resume=True)
            return None

        saved_config = from_rank0(inspect)
        if saved_config is not None:
            summary = train_into(config_from_dict(saved_config), run_dir, fresh=True, cleanup=False)
        else:
            summary = train_into(None, run_dir, fresh=False)
    else:
        cfg = run_config(args)
        stem = Path(args.config).stem if args.config else "default"

        def prepare() -> tuple[Path, bool]:  # rank 0's clock names the folder of every rank
            out = Path(args.out or f"runs/{stem}-{cfg.optim.method}-s{cfg.train.seed}-{timestamp()}")
            existed = out.exists()
            return prepare_run_dir(out, resume=False), existed

        run_dir, existed = from_rank0(prepare)
        print(f"run directory: {run_dir}")
        summary = train_into(cfg, run_dir, fresh=True, keep_folder=existed)
    stopped = _signals.requested()
    test = summary["test"]
    print(f"test: accuracy {100 * test['accuracy']:.2f}%  NLL {test['nll']:.4f}  Brier {test['brier']:.4f}  "
          f"ECE {100 * test['ece']:.2f}% ({test['ece_bins']} bins)")
    print(f"summary: {Path(run_dir) / 'summary.json'}")
    if stopped is not None:  # the signal came during the final evaluation: never forgotten
        raise Preempted(f"{_signals.stopped_by(stopped)} during the final evaluation, which finished: the run is "
                        f"complete ({Path(run_dir) / 'summary.json'}); nothing to continue")
    return 0


def train_into(cfg, run_dir: Path, *, fresh: bool, keep_folder: bool = True, cleanup: bool = True) -> dict[str, Any]:
    """Train; a run that fails or is interrupted before its first checkpoint leaves nothing it
    created behind (a folder the user made stays, emptied of our files). A stop request (SIGTERM,
    Ctrl-C) once ``config.yaml`` is written keeps the folder instead: ``--resume`` starts it again
    from that config, as after ``kill -9`` at the same moment."""
    from ..train import train
    from ..train.distributed import current
    from ..train.run_dir import discard_unfinished

    try:
        return train(cfg, run_dir, resume=not fresh)
    except BaseException as error:
        from ..train import Preempted

        checkpointed = (run_dir / "checkpoints" / "last.pt").exists()
        restartable = isinstance(error, Preempted) and (run_dir / "config.yaml").is_file()
        if fresh and cleanup and not restartable and current().is_main:
            discard_unfinished(run_dir, keep_folder=keep_folder)
        if isinstance(error, Preempted) and fresh and cleanup and not checkpointed and not restartable:
            raise Preempted(f"{_signals.stopped_by()} before the run's config was written; nothing was kept: "
                            "start the run again") from None
        if isinstance(error, KeyboardInterrupt):
            raise Interrupted(f"interrupted; continue with: otmdr train --resume {run_dir}" if checkpointed
                               else "interrupted before the first checkpoint; nothing was kept") from None
        raise

