"""Figures of a comparison: learning curves, test accuracy per method, reliability diagrams."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

__all__ = ["plot_learning_curves", "plot_test_accuracy", "plot_reliability"]


def _mean_curve(runs: list[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    curves = [[row[key] for row in run["history"] if key in row] for run in runs]
    if not curves or not curves[0]:
        return None
    length = min(len(c) for c in curves)
    values = np.array([c[:length] for c in curves], dtype=float)
    return np.arange(1, length + 1), values.mean(axis=0), values.std(axis=0)


def plot_learning_curves(summaries: dict[str, list[dict[str, Any]]], path: Path) -> Path:
    keys = [("train_loss", "train loss"), ("val_accuracy", "validation accuracy"), ("val_nll", "validation NLL")]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.4))
    for ax, (key, title) in zip(axes, keys):
        for method, runs in summaries.items():
            curve = _mean_curve(runs, key)
            if curve is None:
                continue
            epochs, mean, std = curve
            ax.plot(epochs, mean, label=method)
            ax.fill_between(epochs, mean - std, mean + std, alpha=0.2)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle("mean ± std over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_test_accuracy(summaries: dict[str, list[dict[str, Any]]], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(summaries), 3.4))
    for i, (method, runs) in enumerate(summaries.items()):
        values = np.array([100 * r["test"]["accuracy"] for r in runs])
        ax.bar(i, values.mean(), yerr=values.std(), alpha=0.35, capsize=4)
        ax.scatter(np.full(len(values), i), values, color="black", s=14, zorder=3)
    ax.set_xticks(range(len(summaries)), list(summaries))
    ax.set_ylabel("test accuracy (%)")
    low = min(100 * r["test"]["accuracy"] for runs in summaries.values() for r in runs)
    high = max(100 * r["test"]["accuracy"] for runs in summaries.values() for r in runs)
    ax.set_ylim(max(0.0, low - 2 * max(0.5, high - low)), min(100.0, high + max(0.5, high - low)))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _pooled_reliability(runs: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    edges = np.array(runs[0]["reliability"]["edges"])
    count = sum(np.array(r["reliability"]["count"], dtype=float) for r in runs)
    conf = sum(np.array(r["reliability"]["confidence"]) * np.array(r["reliability"]["count"]) for r in runs)
    acc = sum(np.array(r["reliability"]["accuracy"]) * np.array(r["reliability"]["count"]) for r in runs)
    safe = np.maximum(count, 1)
    return edges, count, conf / safe, acc / safe


def plot_reliability(summaries: dict[str, list[dict[str, Any]]], path: Path) -> Path:
    fig, axes = plt.subplots(1, len(summaries), figsize=(3.4 * len(summaries), 3.4), squeeze=False)
    for ax, (method, runs) in zip(axes[0], summaries.items()):
        edges, count, conf, acc = _pooled_reliability(runs)
        centres = (edges[:-1] + edges[1:]) / 2
        width = edges[1] - edges[0]
        used = count > 0
        ax.bar(centres[used], acc[used], width=width, edgecolor="black", alpha=0.6, label="accuracy")
        ax.plot([0, 1], [0, 1], "k--", linewidth=1)
        ax.scatter(conf[used], acc[used], s=10, color="red", zorder=3, label="(confidence, accuracy)")
        ece = float(np.sum(np.abs(conf - acc) * count) / count.sum())
        ax.set_title(f"{method}: pooled ECE {100 * ece:.2f}% ({len(edges) - 1} bins)", fontsize=10)
        ax.set_xlabel("confidence")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
    axes[0][0].set_ylabel("accuracy")
    axes[0][0].legend(loc="upper left", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
