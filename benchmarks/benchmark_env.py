"""What every timing benchmark records beside its numbers: how busy the machine was, which commit
was measured, and on what. Shared by step_speed.py and fsdp_memory.py (run as scripts: this folder is
on their import path)."""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from otmdr.train.compute import cpu_model

__all__ = ["machine_busy_s", "git_revision", "run_environment"]


def machine_busy_s() -> float | None:
    """CPU seconds all processes have used since boot (Linux ``/proc/stat``), None elsewhere."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
        return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def git_revision() -> str:
    """The commit measured, with "+dirty" when tracked files under src/ have uncommitted changes."""
    root = Path(__file__).resolve().parent.parent

    def git(*cmd: str) -> str:
        return subprocess.run(["git", *cmd], cwd=root, capture_output=True, text=True, check=True).stdout.strip()

    try:
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", "src")
        return git("rev-parse", "--short", "HEAD") + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run_environment() -> dict[str, Any]:
    """Where and what was measured: the command, the date, the commit, the software and the CPU
    (timings compare only on the same CPU model)."""
    return {"command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "git": git_revision(), "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "cpu": cpu_model(), "cpu_count": os.cpu_count()}
