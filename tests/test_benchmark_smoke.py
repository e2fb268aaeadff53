"""The step-speed benchmark still runs (a seconds-long smoke run; nothing is timed or asserted
about speed here, and nothing is written)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_step_speed_quick_run():
    before = sorted((ROOT / "benchmarks" / "results").glob("*"))
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "step_speed.py"), "--quick", "--threads", "1"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "OT-MDR K=1 / SAM" in done.stdout and "ResNet-20" in done.stdout
    assert sorted((ROOT / "benchmarks" / "results").glob("*")) == before
