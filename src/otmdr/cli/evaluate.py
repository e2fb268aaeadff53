"""``otmdr eval`` (test metrics, attacks, corruptions and their mCE) and ``otmdr corrupt``."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from ._common import UsageError, load_trained


def _check_eval_options(args: argparse.Namespace) -> None:
    """Every option of ``otmdr eval`` is checked before the first forward pass, not after the
    clean evaluation and the temperature fit."""
    from ..eval.run_robustness import parse_epsilons

    if args.attack:
        try:
            epsilons = parse_epsilons(args.eps)
        except ValueError as error:
            raise UsageError(f"--eps: {error}") from None
        _check_epsilons(args.eps, epsilons, linf=args.attack == "fgsm" or args.norm == "linf")
    if args.baseline and not args.corruptions:
        raise UsageError("--baseline needs --corruptions: the mCE compares corruption errors with the baseline's")
    if args.corruptions:
        from ..data.corruptions import CORRUPTIONS
        from ..eval.corruption_grid import parse_corruptions, parse_severities

        available = list(CORRUPTIONS)
        if args.corrupted_dir:
            from ..data import list_corruptions

            available = list_corruptions(args.corrupted_dir)
        try:
            parse_corruptions(args.corruptions, available)
            parse_severities(args.severities)
        except ValueError as error:
            raise UsageError(f"--corruptions/--severities: {error}") from None


def _check_epsilons(text: str, epsilons: list[float], *, linf: bool) -> None:
    """Radii are on [0, 1] pixels: a negative or non-finite one is refused, and so is an L-inf
    radius above 1 (every image is within 1 of every other, so 8 means 8/255 written the 0-255
    way). An L2 radius is a norm over all pixels, where 2 is an ordinary value."""
    import math

    written = [t.strip() for t in text.split(",")]
    for shown, eps in zip(written, epsilons):
        if not math.isfinite(eps) or eps < 0:
            raise UsageError(f"--eps {shown}: a radius must be a finite number >= 0, e.g. --eps 8/255")
    above = [(shown, eps) for shown, eps in zip(written, epsilons) if eps > 1]
    if linf and above:
        shown, eps = above[0]
        fixed = ",".join(f"{t}/255" if e > 1 else t for t, e in zip(written, epsilons))
        raise UsageError(f"--eps {shown} is above 1 on [0, 1] pixels: did you mean {shown}/255 = {eps / 255:.4f}? "
                         f"write --eps {fixed}")


def refuse_existing(args: argparse.Namespace, targets: list[tuple[str, Path | str | None]]) -> None:
    """Results are never overwritten silently: an output that exists already is refused before any
    work (``targets``: the option as shown, e.g. ``--json``, and the file it names, if any)."""
    for option, target in targets:
        if target and Path(target).exists() and not getattr(args, "force", False):
            fix = ("pass --force to replace it" if hasattr(args, "force") else "remove it")
            raise UsageError(f"{option}: {target} already exists: {fix} or choose another path (otmdr does not "
                              "overwrite results)")


def checkpoint_record(args: argparse.Namespace) -> dict[str, str]:
    """The checkpoint file a command read (``args.path``: a run directory or a checkpoint) and the
    SHA-256 of its bytes, so a result says which weights it is of."""
    import hashlib

    path = Path(args.path)
    if path.is_dir():
        path = path / "checkpoints" / f"{args.checkpoint}.pt"
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return {"path": str(path), "sha256": digest.hexdigest()}


def _set_predictive_samples(args: argparse.Namespace, cfg, model) -> None:
    """``--predictive-samples``: fewer draws make a Bayesian network's corruption and attack
    evaluations affordable (each draw is a forward pass per image and condition), more make its
    Monte-Carlo error smaller. A deterministic model has no draws to set."""
    from ..models.bayes import is_bayesian

    if args.predictive_samples is None:
        return
    if not is_bayesian(model):
        raise UsageError(f"--predictive-samples: {args.path} is not a Bayesian network (its prediction is one "
                         "forward pass): leave the option out")
    cfg.bayes.test_samples = args.predictive_samples


def _load_baseline(args: argparse.Namespace, cfg):
    """The ``--baseline`` run's config and model, checked to be a run of the same dataset."""
    from ..models.bayes import is_bayesian
    from ..train import CheckpointError, RunDirError, load_run

    path = Path(args.baseline)
    if not path.exists():
        raise UsageError(f"--baseline {path}: no such run directory or checkpoint")
    try:
        base_cfg, model, _ = load_run(path, device=args.device, which=args.checkpoint)
    except (CheckpointError, RunDirError) as error:
        raise UsageError(f"--baseline {path}: {error}") from None
    if base_cfg.data.name != cfg.data.name:
        raise UsageError(f"--baseline {path} was trained on {base_cfg.data.name}, {args.path} on {cfg.data.name}: "
                          "the mCE needs a baseline of the same dataset")
    base_cfg.data.test_limit = cfg.data.test_limit
    if args.predictive_samples is not None and is_bayesian(model):  # the same draws as the run's
        base_cfg.bayes.test_samples = args.predictive_samples
    return base_cfg, model


def cmd_eval(args: argparse.Namespace) -> int:
    from ..eval import evaluate_model
    from ..train.checkpoint import atomic_write_text

    _check_eval_options(args)
    refuse_existing(args, [("--json", args.json), ("--plot", args.plot if args.attack else None),
                           ("--heatmap", args.heatmap if args.corruptions else None)])
    cfg, model, data = load_trained(args)
    _set_predictive_samples(args, cfg, model)
    baseline = _load_baseline(args, cfg) if args.baseline else None
    result = {"path": str(args.path), "checkpoint": checkpoint_record(args),
              **evaluate_model(cfg, model, data, n_bins=args.ece_bins,
                               temperature_scaling=not args.no_temperature_scaling)}
    split = (f"a fixed random subset of {len(data.test.labels)} test images (--test-limit)" if cfg.data.test_limit
             else f"the test split ({len(data.test.labels)} images)")
    print(f"{args.path}: {cfg.data.name}, {split}, model {cfg.model.name}")
    scaled = result.get("test_temperature_scaled", {})
    percent = {"accuracy", "ece"}  # one convention everywhere: accuracy and ECE in percent

    def shown(key: str, value: float) -> str:
        return f"{100 * value:.2f}%" if key in percent else f"{value:.4f}"

    for key, value in result["test"].items():
        after = scaled.get(key) if key != "accuracy" else None
        extra = f"   (temperature-scaled: {shown(key, after)})" if isinstance(after, float) else ""
        print(f"  {key:10s} {shown(key, value)}{extra}" if isinstance(value, float) else f"  {key:10s} {value}")
    if scaled:
        print(f"  temperature {scaled['temperature']:.4f} (fitted on the validation split)")
    for key, value in result.get("diversity", {}).items():
        text = ", ".join(f"{v:.4f}" for v in value) if isinstance(value, list) else f"{value:.6g}"
        print(f"  {key:24s} {text}")
    if args.attack:
        result["attack"] = _attack(args, cfg, model, data, clean=result["test"]["accuracy"])
    if args.corruptions:
        result["corruptions"] = _corruptions(args, cfg, model, data, baseline)
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=2))
        print(f"written: {args.json}")
    return 0


def _attack(args: argparse.Namespace, cfg, model, data, *, clean: float | None = None) -> dict[str, Any]:
    """Robust accuracy per radius (otmdr.eval.run_robustness), printed and plotted."""
    from ..eval.run_robustness import attack_robustness, parse_epsilons

    try:
        result = attack_robustness(cfg, model, data, attack=args.attack, epsilons=parse_epsilons(args.eps),
                                   norm=args.norm, steps=args.steps, eot=args.eot,
                                   autoattack_version=args.autoattack_version, echo=print)
    except ValueError as error:  # e.g. too few classes for AutoAttack's targeted attacks
        raise UsageError(f"--attack {args.attack}: {error}") from None
    if args.plot:
        from ..report.plots import plot_robust_accuracy

        curve = {float(k): v for k, v in result["robust_accuracy"].items()}
        shown = ({0.0: clean} if clean is not None else {}) | curve  # the clean accuracy at epsilon 0
        plot_robust_accuracy({cfg.model.name: shown}, args.plot, title=f"{args.attack.upper()} on {cfg.model.name}")
        print(f"plot: {args.plot}")
    return result


def _corruptions(args: argparse.Namespace, cfg, model, data, baseline=None) -> dict[str, Any]:
    """Metrics per corruption x severity (otmdr.eval.run_robustness), printed, with the mCE against
    ``baseline`` (its config and model) when given."""
    from ..eval.run_robustness import corruption_errors, corruption_evaluation
    from ..eval.corruption_grid import format_corruption_table

    options = dict(corruptions=args.corruptions, severities=args.severities, corrupted_dir=args.corrupted_dir,
                   seed=args.corruption_seed, n_bins=args.ece_bins)
    try:
        result = corruption_evaluation(cfg, model, data, **options, echo=lambda line: print(line, flush=True))
    except ValueError as error:
        raise UsageError(f"--corruptions/--severities: {error}") from None
    print()
    print(format_corruption_table(result))
    print(f"  mean corruption accuracy {100 * result['mean_corruption_accuracy']:.2f}%  (clean "
          f"{100 * result['clean']['accuracy']:.2f}%, relative degradation "
          f"{100 * result['relative_degradation']:.1f}%);  mean NLL {result['mean_corruption_nll']:.4f}, "
          f"mean ECE {100 * result['mean_corruption_ece']:.2f}%")
    if baseline is not None:
        print(f"  baseline {args.baseline}:", flush=True)
        base_cfg, base_model = baseline
        base = corruption_evaluation(base_cfg, base_model, data, **options, echo=lambda line: print(line, flush=True))
        result["mce"] = {"baseline": str(args.baseline), **corruption_errors(result, base)}
        _print_mce(result["mce"])
    if args.heatmap:
        from ..report.plots import plot_corruption_heatmaps

        plot_corruption_heatmaps({f"{cfg.model.name} ({cfg.optim.method})": result}, args.heatmap)
        print(f"heat map: {args.heatmap}")
    return result


def _print_mce(mce: dict[str, Any]) -> None:
    """The CE table and the (relative) mCE; a ratio the baseline cannot support is n/a, with why."""
    from ..eval.run_robustness import MIN_BASELINE_DEGRADATION

    def percent(value: float | None, width: int) -> str:
        return f"{'n/a' if value is None else f'{100 * value:.1f}':>{width}s}"

    width = max(len(name) for name in mce["ce"])
    print(f"  {'corruption':{width}s}      CE  relative CE   (%, baseline = 100)")
    for name, ce in mce["ce"].items():
        print(f"  {name:{width}s}  {percent(ce, 6)}  {percent(mce['relative_ce'][name], 11)}")
    floor = f"{100 * mce.get('min_baseline_degradation', MIN_BASELINE_DEGRADATION):g} point"
    missing_ce, missing_rel = mce.get("ce_not_available", {}), mce.get("relative_ce_not_available", {})
    if missing_ce:
        print(f"  CE n/a for {', '.join(missing_ce)}: the baseline makes no error there (a ratio over zero)")
    if missing_rel and len(missing_rel) < len(mce["ce"]):
        print(f"  relative CE n/a for {', '.join(missing_rel)}: the baseline's error rises by less than {floor} "
              "there (mean over the severities), so the ratio of degradations would divide by noise")
    total = len(mce["ce"])

    def mean(key: str) -> str:
        value, names = mce[key], mce.get(f"{key}_corruptions", list(mce["ce"]))
        if value is None:
            why = (f"the baseline's error rises by less than {floor} under every corruption" if key == "relative_mce"
                   else "the baseline makes no error under any corruption")
            return f"n/a ({why})"
        return f"{100 * value:.1f}%" + (f" over {len(names)} of {total} corruptions" if len(names) < total else "")

    print(f"  mCE {mean('mce')}, relative mCE {mean('relative_mce')} against {mce['baseline']} "
          f"(its mean corruption accuracy {100 * mce['baseline_mean_corruption_accuracy']:.2f}%, clean "
          f"{100 * mce['baseline_clean_accuracy']:.2f}%)")


def cmd_corrupt(args: argparse.Namespace) -> int:
    """Write the test split of a dataset, corrupted at severities 1-5, in the CIFAR-10-C layout."""
    from ..data import load_split, test_subset, write_corrupted
    from ..eval.corruption_grid import parse_corruptions

    try:
        names = parse_corruptions(args.corruptions)
    except ValueError as error:
        raise UsageError(f"--corruptions: {error}") from None
    if args.limit is not None and args.limit < 1:
        raise UsageError("--limit must be at least 1")
    test = test_subset(load_split(args.dataset, "test", args.data_dir), args.limit)
    where = f"{args.dataset} test split ({len(test)} images" + (f", otmdr test subset --limit {args.limit}"
                                                                 if args.limit else "") + ")"
    print(f"corrupting the {where}: {len(names)} corruptions x severities 1-5, seed {args.seed} -> {args.out}",
          flush=True)
    started = time.perf_counter()

    def progress(name: str) -> None:
        print(f"  {name} ({time.perf_counter() - started:.0f}s)", flush=True)

    write_corrupted(test.images, test.labels, args.out, names, seed=args.seed, progress=progress, source=where)
    print(f"written: {args.out} (evaluate with: otmdr eval RUN_DIR --corruptions all --corrupted-dir {args.out}"
          + (f" --test-limit {args.limit}" if args.limit else "") + ")")
    return 0

