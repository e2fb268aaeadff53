"""Paired differences between methods over seeds, with Student-t confidence intervals.

Runs of a comparison that share a seed share the initialisation, the data order and the
validation split, so the honest question is how each method differs from a reference *on the
same seed*: the mean of the per-seed differences, with a 95% interval from the t distribution
with n - 1 degrees of freedom (n = number of shared seeds). The verdict is read off the interval
only: "better" or "worse" when it excludes zero, otherwise "no difference detectable with n seeds".
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from scipy import stats as _scipy_stats

__all__ = ["PairedDifference", "paired_difference", "t_half_width", "paired_table", "format_paired",
           "PAIRED_METRICS", "CI_METHOD"]

CI_METHOD = "95% CI: Student t on the per-seed paired differences (n - 1 degrees of freedom)"


@dataclass(frozen=True)
class PairedDifference:
    mean: float
    low: float | None  # None with a single seed: no interval
    high: float | None
    n: int
    higher_is_better: bool

    @property
    def verdict(self) -> str:
        if self.low is None or self.high is None:
            return "one seed: no interval"
        if self.low > 0 or self.high < 0:
            word = "better" if (self.low > 0) == self.higher_is_better else "worse"
            return word + (" (every seed differs by the same amount)" if self.low == self.high else "")
        return f"no difference detectable with {self.n} seeds"


def t_half_width(values: Sequence[float], confidence: float = 0.95) -> float:
    """Half the width of the t interval of the mean of ``values`` (0 for fewer than 2 values)."""
    n = len(values)
    if n < 2:
        return 0.0
    return float(_scipy_stats.t.ppf(0.5 + confidence / 2, n - 1)) * statistics.stdev(values) / math.sqrt(n)


def paired_difference(values: Sequence[float], reference: Sequence[float], *, higher_is_better: bool,
                      confidence: float = 0.95) -> PairedDifference:
    """Mean of ``values[i] - reference[i]`` and its t interval (seed i paired with seed i)."""
    if len(values) != len(reference) or not values:
        raise ValueError(f"paired values need the same non-zero length, got {len(values)} and {len(reference)}")
    diffs = [a - b for a, b in zip(values, reference)]
    n = len(diffs)
    mean = statistics.fmean(diffs)
    if n < 2:
        return PairedDifference(mean, None, None, n, higher_is_better)
    half = t_half_width(diffs, confidence)
    return PairedDifference(mean, mean - half, mean + half, n, higher_is_better)


#: (title, value of a run summary's test block, scale, higher is better)
PAIRED_METRICS: list[tuple[str, str, float, bool]] = [
    ("accuracy (pp)", "accuracy", 100.0, True),
    ("NLL", "nll", 1.0, False),
    ("ECE (pp)", "ece", 100.0, False),
]


def paired_table(summaries: dict[str, list[dict[str, Any]]], reference: str,
                 test_block: Callable[[dict[str, Any]], dict[str, Any] | None] = lambda s: s["test"],
                 ) -> list[dict[str, Any]]:
    """One row per non-reference method: its :class:`PairedDifference` for each metric, on the
    seeds it shares with ``reference``. ``test_block`` picks the metrics to compare (the final
    model's by default; e.g. the early-stopped model's)."""
    if reference not in summaries:
        raise ValueError(f"reference method {reference!r} is not among {', '.join(summaries)}")
    ref = {s["seed"]: test_block(s) for s in summaries[reference]}
    rows = []
    for method, runs in summaries.items():
        if method == reference:
            continue
        blocks = [(test_block(s), ref[s["seed"]]) for s in runs if s["seed"] in ref]
        pairs = [(a, b) for a, b in blocks if a is not None and b is not None]
        row: dict[str, Any] = {"method": method, "seeds": len(pairs)}
        for title, key, scale, higher in PAIRED_METRICS:
            row[title] = paired_difference([scale * a[key] for a, _ in pairs], [scale * b[key] for _, b in pairs],
                                           higher_is_better=higher) if pairs else None
        rows.append(row)
    return rows


def _cell(d: PairedDifference | None, digits: int) -> str:
    if d is None:
        return "n/a"
    if d.low is None:
        return f"{d.mean:+.{digits}f} ({d.verdict})"
    return f"{d.mean:+.{digits}f} [{d.low:+.{digits}f}, {d.high:+.{digits}f}] {d.verdict}"


def format_paired(rows: list[dict[str, Any]], *, markdown: bool) -> str:
    """The paired rows as a terminal or Markdown table (accuracy and ECE in percentage points)."""
    titles = ["method", "seeds"] + [m[0] for m in PAIRED_METRICS]
    digits = {"accuracy (pp)": 2, "NLL": 4, "ECE (pp)": 2}
    cells = [[row["method"], str(row["seeds"])] + [_cell(row[t], digits[t]) for t, *_ in PAIRED_METRICS]
             for row in rows]
    if markdown:
        out = ["| " + " | ".join(titles) + " |", "|" + "|".join(["---"] * len(titles)) + "|"]
        return "\n".join(out + ["| " + " | ".join(line) + " |" for line in cells])
    widths = [max(len(t), *(len(line[i]) for line in cells)) if cells else len(t) for i, t in enumerate(titles)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*titles), fmt.format(*("-" * w for w in widths))]
                     + [fmt.format(*line) for line in cells])
