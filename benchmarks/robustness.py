"""Robustness and sharpness of every run of an ``otmdr compare`` folder, aggregated per method.

For each run it calls the user-facing commands (so the evidence exercises exactly what users run):
``otmdr eval --corruptions all --attack pgd --json`` and ``otmdr sharpness --json``, and with
``--landscape`` ``otmdr landscape`` for the first seed of each method (plus the interpolation
from the first method's run to each other method's run of the same seed). Finished pieces are
reused, so an interrupted invocation continues where it stopped. The mCE of each run is against
the SGD run of the same folder and seed (``--baseline-method``), computed from the two eval.json
files: ``otmdr eval --baseline`` would evaluate the baseline's corruptions again inside every run's
evaluation (a third of its cost), and for a Bayesian network draw its predictive a second time.
The report (Markdown table of mean ± std over seeds, heat maps, robust-accuracy curves, accuracy
per severity, 1-D slices) goes to ``--out``. ``--reuse`` copies the evaluations of another output
folder for runs that are byte-for-byte the same (a matched-radius study holds copies of its parent
study's runs), instead of evaluating them again:

    python benchmarks/robustness.py runs/evidence-fashion-mnist --data-dir ../shared/datasets/fashion-mnist \\
        --out benchmarks/results/fashion-mnist-lenet/robustness --test-limit 2000 --jobs 2 --landscape
"""

from __future__ import annotations

import argparse
import concurrent.futures
import filecmp
import json
import math
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from otmdr.cli.parser import OneLineParser
from otmdr.eval.run_robustness import corruption_errors
from otmdr.report.compare import bayesian_method_names
from otmdr.report.stats import ALPHA, CI_METHOD, DEFAULT_MARGINS, adjust_family, format_cell, paired_difference
from otmdr.report.plots import plot_corruption_heatmaps, plot_robust_accuracy
from otmdr.train.compute import cpu_model


def _what(command: list[str]) -> str:
    """``eval RUN``, ``sharpness RUN``, ``landscape RUN [OTHER]``: the otmdr command of ``command``
    (python -m otmdr.cli ...) and the run(s) it reads, for the progress lines."""
    words = []
    for word in command[3:]:
        if word.startswith("--"):
            break
        words.append(word)
    return shlex.join(words)


def _run(command: list[str], log: Path) -> None:
    """Run one otmdr command with one torch thread, its output in ``log``; raise on failure."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    started = time.perf_counter()
    print(f"  started: {_what(command)} (log {log})", flush=True)
    with open(log, "w") as handle:
        handle.write("$ otmdr " + shlex.join(command[3:]) + "\n")  # command = python -m otmdr.cli ...
        handle.flush()
        code = subprocess.call(command, stdout=handle, stderr=subprocess.STDOUT, env=env)
    if code:
        raise RuntimeError(f"`{shlex.join(command)}` failed (exit {code}); see {log}")
    print(f"  done in {time.perf_counter() - started:5.0f}s: {_what(command)}", flush=True)


def _tasks(args: argparse.Namespace, groups: dict[str, list[Path]], out: Path) -> list[tuple[list[str], Path, Path]]:
    """(command, log file, result file) for every missing piece."""
    otmdr = [sys.executable, "-m", "otmdr.cli"]
    data = ["--data-dir", args.data_dir] if args.data_dir else []
    tasks = []
    for method, run in ((m, r) for m, rs in groups.items() for r in rs):
        where = out / "runs" / _key(method, run)
        where.mkdir(parents=True, exist_ok=True)
        evaluation = [*otmdr, "eval", str(run), *data, "--no-temperature-scaling", "--test-limit", str(args.test_limit),
                      "--corruptions", args.corruptions, "--severities", args.severities,
                      "--attack", "pgd", "--eps", args.eps, "--steps", str(args.pgd_steps), "--eot", str(args.eot),
                      "--json", str(where / "eval.json"), "--force"]  # run only while its JSON is missing
        if args.corrupted_dir:
            evaluation += ["--corrupted-dir", args.corrupted_dir]
        if args.predictive_samples:
            evaluation += ["--predictive-samples", str(args.predictive_samples)]
        tasks.append((evaluation, where / "eval.log", where / "eval.json"))
        sharpness = [*otmdr, "sharpness", str(run), *data, "--samples", str(args.sharpness_samples),
                     "--iterations", str(args.sharpness_iterations), "--probes", str(args.sharpness_probes),
                     "--json", str(where / "sharpness.json"), "--force"]
        tasks.append((sharpness, where / "sharpness.log", where / "sharpness.json"))
    if args.landscape:
        first = {method: group[0] for method, group in groups.items()}
        reference = next(iter(first.values()))
        for method, run in first.items():
            target = out / "landscape" / method.replace(" ", "-")
            command = [*otmdr, "landscape", str(run), *([str(reference)] if run != reference else []), *data,
                       "--out", str(target), "--samples", str(args.landscape_samples), "--points",
                       str(args.landscape_points), "--force"]  # a killed run may have left its figure
            target.mkdir(parents=True, exist_ok=True)
            tasks.append((command, target / "landscape.log", target / "landscape.json"))
    return [t for t in tasks if not t[2].is_file()]


def _same_run(a: Path, b: Path) -> bool:
    """Whether two run folders hold the same trained model: the same config.yaml and checkpoint files."""
    files = [Path("config.yaml"), *sorted(p.relative_to(a) for p in (a / "checkpoints").glob("*.pt"))]
    return len(files) > 1 and all((b / f).is_file() and filecmp.cmp(a / f, b / f, shallow=False) for f in files)


def reuse_evaluations(groups: dict[str, list[Path]], out: Path, other: Path) -> int:
    """Copy ``other``'s evaluations (eval.json, sharpness.json and their logs, made with the same
    options) of every run that is the same as one here into ``out``, where they are still missing;
    returns how many runs were copied. Each copied JSON records where it came from."""
    copied = 0
    for method, run in ((m, r) for m, rs in groups.items() for r in rs):
        source, target = other / "runs" / _key(method, run), out / "runs" / _key(method, run)
        pieces = [name for name in ("eval", "sharpness") if (source / f"{name}.json").is_file()
                  and not (target / f"{name}.json").is_file()]
        if not pieces or not _same_run(run, Path(json.loads((source / f"{pieces[0]}.json").read_text())["path"])):
            continue
        target.mkdir(parents=True, exist_ok=True)
        for name in pieces:
            result = json.loads((source / f"{name}.json").read_text())
            result["copied_from"] = str(source / f"{name}.json")
            if (source / f"{name}.log").is_file():
                shutil.copyfile(source / f"{name}.log", target / f"{name}.log")
            (target / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
        copied += 1
    return copied


def final_runs(folder: Path) -> dict[str, dict[int, Path]]:
    """The finished evaluation runs of the compare folder ``folder`` (``METHOD-seedN``, with a
    summary.json): {folder-style method name: {seed: run dir}}."""
    found: dict[str, dict[int, Path]] = {}
    for summary in folder.glob("*/summary.json"):
        match = re.fullmatch(r"(.+)-seed(\d+)", summary.parent.name)
        if match:
            found.setdefault(match.group(1), {})[int(match.group(2))] = summary.parent
    return found


def _find_runs(specs: list[str]) -> dict[str, list[Path]]:
    """``DIR`` or ``DIR=LABEL`` compare folders -> {method label: finished run dirs}, in the
    folders' method order (``LABEL`` prefixes the method names of that folder). The runs are the
    final runs of each method's chosen setting: in a study whose search seed was also an
    evaluation seed (older studies: seed 0), that seed's final run is the chosen point's search run
    (``search/...``, named in ``search.json``), so it is taken from there; a search run at a seed
    apart from the evaluation seeds (the default now) is no evaluation run and is left out."""
    groups: dict[str, list[Path]] = {}
    for spec in specs:
        folder, _, prefix = spec.partition("=")
        found = final_runs(Path(folder))
        search = Path(folder) / "search.json"
        summaries = Path(folder) / "summaries.json"
        evaluated = ({s["seed"] for runs in json.loads(summaries.read_text()).values() for s in runs if s}
                     if summaries.is_file() else None)
        for point in json.loads(search.read_text()) if search.is_file() else []:
            if not point.get("chosen") or (evaluated is not None and point["seed"] not in evaluated):
                continue
            run = Path(point["run_dir"])
            if not (run / "summary.json").is_file():  # recorded relative to where compare ran
                run = Path(folder) / "search" / run.name
            name = point["method"].replace("/", "-")
            if (run / "summary.json").is_file() and point["seed"] not in found.get(name, {}):
                found.setdefault(name, {})[point["seed"]] = run
        if not found:
            print(f"error: {folder}: no finished runs (*/summary.json, or chosen search runs in search.json): "
                  "name an otmdr compare folder", file=sys.stderr)
            sys.exit(2)
        order = list(json.loads(summaries.read_text())) if summaries.is_file() else []
        names = sorted(found, key=lambda n: order.index(n.replace("-", "/", 1)) if n.replace("-", "/", 1) in order
                       else order.index(n) if n in order else len(order))
        for name in names:
            groups[f"{prefix} {name}" if prefix else name] = [found[name][seed] for seed in sorted(found[name])]
    return groups


def _baseline(groups: dict[str, list[Path]], method: str, run: Path, baseline_method: str) -> Path | None:
    """The mCE baseline of ``run``: the ``baseline_method`` run of the same compare folder and seed
    (its first run if no seed matches); None when disabled or the folder has no such method."""
    if not baseline_method or baseline_method == "none":
        return None
    prefix = method.split(" ")[0] + " " if " " in method else ""
    candidates = groups.get(prefix + baseline_method, [])
    seed = re.search(r"-seed\d+$", run.name)
    same = [r for r in candidates if seed and r.name.endswith(seed.group())]
    return (same or candidates or [None])[0]


def _add_mce(evals: dict[str, list[dict[str, Any]]], groups: dict[str, list[Path]], baseline_method: str) -> None:
    """Each run's mCE against its baseline run's own evaluation, into ``result["corruptions"]["mce"]``
    as ``otmdr eval --baseline`` writes it. An eval.json that has one already keeps it: evaluations
    made before this script stopped passing ``--baseline`` (identical for a deterministic model; for a
    Bayesian network from a second draw of the baseline's predictive), so committed reports rebuild
    as they were."""
    by_run = {run: result for method in groups for run, result in zip(groups[method], evals[method])}
    for method, runs in groups.items():
        for run, result in zip(runs, evals[method]):
            baseline = _baseline(groups, method, run, baseline_method)
            if baseline is None or baseline == run or "mce" in result["corruptions"]:
                continue
            errors = corruption_errors(result["corruptions"], by_run[baseline]["corruptions"])
            result["corruptions"]["mce"] = {"baseline": str(baseline), **errors}


def _mce(result: dict[str, Any], key: str, is_baseline: bool) -> float | None:
    """A run's mCE (or relative mCE) (:func:`_add_mce`); the baseline's own is 1 by definition; None
    where it is n/a (the baseline's error barely rose under the corruptions, so the ratio would be
    noise)."""
    value = 1.0 if is_baseline else result["corruptions"].get("mce", {}).get(key)
    return None if value is None or value != value else value


def _key(method: str, run: Path) -> str:
    """The per-run output folder name, unique across compare folders."""
    return f"{method.split(' ')[0]}-{run.name}" if " " in method else run.name


def _mean_std(values: list[float | None], scale: float = 1.0, digits: int = 2) -> str:
    if any(v is None for v in values):
        return "n/a"
    a = scale * np.asarray(values, dtype=float)
    return f"{a.mean():.{digits}f} ± {a.std(ddof=1) if len(a) > 1 else 0.0:.{digits}f}"


def _mean_corruption_result(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Cell-wise mean over seeds, in the layout plot_corruption_heatmaps reads."""
    first = results[0]
    table = {name: {s: {"accuracy": float(np.mean([r["corruptions"][name][s]["accuracy"] for r in results]))}
                    for s in row} for name, row in first["corruptions"].items()}
    return {"corruptions": table, "severities": first["severities"]}


def report(args: argparse.Namespace, groups: dict[str, list[Path]], out: Path) -> Path:
    def load(method: str, run: Path, what: str) -> dict[str, Any]:
        return json.loads((out / "runs" / _key(method, run) / f"{what}.json").read_text())

    evals = {m: [load(m, r, "eval") for r in rs] for m, rs in groups.items()}
    _add_mce(evals, groups, args.baseline_method)
    sharp = {m: [load(m, r, "sharpness") for r in rs] for m, rs in groups.items()}
    figures = out / "figures"
    figures.mkdir(exist_ok=True)
    first_eval, first_sharp = next(iter(evals.values()))[0], next(iter(sharp.values()))[0]
    eps_keys = list(first_eval["attack"]["robust_accuracy"])
    names = bayesian_method_names(first_eval.get("test_samples"))
    lines = [f"# Robustness and sharpness: {', '.join(Path(d.partition('=')[0]).name for d in args.compare_dirs)}", "",
             f"Command: `python benchmarks/robustness.py {' '.join(shlex.quote(a) for a in sys.argv[1:])}`  ",
             f"Date: {time.strftime('%Y-%m-%dT%H:%M:%S%z')}; CPU {cpu_model()}, "
             f"Python {platform.python_version()}; one torch thread per job.", "",
             f"Test subset: a fixed random subset of {first_eval['corruptions']['images']} test images, the same "
             f"for every run (`--test-limit`); corruptions "
             f"{first_eval['corruptions']['source']}, severities {first_eval['corruptions']['severities']}; "
             f"PGD-{first_eval['attack']['steps']} {first_eval['attack']['norm']} "
             f"({first_eval['attack']['eot_samples']} EOT sample(s)); sharpness on the first "
             f"{first_sharp['samples']} training images, rho {first_sharp['rho']}. "
             "Mean ± std over seeds.", "",
             *([names + " Every number here comes from one set of draws per evaluation: "
                + ("the section \"Monte Carlo error (split-half)\" below measures how much the accuracies move "
                   "with the draws." if _split_halves(evals) else
                   "unlike the compare report's test metrics, no second set was drawn, so a difference of a few "
                   "tenths of a point may be Monte-Carlo error (the compare report's second pass measures it on "
                   "the test split)."), ""]
               if names else []),
             "## Corruptions and attacks (accuracy %, higher is better)", "",
             "| method | seeds | clean | mean corruption acc | relative degradation | corruption NLL | "
             "corruption ECE | "
             + " | ".join(f"PGD eps {_eps_label(e)}" for e in eps_keys) + " |",
             "|---|---:|---:|---:|---:|---:|---:|" + "---:|" * len(eps_keys)]
    baselines = {m: _baseline(groups, m, groups[m][0], args.baseline_method) for m in groups}
    if any(baselines.values()):
        lines[-2] = lines[-2].replace("relative degradation |", "relative degradation | mCE | relative mCE |")
        lines[-1] = lines[-1].replace("|---:|---:|---:|---:|---:|---:|", "|---:|---:|---:|---:|---:|---:|---:|---:|", 1)
    for method, results in evals.items():
        c = [r["corruptions"] for r in results]
        mce = [] if not any(baselines.values()) else (
            [_mean_std([_mce(r, k, baselines[method] in groups[method]) for r in results], 100, 1)
             for k in ("mce", "relative_mce")]
            if baselines[method] else ["n/a", "n/a"])
        lines.append("| " + " | ".join([
            method, str(len(results)), _mean_std([x["clean"]["accuracy"] for x in c], 100),
            _mean_std([x["mean_corruption_accuracy"] for x in c], 100),
            _mean_std([x["relative_degradation"] for x in c], 100, 1), *mce,
            _mean_std([x["mean_corruption_nll"] for x in c], 1, 3),
            _mean_std([x["mean_corruption_ece"] for x in c], 100),
            *[_mean_std([r["attack"]["robust_accuracy"][e] for r in results], 100) for e in eps_keys]]) + " |")
    lines += ["", "Accuracy per corruption (mean over severities and seeds, %):", "",
              "| corruption | " + " | ".join(evals) + " |", "|---|" + "---:|" * len(evals)]
    for name in first_eval["corruptions"]["accuracy_per_corruption"]:
        lines.append(f"| {name} | " + " | ".join(
            _mean_std([r["corruptions"]["accuracy_per_corruption"][name] for r in rs], 100)
            for rs in evals.values()) + " |")
    of_mean = " of the posterior mean" if first_sharp.get("bayesian_posterior_mean") else ""
    lines += ["", f"## Sharpness{of_mean} (lower is flatter)", "",
              "| method | top Hessian eigenvalue | Hessian trace | worst-case sharpness | average sharpness |",
              "|---|---:|---:|---:|---:|"]
    for method, results in sharp.items():
        lines.append("| " + " | ".join([method, *[_mean_std([r[k] for r in results], 1, d) for k, d in (
            ("top_hessian_eigenvalue", 2), ("hessian_trace", 1), ("worst_case_sharpness", 4),
            ("average_sharpness", 5))]]) + " |")

    lines += _paired_section(evals, sharp, eps_keys, any(baselines.values()), args.margin)
    if _split_halves(evals):
        lines += _monte_carlo_section(evals, sharp, eps_keys, args.margin)

    plot_corruption_heatmaps({m: _mean_corruption_result([r["corruptions"] for r in rs]) for m, rs in evals.items()},
                             figures / "corruption_heatmaps.png")
    curves = {m: {float(e): [r["attack"]["robust_accuracy"][e] for r in rs] for e in eps_keys}
              for m, rs in evals.items()}
    for m, rs in evals.items():  # eps = 0 is the clean accuracy on the same images
        curves[m] = {0.0: [r["corruptions"]["clean"]["accuracy"] for r in rs], **curves[m]}
    plot_robust_accuracy(curves, figures / "robust_accuracy.png", title=f"PGD-{first_eval['attack']['steps']} "
                         f"{first_eval['attack']['norm']}, mean ± std over seeds")
    _plot_severity(evals, figures / "accuracy_per_severity.png")
    lines += ["", "![corruption heat maps](figures/corruption_heatmaps.png)", "",
              "![accuracy per severity](figures/accuracy_per_severity.png)", "",
              "![robust accuracy](figures/robust_accuracy.png)"]
    if args.landscape:
        lines += _landscape_section(out)
    lines += ["", "Per-run JSON (the `otmdr eval` and `otmdr sharpness` outputs) and logs are in `runs/`."]
    path = out / "robustness.md"
    path.write_text("\n".join(lines) + "\n")
    return path


Column = tuple[str, Any, bool, "float | None"]  # title, value(eval, sharpness), higher is better, margin


def _paired_rows(evals: dict[str, list[dict[str, Any]]], sharp: dict[str, list[dict[str, Any]]],
                 eps_keys: list[str], with_mce: bool, margin: float) -> tuple[list[Column], list[dict[str, Any]]]:
    """The paired table's columns (title, value, higher is better, margin) and its rows, raw. PGD
    is tested at every radius evaluated: at the largest alone every method can sit at 0% (noisy
    CIFAR-10's ResNet-20s at 8/255), a column that tells nothing apart while a smaller radius does."""
    metrics = [("clean accuracy (pp)", lambda e, s: 100 * e["corruptions"]["clean"]["accuracy"], True, margin),
               ("mean corruption accuracy (pp)", lambda e, s: 100 * e["corruptions"]["mean_corruption_accuracy"],
                True, margin)]
    if with_mce:  # the baseline's own mCE is 100% by definition
        metrics.append(("mCE (%)", lambda e, s: 100 * e["corruptions"]["mce"]["mce"] if "mce" in e["corruptions"]
                        else 100.0, False, None))
    metrics += [(f"PGD {_eps_label(eps)} (pp)", lambda e, s, eps=eps: 100 * e["attack"]["robust_accuracy"][eps], True,
                 margin) for eps in eps_keys]
    metrics.append(("top Hessian eigenvalue", lambda e, s: s["top_hessian_eigenvalue"], False, None))
    methods = list(evals)
    rows: list[dict[str, Any]] = []
    for i, a in enumerate(methods):
        for b in methods[:i]:
            row: dict[str, Any] = {"method": f"{a} − {b}"}
            paired = len(evals[a]) == len(evals[b])
            for title, value, higher_is_better, metric_margin in metrics:
                row[title] = paired_difference([value(e, s) for e, s in zip(evals[a], sharp[a])],
                                               [value(e, s) for e, s in zip(evals[b], sharp[b])],
                                               higher_is_better=higher_is_better,
                                               margin=metric_margin) if paired else None
            rows.append(row)
    return metrics, rows


def _paired_section(evals: dict[str, list[dict[str, Any]]], sharp: dict[str, list[dict[str, Any]]],
                    eps_keys: list[str], with_mce: bool, margin: float = DEFAULT_MARGINS["accuracy (pp)"]) -> list[str]:
    """Every later method against every earlier one, paired by seed (runs of a compare folder are
    listed in seed order and share seeds): mean difference, 95% t interval, the difference test and,
    for the accuracy columns, TOST at ±``margin`` points, raw and Holm-adjusted over the table (the
    compare reports' tests, docs/tuning.md). mCE and the eigenvalue have no margin: their scales
    differ between studies, so only a difference can be shown there."""
    metrics, rows = _paired_rows(evals, sharp, eps_keys, with_mce, margin)
    (rows,), family = adjust_family([rows])
    lines = ["", f"## Paired differences (row method − column method; {CI_METHOD})", "",
             f"Verdicts at alpha {ALPHA:g}: \"better\"/\"worse\" when the paired t test rejects a zero mean; "
             f"\"equivalent within ±{margin:.2f}\" (accuracy columns only, in points) when TOST rejects a "
             "difference that large; \"inconclusive\" when neither; \"no difference detectable\" where a column "
             f"has no margin. \"Holm:\" is the verdict after Holm's correction over this table's {family} tests.",
             "", "| difference | " + " | ".join(title for title, *_ in metrics) + " |", "|---|" + "---|" * len(metrics)]
    for row in rows:
        cells = [format_cell(row[title]) if row[title] is not None else "not paired: different seed counts"
                 for title, *_ in metrics]
        lines.append(f"| {row['method']} | " + " | ".join(cells) + " |")
    return lines


def _split_halves(evals: dict[str, list[dict[str, Any]]]) -> bool:
    """Whether every evaluation recorded its accuracies from each half of its draws (a Bayesian
    network evaluated with 2 or more draws by an otmdr that records them)."""
    return all("monte_carlo" in e["corruptions"] and "monte_carlo" in e["attack"]
               for results in evals.values() for e in results)


def _half(e: dict[str, Any], h: int) -> dict[str, Any]:
    """An evaluation as half ``h`` of its draws alone scored it (the accuracy columns)."""
    corruptions, attack = e["corruptions"], e["attack"]
    split = corruptions["monte_carlo"]
    halved = {key: value for key, value in corruptions.items() if key != "mce"}
    halved.update(clean={**corruptions["clean"], "accuracy": split["clean_accuracy"][h]},
                  mean_corruption_accuracy=split["mean_corruption_accuracy"][h])
    return {**e, "corruptions": halved, "attack": {
        **attack, "robust_accuracy": {k: v[h] for k, v in attack["monte_carlo"]["robust_accuracy"].items()}}}


def _monte_carlo_section(evals: dict[str, list[dict[str, Any]]], sharp: dict[str, list[dict[str, Any]]],
                         eps_keys: list[str], margin: float) -> list[str]:
    """How much a Bayesian study's accuracies move with its weight draws, at no extra evaluation:
    each evaluation also scored each half of its draws alone (two independent predictives), so the
    mean |half A − half B| is a Monte-Carlo error, and the paired table's accuracy verdicts
    computed from half A and from half B show which verdicts depend on the draws. The reported
    numbers average all the draws, so their own error is smaller than a half's: a verdict that
    agrees between the halves is a verdict the draws did not make."""
    first = next(iter(evals.values()))[0]
    counts = sorted({tuple(e["corruptions"]["monte_carlo"]["halves"]) for rs in evals.values() for e in rs})
    halves = " or ".join(f"{a} and {b}" for a, b in counts)
    runs = [e for rs in evals.values() for e in rs]
    columns = [("clean", lambda e: e["corruptions"]["clean"]["accuracy"]),
               ("mean corruption", lambda e: e["corruptions"]["mean_corruption_accuracy"]),
               *[(f"PGD {_eps_label(k)}", lambda e, k=k: e["attack"]["robust_accuracy"][k]) for k in eps_keys]]
    moved = "; ".join(f"{name} {statistics.fmean(100 * abs(value(_half(e, 0)) - value(_half(e, 1))) for e in runs):.2f}"
                      for name, value in columns)
    tables = [_paired_rows({m: [_half(e, h) for e in rs] for m, rs in evals.items()}, sharp, eps_keys, False, margin)
              for h in (0, 1)]
    (metrics, rows_a), (_, rows_b) = tables
    changed, compared = [], 0
    for a, b in zip(rows_a, rows_b):
        for title, _, _, metric_margin in metrics:
            if metric_margin is None or a[title] is None or b[title] is None:
                continue
            compared += 1
            if a[title].verdict != b[title].verdict:
                changed.append(f"- {a['method']}, {title}: {a[title].verdict} from half A, {b[title].verdict} "
                               "from half B")
    lines = ["", "## Monte Carlo error (split-half)", "",
             f"Each evaluation drew {first['corruptions']['monte_carlo']['samples']} weight samples per image and "
             f"also scored each half of them alone ({halves} draws): two independent predictives. Mean over the "
             f"{len(runs)} runs of |half A − half B|, in points: {moved}. The tables above average all the draws, "
             "so their own Monte-Carlo error is smaller than this. The paired accuracy verdicts (raw, as in the "
             f"table above) computed from half A and from half B: {len(changed)} of {compared} differ"
             + (":" if changed else " (no accuracy verdict there depends on which weights were drawn).")]
    return lines + changed
def _eps_label(text: str) -> str:
    value = float(text)
    return f"{round(value * 255)}/255" if abs(value * 255 - round(value * 255)) < 1e-6 else f"{value:g}"


def _plot_severity(evals: dict[str, list[dict[str, Any]]], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.8, 3.6))
    for method, results in evals.items():
        severities = results[0]["corruptions"]["severities"]
        values = 100 * np.array([[r["corruptions"]["clean"]["accuracy"]]
                                 + [r["corruptions"]["accuracy_per_severity"][str(s)] for s in severities]
                                 for r in results])
        ax.errorbar([0, *severities], values.mean(0), yerr=values.std(0), marker="o", capsize=3, label=method)
    ax.set(xlabel="severity (0 = clean)", ylabel="accuracy (%)", title="mean over the corruptions")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _landscape_section(out: Path) -> list[str]:
    import matplotlib.pyplot as plt

    found = {p.parent.name: json.loads(p.read_text()) for p in sorted((out / "landscape").glob("*/landscape.json"))}
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for i, (method, result) in enumerate(found.items()):  # one colour per method in both panels
        axes[0].plot(result["alphas"], result["slice_1d"], label=method, color=f"C{i}")
        if "interpolation" in result:
            axes[1].plot(result["interpolation"]["alphas"], result["interpolation"]["loss"], label=method,
                         color=f"C{i}")
    reference = next((m for m, r in found.items() if "interpolation" not in r), "the reference")
    axes[0].set(xlabel="alpha (filter-normalised direction)", ylabel="training loss", title="1-D slices (seed 0)",
                xticks=[-1.0, -0.5, 0.0, 0.5, 1.0])
    axes[1].set(xlabel=f"alpha (0: this method's run, 1: the {reference} run)", ylabel="training loss",
                title=f"interpolation to the {reference} run (seed 0)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "figures" / "landscape_slices.png", dpi=120)
    plt.close(fig)
    lines = ["", "## Loss landscapes (first seed of each method)", "",
             "![1-D slices](figures/landscape_slices.png)", ""]
    lines += [f"- {method}: ![{method}](landscape/{method}/landscape.png)" for method in found]
    return lines


def main() -> None:
    parser = OneLineParser(description=__doc__.split("\n\n")[0])  # a bad option: one line, exit 2
    parser.add_argument("compare_dirs", nargs="+", metavar="DIR[=LABEL]",
                        help="otmdr compare folders; LABEL prefixes the method names of that folder")
    parser.add_argument("--out", required=True)
    parser.add_argument("--data-dir")
    parser.add_argument("--test-limit", type=int, default=2000)
    parser.add_argument("--corruptions", default="all")
    parser.add_argument("--severities", default="1-5")
    parser.add_argument("--corrupted-dir")
    parser.add_argument("--baseline-method", default="sgd",
                        help="the method whose run of the same folder and seed is the mCE baseline ('none': no mCE)")
    parser.add_argument("--eps", default="1/255,2/255,4/255,8/255")
    parser.add_argument("--pgd-steps", type=int, default=10)
    parser.add_argument("--eot", type=int, default=1)
    parser.add_argument("--predictive-samples", type=int,
                        help="Bayesian networks: weight draws per prediction (default: each run's bayes.test_samples)")
    parser.add_argument("--sharpness-samples", type=int, default=1024)
    parser.add_argument("--sharpness-iterations", type=int, default=50)
    parser.add_argument("--sharpness-probes", type=int, default=20)
    parser.add_argument("--landscape", action="store_true")
    parser.add_argument("--landscape-samples", type=int, default=1024)
    parser.add_argument("--landscape-points", type=int, default=21)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--reuse", metavar="OUT_DIR",
                        help="another robustness folder made with the same options: its evaluations of the same "
                             "runs (byte-identical config and checkpoints) are copied, not repeated")
    parser.add_argument("--margin", type=float, default=DEFAULT_MARGINS["accuracy (pp)"],
                        help="equivalence margin of the accuracy columns, in points (default %(default)s)")
    args = parser.parse_args()
    if not (math.isfinite(args.margin) and args.margin > 0):
        print(f"error: --margin {args.margin}: an equivalence margin must be a positive number of points "
              "(e.g. --margin 0.5)", file=sys.stderr)
        sys.exit(2)
    if args.reuse and not (Path(args.reuse) / "runs").is_dir():
        print(f"error: --reuse {args.reuse}: no runs/ folder there; name the --out folder of an earlier "
              "robustness.py invocation (e.g. STUDY/robustness)", file=sys.stderr)
        sys.exit(2)
    groups = _find_runs(args.compare_dirs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.reuse:
        print(f"{reuse_evaluations(groups, out, Path(args.reuse))} runs' evaluations copied from {args.reuse}")
    tasks = _tasks(args, groups, out)
    print(f"{sum(map(len, groups.values()))} runs, {len(tasks)} evaluations to do, {args.jobs} at a time", flush=True)
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        for future in concurrent.futures.as_completed([pool.submit(_run, c, log) for c, log, _ in tasks]):
            future.result()
    print(f"report: {report(args, groups, out)}")


if __name__ == "__main__":
    main()
