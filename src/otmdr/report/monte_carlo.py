"""Does a report's verdict survive a second Monte-Carlo pass?

A Bayesian network's test metrics are Monte-Carlo estimates: the predictive is the mean over
``bayes.test_samples`` weight draws, and a second set of draws gives slightly different numbers.
Training records such a second pass (``summary.json``'s ``test_second_pass``, and
``early_stopped.test_second_pass``; see :func:`otmdr.eval.evaluate.evaluate_second_pass`).
:func:`monte_carlo_note` recomputes every paired comparison of a report on the second pass and
names each verdict that changes, raw and after Holm's correction over the report's family: a
verdict that depends on which weights were drawn is not a finding about the methods, and more
samples are needed before it is read as one.
"""

from __future__ import annotations

import statistics
from typing import Any

from .stats import PAIRED_METRICS, paired_family

__all__ = ["monte_carlo_note"]


#: the short name a line prints for each metric title of PAIRED_METRICS
_SHORT = {title: title.split(" (")[0] for title, *_ in PAIRED_METRICS}


def _final_second(s: dict[str, Any]) -> dict[str, Any] | None:
    return s.get("test_second_pass")


def _stopped_second(s: dict[str, Any]) -> dict[str, Any] | None:
    return (s.get("early_stopped") or {}).get("test_second_pass")


def _samples(runs: dict[str, list[dict[str, Any]]]) -> str:
    counts = sorted({int(s.get("monte_carlo", {}).get("samples") or s.get("test_samples") or 0)
                     for group in runs.values() for s in group if _final_second(s) is not None} - {0})
    return "/".join(str(c) for c in counts) if counts else "the"


def _one_pass(summaries: dict[str, list[dict[str, Any]]], second: bool) -> dict[str, list[dict[str, Any]]]:
    """The runs that have a second pass, with the first pass's test metrics or the second's (final
    and early-stopped; an early-stopped model without a second pass is left out of both)."""
    view = {}
    for method, runs in summaries.items():
        mine = []
        for s in runs:
            if _final_second(s) is None:
                continue
            run = {**s, "test": s["test_second_pass"] if second else s["test"]}
            stopped = s["early_stopped"] if _stopped_second(s) is not None else None
            pick = "test_second_pass" if second else "test"
            run["early_stopped"] = stopped and {**stopped, "test": stopped[pick]}
            mine.append(run)
        if mine:
            view[method] = mine
    return view


def _changes(summaries: dict[str, list[dict[str, Any]]], references: list[str],
             margins: dict[str, float] | None, samples: str) -> tuple[list[str], int, list[str], int]:
    """Each paired verdict that the second pass changes, raw and after Holm (the report's family,
    formed on each pass): (raw lines, raw verdicts compared, Holm lines, Holm verdicts compared).
    The final model's comparisons come first, then the early-stopped model's, as in the report."""
    first, _ = paired_family(_one_pass(summaries, False), references, margins)
    second, _ = paired_family(_one_pass(summaries, True), references, margins)
    tables = sorted(zip(first, second), key=lambda pair: pair[0][1] != "final model")  # stable: references in order
    raw: list[str] = []
    holm: list[str] = []
    raw_compared = holm_compared = 0
    for (reference, model, rows_a), (_, _, rows_b) in tables:
        for a, b in zip(rows_a, rows_b):
            for title, *_ in PAIRED_METRICS:
                if a[title] is None or b[title] is None:
                    continue
                name = f"{a['method']} − {reference} {_SHORT[title]} ({model.split()[0]})"
                raw_compared += 1
                if a[title].verdict != b[title].verdict:
                    raw.append(f"{name}: {a[title].verdict} with the first {samples} samples, {b[title].verdict} "
                               f"with a second {samples}: Monte Carlo error matters at this sample count; raise "
                               "bayes.test_samples")
                before, after = a[title].holm_verdict, b[title].holm_verdict
                if before is None or after is None:
                    continue
                holm_compared += 1
                if before != after:
                    holm.append(f"{name}, after Holm: {before} with the first {samples} samples, {after} with a "
                                f"second {samples}")
    return raw, raw_compared, holm, holm_compared


def _mean_abs(pairs: list[tuple[dict[str, Any], dict[str, Any]]], key: str, scale: float) -> float:
    return statistics.fmean(scale * abs(b[key] - a[key]) for a, b in pairs)


def _error_text(pairs: list[tuple[dict[str, Any], dict[str, Any]]]) -> str:
    return ", ".join(f"{_SHORT[title]} {_mean_abs(pairs, key, scale):.{4 if scale == 1 else 2}f}"
                     f"{' pp' if scale != 1 else ''}" for title, key, scale, _ in PAIRED_METRICS)


def monte_carlo_note(summaries: dict[str, list[dict[str, Any]]], references: list[str],
                     margins: dict[str, float] | None = None) -> list[str]:
    """Lines on the Monte-Carlo error of a report's Bayesian runs (``summaries``: method -> run
    summaries, as ``otmdr compare`` reads them; ``references`` and ``margins`` as the report's
    paired tables use them).

    Every paired comparison (each reference, each other method, final and early-stopped model,
    accuracy/NLL/ECE) is computed on the first pass and again on the second; each raw verdict
    (:attr:`~otmdr.report.stats.PairedDifference.verdict`) that differs gets one line::

        otmdr − sgd accuracy (final): better with the first 30 samples, inconclusive with 3 seeds
        with a second 30: Monte Carlo error matters at this sample count; raise bayes.test_samples

    Then each verdict after Holm's correction (:attr:`~otmdr.report.stats.PairedDifference.holm_verdict`,
    the family as the report forms it, on each pass) that differs gets one line too: a raw verdict at
    the edge of a margin can flip while the corrected one, which the report's bottom line quotes,
    holds.

    Both passes use the same seeds: those of the runs that have a second pass (all of them when
    every run was trained with it; then the first pass is exactly the report's table). The last
    line is the Monte-Carlo error itself: the mean over runs of |second − first| of accuracy, NLL
    and ECE (accuracy and ECE in percentage points), and how many verdicts changed, raw and after Holm. An empty list
    when no run has a second pass (deterministic models, or runs trained before it was recorded).
    """
    final = [(s["test"], s["test_second_pass"]) for runs in summaries.values() for s in runs
             if _final_second(s) is not None]
    stopped_pairs = [(s["early_stopped"]["test"], s["early_stopped"]["test_second_pass"])
                     for runs in summaries.values() for s in runs if _stopped_second(s) is not None]
    if not final and not stopped_pairs:
        return []
    samples = _samples(summaries)
    lines, compared, holm_lines, holm_compared = _changes(summaries, references, margins, samples)
    parts = []
    if final:
        parts.append(f"final model over {len(final)} runs: {_error_text(final)}")
    if stopped_pairs:
        parts.append(f"early-stopped model over {len(stopped_pairs)} runs: {_error_text(stopped_pairs)}")
    changed = (f"{len(lines)} of {compared} paired verdicts change with a second pass" if compared
               else "no paired verdicts to check")
    if holm_compared:
        changed += f", {len(holm_lines)} of {holm_compared} after Holm's correction"
    lines += holm_lines
    lines.append(f"Monte Carlo error at {samples} weight samples per pass (mean |second pass − first pass|): "
                 f"{'; '.join(parts)}; {changed}.")
    return lines
