"""The Markdown report of ``otmdr compare``: the table, the plots, and how it was produced."""

from __future__ import annotations

import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from .plots import plot_learning_curves, plot_reliability, plot_test_accuracy
from .tables import aggregate, format_table

__all__ = ["write_compare_report"]


def write_compare_report(out_dir: Path, summaries: dict[str, list[dict[str, Any]]], *, command: str,
                         config_text: str, threads: int | None = None) -> Path:
    figures = out_dir / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    curves = plot_learning_curves(summaries, figures / "learning_curves.png")
    accuracy = plot_test_accuracy(summaries, figures / "test_accuracy.png")
    calibration = plot_reliability(summaries, figures / "reliability.png")
    first = next(iter(summaries.values()))[0]
    bins = first["test"]["ece_bins"]
    lines = [
        f"# Comparison on {first['dataset']} with {first['model']} ({first['parameters']:,} parameters)",
        "",
        f"Command: `{command}`  ",
        f"Date: {datetime.now(timezone.utc).isoformat(timespec='seconds')}; torch {torch.__version__}, "
        f"Python {platform.python_version()}, {platform.machine()} "
        f"({threads or torch.get_num_threads()} torch thread(s) per run); "
        f"{first['epochs']} epochs per run.",
        "",
        f"Test metrics, mean ± std over seeds (ECE with {bins} equal-width bins; TS = temperature scaling "
        "fitted on the validation split; radius = measured perturbation norm ‖θ~−θ‖, mean over the last epoch).",
        "",
        format_table(aggregate(summaries), markdown=True),
        "",
        "Per run (test accuracy %):",
        "",
    ]
    for method, runs in summaries.items():
        values = ", ".join(f"seed {r['seed']}: {100 * r['test']['accuracy']:.2f}" for r in runs)
        lines.append(f"- {method}: {values}")
    lines += [
        "",
        f"![learning curves]({curves.relative_to(out_dir)})",
        "",
        f"![test accuracy]({accuracy.relative_to(out_dir)})",
        "",
        f"![reliability diagrams]({calibration.relative_to(out_dir)})",
        "",
        "<details><summary>configuration</summary>",
        "",
        "```yaml",
        config_text.rstrip(),
        "```",
        "",
        "</details>",
        "",
    ]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines))
    return path
