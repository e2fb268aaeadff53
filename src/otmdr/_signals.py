"""One policy for SIGTERM and SIGINT in every otmdr command, and the test-only pause hook.

A command that has safe points to stop at (``train``, ``compare``, a ``compare --jobs`` worker)
runs inside :func:`deferred`: the first SIGTERM or SIGINT only records a stop request, which the
command checks at its safe points (a step boundary, between runs, before a report) and turns into
a resumable state, the resume line and exit status 128 + the signal (143 for SIGTERM, 130 for
SIGINT). A second SIGINT (Ctrl-C pressed again) raises ``KeyboardInterrupt`` at once. Every other
command runs inside :func:`installed` alone: a signal raises at once (:class:`Stopped` for
SIGTERM, ``KeyboardInterrupt`` for SIGINT), so the atomic writes in flight remove their temporary
files on the way out and the command ends with one line.

Signals are delivered to the main thread only; elsewhere these context managers do nothing.
This module imports nothing from otmdr: it is the lowest layer (docs/design.md).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = ["Stopped", "installed", "deferred", "requested", "stopped_by", "exit_status", "pause_point",
           "step_pause", "wait_for_test", "TEST_PAUSE_VARIABLE"]

_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_requested: int | None = None  # the first stop signal received while deferring
_installed = 0  # nesting depth of installed()
_deferring = 0  # nesting depth of deferred()
_previous: dict[int, object] = {}


class Stopped(BaseException):
    """SIGTERM where the command has no safe point to stop at: raised from the handler, like
    ``KeyboardInterrupt`` for SIGINT (a BaseException, so ``except Exception`` cannot swallow it)."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


def _handle(signum: int, frame: object) -> None:
    global _requested
    if _deferring and not (signum == signal.SIGINT and _requested == signal.SIGINT):
        if _requested is None:
            _requested = signum
        return
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise Stopped(signum)


@contextlib.contextmanager
def installed() -> Iterator[None]:
    """The handlers of SIGTERM and SIGINT for the duration (restored after); the outermost entry
    forgets an earlier stop request, so one process can run several commands (tests, notebooks)."""
    global _installed, _requested
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if _installed == 0:
        _requested = None
        for signum in _SIGNALS:
            _previous[signum] = signal.signal(signum, _handle)
    _installed += 1
    try:
        yield
    finally:
        _installed -= 1
        if _installed == 0:
            for signum in _SIGNALS:
                signal.signal(signum, _previous.pop(signum))  # type: ignore[arg-type]  # a saved handler


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Within it SIGTERM and a first SIGINT become a stop request (:func:`requested`) that the
    code checks at its safe points, instead of an exception at an arbitrary line."""
    global _deferring
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    with installed():
        _deferring += 1
        try:
            yield
        finally:
            _deferring -= 1


def requested() -> int | None:
    """The signal number of the pending stop request, or None."""
    return _requested


def stopped_by(signum: int | None = None) -> str:
    """How a stop message starts: ``preempted (SIGTERM)`` or ``interrupted (SIGINT)``."""
    signum = _requested if signum is None else signum
    if signum == signal.SIGINT:
        return "interrupted (SIGINT)"
    return "preempted (SIGTERM)"  # SIGTERM, or another process's stop under torchrun


def exit_status(signum: int | None = None) -> int:
    """128 + the signal, the shell's convention: 143 for SIGTERM, 130 for SIGINT."""
    signum = _requested if signum is None else signum
    return 128 + int(signum if signum is not None else signal.SIGTERM)


#: test-only hook (tests/test_preemption.py, tests/test_signals.py); unset it costs one lookup of
#: the environment per named point, nothing per training step
TEST_PAUSE_VARIABLE = "OTMDR_TEST_PAUSE_AT"


def pause_point(name: str) -> None:
    """``OTMDR_TEST_PAUSE_AT=NAME:MARKER`` (test-only): at the point called ``name`` the process
    creates the file MARKER (holding its pid) and waits until it is deleted, so a test's signal
    lands at a known point instead of after a guessed sleep (a stop request also ends the wait).
    Named points: ``after-config`` (train: config.yaml written, nothing trained), ``compare-run``
    (compare: before each run), ``compare-workers`` (compare --jobs: the workers submitted, still
    starting), ``compare-report`` (compare: every run finished, before the report), ``write-FILE``
    (an atomic write of FILE: its temporary file written, not yet renamed). ``EPOCH:STEP:MARKER`` is
    the training loop's own (:func:`step_pause`)."""
    value = os.environ.get(TEST_PAUSE_VARIABLE)
    if not value:
        return
    at, _, marker = value.partition(":")
    if at == name and marker:
        wait_for_test(Path(marker))


def step_pause(epoch: int) -> tuple[int, Path] | None:
    """``OTMDR_TEST_PAUSE_AT=EPOCH:STEP:MARKER`` (test-only): ``(STEP, MARKER)`` in epoch EPOCH
    (counted from 1; ``epoch`` here from 0), else None: the loop pauses right after that step."""
    value = os.environ.get(TEST_PAUSE_VARIABLE)
    if not value or not value.partition(":")[0].isdigit():
        return None
    at_epoch, at_step, marker = value.split(":", 2)
    return (int(at_step), Path(marker)) if int(at_epoch) == epoch + 1 else None


def wait_for_test(marker: Path) -> None:
    """Create ``marker`` and wait until the test deletes it, or until a stop request arrives (so a
    test can hold a process at a point until its signal has surely landed, e.g. one that a
    ``compare --jobs`` study passes on to its workers). The marker appears whole, with this
    process's id in it (written aside, then renamed): a test that sees it can read the id."""
    written = marker.with_name(f"{marker.name}.{os.getpid()}.partial")
    written.write_text(str(os.getpid()))
    os.replace(written, marker)
    while marker.exists() and _requested is None:
        time.sleep(0.01)
