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
    # the cheaper variants are timed over whole cycles, with their measured cost per step: the
    # schedules are deterministic (interval 5; late phase 0.8 of a 5-step run; MSAM one pass)
    rows = {tuple(c.strip() for c in line.split("|")[1:3]): [c.strip() for c in line.split("|")[3:-1]]
            for line in done.stdout.splitlines() if line.startswith("| digits MLP | ")}
    for method, evaluations, full in (("OT-MDR+interval", "1.20", "0.20"), ("OT-MDR+reuse", "1.20", "0.20"),
                                      ("OT-MDR+late", "1.20", "0.20"), ("OT-MDR+momentum", "1.00", "1.00"),
                                      ("OT-MDR+momentum1", "1.50", "1.00"), ("SAM+reuse", "1.20", "0.20"),
                                      ("SAM+momentum", "1.00", "1.00")):
        cells = rows[("digits MLP", method)]
        assert cells[-2:] == [evaluations, full], (method, cells)
        assert cells[0] != "-" and cells[1] == ("SAM" if method.startswith("SAM") else "OT-MDR K=1"), (method, cells)
    assert ("digits MLP", "OT-MDR+trigger") in rows
    assert "grad. evals / step" in done.stdout
