"""The ``otmdr`` command: train, eval, compare, and list models and datasets.

Every anticipated problem (bad config, missing data, corrupt checkpoint, existing run
directory, a run that diverged) ends in one ``otmdr: error: ...`` line and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from . import __version__

EXIT_ERROR = 2


def _timestamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def _config(args: argparse.Namespace, extra: list[str] | None = None):
    from .config import load_config

    shortcuts = [f"{key}={getattr(args, name)}" for name, key in
                 (("method", "optim.method"), ("epochs", "train.epochs"), ("seed", "train.seed"))
                 if getattr(args, name, None) is not None]
    overrides = list(extra or []) + list(args.set or []) + shortcuts
    if getattr(args, "data_dir", None):
        overrides.append(f"data.dir={args.data_dir}")
    return load_config(args.config, overrides)


class _Interrupted(Exception):
    """Ctrl-C during a command; the message says what was kept and how to continue."""


def cmd_train(args: argparse.Namespace) -> int:
    """Train one run. Under torchrun every process runs this; rank 0 alone looks at and writes the
    file system (:func:`otmdr.train.distributed.from_rank0`), the others follow its decisions."""
    from .config import config_from_dict
    from .train import prepare_run_dir
    from .train.distributed import from_rank0

    if args.resume:
        if args.config or args.set or args.method or args.epochs is not None or args.seed is not None:
            raise _UsageError("--resume continues a run with its saved config: drop --config/--set/--method/"
                              "--epochs/--seed")
        run_dir = Path(args.resume)

        def inspect() -> dict[str, Any] | None:
            saved = run_dir / "config.yaml"
            if not (run_dir / "checkpoints" / "last.pt").is_file() and saved.is_file():
                # stopped before its first checkpoint: nothing was trained, so starting again from
                # the saved config is exactly what continuing would have done
                import yaml

                print(f"{run_dir} was stopped before its first checkpoint: starting it again from its config.yaml")
                (run_dir / "checkpoints").mkdir(exist_ok=True)
                return yaml.safe_load(saved.read_text())
            prepare_run_dir(args.resume, resume=True)
            return None

        saved_config = from_rank0(inspect)
        if saved_config is not None:
            summary = _train_into(config_from_dict(saved_config), run_dir, fresh=True, cleanup=False)
        else:
            summary = _train_into(None, run_dir, fresh=False)
    else:
        cfg = _config(args)
        stem = Path(args.config).stem if args.config else "default"

        def prepare() -> tuple[Path, bool]:  # rank 0's clock names the folder of every rank
            out = Path(args.out or f"runs/{stem}-{cfg.optim.method}-s{cfg.train.seed}-{_timestamp()}")
            if out.exists() and not out.is_dir():
                raise _UsageError(f"--out {out} is a file, not a folder: choose another --out")
            existed = out.exists()
            return prepare_run_dir(out, resume=False), existed

        run_dir, existed = from_rank0(prepare)
        print(f"run directory: {run_dir}")
        summary = _train_into(cfg, run_dir, fresh=True, keep_folder=existed)
    test = summary["test"]
    print(f"test: accuracy {100 * test['accuracy']:.2f}%  NLL {test['nll']:.4f}  Brier {test['brier']:.4f}  "
          f"ECE {100 * test['ece']:.2f}% ({test['ece_bins']} bins)")
    print(f"summary: {Path(run_dir) / 'summary.json'}")
    return 0


def _train_into(cfg, run_dir: Path, *, fresh: bool, keep_folder: bool = True, cleanup: bool = True) -> dict[str, Any]:
    """Train; a run that fails or is interrupted before its first checkpoint leaves nothing it
    created behind (a folder the user made stays, emptied of our files)."""
    from .train import train
    from .train.distributed import current

    try:
        return train(cfg, run_dir, resume=not fresh)
    except BaseException as error:
        checkpointed = (run_dir / "checkpoints" / "last.pt").exists()
        if fresh and cleanup and not checkpointed and current().is_main:
            if keep_folder:
                for child in run_dir.iterdir():
                    shutil.rmtree(child) if child.is_dir() else child.unlink()
            else:
                shutil.rmtree(run_dir, ignore_errors=True)
        from .train import Preempted

        if isinstance(error, Preempted) and fresh and cleanup and not checkpointed:
            raise Preempted("preempted (SIGTERM) before the first checkpoint; nothing was kept: start the run "
                            "again") from None
        if isinstance(error, KeyboardInterrupt):
            raise _Interrupted(f"interrupted; continue with: otmdr train --resume {run_dir}" if checkpointed
                               else "interrupted before the first checkpoint; nothing was kept") from None
        raise


def _load_trained(args: argparse.Namespace):
    """The trained model of ``args.path`` and its data (from ``--data-dir`` if the data moved)."""
    from .train import load_run
    from .train.builders import build_data

    cfg, model, _ = load_run(args.path, device=args.device, which=args.checkpoint)
    if args.data_dir:
        cfg.data.dir = args.data_dir
    if getattr(args, "test_limit", None) is not None:
        if args.test_limit < 1:
            raise _UsageError("--test-limit must be at least 1")
        cfg.data.test_limit = args.test_limit
    return cfg, model, build_data(cfg, next(model.parameters()).device)


def _check_eval_options(args: argparse.Namespace) -> None:
    """Every option of ``otmdr eval`` is checked before the first forward pass, not after the
    clean evaluation and the temperature fit."""
    from .eval.robustness import parse_epsilons

    if args.attack:
        try:
            parse_epsilons(args.eps)
        except ValueError as error:
            raise _UsageError(f"--eps: {error}") from None
    if args.baseline and not args.corruptions:
        raise _UsageError("--baseline needs --corruptions: the mCE compares corruption errors with the baseline's")
    if args.corruptions:
        from .data.corruptions import CORRUPTIONS
        from .eval.shift import parse_corruptions, parse_severities

        available = list(CORRUPTIONS)
        if args.corrupted_dir:
            from .data import list_corruptions

            available = list_corruptions(args.corrupted_dir)
        try:
            parse_corruptions(args.corruptions, available)
            parse_severities(args.severities)
        except ValueError as error:
            raise _UsageError(f"--corruptions/--severities: {error}") from None


def _load_baseline(args: argparse.Namespace, cfg):
    """The ``--baseline`` run's config and model, checked to be a run of the same dataset."""
    from .train import CheckpointError, RunDirError, load_run

    path = Path(args.baseline)
    if not path.exists():
        raise _UsageError(f"--baseline {path}: no such run directory or checkpoint")
    try:
        base_cfg, model, _ = load_run(path, device=args.device, which=args.checkpoint)
    except (CheckpointError, RunDirError) as error:
        raise _UsageError(f"--baseline {path}: {error}") from None
    if base_cfg.data.name != cfg.data.name:
        raise _UsageError(f"--baseline {path} was trained on {base_cfg.data.name}, {args.path} on {cfg.data.name}: "
                          "the mCE needs a baseline of the same dataset")
    base_cfg.data.test_limit = cfg.data.test_limit
    return base_cfg, model


def cmd_eval(args: argparse.Namespace) -> int:
    from .train import evaluate_model
    from .train.checkpoint import atomic_write_text

    _check_eval_options(args)
    cfg, model, data = _load_trained(args)
    baseline = _load_baseline(args, cfg) if args.baseline else None
    result = {"path": str(args.path), **evaluate_model(cfg, model, data, n_bins=args.ece_bins,
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
        shown = ", ".join(f"{v:.4f}" for v in value) if isinstance(value, list) else f"{value:.6g}"
        print(f"  {key:24s} {shown}")
    if args.attack:
        result["attack"] = _attack(args, cfg, model, data, clean=result["test"]["accuracy"])
    if args.corruptions:
        result["corruptions"] = _corruptions(args, cfg, model, data, baseline)
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=2))
        print(f"written: {args.json}")
    return 0


def _attack(args: argparse.Namespace, cfg, model, data, *, clean: float | None = None) -> dict[str, Any]:
    """Robust accuracy per radius (otmdr.eval.robustness), printed and plotted."""
    from .eval.robustness import attack_robustness, parse_epsilons

    try:
        result = attack_robustness(cfg, model, data, attack=args.attack, epsilons=parse_epsilons(args.eps),
                                   norm=args.norm, steps=args.steps, eot=args.eot,
                                   autoattack_version=args.autoattack_version, echo=print)
    except ValueError as error:  # e.g. too few classes for AutoAttack's targeted attacks
        raise _UsageError(f"--attack {args.attack}: {error}") from None
    if args.plot:
        from .report.plots import plot_robust_accuracy

        curve = {float(k): v for k, v in result["robust_accuracy"].items()}
        shown = ({0.0: clean} if clean is not None else {}) | curve  # the clean accuracy at epsilon 0
        plot_robust_accuracy({cfg.model.name: shown}, args.plot, title=f"{args.attack.upper()} on {cfg.model.name}")
        print(f"plot: {args.plot}")
    return result


def _corruptions(args: argparse.Namespace, cfg, model, data, baseline=None) -> dict[str, Any]:
    """Metrics per corruption x severity (otmdr.eval.robustness), printed, with the mCE against
    ``baseline`` (its config and model) when given."""
    from .eval.robustness import corruption_errors, corruption_evaluation
    from .eval.shift import format_corruption_table

    options = dict(corruptions=args.corruptions, severities=args.severities, corrupted_dir=args.corrupted_dir,
                   seed=args.corruption_seed, n_bins=args.ece_bins)
    try:
        result = corruption_evaluation(cfg, model, data, **options, echo=lambda line: print(line, flush=True))
    except ValueError as error:
        raise _UsageError(f"--corruptions/--severities: {error}") from None
    print()
    print(format_corruption_table(result))
    print(f"  mean corruption accuracy {100 * result['mean_corruption_accuracy']:.2f}%  (clean "
          f"{100 * result['clean']['accuracy']:.2f}%, relative degradation "
          f"{100 * result['relative_degradation']:.1f}%);  mean NLL {result['mean_corruption_nll']:.4f}, "
          f"mean ECE {100 * result['mean_corruption_ece']:.2f}%")
    if baseline is not None:
        print(f"  baseline {args.baseline}:", flush=True)
        base = corruption_evaluation(*baseline, data, **options, echo=lambda line: print(line, flush=True))
        result["mce"] = {"baseline": str(args.baseline), **corruption_errors(result, base)}
        _print_mce(result["mce"])
    if args.heatmap:
        from .report.plots import plot_corruption_heatmaps

        plot_corruption_heatmaps({f"{cfg.model.name} ({cfg.optim.method})": result}, args.heatmap)
        print(f"heat map: {args.heatmap}")
    return result


def _print_mce(mce: dict[str, Any]) -> None:
    width = max(len(name) for name in mce["ce"])
    print(f"  {'corruption':{width}s}      CE  relative CE   (%, baseline = 100)")
    for name, ce in mce["ce"].items():
        print(f"  {name:{width}s}  {100 * ce:6.1f}  {100 * mce['relative_ce'][name]:11.1f}")
    print(f"  mCE {100 * mce['mce']:.1f}%, relative mCE {100 * mce['relative_mce']:.1f}% against {mce['baseline']} "
          f"(its mean corruption accuracy {100 * mce['baseline_mean_corruption_accuracy']:.2f}%, clean "
          f"{100 * mce['baseline_clean_accuracy']:.2f}%)")


def cmd_corrupt(args: argparse.Namespace) -> int:
    """Write the test split of a dataset, corrupted at severities 1-5, in the CIFAR-10-C layout."""
    from .data import load_split, test_subset, write_corrupted
    from .eval.shift import parse_corruptions

    try:
        names = parse_corruptions(args.corruptions)
    except ValueError as error:
        raise _UsageError(f"--corruptions: {error}") from None
    if args.limit is not None and args.limit < 1:
        raise _UsageError("--limit must be at least 1")
    test = test_subset(load_split(args.dataset, "test", args.data_dir), args.limit)
    where = f"{args.dataset} test split ({len(test)} images" + (f", otmdr test subset --limit {args.limit}"
                                                                 if args.limit else "") + ")"
    print(f"corrupting the {where}: {len(names)} corruptions x severities 1-5, seed {args.seed} -> {args.out}", flush=True)
    started = time.perf_counter()

    def progress(name: str) -> None:
        print(f"  {name} ({time.perf_counter() - started:.0f}s)", flush=True)

    write_corrupted(test.images, test.labels, args.out, names, seed=args.seed, progress=progress, source=where)
    print(f"written: {args.out} (evaluate with: otmdr eval RUN_DIR --corruptions all --corrupted-dir {args.out}"
          + (f" --test-limit {args.limit}" if args.limit else "") + ")")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """Methods x seeds, optionally after a validation-only grid search per method (otmdr.train.study)."""
    import yaml

    from .config import METHODS, config_to_dict
    from .report import comparison_tables, edge_notes, search_table, write_compare_report
    from .train.checkpoint import atomic_write_text
    from .train.grid import parse_grid
    from .train.study import Study, plan, run_study

    regimes = ("", "joint", "per-member")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m.partition("/")[0] not in METHODS or m.partition("/")[2] not in regimes]
    if unknown or not methods:
        raise _UsageError(f"--methods: unknown method(s) {unknown}; choose from {', '.join(METHODS)}, "
                          "optionally with an ensemble regime: METHOD/joint or METHOD/per-member")
    if len(set(methods)) != len(methods):
        raise _UsageError(f"--methods: a method is listed twice ({args.methods})")
    if args.seeds < 1:
        raise _UsageError("--seeds must be at least 1")
    if args.jobs < 1:
        raise _UsageError("--jobs must be at least 1")
    references = [r.strip() for r in (args.reference or methods[0]).split(",") if r.strip()]
    if not references or any(r not in methods for r in references):
        raise _UsageError(f"--reference: {args.reference!r} is not one of --methods {','.join(methods)}")
    base = _config(args)
    stem = Path(args.config).stem if args.config else "default"
    from .train.distributed import current, from_rank0

    if current().enabled and args.jobs > 1:
        raise _UsageError("--jobs > 1 under torchrun: the processes train one run at a time together; drop --jobs")
    out = Path(from_rank0(lambda: args.out or f"runs/compare-{stem}-{_timestamp()}"))  # rank 0's clock
    overrides = list(args.set or []) + ([f"data.dir={args.data_dir}"] if args.data_dir else [])
    study = Study(config_path=args.config, overrides=overrides, methods=methods,
                  seeds=list(range(base.train.seed, base.train.seed + args.seeds)),
                  grid=parse_grid(args.grid or [], methods), out=out, search_overrides=list(args.search_set or []),
                  select=args.select, bn_policy=None if args.bn_policy == "per-method" else args.bn_policy)
    plan(study)  # builds every config: a bad grid or value fails here, before anything is created

    def prepare() -> bool:
        if out.exists() and not out.is_dir():
            raise _UsageError(f"--out {out} is a file, not a folder: choose another --out")
        if out.exists() and any(out.iterdir()) and not args.resume:
            raise _UsageError(f"{out} already exists and is not empty; it is never overwritten: choose another "
                              "--out, or add --resume to finish the runs it holds")
        fresh = "created" if not out.exists() else ("empty" if not any(out.iterdir()) else "")
        out.mkdir(parents=True, exist_ok=True)
        return fresh

    fresh = from_rank0(prepare)
    try:
        result = run_study(study, jobs=args.jobs, echo=not args.quiet)
    except BaseException:
        # e.g. a missing data directory, found by the first run: what this call put into a new or
        # empty folder is removed if nothing was checkpointed, so a failed start leaves no partial
        # artefact (an empty folder you made stays; rank 0 alone, without a collective: another
        # process may be the one that failed)
        if fresh and current().is_main and not any(out.rglob("*.pt")):
            for child in ([out] if fresh == "created" else list(out.iterdir())):
                shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink(missing_ok=True)
        raise
    if not current().is_main:  # rank 0 writes the report; the others only trained with it
        return 0
    summaries = result["summaries"]
    search = result["points"]
    print()
    if search:
        print(search_table(search, study.select, markdown=False))
        for note in edge_notes(search):
            print(f"note: {note}")
        print()
    print(comparison_tables(summaries, references, markdown=False))
    print(f"\nbatch-norm statistics: {args.bn_policy}" + (" for every method (--bn-policy)"
                                                          if args.bn_policy != "per-method" else ""))
    command = "otmdr " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if args.command_line is None else args.command_line
    config_text = yaml.safe_dump(config_to_dict(base), sort_keys=False)
    report = write_compare_report(out, summaries, command=command, config_text=config_text,
                                  threads=(max(1, (base.train.threads or os.cpu_count() or 1) // args.jobs)
                                           if args.jobs > 1 else base.train.threads),
                                  references=references, search=search,
                                  select=study.select, wall_seconds=result["seconds"],
                                  train_seconds=result["train_seconds"], runs=result["runs"],
                                  bn_policy="each method's own (per-method)" if args.bn_policy == "per-method"
                                  else f"{args.bn_policy} for every method (--bn-policy)")
    atomic_write_text(out / "summaries.json", json.dumps(summaries, indent=1))
    if search:
        atomic_write_text(out / "search.json", json.dumps(search, indent=1))
    print(f"\nreport: {report}")
    return 0


def cmd_sharpness(args: argparse.Namespace) -> int:
    import torch.nn.functional as F

    from .eval.sharpness import average_sharpness, hessian_trace, top_hessian_eigenvalue, worst_case_sharpness
    from .eval.subsets import PassProgress, fixed_training_subset
    from .models.bayes import is_bayesian, posterior_mean
    from .train.checkpoint import atomic_write_text

    _, model, data = _load_trained(args)
    # passes over the subset: 2 per power iteration and per probe (a Hessian-vector product reads
    # the batches twice), 27 for the rest (set-up, worst-case and average sharpness); measured
    batches = PassProgress(fixed_training_subset(data, args.samples, args.batch_size),
                            2 * (args.iterations + args.probes) + 27, "sharpness")
    with posterior_mean(model):  # a BNN: the network of its posterior means
        result = {
            "path": str(args.path), "samples": sum(len(y) for _, y in batches), "rho": args.rho,
            "bayesian_posterior_mean": is_bayesian(model),
            "top_hessian_eigenvalue": top_hessian_eigenvalue(model, batches, F.cross_entropy,
                                                             iterations=args.iterations),
            "hessian_trace": hessian_trace(model, batches, F.cross_entropy, probes=args.probes),
            "worst_case_sharpness": worst_case_sharpness(model, batches, F.cross_entropy, rho=args.rho),
            "average_sharpness": average_sharpness(model, batches, F.cross_entropy, rho=args.rho),
        }
    batches.close()
    for key, value in result.items():
        print(f"  {key:24s} {value}")
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=2))
    return 0


def cmd_landscape(args: argparse.Namespace) -> int:
    """Loss along filter-normalised directions around RUN_A (1-D curve, 2-D contour and surface),
    and along the line from RUN_A to RUN_B when given; plots and JSON in --out."""
    import torch.nn.functional as F

    from .eval.landscape import landscape_evaluation
    from .eval.subsets import PassProgress, fixed_training_subset
    from .report.plots import plot_interpolation, plot_landscape
    from .train.checkpoint import atomic_write_text

    args.path = args.run_a
    cfg, model, data = _load_trained(args)
    other = None
    if args.run_b:  # checked before the grid is computed
        from .train import load_run

        _, other, _ = load_run(args.run_b, device=args.device, which=args.checkpoint)
        mine, theirs = model.state_dict(), other.state_dict()
        if mine.keys() != theirs.keys() or any(mine[k].shape != theirs[k].shape for k in mine):
            raise _UsageError(f"{args.run_a} and {args.run_b} are different architectures; interpolation needs two "
                              "runs of the same model")
    batches = PassProgress(fixed_training_subset(data, args.samples, 512),
                            2 * (args.points * (args.points + 1) + (args.points if args.run_b else 0)),
                            "landscape")  # 2 iterations per loss: the losses, then the sample count
    n = sum(len(y) for _, y in list.__iter__(batches))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"run": str(args.run_a), "samples": n,
              **landscape_evaluation(model, batches, F.cross_entropy, points=args.points, span=args.span, other=other)}
    batches.close()
    plot_landscape(result, out / "landscape.png",
                   title=f"{cfg.model.name} ({cfg.optim.method}), filter-normalised directions, {n} training images")
    if other is not None:
        plot_interpolation(result, out / "interpolation.png", start=Path(args.run_a).name, end=Path(args.run_b).name)
    atomic_write_text(out / "landscape.json", json.dumps(result))
    print(f"written: {out / 'landscape.png'}" + (f", {out / 'interpolation.png'}" if args.run_b else ""))
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    """Print the (resolved) config with every key annotated: the defaults, or a file with --set."""
    from .config import describe_config

    print(describe_config(_config(args)))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from .models import describe_models

    for name, parameters, description in describe_models():
        print(f"{name:18s} {parameters / 1e6:8.3f}M  {description}")
    return 0


def cmd_datasets(args: argparse.Namespace) -> int:
    from .data import list_datasets

    for spec in list_datasets():
        where = "embedded (no --data-dir needed)" if not spec.needs_root else spec.layout
        print(f"{spec.name:16s} {spec.num_classes:4d} classes  {spec.in_channels}x{spec.image_size}x{spec.image_size}")
        print(f"{'':16s} layout: {where}")
        if spec.needs_root:
            print(f"{'':16s} get it: {spec.how_to_get}")
    return 0


class _UsageError(Exception):
    pass


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="otmdr", description="OT-MDR, SAM and SGD: train, evaluate, compare")
    parser.add_argument("--version", action="version", version=f"otmdr {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    def sub(name: str, **kwargs: Any) -> argparse.ArgumentParser:  # every default shown in --help
        return commands.add_parser(name, formatter_class=argparse.ArgumentDefaultsHelpFormatter, **kwargs)

    def config_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", help="YAML experiment config (see configs/)")
        p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key, e.g. optim.lr=0.05")
        p.add_argument("--data-dir", help="directory (or archive) holding the dataset (= --set data.dir=...)")

    def distributed_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--dist-timeout", type=float, default=600.0, metavar="SECONDS",
                       help="under torchrun (docs/distributed.md): how long a process waits for the others in a "
                            "collective before it stops with an error (a peer that died or hangs)")

    def trained_run_options(p: argparse.ArgumentParser) -> None:  # commands that read a trained run
        p.add_argument("--data-dir", help="where the dataset is now, if it moved")
        p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda or cuda:N")
        p.add_argument("--checkpoint", choices=("last", "best"), default="last",
                       help="for a run directory: the final model (as in summary.json) or the best on validation")

    p = sub("train", help="train one model")
    config_options(p)
    p.add_argument("--method", choices=("sgd", "sam", "asam", "otmdr"), help="= --set optim.method=...")
    p.add_argument("--epochs", type=int, help="= --set train.epochs=...")
    p.add_argument("--seed", type=int, help="= --set train.seed=...")
    p.add_argument("--out", help="run directory (default runs/<config>-<method>-s<seed>-<time>)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped run exactly")
    distributed_options(p)
    p.set_defaults(func=cmd_train)

    p = sub("eval", help="evaluate a run directory or checkpoint on the test split")
    p.add_argument("path", help="run directory or checkpoint file")
    trained_run_options(p)
    p.add_argument("--ece-bins", type=int, default=None, help="ECE bins (default: the run's eval.ece_bins)")
    p.add_argument("--json", help="also write the metrics to this JSON file")
    p.add_argument("--no-temperature-scaling", action="store_true", help="skip fitting T on the validation split")
    p.add_argument("--attack", choices=("fgsm", "pgd", "autoattack"),
                   help="also report robust accuracy under this attack (autoattack needs: pip install 'otmdr[autoattack]')")
    p.add_argument("--autoattack-version", choices=("standard", "rand"),
                   help="AutoAttack suite (default: rand for Bayesian networks, standard otherwise)")
    p.add_argument("--eps", default="1/255,2/255,4/255,8/255", help="comma-separated radii on [0,1] pixels")
    p.add_argument("--norm", choices=("linf", "l2"), default="linf", help="PGD and AutoAttack threat model")
    p.add_argument("--steps", type=int, default=10, help="PGD steps")
    p.add_argument("--eot", type=int, default=1, help="gradient samples per step (expectation over transformation)")
    p.add_argument("--plot", help="write the robust-accuracy curve to this PNG")
    p.add_argument("--test-limit", type=int, help="evaluate on a fixed random subset of N test images (the same for every run; faster attacks)")
    p.add_argument("--corruptions", metavar="all|benchmark|NAMES",
                   help="also evaluate under common corruptions: 'all' (the 19 of CIFAR-10-C), 'benchmark' (its 15 "
                        "of the mCE) or comma-separated names; see docs/corruptions.md")
    p.add_argument("--baseline", metavar="RUN_DIR", help="also report each corruption's error relative to this run's "
                                                         "(CE), their mean (mCE) and the relative mCE")
    p.add_argument("--severities", default="1-5", help="corruption severities, e.g. 1-5, 3 or 1,3,5")
    p.add_argument("--corrupted-dir", help="read the corrupted test set from this official-layout folder "
                                           "(CIFAR-10-C style, or written by `otmdr corrupt`) instead of generating it")
    p.add_argument("--corruption-seed", type=int, default=0, help="seed of the on-the-fly corruptions")
    p.add_argument("--heatmap", help="write the corruption x severity accuracy heat map to this PNG")
    p.set_defaults(func=cmd_eval)

    p = sub("compare", help="train several methods x seeds (after an optional grid search on "
                                            "validation) and report mean ± std and paired differences")
    config_options(p)
    p.add_argument("--methods", default="sgd,sam,otmdr",
                   help="comma-separated: sgd, sam, asam, otmdr; for ensembles optionally METHOD/joint or "
                        "METHOD/per-member (sgd/per-member = a deep ensemble)")
    p.add_argument("--seeds", type=int, default=3, help="number of seeds (from train.seed upwards)")
    p.add_argument("--out", help="output directory (default runs/compare-<config>-<time>)")
    p.add_argument("--resume", action="store_true", help="reuse finished runs in --out and resume stopped ones")
    p.add_argument("--grid", action="append", metavar="[METHOD:]KEY=V1,V2,...",
                   help="search these values on the validation split before the final runs, e.g. sam.rho=0.02,0.05,0.1 "
                        "or otmdr.rho=[0.01,0.02],[0.05,0.1] (sam/asam/otmdr keys apply to that method, others "
                        "to every method or to METHOD: only); repeat for more keys (Cartesian product)")
    p.add_argument("--select", default="val_accuracy", choices=("val_accuracy", "val_nll", "val_brier", "val_ece"),
                   help="validation metric (last epoch) that chooses each method's grid point")
    p.add_argument("--search-set", action="append", metavar="KEY=VALUE",
                   help="override for the search runs only, e.g. train.epochs=10 (a shorter search budget)")
    p.add_argument("--reference", help="method(s) the paired differences are taken against, comma-separated "
                                       "(default: the first listed)")
    p.add_argument("--bn-policy", default="clean", choices=("clean", "ascent", "all", "none", "per-method"),
                   help="batch-norm statistics policy for every method, so that runs differ in the method only "
                        "(default: %(default)s, SAM's and OT-MDR's default; per-method: each method's config, e.g. "
                        "the ascent passes of otmdr.preset=release)")
    p.add_argument("--jobs", type=int, default=1, help="independent runs trained in parallel processes, the CPU "
                                                       "threads split between them")
    p.add_argument("--quiet", action="store_true", help="no per-epoch lines (they are in each run's train.log)")
    p.add_argument("--command-line", help=argparse.SUPPRESS)
    distributed_options(p)
    p.set_defaults(func=cmd_compare)

    p = sub("sharpness", help="Hessian and rho-ball sharpness of a trained model (eval-mode BN)")
    p.add_argument("path", help="run directory or checkpoint file")
    trained_run_options(p)
    p.add_argument("--samples", type=int, default=1024, help="a fixed random subset of N training images")
    p.add_argument("--batch-size", type=int, default=256, help="images per Hessian-vector product")
    p.add_argument("--rho", type=float, default=0.05, help="radius for worst-case and average sharpness")
    p.add_argument("--iterations", type=int, default=50, help="power iterations for the top eigenvalue")
    p.add_argument("--probes", type=int, default=20, help="Hutchinson probes for the trace")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.set_defaults(func=cmd_sharpness)

    p = sub("landscape", help="loss-landscape slices around a run (and the line to another)")
    p.add_argument("run_a", help="run directory or checkpoint")
    p.add_argument("run_b", nargs="?", help="second run of the same architecture, for interpolation")
    p.add_argument("--out", required=True, help="folder for landscape.png, interpolation.png, landscape.json")
    trained_run_options(p)
    p.add_argument("--samples", type=int, default=1024, help="a fixed random subset of N training images")
    p.add_argument("--span", type=float, default=1.0, help="alpha and beta range [-span, span]")
    p.add_argument("--points", type=int, default=21, help="grid points per axis")
    p.set_defaults(func=cmd_landscape)

    p = sub("corrupt", help="write a corrupted copy of a test split in the CIFAR-10-C .npy layout")
    p.add_argument("--dataset", required=True, help="dataset name (see `otmdr datasets`)")
    p.add_argument("--data-dir", help="where the dataset is (not needed for digits)")
    p.add_argument("--out", required=True, help="new folder for <corruption>.npy files, labels.npy and meta.json")
    p.add_argument("--corruptions", default="all", metavar="all|benchmark|NAMES",
                   help="'all' (the 19 of CIFAR-10-C), 'benchmark' (its 15 of the mCE) or comma-separated names")
    p.add_argument("--seed", type=int, default=0, help="seed of the random corruptions")
    p.add_argument("--limit", type=int, help="only the fixed random subset of N test images that "
                                             "`otmdr eval --test-limit N` uses")
    p.set_defaults(func=cmd_corrupt)

    p = sub("config", help="print every config key with its value and meaning (the defaults, or a resolved config)")
    config_options(p)
    p.set_defaults(func=cmd_config)

    sub("models", help="list the registered models").set_defaults(func=cmd_models)
    sub("datasets", help="list the datasets and their expected layout").set_defaults(func=cmd_datasets)
    return parser


def _check_outputs(args: argparse.Namespace) -> None:
    """Output files named by options must be writable files, checked before any work."""
    for option in ("json", "plot", "heatmap"):
        value = getattr(args, option, None)
        if value and Path(value).is_dir():
            raise _UsageError(f"--{option} {value} is a folder: name a file, e.g. {Path(value) / ('out.' + ('json' if option == 'json' else 'png'))}")


_DISTRIBUTED_COMMANDS = ("train", "compare")


def _start_distributed(args: argparse.Namespace):
    """Join torchrun's process group (train and compare only); other ranks' stdout is muted,
    since rank 0 reports for the whole job."""
    from .train import distributed

    try:
        context = distributed.launched()
    except distributed.DistributedError as error:
        raise _UsageError(str(error)) from None
    if not context.enabled:
        return context
    if args.command not in _DISTRIBUTED_COMMANDS:
        raise _UsageError(f"otmdr {args.command} runs in one process: launch it without torchrun (only train and "
                          "compare train with several processes)")
    if args.dist_timeout <= 0:
        raise _UsageError("--dist-timeout must be > 0 seconds")
    try:
        context = distributed.init(args.dist_timeout)
    except distributed.DistributedError as error:
        raise _UsageError(str(error)) from None
    if not context.is_main:
        sys.stdout = open(os.devnull, "w")
    return context


def _lost_peer(error: BaseException) -> bool:
    """A collective that failed because another process died, hung or closed its connection."""
    import torch.distributed as dist

    if isinstance(error, getattr(dist, "DistError", ())):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and any(
        marker in text for marker in ("gloo", "nccl", "connection closed", "connection reset", "timed out",
                                      "timeout", "processgroup", "broken pipe"))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .config import ConfigError
    from .data import DatasetError
    from .eval.autoattack import MissingDependencyError
    from ._lock import FolderBusy
    from .train import CheckpointError, Preempted, RunDirError, TrainingError
    from .train import distributed

    context = distributed.Context()
    finished = False

    def report(error: BaseException, text: str) -> None:
        """Rank 0 reports; another rank only what rank 0 may not know (its own failures)."""
        if context.is_main:
            print(text, file=sys.stderr)
        elif not (getattr(error, "otmdr_from_rank0", False)
                  or isinstance(error, (ConfigError, _UsageError, Preempted))):
            print(text.replace("otmdr:", f"otmdr [rank {context.rank}]:", 1), file=sys.stderr)

    try:
        _check_outputs(args)
        context = _start_distributed(args)
        code = args.func(args)
        finished = True
        return code
    except Preempted as error:  # SIGTERM: a resumable checkpoint was written at a step boundary
        advice = " (rerun the same otmdr compare command with --resume)" if args.command == "compare" else ""
        report(error, f"otmdr: {error}{advice}")
        return 143
    except (ConfigError, DatasetError, CheckpointError, RunDirError, TrainingError, MissingDependencyError,
            FolderBusy, _UsageError) as error:
        report(error, f"otmdr: error: {error}")
        return EXIT_ERROR
    except RuntimeError as error:
        if not (context.enabled and _lost_peer(error)):
            raise
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"otmdr [rank {context.rank}]: error: another process of this torchrun job failed or stopped "
              f"answering ({first[:200]}); this process stops too: the failing process's own message says why",
              file=sys.stderr)
        return EXIT_ERROR
    except BrokenPipeError:  # e.g. `otmdr models | head`
        return 0
    except OSError as error:  # a read-only folder, a full disk, a path that is a directory, ...
        where = f" ({error.filename})" if error.filename else ""
        print(f"otmdr: error: {error.strerror or error}{where}: check the path, its permissions and the free "
              "disk space", file=sys.stderr)
        return EXIT_ERROR
    except _Interrupted as error:
        print(f"\notmdr: {error}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("\notmdr: interrupted; finished runs are kept: rerun the same command with --resume (compare) "
              "or otmdr train --resume RUN_DIR to continue", file=sys.stderr)
        return 130
    finally:
        if context.enabled:
            _leave(finished)


def _leave(finished: bool) -> None:
    """Leave the process group. After success every rank first waits for the others, so none
    tears the connections down while a peer still completes its last collective."""
    from .train import distributed

    try:
        if finished:
            import torch.distributed as dist

            dist.barrier()
    except RuntimeError:
        pass
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    sys.exit(main())
