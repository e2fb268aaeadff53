"""A model's metrics on every corruption x severity of a test set (robustness to distribution shift).

The corrupted images come from a :data:`CorruptedSource`, a function ``(name, severity) ->
(uint8 images (N, C, H, W), labels)``: :func:`generated_source` corrupts the clean test images on
the fly with :func:`otmdr.data.corruptions.corrupt`; :func:`folder_source` reads a folder in the
official CIFAR-10-C layout. Keeping the source separate lets one corrupted copy, written once by
``otmdr corrupt``, be reused for every model of a comparison.

This module knows models and images only; :mod:`otmdr.eval.run_robustness` evaluates a trained
run (its config, model and data) with it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data import BatchLoader, DatasetError, DatasetSpec, ImageData, load_corrupted, test_subset
from ..data.corruptions import BENCHMARK_CORRUPTIONS, CORRUPTIONS, corrupt
from .metrics import classification_metrics
from .predict import predict

__all__ = ["CorruptedSource", "generated_source", "folder_source", "corruption_robustness", "parse_corruptions",
           "parse_severities", "format_corruption_table"]

CorruptedSource = Callable[[str, int], tuple[torch.Tensor, torch.Tensor]]
_KEPT = ("accuracy", "nll", "brier", "ece")


def parse_corruptions(text: str, available: Sequence[str] = CORRUPTIONS) -> list[str]:
    """``"all"`` (every available name: the 19 of CIFAR-10-C, or what a folder holds), ``"benchmark"``
    (the 15 of the CIFAR-10-C benchmark, the mCE of most papers) or a comma-separated list of
    names, checked against ``available``."""
    if text.strip() == "all":
        return list(available)
    if text.strip() == "benchmark":
        missing = [n for n in BENCHMARK_CORRUPTIONS if n not in available]
        if missing:
            raise ValueError("'benchmark' means the 15 benchmark corruptions; not available here: "
                             + ", ".join(missing))
        return list(BENCHMARK_CORRUPTIONS)
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in available]
    if unknown or not names:
        raise ValueError(f"unknown corruption(s) {unknown}: use 'all', 'benchmark' or names from "
                         + ", ".join(available))
    return names


def parse_severities(text: str) -> list[int]:
    """``"1-5"``, ``"3"`` or ``"1,3,5"`` -> sorted severities in 1..5."""
    try:
        values: set[int] = set()
        for part in text.split(","):
            low, dash, high = part.strip().partition("-")
            values.update(range(int(low), int(high if dash else low) + 1))
    except ValueError:
        raise ValueError(f"severities: expected e.g. 1-5, 3 or 1,3,5, got {text!r}") from None
    if not values or not values <= {1, 2, 3, 4, 5}:
        raise ValueError(f"severities must lie in 1..5, got {text!r}")
    return sorted(values)


def generated_source(images: torch.Tensor, labels: torch.Tensor, *, seed: int = 0,
                     chunk: int = 1000) -> CorruptedSource:
    """Corrupt the clean uint8 ``images`` (N, C, H, W) on demand, ``chunk`` images at a time
    (the corruptions run on the CPU in numpy)."""
    images = images.cpu()

    def source(name: str, severity: int) -> tuple[torch.Tensor, torch.Tensor]:
        parts = [corrupt(images[i:i + chunk], name, severity, seed=seed + i) for i in range(0, len(images), chunk)]
        return torch.cat(parts), labels

    return source


def folder_source(root: str, clean: ImageData, test_limit: int | None = None) -> CorruptedSource:
    """Read the corrupted images from an official-layout folder (CIFAR-10-C, or one written by
    ``otmdr corrupt``) and check they are the ``clean`` images corrupted.

    A folder holding the full test split is cut to the same fixed subset ``test_limit`` selects
    for the clean images; one written with ``otmdr corrupt --limit N`` already is that subset. A
    folder of another size, or whose labels differ, is refused instead of giving numbers for
    other images.
    """

    def source(name: str, severity: int) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = load_corrupted(root, name, severity)
        block = ImageData(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels),
                          clean.classes)
        block = test_subset(block, test_limit)
        if len(block) != len(clean):
            raise DatasetError(f"{root} holds {len(block)} images per severity, the test split evaluated here "
                               f"{len(clean)}: pass --test-limit {len(block)} if it was written with `otmdr corrupt "
                               f"--limit {len(block)}`, or write one for this split")
        if not torch.equal(block.labels, clean.labels.cpu()):
            raise DatasetError(f"{root}: its labels differ from those of the test split evaluated here: the folder "
                               "holds a corrupted copy of another dataset, subset or ordering; write a matching one "
                               "with `otmdr corrupt` (with --limit equal to --test-limit)")
        return block.images, block.labels

    return source


def corruption_robustness(model: nn.Module, clean: ImageData, spec: DatasetSpec, source: CorruptedSource, *,
                          corruptions: Sequence[str] = CORRUPTIONS, severities: Sequence[int] = (1, 2, 3, 4, 5),
                          batch_size: int = 500, device: torch.device | str = "cpu", n_bins: int = 15,
                          samples: int = 1, autocast: torch.dtype | None = None,
                          progress: Callable[[str, int, dict[str, float]], None] | None = None) -> dict[str, Any]:
    """Accuracy, NLL, Brier and ECE on the clean images and on each (corruption, severity).

    Summaries: the mean corruption accuracy (mCA, the mean over all corruptions and severities),
    its NLL and ECE counterparts, the accuracy per corruption and per severity, and the relative
    degradation ``(clean accuracy - mCA) / clean accuracy``.

    With ``samples`` >= 2 (a Bayesian network) ``monte_carlo`` also holds the accuracies that each
    half of the draws gives on its own (clean, every cell, the mCA): a split-half check of the
    Monte-Carlo error at no extra forward pass.
    """
    half_accuracy: dict[tuple[str, int], list[float]] = {}

    def metrics(images: torch.Tensor, labels: torch.Tensor, cell: tuple[str, int] = ("clean", 0)) -> dict[str, float]:
        if images.shape[1:] != clean.images.shape[1:]:
            raise ValueError(f"corrupted images have shape {tuple(images.shape[1:])}, the model's test images "
                             f"{tuple(clean.images.shape[1:])}")
        loader = BatchLoader(ImageData(images, labels.long(), clean.classes), spec, batch_size, shuffle=False,
                             device=device)
        prediction = predict(model, loader, autocast_dtype=autocast, samples=samples, halves=True)
        if prediction.halves is not None:
            half_accuracy[cell] = [float((half.argmax(dim=1) == prediction.labels).double().mean())
                                   for half in prediction.halves]
        result = classification_metrics(torch.softmax(prediction.log_probs, dim=1), prediction.labels, n_bins)
        return {k: result[k] for k in _KEPT}

    table: dict[str, dict[str, dict[str, float]]] = {}
    for name in corruptions:
        for severity in severities:
            images, labels = source(name, severity)
            table.setdefault(name, {})[str(severity)] = cell = metrics(images, labels, (name, severity))
            if progress is not None:
                progress(name, severity, cell)
    clean_metrics = metrics(clean.images.cpu(), clean.labels.cpu())

    def mean(key: str, cells) -> float:
        return float(np.mean([c[key] for c in cells]))

    cells = [c for row in table.values() for c in row.values()]
    mca = mean("accuracy", cells)
    monte_carlo = {}
    if half_accuracy:
        grid = [half_accuracy[(n, s)] for n in corruptions for s in severities]
        monte_carlo = {"monte_carlo": {
            "samples": samples, "halves": [samples // 2, samples - samples // 2],
            "clean_accuracy": half_accuracy[("clean", 0)],
            "mean_corruption_accuracy": [float(np.mean([c[h] for c in grid])) for h in (0, 1)],
            "cells": {n: {str(s): half_accuracy[(n, s)] for s in severities} for n in corruptions}}}
    return {
        "clean": clean_metrics,
        "corruptions": table,
        "severities": list(severities),
        "images": len(clean),
        "mean_corruption_accuracy": mca,
        "mean_corruption_nll": mean("nll", cells),
        "mean_corruption_ece": mean("ece", cells),
        "relative_degradation": (clean_metrics["accuracy"] - mca) / clean_metrics["accuracy"]
        if clean_metrics["accuracy"] > 0 else float("nan"),
        "accuracy_per_corruption": {n: mean("accuracy", row.values()) for n, row in table.items()},
        "accuracy_per_severity": {str(s): mean("accuracy", [row[str(s)] for row in table.values()])
                                  for s in severities},
        **monte_carlo,
    }


def format_corruption_table(result: dict[str, Any], key: str = "accuracy", *, markdown: bool = False) -> str:
    """Rows = corruptions, columns = severities and their mean; percentages for accuracy and ECE."""
    scale = 100.0 if key in ("accuracy", "ece") else 1.0
    fmt = "{:.2f}" if scale == 100.0 else "{:.4f}"
    severities = [str(s) for s in result["severities"]]
    header = ["corruption", *[f"s{s}" for s in severities], "mean"]
    rows = []
    for name, row in result["corruptions"].items():
        values = [row[s][key] for s in severities]
        rows.append([name, *[fmt.format(scale * v) for v in values], fmt.format(scale * float(np.mean(values)))])
    per_severity = [float(np.mean([r[s][key] for r in result["corruptions"].values()])) for s in severities]
    rows.append(["all corruptions", *[fmt.format(scale * v) for v in per_severity],
                 fmt.format(scale * float(np.mean(per_severity)))])
    rows.append(["clean", *[""] * len(severities), fmt.format(scale * result["clean"][key])])
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in [header, *rows])
