"""Mean +- std tables over seeds, for the terminal and for Markdown."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

from ..eval.attacks import format_epsilon  # re-exported: report formats what eval measured

__all__ = ["aggregate", "format_table", "early_stopped", "format_epsilon", "COLUMNS", "COMPUTE", "WALL", "RADIUS"]

COMPUTE = "grad. evals (× ref)"
WALL = "train time (× ref)"
RADIUS = "radius ‖θ̃−θ‖ incl. noise"


#: (title, function of a run summary, digits, scale)
COLUMNS: list[tuple[str, Any, int, float]] = [
    ("test acc (%)", lambda s: s["test"]["accuracy"], 2, 100.0),
    ("test NLL", lambda s: s["test"]["nll"], 4, 1.0),
    ("Brier", lambda s: s["test"]["brier"], 4, 1.0),
    ("ECE (%)", lambda s: s["test"]["ece"], 2, 100.0),
    ("ECE after TS (%)", lambda s: s.get("test_temperature_scaled", {}).get("ece"), 2, 100.0),
    ("s / epoch (median)", lambda s: s["seconds_per_epoch"], 2, 1.0),
    ("passes / step", lambda s: s["passes_per_step"], 1, 1.0),
    ("epochs", lambda s: s["epochs"], 0, 1.0),
    # the compute each run spent: gradient evaluations (full-batch forward+backward equivalents)
    # and training wall-clock, as ratios to the reference method's mean (filled in by aggregate)
    (COMPUTE, lambda s: s.get("compute", {}).get("gradient_evaluations"), 2, 1.0),
    (WALL, lambda s: s.get("compute", {}).get("train_seconds"), 2, 1.0),
    # the measured ||theta~ - theta|| of the last epoch: with OT-MDR's Langevin noise (otmdr.noise_std,
    # on in the Bayesian configs) it holds the noise too, which in a large network dwarfs the ascent
    # move (5.499 against SAM's 0.005 in a Bayesian study): the title says so, and runs with noise
    # get the two parts in columns of their own (n/a for a method without noise; left out of a
    # study without any)
    (RADIUS, lambda s: s["perturbation_norm"], 3, 1.0),
    ("ascent radius (no noise)", lambda s: s.get("perturbation_move_norm") if s.get("perturbation_noise_norm")
     else None, 3, 1.0),
    ("noise ‖ξ‖", lambda s: s.get("perturbation_noise_norm") or None, 3, 1.0),
    # ensembles only (columns with no value in any row are left out of the table)
    ("disagreement", lambda s: s.get("diversity", {}).get("pairwise_disagreement"), 4, 1.0),
    ("double fault", lambda s: s.get("diversity", {}).get("double_fault"), 4, 1.0),
    ("error corr.", lambda s: s.get("diversity", {}).get("error_correlation"), 3, 1.0),
    ("MI (nats)", lambda s: s.get("diversity", {}).get("mutual_information"), 4, 1.0),
]


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def aggregate(summaries: dict[str, list[dict[str, Any]]], reference: str | None = None) -> list[dict[str, Any]]:
    """One row per method: mean and std of every column over its seeds; the compute columns as
    ratios to ``reference``'s mean (default: the first method), so "what did each side spend"
    is read next to every accuracy."""
    reference = reference if reference in summaries else next(iter(summaries), None)
    rows = []
    for method, runs in summaries.items():
        row: dict[str, Any] = {"method": method, "seeds": len(runs)}
        for title, get, _, scale in COLUMNS:
            values = [get(s) for s in runs]
            if title in (COMPUTE, WALL) and reference is not None:
                base = [get(s) for s in summaries[reference]]
                if None in base or not base or not statistics.fmean(base):
                    values = [None]
                else:
                    scale = 1.0 / statistics.fmean(base)
            if any(v is None for v in values) or not values:
                row[title] = None
            else:
                mean, std = _mean_std([v * scale for v in values])
                row[title] = (mean, std)
        rows.append(row)
    return rows


def format_table(rows: list[dict[str, Any]], *, markdown: bool) -> str:
    columns = [c for c in COLUMNS if any(row[c[0]] is not None for row in rows)]
    titles = ["method", "seeds"] + [c[0] for c in columns]
    digits = {c[0]: c[2] for c in columns}
    cells = []
    for row in rows:
        line = [row["method"], str(row["seeds"])]
        for title, _, _, _ in columns:
            value = row[title]
            if value is None:
                line.append("n/a")
            elif row["seeds"] == 1:  # one seed: no spread to show
                line.append(f"{value[0]:.{digits[title]}f}")
            else:
                line.append(f"{value[0]:.{digits[title]}f} ± {value[1]:.{digits[title]}f}")
        cells.append(line)
    if markdown:
        out = ["| " + " | ".join(titles) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * len(columns)) + "|"]
        out += ["| " + " | ".join(line) + " |" for line in cells]
        return "\n".join(out)
    widths = [max(len(t), *(len(line[i]) for line in cells)) for i, t in enumerate(titles)]
    fmt = "  ".join(f"{{:<{w}}}" if i < 2 else f"{{:>{w}}}" for i, w in enumerate(widths))
    header = [fmt.format(*titles), fmt.format(*("-" * w for w in widths))]
    return "\n".join(header + [fmt.format(*line) for line in cells])


def early_stopped(summaries: dict[str, list[dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
    """The same runs with the test metrics of their best-validation checkpoint in place of the
    final model's (methods whose runs have no validation split are left out)."""
    return {method: [{**s, "test": s["early_stopped"]["test"], "test_temperature_scaled": {}} for s in runs]
            for method, runs in summaries.items() if all(s.get("early_stopped") for s in runs)}
