"""Robustness of a trained run: adversarial attacks, common corruptions and the mCE against a baseline.

The run-level layer over :mod:`otmdr.eval.attacks` and :mod:`otmdr.eval.corruption_grid` (which
know models and images only): it reads a run's config for precision, sampling and test subset.

What ``otmdr eval --attack/--corruptions/--baseline`` computes, as functions a Python user can
call on a loaded run (``cfg, model, data`` from :func:`otmdr.train.load_run` and
:func:`otmdr.train.builders.build_data`): the CLI only parses its options, calls these and prints.
Progress lines go to ``echo`` (``print`` in the CLI, nothing by default).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from ..data import ImageData
from ..data.corruptions import CORRUPTIONS
from .corruption_grid import corruption_robustness, folder_source, generated_source, parse_corruptions, parse_severities

__all__ = ["parse_epsilons", "attack_robustness", "corruption_evaluation", "corruption_errors"]

Echo = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


def parse_epsilons(text: str) -> list[float]:
    """``"1/255,8/255"`` or ``"0.1, 0.3"`` -> radii; ValueError on anything else."""
    from ..config import parse_number

    try:
        return [parse_number(e.strip()) for e in text.split(",")]
    except ValueError:
        raise ValueError(f"expected comma-separated numbers or fractions like 8/255, got {text!r}") from None


def _per_channel(values, channels: int) -> torch.Tensor:
    """A (1, C, 1, 1) tensor of per-channel constants (a single value is broadcast)."""
    t = torch.tensor(values, dtype=torch.float32)
    return (t.expand(channels) if t.numel() == 1 else t).view(1, -1, 1, 1)


def attack_robustness(cfg, model: torch.nn.Module, data, *, attack: str, epsilons: Sequence[float], norm: str = "linf",
                      steps: int = 10, eot: int = 1, autoattack_version: str | None = None,
                      echo: Echo = _quiet) -> dict[str, Any]:
    """Robust test accuracy per radius under ``attack`` (fgsm, pgd or autoattack).

    The attacks work on [0, 1] pixels, so the model is wrapped with its dataset normalisation;
    Bayesian networks are attacked with their test-time sampling (and AutoAttack's 'rand' suite
    unless ``autoattack_version`` says otherwise). ValueError when AutoAttack cannot run.
    """
    from ..models.bayes import is_bayesian
    from .attacks import Normalized, fgsm, format_epsilon, pgd, robust_accuracies

    spec = data.test.spec
    mean = _per_channel(spec.mean, spec.in_channels)
    std = _per_channel(spec.std, spec.in_channels)
    attacked = Normalized(model, mean.flatten().tolist(), std.flatten().tolist())
    bayesian = is_bayesian(model)
    samples = cfg.bayes.test_samples if bayesian else 1
    batches = [(x * std.to(x) + mean.to(x), y) for x, y in data.test]  # back to [0, 1]
    curve: dict[float, float] = {}
    halves: dict[str, list[float]] = {}  # a Bayesian network's accuracy from each half of its draws
    details: dict[str, Any] = {}
    for eps in epsilons:
        if attack == "autoattack":
            curve[eps], details[str(eps)] = _autoattack(attacked, batches, eps, norm, autoattack_version or
                                                        ("rand" if bayesian else "standard"), echo)
            continue
        if attack == "fgsm":
            fn = lambda m, x, y, e=eps: fgsm(m, x, y, e, eot_samples=eot)  # noqa: E731
        else:
            fn = lambda m, x, y, e=eps: pgd(m, x, y, e, norm=norm, steps=steps, eot_samples=eot)  # noqa: E731
        curve[eps], half = robust_accuracies(attacked, batches, fn, samples=samples)
        if half is not None:
            halves[str(eps)] = half
        echo(f"  {attack} {norm if attack == 'pgd' else 'linf'} eps {format_epsilon(eps)}: "
             f"robust accuracy {100 * curve[eps]:.2f}%")
    result = {"method": attack, "norm": "linf" if attack == "fgsm" else norm, "steps": steps,
              "eot_samples": eot, "robust_accuracy": {str(k): v for k, v in curve.items()}}
    if details:
        result.update(steps=None, eot_samples=None, autoattack=details)
    if halves:
        result["monte_carlo"] = {"samples": samples, "halves": [samples // 2, samples - samples // 2],
                                 "robust_accuracy": halves}
    return result


def _autoattack(attacked, batches, eps: float, norm: str, version: str, echo: Echo) -> tuple[float, dict]:
    """AutoAttack at one radius (optional dependency pyautoattack)."""
    from .attacks import format_epsilon
    from .autoattack import autoattack_accuracy

    result = autoattack_accuracy(attacked, batches, eps, norm=norm, version=version)
    stages = ", ".join(f"{name} {100 * acc:.2f}%" for name, acc in result["stages"].items())
    echo(f"  autoattack ({version}) {norm} eps {format_epsilon(eps)}: robust accuracy "
         f"{100 * result['robust_accuracy']:.2f}%  (clean {100 * result['clean_accuracy']:.2f}%; after {stages})")
    return result["robust_accuracy"], result


def corruption_evaluation(cfg, model: torch.nn.Module, data, *, corruptions: str = "all", severities: str = "1-5",
                          corrupted_dir: str | None = None, seed: int = 0, n_bins: int | None = None,
                          echo: Echo = _quiet) -> dict[str, Any]:
    """Metrics per corruption x severity on the run's test split (see
    :func:`otmdr.eval.corruption_grid.corruption_robustness`): corrupted on the fly with ``seed``, or read
    from an official-layout folder ``corrupted_dir`` (CIFAR-10-C, or one written by ``otmdr
    corrupt``). ``corruptions``/``severities`` are the CLI's texts; ValueError when they are invalid.
    """
    from .evaluate import AUTOCAST, prediction_samples

    test = data.test
    clean = ImageData(test.images.cpu(), test.labels.cpu(), test.classes)
    if corrupted_dir:
        from ..data import list_corruptions

        available = list_corruptions(corrupted_dir)
        source = folder_source(corrupted_dir, clean, cfg.data.test_limit)
        where = f"read from {corrupted_dir}"
    else:
        available = list(CORRUPTIONS)
        source = generated_source(clean.images, clean.labels, seed=seed)
        where = f"generated on the fly (seed {seed})"
    names = parse_corruptions(corruptions, available)
    chosen = parse_severities(severities)
    echo(f"  corruptions: {len(names)} x severities {chosen} on {len(clean)} test images, {where}")

    def progress(name: str, severity: int, cell: dict[str, float]) -> None:
        echo(f"    {name:18s} s{severity}: accuracy {100 * cell['accuracy']:6.2f}%  NLL {cell['nll']:.4f}  "
             f"ECE {100 * cell['ece']:5.2f}%")

    result = corruption_robustness(
        model, clean, test.spec, source, corruptions=names, severities=chosen, device=test.device,
        n_bins=n_bins or cfg.eval.ece_bins, samples=prediction_samples(cfg, model),
        autocast=AUTOCAST[cfg.train.precision], progress=progress)
    result["source"] = where
    return result


#: the baseline's error must rise by at least this much under a corruption (mean over the
#: severities) for that corruption's relative CE to be defined: below it the ratio divides by the
#: noise of a few images (0.2 points gave 1900 %), and at 0 by nothing
MIN_BASELINE_DEGRADATION = 0.01


def corruption_errors(result: dict[str, Any], baseline: dict[str, Any]) -> dict[str, Any]:
    """The corruption errors of Hendrycks & Dietterich (2019) of ``result`` against ``baseline``
    (two :func:`corruption_evaluation` results on the same corruptions and severities).

    Per corruption c, with E the error (1 - accuracy) and severities s:
    ``CE_c = sum_s E_s,c / sum_s E_s,c(baseline)`` and
    ``relative CE_c = sum_s (E_s,c - E_clean) / sum_s (E_s,c(baseline) - E_clean(baseline))``;
    mCE and relative mCE are their means over the corruptions.

    A ratio whose denominator is (near) zero is not a number to report: a CE is None when the
    baseline makes no error under that corruption, and a relative CE is None when the baseline's
    error rises by less than :data:`MIN_BASELINE_DEGRADATION` on average over the severities (its
    degradation is noise, or the corruption helps it). The reasons are in ``ce_not_available`` and
    ``relative_ce_not_available``; the (relative) mCE is the mean over the corruptions where it is
    defined, named in ``mce_corruptions``/``relative_mce_corruptions``, and None where none is.
    The result is valid JSON (no NaN).
    """
    if list(result["corruptions"]) != list(baseline["corruptions"]) or result["severities"] != baseline["severities"]:
        raise ValueError("the baseline was evaluated on other corruptions or severities")
    clean, clean_base = 1 - result["clean"]["accuracy"], 1 - baseline["clean"]["accuracy"]
    severities = result["severities"]
    ce: dict[str, float | None] = {}
    rel: dict[str, float | None] = {}
    ce_missing: dict[str, str] = {}
    rel_missing: dict[str, str] = {}
    for name, row in result["corruptions"].items():
        errors = [1 - row[str(s)]["accuracy"] for s in severities]
        base = [1 - baseline["corruptions"][name][str(s)]["accuracy"] for s in severities]
        if sum(base) > 0:
            ce[name] = sum(errors) / sum(base)
        else:
            ce[name] = None
            ce_missing[name] = "the baseline makes no error under it"
        degradation = sum(b - clean_base for b in base)
        if degradation / len(severities) >= MIN_BASELINE_DEGRADATION:
            rel[name] = sum(e - clean for e in errors) / degradation
        else:
            rel[name] = None
            rel_missing[name] = (f"the baseline's error rises by {100 * degradation / len(severities):.2f} points "
                                 f"on average over the severities, less than {100 * MIN_BASELINE_DEGRADATION:g}: "
                                 "a ratio of noise")

    def mean(values: dict[str, float | None]) -> tuple[float | None, list[str]]:
        defined = [k for k, v in values.items() if v is not None]
        return (float(np.mean([values[k] for k in defined])) if defined else None), defined

    mce, mce_names = mean(ce)
    relative_mce, rel_names = mean(rel)
    return {"ce": ce, "mce": mce, "relative_ce": rel, "relative_mce": relative_mce,
            "mce_corruptions": mce_names, "relative_mce_corruptions": rel_names,
            "ce_not_available": ce_missing, "relative_ce_not_available": rel_missing,
            "min_baseline_degradation": MIN_BASELINE_DEGRADATION,
            "baseline_mean_corruption_accuracy": baseline["mean_corruption_accuracy"],
            "baseline_clean_accuracy": baseline["clean"]["accuracy"]}
