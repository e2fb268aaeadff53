"""``otmdr compare``: methods x seeds after an optional validation-only grid search."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

from .. import _signals
from ._common import UsageError, run_config, timestamp


def cmd_compare(args: argparse.Namespace) -> int:
    """Methods x seeds, optionally after a validation-only grid search per method (otmdr.train.study)."""
    import yaml

    from ..config import METHODS, config_to_dict
    from ..report import comparison_tables, edge_notes, search_table, write_compare_report
    from ..train.checkpoint import atomic_write_text
    from ..train.grid import parse_grid
    from ..train.run_dir import discard_failed_study, prepare_study_dir
    from ..train import Preempted
    from ..report.stats import parse_margins
    from ..train.study import (VARIANTS, Study, close_calls, final_scores, method_variant, plan, run_study,
                              split_method)

    regimes = ("", "joint", "per-member")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if split_method(m)[0] not in METHODS or split_method(m)[1] not in regimes
               or split_method(m)[2] not in ("", "compute")
               or ("+" in m.partition("@")[0].partition("/")[0] and method_variant(m) not in VARIANTS)]
    if unknown or not methods:
        raise UsageError(f"--methods: unknown method(s) {unknown}; choose from {', '.join(METHODS)}, optionally "
                          f"with an efficient variant (METHOD+VARIANT, VARIANT one of {', '.join(VARIANTS)}; "
                          "not for sgd), an ensemble regime (METHOD/joint, METHOD/per-member) and an equal-compute "
                          "budget (METHOD@compute), in that order: otmdr+reuse/joint@compute")
    plain = [m for m in methods if split_method(m)[0] == "sgd" and method_variant(m)]
    if plain:
        raise UsageError(f"--methods: {plain[0]}: plain SGD has no sharpness-aware step to make cheaper; the "
                          f"variants (+{', +'.join(VARIANTS)}) apply to sam, asam and otmdr")
    try:
        margins = parse_margins(args.margin)
    except ValueError as error:
        raise UsageError(f"--margin: {error}") from None
    if len(set(methods)) != len(methods):
        raise UsageError(f"--methods: a method is listed twice ({args.methods})")
    if args.seeds < 1:
        raise UsageError("--seeds must be at least 1")
    if args.jobs < 1:
        raise UsageError("--jobs must be at least 1")
    references = [r.strip() for r in (args.reference or methods[0]).split(",") if r.strip()]
    if not references or any(r not in methods for r in references):
        raise UsageError(f"--reference: {args.reference!r} is not one of --methods {','.join(methods)}")
    base = run_config(args)
    from ..config import SEED

    if SEED.high is not None and base.train.seed + args.seeds - 1 > SEED.high:
        raise UsageError(f"--seeds {args.seeds} from train.seed {base.train.seed} reaches seed "
                         f"{base.train.seed + args.seeds - 1}, past the last seed {int(SEED.high)}: lower train.seed "
                         "or --seeds")
    stem = Path(args.config).stem if args.config else "default"
    from ..train.distributed import current, from_rank0

    if current().enabled and args.jobs > 1:
        raise UsageError("--jobs > 1 under torchrun: the processes train one run at a time together; drop --jobs")
    out = Path(from_rank0(lambda: args.out or f"runs/compare-{stem}-{timestamp()}"))  # rank 0's clock
    overrides = list(args.set or []) + ([f"data.dir={args.data_dir}"] if args.data_dir else [])
    study = Study(config_path=args.config, overrides=overrides, methods=methods,
                  seeds=list(range(base.train.seed, base.train.seed + args.seeds)),
                  grid=parse_grid(args.grid or [], methods), out=out, search_overrides=list(args.search_set or []),
                  select=args.select, bn_policy=None if args.bn_policy == "per-method" else args.bn_policy,
                  search_seed_count=args.search_seeds, budget=args.budget, extend_edges=args.extend_edges)
    plan(study)  # builds every config: a bad grid or value fails here, before anything is created

    command = args.command_line
    if command is None:
        command = "otmdr " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    fresh = from_rank0(lambda: prepare_study_dir(out, resume=args.resume))
    try:
        result = run_study(study, jobs=args.jobs, echo=not args.quiet)
    except Preempted as stop:  # a stop request met at a safe point: what was done is kept, resumably
        raise Preempted(f"{str(stop).split('; continue with')[0]}; finished runs and checkpoints are kept in "
                        f"{out}; continue with: {_resume_line(command, out)}") from None
    except BaseException:
        if current().is_main:  # rank 0 alone, without a collective: another process may be the one that failed
            discard_failed_study(out, fresh)
        raise
    if not current().is_main:  # rank 0 writes the report; the others only trained with it
        return 0
    _signals.pause_point("compare-report")  # test-only
    if _signals.requested() is not None:  # every run finished; the report is written on resume
        raise Preempted(f"{_signals.stopped_by()} before the report was written; every run is finished in {out}; "
                        f"continue with: {_resume_line(command, out)}")
    summaries = result["summaries"]
    search = result["points"]
    notes = close_calls(search, study.select, final_scores=final_scores(summaries, study.select)) if search else []
    print()
    if search:
        print(f"search seed(s): {', '.join(map(str, result['search_seeds']))}; evaluation seeds: "
              f"{', '.join(map(str, result['seeds']))}")
        print(search_table(search, study.select, markdown=False))
        for note in edge_notes(search) + notes:
            print(f"note: {note}")
        print()
    print(comparison_tables(summaries, references, markdown=False, margins=margins))
    print(f"\nbatch-norm statistics: {args.bn_policy}" + (" for every method (--bn-policy)"
                                                          if args.bn_policy != "per-method" else ""))
    config_text = yaml.safe_dump(config_to_dict(base), sort_keys=False)
    report = write_compare_report(out, summaries, command=command, config_text=config_text,
                                  threads=(max(1, (base.train.threads or os.cpu_count() or 1) // args.jobs)
                                           if args.jobs > 1 else base.train.threads),
                                  references=references, search=search,
                                  select=study.select, wall_seconds=result["seconds"],
                                  train_seconds=result["train_seconds"], runs=result["runs"],
                                  reused=result["reused"], search_seeds=result["search_seeds"],
                                  reused_search_seeds=result["reused_search_seeds"], close_calls=notes,
                                  margins=margins, budget=args.budget, settings=result["settings"],
                                  bn_policy="each method's own (per-method)" if args.bn_policy == "per-method"
                                  else f"{args.bn_policy} for every method (--bn-policy)")
    atomic_write_text(out / "summaries.json", json.dumps(summaries, indent=1))
    if search:
        atomic_write_text(out / "search.json", json.dumps(result["search_runs"], indent=1))
    print(f"\nreport: {report}")
    if _signals.requested() is not None:  # a signal while the report was written: never forgotten
        raise Preempted(f"{_signals.stopped_by()} while the report was written, which finished ({report}); "
                        f"continue with: {_resume_line(command, out)}")
    return 0


def _resume_line(command: str, out: Path) -> str:
    """The command that continues this study: the same one with --resume (and the --out it used)."""
    words = shlex.split(command)
    if "--out" not in words and not any(w.startswith("--out=") for w in words):
        words += ["--out", str(out)]
    if "--resume" not in words:
        words.append("--resume")
    return " ".join(shlex.quote(w) for w in words)

