"""Paired differences between methods over seeds: intervals, difference tests, equivalence tests.

Runs of a comparison that share a seed share the initialisation, the data order and the
validation split, so the honest question is how each method differs from a reference *on the
same seed*: the mean of the per-seed differences, with a 95% interval from the t distribution
with n - 1 degrees of freedom (n = number of shared seeds).

Two tests per metric, both at alpha = 0.05. The two-sided paired t test of "mean difference = 0"
says "better" or "worse" (exactly when the 95% interval excludes zero). Its failure is *not*
evidence that two methods are the same: with few seeds almost nothing is significant. Sameness
needs its own test, TOST (two one-sided t tests against a margin m in the metric's units): it says
"equivalent within ±m" exactly when the 90% interval lies inside (-m, +m). Neither rejecting is
"inconclusive", which is what few seeds usually buy.

A report prints many such verdicts (every method against every reference, final and
early-stopped, three metrics), so some raw verdicts are false by chance alone. :func:`adjust_family`
applies Holm's step-down correction over *every* test the report makes, difference and
equivalence tests of all its tables as one family: a reader may act on any verdict in the report,
so the family-wise error rate is controlled over all of them. Holm is valid under any dependence
(final and early-stopped models of one seed are strongly correlated); counting both tests of a
cell, and correlated tables, separately only makes it conservative, never wrong.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from scipy import stats as _scipy_stats

from .tables import early_stopped

__all__ = ["PairedDifference", "paired_difference", "t_half_width", "paired_table", "format_paired",
           "PAIRED_METRICS", "PAIRED_DIGITS", "CI_METHOD", "ALPHA", "DEFAULT_MARGINS", "MARGIN_NAMES",
           "parse_margins", "holm", "adjust_family", "paired_family", "describe_tests", "TEST_METHOD", "format_cell"]

CI_METHOD = "95% CI: Student t on the per-seed paired differences (n - 1 degrees of freedom)"

#: Level of both tests: the difference test agrees with the 95% interval, TOST with the 90% interval.
ALPHA = 0.05


@dataclass(frozen=True)
class PairedDifference:
    mean: float
    low: float | None  # None with a single seed: no interval
    high: float | None
    n: int
    higher_is_better: bool
    margin: float | None = None  # equivalence margin in the metric's units; None: no equivalence test
    p_difference: float | None = None  # two-sided paired t test of mean = 0 (None with one seed)
    p_equivalence: float | None = None  # TOST against ±margin (None with one seed or without a margin)
    holm_p_difference: float | None = None  # Holm-adjusted within a family (None until adjusted)
    holm_p_equivalence: float | None = None
    digits: int = 2  # decimals the metric is printed with (the margin in verdicts too)
    alpha: float = ALPHA

    @property
    def verdict(self) -> str:
        """The raw verdict: "better"/"worse", "..., yet within ±m", "equivalent within ±m",
        "inconclusive with n seeds" (or "no difference detectable with n seeds" without a margin)."""
        if self.low is None or self.high is None:
            return "one seed: no interval"
        if self.p_difference is None:  # built by hand without tests: read the interval
            return self._classify(0.0 if self.low > 0 or self.high < 0 else 1.0, self.p_equivalence)
        return self._classify(self.p_difference, self.p_equivalence)

    @property
    def holm_verdict(self) -> str | None:
        """The same classification from the Holm-adjusted p-values; None before :func:`adjust_family`."""
        if self.low is None or self.high is None or self.holm_p_difference is None:
            return None
        return self._classify(self.holm_p_difference, self.holm_p_equivalence)

    def _classify(self, p_difference: float, p_equivalence: float | None) -> str:
        assert self.low is not None and self.high is not None
        equivalent = self.margin is not None and p_equivalence is not None and p_equivalence < self.alpha
        within = f"within ±{self.margin:.{self.digits}f}" if self.margin is not None else ""
        if p_difference < self.alpha:
            word = "better" if (self.mean > 0) == self.higher_is_better else "worse"
            if equivalent:
                word += f", yet {within}"
            return word + (" (every seed differs by the same amount)" if self.low == self.high else "")
        if equivalent:
            return f"equivalent {within}"
        if self.margin is None:
            return f"no difference detectable with {self.n} seeds"
        return f"inconclusive with {self.n} seeds"


def t_half_width(values: Sequence[float], confidence: float = 0.95) -> float:
    """Half the width of the t interval of the mean of ``values`` (0 for fewer than 2 values)."""
    n = len(values)
    if n < 2:
        return 0.0
    return float(_scipy_stats.t.ppf(0.5 + confidence / 2, n - 1)) * statistics.stdev(values) / math.sqrt(n)


def _p_values(diffs: Sequence[float], margin: float | None) -> tuple[float, float | None]:
    """(two-sided p of mean = 0, TOST p against ±margin or None), t distribution with n - 1 dof."""
    n, mean, sd = len(diffs), statistics.fmean(diffs), statistics.stdev(diffs)
    if sd == 0:  # every seed differs by the same amount: the tests degenerate to certainty
        return (0.0 if mean != 0 else 1.0), (None if margin is None else 0.0 if abs(mean) < margin else 1.0)
    se, dof = sd / math.sqrt(n), n - 1
    p_difference = min(1.0, 2 * float(_scipy_stats.t.sf(abs(mean) / se, dof)))
    if margin is None:
        return p_difference, None
    above_lower = float(_scipy_stats.t.sf((mean + margin) / se, dof))  # H0: mean <= -margin
    below_upper = float(_scipy_stats.t.cdf((mean - margin) / se, dof))  # H0: mean >= +margin
    return p_difference, max(above_lower, below_upper)


def paired_difference(values: Sequence[float], reference: Sequence[float], *, higher_is_better: bool,
                      confidence: float = 0.95, margin: float | None = None, digits: int = 2) -> PairedDifference:
    """Mean of ``values[i] - reference[i]`` (seed i paired with seed i), its t interval, the paired
    t test of a zero mean and, with a ``margin`` (> 0, the metric's units), the TOST equivalence
    test; both tests at alpha = 1 - ``confidence`` (TOST then agrees with the 1 - 2 alpha interval).
    ``digits`` is how many decimals the verdict prints the margin with."""
    if len(values) != len(reference) or not values:
        raise ValueError(f"paired values need the same non-zero length, got {len(values)} and {len(reference)}")
    if margin is not None and not (math.isfinite(margin) and margin > 0):
        raise ValueError(f"an equivalence margin must be a positive number, got {margin}")
    diffs = [a - b for a, b in zip(values, reference)]
    n = len(diffs)
    mean = statistics.fmean(diffs)
    alpha = 1 - confidence
    if n < 2:
        return PairedDifference(mean, None, None, n, higher_is_better, margin=margin, digits=digits, alpha=alpha)
    half = t_half_width(diffs, confidence)
    p_difference, p_equivalence = _p_values(diffs, margin)
    return PairedDifference(mean, mean - half, mean + half, n, higher_is_better, margin=margin,
                            p_difference=p_difference, p_equivalence=p_equivalence, digits=digits, alpha=alpha)


#: (title, value of a run summary's test block, scale, higher is better)
PAIRED_METRICS: list[tuple[str, str, float, bool]] = [
    ("accuracy (pp)", "accuracy", 100.0, True),
    ("NLL", "nll", 1.0, False),
    ("ECE (pp)", "ece", 100.0, False),
]
#: Decimals each metric is printed with.
PAIRED_DIGITS: dict[str, int] = {"accuracy (pp)": 2, "NLL": 4, "ECE (pp)": 2}
#: Equivalence margins in each metric's units (percentage points for accuracy and ECE).
DEFAULT_MARGINS: dict[str, float] = {"accuracy (pp)": 0.5, "NLL": 0.02, "ECE (pp)": 0.5}
#: The short names ``--margin`` accepts, and the metric each one names.
MARGIN_NAMES: dict[str, str] = {"accuracy": "accuracy (pp)", "nll": "NLL", "ece": "ECE (pp)"}


def parse_margins(text: str) -> dict[str, float]:
    """Margins from a ``--margin`` value: "0.5" sets the accuracy margin (pp) only;
    "accuracy=0.5,nll=0.01,ece=1" sets the named ones. The rest keep :data:`DEFAULT_MARGINS`.
    Raises ValueError with a one-line message on unknown names, non-numbers and margins <= 0."""
    margins = dict(DEFAULT_MARGINS)
    example = "expected e.g. '0.5' (accuracy, pp) or 'accuracy=0.5,nll=0.01,ece=1'"
    items = [item.strip() for item in text.split(",")]
    if "=" not in text:
        if len(items) != 1:
            raise ValueError(f"margin {text!r}: name each of several margins ({example})")
        items = [f"accuracy={items[0]}"]
    seen: set[str] = set()
    for item in items:
        name, _, value = (part.strip() for part in item.partition("="))
        name = name.lower()
        if name not in MARGIN_NAMES:
            raise ValueError(f"margin {item!r}: unknown metric {name!r} (known: {', '.join(MARGIN_NAMES)}; {example})")
        if name in seen:
            raise ValueError(f"margin {text!r}: {name} given twice")
        seen.add(name)
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"margin {item!r}: {value!r} is not a number ({example})") from None
        if not (math.isfinite(number) and number > 0):
            raise ValueError(f"margin {item!r}: a margin must be a positive finite number")
        margins[MARGIN_NAMES[name]] = number
    return margins


def paired_table(summaries: dict[str, list[dict[str, Any]]], reference: str,
                 test_block: Callable[[dict[str, Any]], dict[str, Any] | None] = lambda s: s["test"],
                 margins: dict[str, float] | None = None) -> list[dict[str, Any]]:
    """One row per non-reference method: its :class:`PairedDifference` for each metric, on the
    seeds it shares with ``reference``. ``test_block`` picks the metrics to compare (the final
    model's by default; e.g. the early-stopped model's). ``margins`` (by metric title, missing ones
    from :data:`DEFAULT_MARGINS`) are the equivalence margins."""
    if reference not in summaries:
        raise ValueError(f"reference method {reference!r} is not among {', '.join(summaries)}")
    unknown = set(margins or {}) - set(DEFAULT_MARGINS)
    if unknown:
        raise ValueError(f"margins for unknown metrics {sorted(unknown)} (known: {', '.join(DEFAULT_MARGINS)})")
    margin_of = {**DEFAULT_MARGINS, **(margins or {})}
    ref = {s["seed"]: test_block(s) for s in summaries[reference]}
    rows = []
    for method, runs in summaries.items():
        if method == reference:
            continue
        blocks = [(test_block(s), ref[s["seed"]]) for s in runs if s["seed"] in ref]
        pairs = [(a, b) for a, b in blocks if a is not None and b is not None]
        row: dict[str, Any] = {"method": method, "seeds": len(pairs)}
        for title, key, scale, higher in PAIRED_METRICS:
            measured = pairs and all(a.get(key) is not None and b.get(key) is not None for a, b in pairs)
            row[title] = paired_difference([scale * a[key] for a, _ in pairs], [scale * b[key] for _, b in pairs],
                                           higher_is_better=higher, margin=margin_of[title],
                                           digits=PAIRED_DIGITS[title]) if measured else None  # n/a: not measured
        rows.append(row)
    return rows


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the input order: the i-th smallest (from 0) times
    (m - i), made non-decreasing in the sorted order and capped at 1. Rejecting where the adjusted
    p < alpha controls the family-wise error rate at alpha under any dependence."""
    for p in p_values:
        if not 0.0 <= p <= 1.0:  # also rejects NaN
            raise ValueError(f"p-values must lie in [0, 1], got {p}")
    m = len(p_values)
    adjusted = [0.0] * m
    running = 0.0
    for rank, index in enumerate(sorted(range(m), key=lambda i: p_values[i])):
        running = max(running, min(1.0, (m - rank) * p_values[index]))
        adjusted[index] = running
    return adjusted


def adjust_family(tables: Sequence[list[dict[str, Any]]]) -> tuple[list[list[dict[str, Any]]], int]:
    """Holm over every test in ``tables`` (outputs of :func:`paired_table`) as one family: each
    :class:`PairedDifference`'s difference test and, where it has a margin, its equivalence test.
    Returns copies of the tables with the ``holm_p_*`` fields filled in, and the family size
    (rows with one seed have no tests and stay unadjusted)."""
    slots: list[tuple[int, int, str, str]] = []  # (table, row, key, "difference" | "equivalence")
    p_values: list[float] = []
    for t, table in enumerate(tables):
        for r, row in enumerate(table):
            for key, value in row.items():
                if not isinstance(value, PairedDifference) or value.p_difference is None:
                    continue
                slots.append((t, r, key, "difference"))
                p_values.append(value.p_difference)
                if value.p_equivalence is not None:
                    slots.append((t, r, key, "equivalence"))
                    p_values.append(value.p_equivalence)
    adjusted: dict[tuple[int, int, str], dict[str, float]] = {}
    for (t, r, key, test), p in zip(slots, holm(p_values)):
        adjusted.setdefault((t, r, key), {})[f"holm_p_{test}"] = p
    out = [[dict(row) for row in table] for table in tables]
    for (t, r, key), fields in adjusted.items():
        out[t][r][key] = dataclasses.replace(out[t][r][key], **fields)
    return out, len(p_values)


def describe_tests(margins: dict[str, float] | None = None, family: int | None = None) -> str:
    """One paragraph on the tests behind the verdicts, for a report to print (``family``: the
    number of tests Holm adjusted over, if known)."""
    margin_of = {**DEFAULT_MARGINS, **(margins or {})}
    units = {"accuracy (pp)": " pp", "NLL": "", "ECE (pp)": " pp"}
    listed = ", ".join(f"{title.split(' (')[0]} {margin_of[title]:.{PAIRED_DIGITS[title]}f}{units[title]}"
                       for title in DEFAULT_MARGINS)
    size = f" ({family} tests)" if family is not None else ""
    return (f"Verdicts at alpha {ALPHA:g} on the per-seed paired differences: \"better\"/\"worse\" when the "
            "two-sided paired t test rejects a zero mean (the 95% CI excludes 0); \"equivalent within ±m\" when "
            "TOST (two one-sided t tests) rejects |mean| >= m, i.e. the 90% CI lies inside ±m, with margins m: "
            f"{listed}; \"inconclusive\" when neither (not evidence of sameness). \"Holm:\" is the same verdict "
            f"after Holm's step-down correction over every test of this report as one family{size}, "
            "difference and equivalence tests alike (\"unchanged\": the raw verdict survives it).")


TEST_METHOD = describe_tests()


def format_cell(d: PairedDifference | None, digits: int = 2, holm: bool = True) -> str:
    """One table cell: the mean difference, its 95% interval and the raw verdict, then (with
    ``holm`` and a difference from :func:`adjust_family`) "; Holm: " and the adjusted verdict,
    "unchanged" when it is the raw one (not "same": that would read as an equivalence verdict);
    "n/a" for a metric that was not measured."""
    if d is None:
        return "n/a"
    if d.low is None or d.high is None:
        return f"{d.mean:+.{digits}f} ({d.verdict})"
    text = f"{d.mean:+.{digits}f} [{d.low:+.{digits}f}, {d.high:+.{digits}f}] {d.verdict}"
    adjusted = d.holm_verdict
    if holm and adjusted is not None:
        text += "; Holm: " + ("unchanged" if adjusted == d.verdict else adjusted)
    return text


def format_paired(rows: list[dict[str, Any]], *, markdown: bool, holm: bool = True) -> str:
    """The paired rows as a terminal or Markdown table (accuracy and ECE in percentage points):
    each cell the mean difference, its 95% interval and the raw verdict, then (with ``holm`` and
    rows from :func:`adjust_family`) the Holm-adjusted verdict, "unchanged" when it is the raw one."""
    titles = ["method", "seeds"] + [m[0] for m in PAIRED_METRICS]
    cells = [[row["method"], str(row["seeds"])]
             + [format_cell(row[t], PAIRED_DIGITS[t], holm) for t, *_ in PAIRED_METRICS] for row in rows]
    if markdown:
        out = ["| " + " | ".join(titles) + " |", "|" + "|".join(["---"] * len(titles)) + "|"]
        return "\n".join(out + ["| " + " | ".join(line) + " |" for line in cells])
    widths = [max(len(t), *(len(line[i]) for line in cells)) if cells else len(t) for i, t in enumerate(titles)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*titles), fmt.format(*("-" * w for w in widths))]
                     + [fmt.format(*line) for line in cells])


def paired_family(summaries: dict[str, list[dict[str, Any]]], references: list[str],
                  margins: dict[str, float] | None = None) -> tuple[list[tuple[str, str, list[dict[str, Any]]]], int]:
    """Every paired table of a report, ``(reference, model, rows)`` with model "final model" or
    "early-stopped model", Holm-adjusted as one family (a reader scanning the report for a
    "better" makes all of its tests, each distinct pair once), and the family's size."""
    stopped = early_stopped(summaries)
    keys, tables = [], []
    for ref in references if len(summaries) > 1 else []:
        for model, runs in (("final model", summaries), ("early-stopped model", stopped)):
            if ref in runs:
                keys.append((ref, model))
                tables.append(paired_table(runs, ref, margins=margins))
    if not tables:
        return [], 0
    # a pair shown against both of its methods (sam − sgd and sgd − sam) is one hypothesis: it
    # enters the family once, and its reverse takes the same adjusted p-values
    first: dict[tuple[frozenset[str], str], tuple[int, int]] = {}
    unique = []
    for t, ((ref, model), rows) in enumerate(zip(keys, tables)):
        for r, row in enumerate(rows):
            if first.setdefault((frozenset((row["method"], ref)), model), (t, r)) == (t, r):
                unique.append(row)
    (adjusted_unique,), family = adjust_family([unique])
    by_slot = dict(zip(first.values(), adjusted_unique))
    out = []
    for (ref, model), rows in zip(keys, tables):
        adjusted_rows = []
        for row in rows:
            source = by_slot[first[(frozenset((row["method"], ref)), model)]]
            adjusted_rows.append({key: dataclasses.replace(value, holm_p_difference=source[key].holm_p_difference,
                                                           holm_p_equivalence=source[key].holm_p_equivalence)
                                  if isinstance(value, PairedDifference) else value for key, value in row.items()})
        out.append((ref, model, adjusted_rows))
    return out, family
