"""The process around a command: parse, join torchrun's group if launched by it, run, and turn
every anticipated problem into one ``otmdr: error: ...`` line and exit status 2."""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
import traceback
from pathlib import Path
from typing import NoReturn

from .. import _signals
from ..config import PLUGINS_ENV
from ._common import EXIT_ERROR, Interrupted, UsageError
from .parser import build_parser


def _check_outputs(args: argparse.Namespace) -> None:
    """Output files named by options must be writable files, checked before any work; the
    temporary files a killed earlier write of them left beside them are removed."""
    from .._atomic import remove_stale_temporaries

    for option in ("json", "plot", "heatmap"):
        value = getattr(args, option, None)
        if value and Path(value).is_dir():
            example = Path(value) / ("out." + ("json" if option == "json" else "png"))
            raise UsageError(f"--{option} {value} is a folder: name a file, e.g. {example}")
        if value:
            remove_stale_temporaries(value)


_DISTRIBUTED_COMMANDS = ("train", "compare")
#: commands with safe points to stop at: a signal is a stop request they check (otmdr._signals);
#: the others stop at once on a signal
_DEFERRING = ("train", "compare")


def _torchrun_context(args: argparse.Namespace):
    """The process's place in a torchrun job, read from the environment (no connection yet), and
    the checks that do not need the others."""
    from ..train import distributed

    try:
        context = distributed.launched()
    except distributed.DistributedError as error:
        raise UsageError(str(error)) from None
    if not context.enabled:
        return context
    if args.command not in _DISTRIBUTED_COMMANDS:
        raise UsageError(f"otmdr {args.command} runs in one process: launch it without torchrun (only train and "
                          "compare train with several processes)")
    if args.dist_timeout <= 0:
        raise UsageError("--dist-timeout must be > 0 seconds")
    return context


def _join(args: argparse.Namespace, context) -> None:
    """Join torchrun's process group (train and compare only); other ranks' stdout is muted,
    since rank 0 reports for the whole job. A peer that already failed and exited makes this
    raise a lost-peer error, which the caller reports as one line."""
    from ..train import distributed

    if not context.enabled:
        return
    try:
        distributed.init(args.dist_timeout)
    except distributed.DistributedError as error:
        raise UsageError(str(error)) from None
    if not context.is_main:
        sys.stdout = open(os.devnull, "w")


def _lost_peer(error: BaseException) -> bool:
    """A collective that failed because another process died, hung or closed its connection."""
    import torch.distributed as dist

    if isinstance(error, getattr(dist, "DistError", ())):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and any(
        marker in text for marker in ("gloo", "nccl", "connection closed", "connection reset", "timed out",
                                      "timeout", "processgroup", "broken pipe"))


# The commands need the ``train`` extra (configs, datasets, progress, reports): its packages by
# import name, as in pyproject.toml. ``pip install otmdr`` alone gives the optimizers (torch and
# numpy); a command then says what to install instead of failing at an import.
TRAIN_EXTRA = {"yaml": "pyyaml", "sklearn": "scikit-learn", "scipy": "scipy", "PIL": "pillow", "tqdm": "tqdm",
               "matplotlib": "matplotlib"}


def missing_extras() -> list[str]:
    """The train extra's packages that cannot be imported here (found without importing them)."""
    from importlib.util import find_spec

    def absent(module: str) -> bool:
        try:
            return find_spec(module) is None
        except (ImportError, ValueError):  # ValueError: blocked in sys.modules (None)
            return True

    return [package for module, package in TRAIN_EXTRA.items() if absent(module)]


def main(argv: list[str] | None = None) -> int:
    """``otmdr ARGV``: the exit status (a failed process of a torchrun job exits at once instead)."""
    try:
        args = build_parser().parse_args(argv)  # --help, --version and usage errors need the core only
    except SystemExit as stop:  # an option refused while parsing (its one line is printed): the status, as for
        if stop.code in (0, None):  # every other bad input; --help and --version exit as argparse does
            raise
        return stop.code if isinstance(stop.code, int) else EXIT_ERROR
    if argv is not None and getattr(args, "command_line", "") is None:  # called from Python, not a shell:
        args.command_line = "otmdr " + shlex.join(argv)  # the report and the resume line name these words
    missing = missing_extras()
    if missing:
        print(f"otmdr: error: otmdr {args.command} needs the train extra ({', '.join(missing)} missing): "
              "pip install 'otmdr[train]'", file=sys.stderr)
        return EXIT_ERROR
    from ..train import distributed

    plugins = list(dict.fromkeys(getattr(args, "imports", []) + getattr(args, "imports_here", [])))
    before = os.environ.get(PLUGINS_ENV)
    if plugins:  # in the environment, so worker processes (compare --jobs) import them as well
        os.environ[PLUGINS_ENV] = ",".join(dict.fromkeys([m for m in (before or "").split(",") if m] + plugins))
    try:
        with _signals.deferred() if args.command in _DEFERRING else _signals.installed():
            code = _run(args)
    except BaseException:
        if distributed.current().enabled:  # a bug, not an anticipated error: its traceback, then out
            traceback.print_exc()
            _exit_at_once(1)
        raise
    finally:
        if plugins:  # main() called from Python: the caller's environment as it was
            if before is None:
                os.environ.pop(PLUGINS_ENV, None)
            else:
                os.environ[PLUGINS_ENV] = before
    if distributed.current().enabled:
        _leave() if code == 0 else _exit_at_once(code)
    return code


def _run(args: argparse.Namespace) -> int:
    """The command, with every anticipated problem turned into one line and an exit status."""
    from ..config import ConfigError, import_plugins
    from ..data import DatasetError
    from ..eval.autoattack import MissingDependencyError
    from ..eval.calibration import CalibrationError
    from .._lock import FolderBusy
    from ..train import CheckpointError, Preempted, RunDirError, TrainingError
    from ..train import distributed

    context = distributed.Context()

    def report(error: BaseException, text: str) -> None:
        """Rank 0 reports; another rank only what rank 0 may not know (its own failures)."""
        if context.is_main:
            print(text, file=sys.stderr)
        elif not (getattr(error, "otmdr_from_rank0", False)
                  or isinstance(error, (ConfigError, UsageError, Preempted))):
            print(text.replace("otmdr:", f"otmdr [rank {context.rank}]:", 1), file=sys.stderr)

    try:
        import_plugins()  # --import and $OTMDR_IMPORT, before the command reads anything
        _check_outputs(args)
        context = _torchrun_context(args)  # known before joining: a peer lost while joining is reported too
        _join(args, context)
        return args.func(args)
    except Preempted as error:  # a stop request met at a safe point: the work is resumable
        report(error, f"otmdr: {error}")
        return _signals.exit_status()
    except _signals.Stopped as stopped:  # SIGTERM to a command without safe points: nothing half-written
        print(f"otmdr: stopped by {signal.Signals(stopped.signum).name}: a file it was writing keeps its earlier "
              "content; run the command again", file=sys.stderr)
        return _signals.exit_status(stopped.signum)
    except (ConfigError, DatasetError, CheckpointError, RunDirError, TrainingError, MissingDependencyError,
            FolderBusy, UsageError, CalibrationError) as error:
        report(error, f"otmdr: error: {error}")
        return EXIT_ERROR
    except RuntimeError as error:
        if not (context.enabled and _lost_peer(error)):
            raise
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"otmdr [rank {context.rank}]: error: another process of this torchrun job failed or stopped "
              f"answering ({first[:200]}); this process stops too: the failing process's own message says why",
              file=sys.stderr)
        return EXIT_ERROR
    except BrokenPipeError:  # e.g. `otmdr models | head`
        return 0
    except OSError as error:  # a read-only folder, a full disk, a path that is a directory, ...
        where = f" ({error.filename})" if error.filename else ""
        print(f"otmdr: error: {error.strerror or error}{where}: check the path, its permissions and the free "
              "disk space", file=sys.stderr)
        return EXIT_ERROR
    except Interrupted as error:
        print(f"\notmdr: {error}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("\notmdr: interrupted; finished runs are kept: rerun the same command with --resume (compare) "
              "or otmdr train --resume RUN_DIR to continue", file=sys.stderr)
        return 130


def _leave() -> NoReturn:
    """End a successful process of a torchrun job. Every rank first waits for the others, so none
    tears the connections down while a peer still completes its last collective; then it exits
    without freeing the process group, whose gloo destructor (with DDP's comm-hook futures still
    referenced) aborted a finished rank with SIGABRT now and then on a loaded machine
    (tests/test_ddp.py saw it 2 times in 12 runs). Every result is on disk by then."""
    import torch.distributed as dist

    try:
        dist.barrier()
    except RuntimeError:  # a peer failed after this rank finished: this rank's results are written
        pass
    _exit_at_once(0)


def _exit_at_once(code: int) -> NoReturn:
    """End a process of a torchrun job without Python's teardown of torch.distributed.

    Freeing a gloo process group while a collective is still pending deadlocks now and then: its
    destructor joins the worker thread while holding the GIL, and the worker needs the GIL to free
    the collective's tensors (seen as a failing rank that never exits). Everything otmdr keeps is
    written atomically before this point, so skipping the teardown loses nothing.
    """
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        if stream is None:  # sys.__stdout__ / __stderr__ without a console
            continue
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):
            pass
    os._exit(code)
