"""The Markdown report of ``otmdr compare``: the tables (final and early-stopped models), the
paired differences against a reference method, the grid search, the plots, and how it was produced."""

from __future__ import annotations

import math
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from .._atomic import atomic_write_text
from ..train.compute import cpu_model
from .monte_carlo import monte_carlo_note
from .plots import (mean_compute, plot_accuracy_vs_compute, plot_learning_curves, plot_reliability, plot_search,
                    plot_test_accuracy)
from .stats import CI_METHOD, describe_tests, format_paired, paired_family
from .tables import aggregate, early_stopped, format_table

__all__ = ["write_compare_report", "comparison_tables", "bottom_line", "search_table", "edge_notes",
           "bayesian_method_names", "compute_reference"]


def bayesian_method_names(test_samples: int | None) -> str | None:
    """The line that says what the method names mean for a Bayesian network (None otherwise):
    a reader of a BNN report expects SGVB, flat SGVB and OT-MDR, and would read `sgd` as plain SGD."""
    if not test_samples or test_samples <= 1:
        return None
    return (f"Bayesian network (predictive: the mean over {test_samples} weight samples): `sgd` is SGVB (the "
            "base optimizer on the variational objective), `sam` is flat SGVB (SAM on the means), `otmdr` is "
            "OT-MDR on the means; the sigmas are trained, never perturbed.")


def comparison_tables(summaries: dict[str, list[dict[str, Any]]], references: list[str], *, markdown: bool,
                      margins: dict[str, float] | None = None) -> str:
    """The final-model table, the early-stopped table, the paired differences against each of
    ``references`` for both, and the bottom line, as one block of text (terminal) or Markdown."""
    heading = (lambda t: f"**{t}**") if markdown else (lambda t: t)
    stopped = early_stopped(summaries)
    reference = references[0] if references else None
    blocks = [heading("Final model (last epoch), mean ± std over seeds"), "",
              format_table(aggregate(summaries, reference), markdown=markdown)]
    if stopped:
        epochs = "; ".join(f"{m}: " + ", ".join(str(s["early_stopped"]["epoch"]) for s in runs)
                           for m, runs in summaries.items() if m in stopped)
        blocks += ["", heading("Early-stopped model (checkpoint of the best validation accuracy)"), "",
                   format_table(aggregate(stopped, reference), markdown=markdown), "",
                   f"Best validation epoch per seed: {epochs}"]
    family, size = paired_family(summaries, references, margins)
    if family:
        blocks += ["", f"Paired tests: {CI_METHOD}. {describe_tests(margins, size)}"]
        for ref, model, rows in family:
            blocks += ["", heading(f"Paired differences against {ref}, {model} (method − {ref})"), "",
                       format_paired(rows, markdown=markdown)]
        blocks += ["", bottom_line(summaries, family, size, markdown=markdown)]
    noted = monte_carlo_note(summaries, references, margins)
    if noted:  # Bayesian networks: does a second set of weight samples change any verdict?
        blocks += ["", heading("Monte Carlo error of the predictive"), "",
                   *[f"- {line}" if markdown else f"  {line}" for line in noted]]
    return "\n".join(blocks)


def _compute_ratio(summaries: dict[str, list[dict[str, Any]]], method: str, ref: str) -> str:
    """"at 2.00x sgd's gradient evaluations" (empty when a run did not count them)."""
    def spent(name: str) -> float | None:
        values = [s.get("compute", {}).get("gradient_evaluations") for s in summaries[name]]
        return None if None in values or not values else sum(values) / len(values)

    mine, theirs = spent(method), spent(ref)
    return f" at {mine / theirs:.2f}x {ref}'s gradient evaluations" if mine and theirs else ""


def bottom_line(summaries: dict[str, list[dict[str, Any]]], family: list[tuple[str, str, list[dict[str, Any]]]],
                size: int, *, markdown: bool) -> str:
    """One paragraph a reader can act on: each pair's test-accuracy verdict after Holm's
    correction (the raw one where it differs), at what compute, final and early-stopped; each pair
    once (the reverse of a pair already stated is skipped); and, under label noise, why ECE is high."""
    said: set[tuple[str, str, str]] = set()
    parts = []
    for ref, model, rows in family:
        clauses = []
        for row in rows:
            d = row.get("accuracy (pp)")
            if d is None or (row["method"], ref, model) in said or (ref, row["method"], model) in said:
                continue
            said.add((row["method"], ref, model))
            verdict = d.holm_verdict or d.verdict
            raw = f"; raw: {d.verdict}" if d.holm_verdict and d.holm_verdict != d.verdict else ""
            interval = f" [{d.low:+.2f}, {d.high:+.2f}]" if d.low is not None and d.high is not None else ""
            clauses.append(f"{row['method']} vs {ref}: {verdict} ({d.mean:+.2f} points{interval}{raw})"
                           + _compute_ratio(summaries, row["method"], ref))
        if clauses:
            parts.append(f"{model}: " + "; ".join(clauses))
    text = (("**Bottom line**" if markdown else "Bottom line") + f" (test accuracy, verdicts after Holm's correction "
            f"over the {size} tests above): " + ". ".join(parts) + ".")
    first = next(iter(summaries.values()))[0]
    noise = first.get("label_noise")
    tests = [s["test"] for runs in summaries.values() for s in runs if "ece" in s.get("test", {})]
    # ECE above the error rate cannot come from overconfidence alone (|acc - conf| <= 1 - acc there)
    if noise and tests and all(t["ece"] > max(0.1, 1 - t["accuracy"]) for t in tests):
        eces = [t["ece"] for t in tests]
        text += (f" ECE is high for every method ({100 * min(eces):.0f}-{100 * max(eces):.0f}%) because "
                 f"{100 * noise['rate']:.0f}% of the training labels are wrong: fitted to them, a network gives the "
                 "labelled class only part of its probability, so on the clean test labels it is underconfident "
                 "(every run's ECE exceeds its error rate, which overconfidence alone cannot do). That is a "
                 "property of the noisy labels, not of a method; recalibrating on clean validation labels "
                 "(temperature scaling) addresses it.")
    return text


def search_table(points: list[dict[str, Any]], metric: str, *, markdown: bool) -> str:
    """Every grid point: method, setting, validation score (mean over the search seeds ± its
    standard error, where known), measured radius, and which was chosen."""
    scale, unit = (100.0, " (%)") if metric in ("val_accuracy", "val_ece") else (1.0, "")
    digits = 2 if scale == 100.0 else 4

    def shown(p: dict[str, Any]) -> str:
        if p["score"] is None:
            return "diverged"
        se = p.get("standard_error")
        return f"{scale * p['score']:.{digits}f}" + (f" ± {scale * se:.{digits}f}" if se is not None else "")

    titles = ["method", "setting", f"{metric}{unit}", "radius ‖θ̃−θ‖", "chosen"]
    cells = [[p["method"], p["setting"], shown(p), f"{p['radius']:.3f}" if p["radius"] is not None else "n/a",
              "yes" if p["chosen"] else ""] for p in points]
    if markdown:
        out = ["| " + " | ".join(titles) + " |", "|---|---|---:|---:|---|"]
        return "\n".join(out + ["| " + " | ".join(c) + " |" for c in cells])
    widths = [max(len(t), *(len(c[i]) for c in cells)) for i, t in enumerate(titles)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*titles), fmt.format(*("-" * w for w in widths))] + [fmt.format(*c) for c in cells])


def _radius_edge(radius: float, radii: list[float], tolerance: float = 0.05) -> str | None:
    """Which extreme of the grid's radii ``radius`` is at (within ``tolerance``), if any."""
    smallest, largest = min(radii), max(radii)
    if math.isclose(smallest, largest, rel_tol=tolerance):
        return None  # the grid does not move the radius
    if math.isclose(radius, smallest, rel_tol=tolerance):
        return "at the smallest radius"
    if math.isclose(radius, largest, rel_tol=tolerance):
        return "at the largest radius"
    return None


def edge_notes(points: list[dict[str, Any]]) -> list[str]:
    """A method whose chosen point is the first or last of its grid (3 points or more) may do
    better beyond it: say so, since the comparison then understates that method. With a measured
    radius that varies over the grid the edge is the smallest or largest radius, radii within 5%
    counting as one (a grid extended with --resume lists its new values last, wherever they fall; a
    two-key grid such as rho x noise puts several points at one radius). A grid that does not move
    the radius (SGD's learning rate and weight decay) is read key by key: a numeric value that is
    the smallest or largest of 3 or more of its key. Without radii, the grid's order as given."""
    notes = []
    for method in dict.fromkeys(p["method"] for p in points):
        mine = [p for p in points if p["method"] == method]
        chosen = [p for p in mine if p["chosen"]]
        if len(mine) < 3 or not chosen:
            continue
        if all(isinstance(p.get("radius"), (int, float)) for p in mine):
            radii = [p["radius"] for p in mine]
            side = _radius_edge(chosen[0]["radius"], radii)
            if side is None and math.isclose(min(radii), max(radii), rel_tol=0.05):
                side = _key_edge(chosen[0], mine)
        else:
            side = "the first" if chosen[0] is mine[0] else "the last" if chosen[0] is mine[-1] else None
        if side:
            notes.append(f"{method}: the chosen point ({chosen[0]['setting']}) is {side} of its grid; "
                         "the best setting may lie beyond it: extend the grid (finished points are reused with "
                         "--resume)")
    return notes


def _key_edge(chosen: dict[str, Any], points: list[dict[str, Any]]) -> str | None:
    """"at the smallest lr" (and so on) for each numeric key of the chosen setting whose value is an
    extreme of 3 or more values of that key in the grid; None if none is."""
    def numbers(setting: str) -> dict[str, float]:
        out = {}
        for token in setting.split():
            key, _, value = token.partition("=")
            try:
                out[key] = float(value)
            except ValueError:
                continue
        return out

    values: dict[str, set[float]] = {}
    for point in points:
        for key, value in numbers(point["setting"]).items():
            values.setdefault(key, set()).add(value)
    edges = [f"{'smallest' if value == min(values[key]) else 'largest'} {key}"
             for key, value in numbers(chosen["setting"]).items()
             if len(values[key]) >= 3 and value in (min(values[key]), max(values[key]))]
    return "at the " + " and the ".join(edges) if edges else None


def compute_reference(summaries: dict[str, list[dict[str, Any]]], references: list[str]) -> str | None:
    """The reference of the accuracy-against-compute figure: the report's first reference, else (it
    spent nothing) the method that spent the fewest gradient evaluations; None, and no figure, when
    a method's runs did not count them or the methods' means differ by 1% or less (the tables say it all)."""
    spent = {method: mean_compute(runs)[0] for method, runs in summaries.items()}
    known = {method: value for method, value in spent.items() if value is not None}
    if len(known) < 2 or len(known) < len(spent) or not any(known.values()):
        return None
    reference = (references[0] if references and known.get(references[0])
                 else min((m for m in known if known[m]), key=lambda m: known[m]))
    ratios = [value / known[reference] for value in known.values()]
    return reference if max(ratios) - min(ratios) > 0.01 * max(ratios) else None


def _seed_list(seeds: list[int]) -> str:
    """0-9 for a run of consecutive seeds, else the list."""
    if len(seeds) > 2 and seeds == list(range(seeds[0], seeds[-1] + 1)):
        return f"{seeds[0]}-{seeds[-1]}"
    return ", ".join(map(str, seeds))


def _cpus(summaries: dict[str, list[dict[str, Any]]]) -> str:
    """The CPU the runs trained on (results are bit-exact on one CPU model, not across models); a
    study resumed on other machines names each model with its count of runs."""
    counts: dict[str, int] = {}
    for runs in summaries.values():
        for summary in runs:
            cpu = summary.get("machine", {}).get("cpu") or cpu_model()
            counts[cpu] = counts.get(cpu, 0) + 1
    if len(counts) == 1:
        return f"CPU {next(iter(counts))}"
    return ("CPUs " + ", ".join(f"{cpu} ({n} run{'s' if n != 1 else ''})" for cpu, n in counts.items())
            + ": the runs of one model are bit-exact there, not on the other")


def write_compare_report(out_dir: Path, summaries: dict[str, list[dict[str, Any]]], *, command: str,
                         config_text: str, threads: int | None = None, references: list[str] | None = None,
                         search: list[dict[str, Any]] | None = None, select: str = "val_accuracy",
                         wall_seconds: float | None = None, bn_policy: str | None = None,
                         train_seconds: float | None = None, runs: int | None = None,
                         reused: int = 0, search_seeds: list[int] | None = None,
                         reused_search_seeds: list[int] | None = None, close_calls: list[str] | None = None,
                         margins: dict[str, float] | None = None, budget: str = "epochs",
                         settings: dict[str, list[str]] | None = None) -> Path:
    figures = out_dir / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    references = references or [next(iter(summaries))]
    curves = plot_learning_curves(summaries, figures / "learning_curves.png")
    accuracy = plot_test_accuracy(summaries, figures / "test_accuracy.png")
    calibration = plot_reliability(summaries, figures / "reliability.png")
    compute_ref = compute_reference(summaries, references)
    spending = (plot_accuracy_vs_compute(summaries, figures / "accuracy_vs_compute.png", reference=compute_ref)
                if compute_ref else None)
    if spending is None:  # an earlier report's figure in this folder would outlive the link to it
        (figures / "accuracy_vs_compute.png").unlink(missing_ok=True)
    first = next(iter(summaries.values()))[0]
    bins = first["test"]["ece_bins"]
    lines = [
        f"# Comparison on {first['dataset']} with {first['model']} ({first['parameters']:,} parameters)",
        "",
        f"Command: `{command}`  ",
        f"Date: {datetime.now(timezone.utc).isoformat(timespec='seconds')}; torch {torch.__version__}, "
        f"Python {platform.python_version()}, {platform.machine()}, {_cpus(summaries)} "
        f"({threads or torch.get_num_threads()} torch thread(s) per run); "
        f"{first['epochs']} epochs per run"
        + (f"; {runs} runs, {train_seconds / 60:.{1 if train_seconds < 600 else 0}f} min of training summed over "
           "them" if train_seconds else "")
        + (f"; this invocation took {wall_seconds / 60:.1f} min" if wall_seconds else "")
        + (f" and trained {runs - reused} of the runs ({reused} finished earlier and reused: --resume; "
           "the thread count is this invocation's)" if reused and runs else "")
        + "." + (f" Batch-norm statistics: {bn_policy}." if bn_policy else ""),
    ]
    names = bayesian_method_names(first.get("test_samples"))
    if names:
        lines += ["", names]
    noise = first.get("label_noise")
    if noise:
        lines += ["", f"Label noise: {100 * noise['rate']:.0f}% {noise['kind']} on the training split (seed "
                      f"{noise['seed']}; realised {100 * noise['train_noisy_fraction']:.2f}% of the training labels), "
                      + ("validation labels noisy too" if noise.get("val_noisy_fraction")
                         else "validation labels clean")
                      + "; test labels clean."]
    seeds = sorted({r["seed"] for runs in summaries.values() for r in runs})
    lines += ["", f"Evaluation seeds: {_seed_list(seeds)} ({len(seeds)}); each method's test numbers come from "
                  "these runs" + (", every one trained after the search, none of them a search run."
                                  if search and not reused_search_seeds else ".")]
    if budget == "compute" or any("@compute" in m for m in summaries):
        lines += ["", "Equal compute: " + ("every method's" if budget == "compute" else "the `@compute` methods'")
                  + " epochs (and schedule) were scaled so that its gradient evaluations match the most expensive "
                  "method's; the epochs and `grad. evals` columns show what each spent."]
    if search:
        searched = search_seeds or sorted({p["seed"] for p in search if "seed" in p})
        lines += ["", "## Hyper-parameter search", "",
                  f"Every grid point trained at search seed(s) {_seed_list(searched)} and was scored by `{select}` "
                  "at its last epoch on the **validation split**" + (", averaged over the search seeds" if
                                                                      len(searched) > 1 else "")
                  + "; the test split played no part in the choice. The chosen point of each method then trained "
                  "over every evaluation seed.", ""]
        if reused_search_seeds:
            lines += [f"**Warning:** seed(s) {_seed_list(reused_search_seeds)} searched *and* evaluated: their final "
                      "runs are the search runs that won, so they carry the search's luck (a selection bias that "
                      "favours the searched methods). Search at seeds apart from the evaluation seeds (the default) "
                      "for a verdict a reviewer can trust.", ""]
        lines += [search_table(search, select, markdown=True), "",
                  "Chosen: " + "; ".join(f"{p['method']} {p['setting']}" for p in search if p["chosen"]) + ".", "",
                  *(["Searched past the grid's edges (`--extend-edges`): "
                     + "; ".join(f"{p['method']} {p['setting']}" for p in search if p.get("extended")) + ".", ""]
                    if any(p.get("extended") for p in search) else []),
                  *[f"Note: {note}  " for note in edge_notes(search) + (close_calls or [])], "",
                  "![validation score against radius]("
                  f"{plot_search(search, figures / 'search_radius.png', metric=select).relative_to(out_dir)})"]
    lines += [
        "",
        "## Test comparison",
        "",
        f"Test metrics (ECE with {bins} equal-width bins; TS = temperature scaling fitted on the validation "
        "split; radius = measured perturbation norm ‖θ̃−θ‖, mean over the last epoch).",
        "",
        comparison_tables(summaries, references, markdown=True, margins=margins),
        "",
        "Per run (test accuracy %, final model):",
        "",
    ]
    for method, method_runs in summaries.items():
        values = ", ".join(f"seed {r['seed']}: {100 * r['test']['accuracy']:.2f}" for r in method_runs)
        lines.append(f"- {method}: {values}")
    warned = [(m, r["seed"], w) for m, runs in summaries.items() for r in runs for w in r.get("warnings", [])]
    if warned:
        lines += ["", "**Warnings raised during training:**", ""]
        lines += [f"- {m} seed {seed}: {w}" for m, seed, w in warned]
    lines += [
        "",
        f"![learning curves]({curves.relative_to(out_dir)})",
        "",
        f"![test accuracy]({accuracy.relative_to(out_dir)})",
        "",
        *([f"Test accuracy against compute: x is each method's gradient evaluations (left) and training "
           f"wall-clock (right), means over seeds as multiples of {compute_ref}'s; y is the test accuracy of the "
           "final model (filled)" + (" and of the early-stopped model (hollow)" if early_stopped(summaries) else "")
           + ", the mean with its 95% t interval over seeds (not paired: the paired intervals are in the tables "
           "above).", "",
           f"![test accuracy against compute]({spending.relative_to(out_dir)})", ""] if spending else []),
        f"![reliability diagrams]({calibration.relative_to(out_dir)})",
        "",
        "<details><summary>configuration</summary>",
        "",
        *(["Each method ran this configuration with:", "",
           *[f"- {method}: `{' '.join(overrides)}`" for method, overrides in settings.items()], ""]
          if settings else []),
        "```yaml",
        config_text.rstrip(),
        "```",
        "",
        "</details>",
        "",
    ]
    path = out_dir / "report.md"
    atomic_write_text(path, "\n".join(lines))  # a reader never sees half a report
    return path
