"""``otmdr compare`` for the user's own training code: any loop, the project's protocol and report.

A user who trains with plain PyTorch, Lightning or a Hugging Face trainer passes one function,
``train(config, seed) -> metrics``, and gets what ``otmdr compare`` gives the zoo: each method's
grid searched on validation at search seeds apart from the evaluation seeds, the chosen settings
trained over the evaluation seeds, paired intervals with TOST and Holm verdicts, the compute each
side spent, and ``report.md`` with its figures::

    from otmdr.study import compare

    def train(config: dict, seed: int) -> dict:
        ...  # build, train with config["method"] (and config["rho"] ...), evaluate
        return {"val_accuracy": 0.91, "test_accuracy": 0.90, "gradient_evaluations": 2 * steps}

    compare(train, methods={"sgd": {"method": "sgd"}, "sam": {"method": "sam", "rho": 0.05}},
            grid={"sam": {"rho": [0.02, 0.05, 0.1]}}, seeds=5, out="runs/my-study")

``config`` is the method's dict updated with its grid point; ``train`` returns a mapping with the
selection metric (``select``, default ``val_accuracy``: a fraction) and ``test_accuracy``;
optionally ``test_nll``, ``test_ece``, ``test_brier``, ``gradient_evaluations`` (full-batch
forward+backward passes: the compute column), ``train_seconds`` and ``radius``. Every result is
saved as it finishes (``<out>/.../result.json``): rerunning the same call reuses them, so a killed
study resumes; a folder holding another config is refused. ``jobs > 1`` trains in spawned worker
processes: ``train`` must then be importable (defined at a module's top level).
"""

from __future__ import annotations

import itertools
import json
import math
import multiprocessing
import pickle
import statistics
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._atomic import atomic_write_text
from .report.compare import comparison_tables, compute_reference, edge_notes, search_table
from .report.plots import plot_accuracy_vs_compute, plot_search, plot_test_accuracy
from .train.grid import edge_steps
from .train.study import close_calls
from .report.stats import parse_margins

__all__ = ["compare", "StudyError", "StudyResult", "SEARCH_SEED_OFFSET"]

#: default search seeds start this far above the first evaluation seed, as in ``otmdr compare``
SEARCH_SEED_OFFSET = 1000
_TEST_KEYS = {"test_accuracy": "accuracy", "test_nll": "nll", "test_ece": "ece", "test_brier": "brier"}


class StudyError(ValueError):
    """A study that cannot run as asked: the message says what was expected."""


@dataclass
class StudyResult:
    """What a study found: per method the chosen config and its runs, and where the report is."""

    chosen: dict[str, dict[str, Any]]
    summaries: dict[str, list[dict[str, Any]]]
    search: list[dict[str, Any]] = field(default_factory=list)
    report: Path | None = None


@dataclass(frozen=True)
class _Job:
    method: str
    label: str
    config: dict[str, Any]
    seed: int
    folder: Path


def _points(method: str, base: Mapping[str, Any], axes: Mapping[str, Sequence[Any]]) -> list[tuple[str, dict]]:
    """Each grid point of a method as (label, config): its base config updated with the point."""
    if not axes:
        return [("default", dict(base))]
    keys = list(axes)
    for key in keys:
        values = list(axes[key])
        if not values:
            raise StudyError(f"grid {method}.{key}: no values")
        if len({json.dumps(v, sort_keys=True) for v in values}) != len(values):
            raise StudyError(f"grid {method}.{key}: a value is repeated")
    return [(_label(update), {**base, **update}) for update in
            (dict(zip(keys, combo)) for combo in itertools.product(*(axes[k] for k in keys)))]


def _label(update: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={json.dumps(v, separators=(',', ':'))}" for k, v in update.items())


def _slug(text: str) -> str:
    keep = "".join(c if c.isalnum() or c in ".=_+-" else "_" for c in text.replace(" ", "_"))
    return keep.strip("_") or "default"


def _seeds(value: int | Sequence[int], first: int, what: str) -> list[int]:
    seeds = list(range(first, first + value)) if isinstance(value, int) else [int(s) for s in value]
    if not seeds or len(set(seeds)) != len(seeds):
        raise StudyError(f"{what}: give at least one seed, none twice (got {value!r})")
    return seeds


def _run_one(train: Callable[[dict, int], Mapping[str, Any]], job: _Job, select: str) -> dict[str, Any]:
    """Train one run (or reuse its saved result) and validate what ``train`` returned."""
    saved = job.folder / "result.json"
    if saved.is_file():
        record = json.loads(saved.read_text())
        if record["config"] != job.config or record["seed"] != job.seed:
            raise StudyError(f"{job.folder} holds a run of another config than {job.method} [{job.label}] seed "
                             f"{job.seed} now asks for: use a new out folder")
        return record
    metrics = train(dict(job.config), job.seed)
    if not isinstance(metrics, Mapping):
        raise StudyError(f"train(config, seed) returned {type(metrics).__name__}: expected a dict of metrics, "
                         f"e.g. {{'{select}': 0.91, 'test_accuracy': 0.90}}")
    missing = [k for k in (select, "test_accuracy") if k not in metrics]
    if missing:
        raise StudyError(f"train(config, seed) for {job.method} [{job.label}] seed {job.seed} returned no "
                         f"{' or '.join(missing)} (it returned {sorted(metrics)}): return the validation metric "
                         "that selects and the test accuracy, as fractions")
    values: dict[str, Any] = {}
    for key, value in metrics.items():
        if key == "history":
            values[key] = list(value)
            continue
        try:
            values[key] = float(value)
        except (TypeError, ValueError):
            raise StudyError(f"train(config, seed) returned {key}={value!r}: metrics must be numbers") from None
    record = {"method": job.method, "setting": job.label, "seed": job.seed, "config": job.config, "metrics": values}
    job.folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(saved, json.dumps(record, indent=1))
    return record


def _execute(train: Callable, jobs: list[_Job], select: str, workers: int, log: Callable[[str], None]
             ) -> list[dict[str, Any]]:
    if workers <= 1:
        out = []
        for index, job in enumerate(jobs, 1):
            out.append(_run_one(train, job, select))
            log(f"  [{index}/{len(jobs)}] {job.method} [{job.label}] seed {job.seed}: "
                f"{select} {out[-1]['metrics'][select]:.4f}")
        return out
    try:
        pickle.dumps(train)
    except (pickle.PicklingError, AttributeError, TypeError) as error:
        raise StudyError(f"jobs={workers} needs a train function defined at a module's top level (it is sent to "
                         f"worker processes): {error}") from None
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(_run_one, train, job, select) for job in jobs]
        results = []
        for index, (job, future) in enumerate(zip(jobs, futures), 1):
            results.append(future.result())
            log(f"  [{index}/{len(jobs)}] {job.method} [{job.label}] seed {job.seed}: "
                f"{select} {results[-1]['metrics'][select]:.4f}")
        return results


def _summary(record: dict[str, Any]) -> dict[str, Any]:
    """A result in the layout of ``otmdr compare``'s run summaries (what the report reads)."""
    metrics = record["metrics"]
    summary: dict[str, Any] = {
        "method": record["method"], "seed": record["seed"],
        "test": {name: metrics.get(key) for key, name in _TEST_KEYS.items()},
        "perturbation_norm": metrics.get("radius"), "seconds_per_epoch": None, "passes_per_step": None,
        "epochs": None, "history": metrics.get("history", []),
    }
    if "gradient_evaluations" in metrics or "train_seconds" in metrics:
        summary["compute"] = {"gradient_evaluations": metrics.get("gradient_evaluations"),
                              "train_seconds": metrics.get("train_seconds")}
    return summary


def compare(train: Callable[[dict, int], Mapping[str, Any]], *,
            methods: Mapping[str, Mapping[str, Any]] | Sequence[str], out: str | Path,
            grid: Mapping[str, Mapping[str, Sequence[Any]]] | None = None,
            seeds: int | Sequence[int] = 5, search_seeds: int | Sequence[int] = 1, select: str = "val_accuracy",
            higher_is_better: bool | None = None, references: Sequence[str] | None = None,
            margin: str | float = 0.5, jobs: int = 1, extend_edges: int = 0, title: str = "your training function",
            log: Callable[[str], None] = print) -> StudyResult:
    """Search each method's grid on validation, train the chosen settings over ``seeds`` and write
    ``<out>/report.md`` (see the module docstring). ``methods`` maps a name to its base config (a
    list of names gives ``{"method": name}`` each); ``grid`` maps a method to ``{key: values}``
    (their product is searched); ``higher_is_better`` defaults to True unless ``select`` names a
    loss, NLL, Brier score or ECE; ``extend_edges``: rounds of searching one step past a choice at
    an edge of its grid, as ``otmdr compare --extend-edges``."""
    if not callable(train):
        raise StudyError("train must be a function train(config: dict, seed: int) -> dict of metrics")
    bases = {m: {"method": m} for m in methods} if not isinstance(methods, Mapping) else \
        {m: dict(c) for m, c in methods.items()}
    if not bases:
        raise StudyError("methods: give at least one method")
    grid = dict(grid or {})
    unknown = [m for m in grid if m not in bases]
    if unknown:
        raise StudyError(f"grid names method(s) {unknown} that are not in methods ({', '.join(bases)})")
    if jobs < 1:
        raise StudyError("jobs must be at least 1")
    if extend_edges < 0:
        raise StudyError("extend_edges must be 0 or more")
    references = list(references or [next(iter(bases))])
    if any(r not in bases for r in references):
        raise StudyError(f"references {references}: each must be one of methods ({', '.join(bases)})")
    try:
        margins = parse_margins(str(margin))
    except ValueError as error:
        raise StudyError(f"margin: {error}") from None
    higher = higher_is_better if higher_is_better is not None else \
        not any(word in select for word in ("loss", "nll", "brier", "ece", "error"))
    evaluation = _seeds(seeds, 0, "seeds")
    searched = _seeds(search_seeds, evaluation[0] + SEARCH_SEED_OFFSET, "search_seeds")
    out = Path(out)
    points = {m: _points(m, bases[m], grid.get(m, {})) for m in bases}

    search_jobs = [_Job(m, label, config, seed, out / "search" / _slug(f"{m}-{label}-seed{seed}"))
                   for m, pts in points.items() if len(pts) > 1 for label, config in pts for seed in searched]
    if search_jobs:
        log(f"search: {len(search_jobs)} run(s) at search seed(s) {', '.join(map(str, searched))}, "
            f"selected on {select} (validation)")
    records = _execute(train, search_jobs, select, jobs, log)
    rows, chosen = _choose(points, records, select, higher, searched)
    extended: set[tuple[str, str]] = set()
    for _ in range(extend_edges):
        more = []
        for m, (label, config) in chosen.items():
            axes = list(grid.get(m, {}))
            if len(points[m]) < 2:
                continue
            mine = {k: config[k] for k in axes}
            for key, value in edge_steps([{k: c[k] for k in axes} for _, c in points[m]], mine):
                step = {**mine, key: value}
                step_label, step_config = _label(step), {**bases[m], **step}
                log(f"  {m}: chosen {label}, at an edge of its grid: also searching {step_label}")
                points[m].append((step_label, step_config))
                extended.add((m, step_label))
                more += [_Job(m, step_label, step_config, seed, out / "search" / _slug(f"{m}-{step_label}-seed{seed}"))
                         for seed in searched]
        if not more:
            break
        records += _execute(train, more, select, jobs, log)
        rows, chosen = _choose(points, records, select, higher, searched)
    for row in rows:
        row["extended"] = (row["method"], row["setting"]) in extended
    for m, (label, _) in chosen.items():
        log(f"  chosen for {m}: {label}")

    final_jobs = [_Job(m, label, config, seed, out / _slug(f"{m}-seed{seed}"))
                  for m, (label, config) in chosen.items() for seed in evaluation]
    log(f"final runs: {len(bases)} method(s) x {len(evaluation)} seed(s)")
    finals = _execute(train, final_jobs, select, jobs, log)
    summaries: dict[str, list[dict[str, Any]]] = {}
    for record in finals:
        summaries.setdefault(record["method"], []).append(_summary(record))
    notes = ([f"searched past the grid's edges (extend_edges={extend_edges}): "
              + "; ".join(f"{r['method']} {r['setting']}" for r in rows if r["extended"])] if extended else [])
    notes += edge_notes(rows) + close_calls(rows, select, higher=higher, more_seeds="search_seeds={n}", final_scores={
        method: [r["metrics"].get(select) for r in finals if r["method"] == method] for method in summaries})
    report = _write_report(out, summaries, rows, chosen, references, margins, select, searched, evaluation, title,
                           notes)
    log(f"report: {report}")
    return StudyResult(chosen={m: config for m, (_, config) in chosen.items()}, summaries=summaries,
                       search=[{k: v for k, v in r.items() if k != "config"} for r in rows], report=report)


def _choose(points: Mapping[str, list[tuple[str, dict]]], records: list[dict[str, Any]], select: str, higher: bool,
            searched: list[int]) -> tuple[list[dict[str, Any]], dict[str, tuple[str, dict]]]:
    """One row per searched grid point (score over the search seeds, its standard error, radius),
    and each method's chosen (label, config): the best score, or its only point."""
    rows: list[dict[str, Any]] = []
    chosen: dict[str, tuple[str, dict]] = {}
    for m, pts in points.items():
        if len(pts) == 1:
            chosen[m] = pts[0]
            continue
        for label, config in pts:
            scores = [r["metrics"][select] for r in records if r["method"] == m and r["setting"] == label]
            finite = [s for s in scores if math.isfinite(s)]
            mean = statistics.fmean(finite) if len(finite) == len(scores) else None
            se = statistics.stdev(finite) / math.sqrt(len(finite)) if mean is not None and len(finite) > 1 else None
            radii = [r["metrics"]["radius"] for r in records
                     if r["method"] == m and r["setting"] == label and "radius" in r["metrics"]]
            rows.append({"method": m, "setting": label, "config": config, "score": mean, "standard_error": se,
                         "seeds": searched, "seed_scores": scores,
                         "radius": statistics.fmean(radii) if radii else None})
        valid = [r for r in rows if r["method"] == m and r["score"] is not None]
        if not valid:
            raise StudyError(f"every grid point of {m} returned a non-finite {select}: nothing to choose")
        best = (max if higher else min)(valid, key=lambda r: r["score"])
        chosen[m] = (best["setting"], best["config"])
    for row in rows:
        row["chosen"] = chosen[row["method"]][0] == row["setting"]
    return rows, chosen


def _write_report(out: Path, summaries: dict[str, list[dict[str, Any]]], rows: list[dict[str, Any]],
                  chosen: dict[str, tuple[str, dict]], references: list[str], margins: dict[str, float], select: str,
                  searched: list[int], evaluation: list[int], title: str, notes: list[str]) -> Path:
    figures = out / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    accuracy = plot_test_accuracy(summaries, figures / "test_accuracy.png")
    compute_ref = compute_reference(summaries, references)  # None when the methods spent about the same
    spending = (plot_accuracy_vs_compute(summaries, figures / "accuracy_vs_compute.png", reference=compute_ref)
                if compute_ref else None)
    if spending is None:  # a figure from an earlier call into this folder would outlive its link
        (figures / "accuracy_vs_compute.png").unlink(missing_ok=True)
    lines = [f"# Comparison of {', '.join(summaries)} with {title}", "",
             f"Evaluation seeds: {', '.join(map(str, evaluation))}; every evaluation run trained after the search, "
             "none of them a search run."]
    if rows:
        lines += ["", "## Hyper-parameter search", "",
                  f"Every grid point trained at search seed(s) {', '.join(map(str, searched))} and was scored by "
                  f"`{select}` on the validation split (the mean over the search seeds); the test split played no "
                  "part in the choice.", "", search_table(rows, select, markdown=True), "",
                  *[f"Note: {note}  " for note in notes]]
        if any(r["radius"] is not None for r in rows):
            lines += ["", f"![validation score against radius]"
                          f"({plot_search(rows, figures / 'search_radius.png', metric=select).relative_to(out)})"]
    lines += ["", "## Test comparison", "", comparison_tables(summaries, references, markdown=True, margins=margins),
              "", "Per run (test accuracy %):", ""]
    lines += [f"- {m}: " + ", ".join(f"seed {r['seed']}: {100 * r['test']['accuracy']:.2f}" for r in runs)
              for m, runs in summaries.items()]
    lines += ["", f"![test accuracy]({accuracy.relative_to(out)})"]
    if spending is not None:
        lines += ["", f"![test accuracy against compute, as ratios to {compute_ref}]({spending.relative_to(out)})"]
    lines += ["", "Each method's config:", ""]
    lines += [f"- {m}: `{json.dumps(config, sort_keys=True)}`" for m, (_, config) in chosen.items()]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    atomic_write_text(out / "summaries.json", json.dumps(summaries, indent=1))
    return path
