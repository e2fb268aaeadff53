"""Figures: of a comparison (learning curves, test accuracy per method, reliability diagrams, the
grid search), of robustness evaluations, and of loss landscapes."""

from __future__ import annotations

import math

from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.transforms import offset_copy  # noqa: E402

from .stats import t_half_width  # noqa: E402
from .tables import early_stopped, format_epsilon  # noqa: E402

RADIUS_MATH = r"$\|\tilde\theta-\theta\|$"  # the perturbation norm, as mathtext draws it

__all__ = ["RADIUS_MATH", "plot_learning_curves", "plot_test_accuracy", "plot_reliability", "plot_corruption_heatmaps",
           "plot_robust_accuracy", "plot_search", "plot_landscape", "plot_interpolation", "mean_compute",
           "compute_ratios", "plot_accuracy_vs_compute"]


def _mean_curve(runs: list[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    curves = [[row[key] for row in run["history"] if key in row] for run in runs]
    if not curves or not curves[0]:
        return None
    length = min(len(c) for c in curves)
    values = np.array([c[:length] for c in curves], dtype=float)
    return np.arange(1, length + 1), values.mean(axis=0), values.std(axis=0)


def plot_learning_curves(summaries: dict[str, list[dict[str, Any]]], path: Path) -> Path:
    keys = [("train_loss", "train loss"), ("val_accuracy", "validation accuracy"), ("val_nll", "validation NLL"),
            ("perturbation_norm", f"measured radius {RADIUS_MATH}")]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.4))
    # one line style per method besides its colour: two methods held at the same radius (SAM with a
    # step and a cosine schedule) draw the same line, and a solid one hid the other
    styles = dict(zip(summaries, ["-", "--", ":", "-."] * len(summaries)))
    for ax, (key, title) in zip(axes, keys):
        for colour, (method, runs) in enumerate(summaries.items()):
            curve = _mean_curve(runs, key)
            if curve is None or (key == "perturbation_norm" and not curve[1].any()):
                continue  # a method without a radius (SGD) would draw on the radius panel's bottom frame
            epochs, mean, std = curve
            ax.plot(epochs, mean, label=method, color=f"C{colour}", linestyle=styles[method])
            ax.fill_between(epochs, mean - std, mean + std, alpha=0.2, color=f"C{colour}")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.ticklabel_format(axis="y", useOffset=False)  # an offset axis reads as a trend in float noise
    # from zero (a radius held at rho would otherwise fill the panel with its 1e-8 jitter), with room
    # above, or a constant radius draws on the panel's frame
    axes[-1].set_ylim(0, 1.1 * axes[-1].get_ylim()[1])
    axes[0].legend()
    seeds = {len(runs) for runs in summaries.values()}
    fig.suptitle("one seed" if seeds == {1} else "mean ± std over seeds (band)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _with_radius(method: str, runs: list[dict[str, Any]]) -> str:
    """A method's name and its mean measured radius: a matched-radius comparison reads from the
    figure alone, and a tuned one shows how far each method was allowed to move."""
    radii = [r["perturbation_norm"] for r in runs if r.get("perturbation_norm")]
    return f"{method}\nradius {np.mean(radii):.3g}" if radii else method


def plot_test_accuracy(summaries: dict[str, list[dict[str, Any]]], path: Path) -> Path:
    """Each seed as a dot and the mean with its 95% t interval: no bars, whose truncated axis
    would make a 0.3-point difference look large; the axis spans at least 10 points."""
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(summaries), 3.4))
    for i, runs in enumerate(summaries.values()):
        values = np.array([100 * r["test"]["accuracy"] for r in runs])
        ax.errorbar(i, values.mean(), yerr=t_half_width(values.tolist()), fmt="s", markersize=7, capsize=6, zorder=2)
        ax.scatter(np.full(len(values), i) + 0.12, values, color="black", s=12, zorder=3)
    ax.set_xticks(range(len(summaries)), [_with_radius(method, runs) for method, runs in summaries.items()],
                  fontsize=8)
    ax.set_xlim(-0.6, len(summaries) - 0.4)
    ax.set_ylabel("test accuracy (%)")
    low = min(100 * r["test"]["accuracy"] for runs in summaries.values() for r in runs)
    high = max(100 * r["test"]["accuracy"] for runs in summaries.values() for r in runs)
    span = max(10.0, 1.3 * (high - low))
    middle = (low + high) / 2
    bottom = max(0.0, min(middle - span / 2, 100.0 - span))
    ax.set_ylim(bottom, min(100.0, bottom + span))
    ax.set_title("mean with 95% t interval; dots: seeds", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def mean_compute(runs: list[dict[str, Any]]) -> tuple[float | None, float | None]:
    """A method's mean over seeds of its runs' gradient evaluations and of their training seconds
    (``compute.train_seconds``, else the sum of the history's ``seconds``: the same number, which
    the study API's results may give only one way); None where a run lacks it."""
    evaluations = [r.get("compute", {}).get("gradient_evaluations") for r in runs]
    seconds = []
    for r in runs:
        spent = r.get("compute", {}).get("train_seconds")
        if spent is None and r.get("history") and all("seconds" in row for row in r["history"]):
            spent = sum(row["seconds"] for row in r["history"])
        seconds.append(spent)
    return (None if not runs or None in evaluations else float(np.mean(evaluations)),
            None if not runs or None in seconds else float(np.mean(seconds)))


def compute_ratios(summaries: dict[str, list[dict[str, Any]]],
                   reference: str) -> dict[str, tuple[float | None, float | None]]:
    """Each method's (gradient evaluations, training time) as ratios of means over seeds to
    ``reference``'s: mean(method) / mean(reference), None where either side lacks the number (or the
    reference spent none)."""
    base_evaluations, base_seconds = mean_compute(summaries[reference])
    out = {}
    for method, runs in summaries.items():
        evaluations, seconds = mean_compute(runs)
        out[method] = (evaluations / base_evaluations if evaluations is not None and base_evaluations else None,
                       seconds / base_seconds if seconds is not None and base_seconds else None)
    return out


#: a point drawn ``shift`` points right of (x, y) (data coordinates), its error bar ``half`` above and below (data)
_Mark = tuple[float, float, float, float]


def _place_labels(ax: Any, labels: list[tuple[float, float, str, Any]], marks: Sequence[_Mark] = (),
                  reach: float = 0.0, fontsize: float = 7) -> None:
    """Each label (x, y, text, colour) next to its point, at the first of a few places (right of
    it, left, then above or below on either side, further out) whose estimated box lies inside
    the axes and overlaps no label placed before and no mark (a marker with its error bar); where
    none is free, the one that covers the least: methods of equal compute and accuracy otherwise
    print over each other. A label pushed above or below its point gets a thin leader line to it:
    among crowded points a label set off by itself reads as another point's. ``reach``: how far
    (points) a label's own marks extend either side of its x. Call it once the figure's layout is
    final."""
    to_pixels = ax.figure.dpi / 72.0
    frame = ax.get_window_extent()
    side = reach + 6  # points from x to the label's near edge
    candidates = [(side, 0, "left", "center"), (-side, 0, "right", "center"), (side, 6, "left", "bottom"),
                  (side, -6, "left", "top"), (-side, 6, "right", "bottom"), (-side, -6, "right", "top"),
                  (side, 14, "left", "bottom"), (side, -14, "left", "top"), (-side, 14, "right", "bottom"),
                  (-side, -14, "right", "top"), (side, 24, "left", "bottom"), (side, -24, "left", "top"),
                  (-side, 24, "right", "bottom"), (-side, -24, "right", "top")]
    taken: list[tuple[float, float, float, float]] = []
    for mx, my, shift, half in marks:  # the marker (size 7: 3.5 points each side) and its caps (4 points)
        cx, cy = ax.transData.transform((mx, my))
        cx += shift * to_pixels
        top = ax.transData.transform((mx, my + half))[1]
        reach_y = max(top - cy, 3.5 * to_pixels)
        taken.append((cx - 4.5 * to_pixels, cy - reach_y, cx + 4.5 * to_pixels, cy + reach_y))

    def cost(box: tuple[float, float, float, float]) -> tuple[bool, float]:
        """(outside the axes, the area it covers of the labels and marks placed before)"""
        covered = sum(max(0.0, min(box[2], t[2]) - max(box[0], t[0])) * max(0.0, min(box[3], t[3]) - max(box[1], t[1]))
                      for t in taken)
        return not (frame.x0 <= box[0] and box[2] <= frame.x1 and frame.y0 <= box[1] and box[3] <= frame.y1), covered

    for x, y, text, color in sorted(labels, key=lambda p: (p[0], -p[1])):
        px, py = ax.transData.transform((x, y))
        width, height = 0.6 * fontsize * len(text) * to_pixels, 1.2 * fontsize * to_pixels
        boxes = []
        for dx, dy, ha, va in candidates:
            left = px + dx * to_pixels - (width if ha == "right" else 0.0)
            bottom = py + dy * to_pixels - {"top": height, "center": height / 2, "bottom": 0.0}[va]
            boxes.append((left, bottom, left + width, bottom + height))
        chosen = min(range(len(boxes)), key=lambda i: cost(boxes[i]))  # the first of the best
        dx, dy, ha, va = candidates[chosen]
        taken.append(boxes[chosen])
        leader = dict(arrowstyle="-", color=color, linewidth=0.6, shrinkA=1, shrinkB=5) if dy else None
        ax.annotate(text, (x, y), textcoords="offset points", xytext=(dx, dy), ha=ha, va=va, fontsize=fontsize,
                    color=color, arrowprops=leader)


def plot_accuracy_vs_compute(summaries: dict[str, list[dict[str, Any]]], path: Path, *, reference: str,
                             guides: Sequence[float] = ()) -> Path:
    """Test accuracy against the compute each method spent, as ratios to ``reference`` (see
    :func:`compute_ratios`): gradient evaluations (left) and training wall-clock (right). Per method
    the final model (filled) and, where the runs have one, the early-stopped model (hollow, dashed
    interval) at the same x, drawn a few points left and right of it so that neither hides the
    other; each the mean over seeds with its 95% t interval over seeds (unpaired: the paired
    differences are the report's tables). ``guides``: x values to mark with a dotted vertical line
    (a compute target, say), none by default. A method without a number is left out of that panel."""
    ratios = compute_ratios(summaries, reference)
    stopped = early_stopped(summaries)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    if len(summaries) > len(colors):  # one colour per method: a study of the variants has a dozen
        colors = [plt.get_cmap("tab20")(i) for i in range(20)]
    fig, axes = plt.subplots(1, 2, figsize=(10.0, 4.0), sharey=True)
    titles = (f"gradient evaluations (× {reference}, mean over seeds)",
              f"training wall-clock (× {reference}, mean over seeds)")
    apart = 3.5 if stopped else 0.0  # points each side of x: final model left, early-stopped right
    placed: list[tuple[list[tuple[float, float, str, Any]], list[_Mark]]] = []
    for panel, (ax, title) in enumerate(zip(axes, titles)):
        labels: list[tuple[float, float, str, Any]] = []
        marks: list[_Mark] = []
        left = offset_copy(ax.transData, fig=fig, x=-apart, units="points")
        right = offset_copy(ax.transData, fig=fig, x=apart, units="points")
        for i, (method, runs) in enumerate(summaries.items()):
            x = ratios[method][panel]
            if x is None:
                continue
            color = colors[i % len(colors)]
            final = [100 * r["test"]["accuracy"] for r in runs]
            ax.errorbar(x, np.mean(final), yerr=t_half_width(final), fmt="o", color=color, markersize=7,
                        capsize=4, zorder=3, transform=left)
            labels.append((x, float(np.mean(final)), method, color))
            marks.append((x, float(np.mean(final)), -apart, t_half_width(final)))
            if method in stopped:
                early = [100 * r["test"]["accuracy"] for r in stopped[method]]
                bars = ax.errorbar(x, np.mean(early), yerr=t_half_width(early), fmt="o", color=color,
                                   markerfacecolor="white", markeredgecolor=color, markersize=7, capsize=4,
                                   zorder=4, transform=right)
                bars[2][0].set_linestyle("--")
                marks.append((x, float(np.mean(early)), apart, t_half_width(early)))
        for guide in guides:
            ax.axvline(guide, color="gray", linestyle=":", linewidth=1)
            ax.annotate(f"{guide:g}x", (guide, 1.0), xycoords=("data", "axes fraction"), textcoords="offset points",
                        xytext=(2, -2), ha="left", va="top", fontsize=7, color="gray")
        if not labels:
            ax.text(0.5, 0.5, "not recorded", transform=ax.transAxes, ha="center", va="center", color="gray")
        xs = [label[0] for label in labels] + list(guides)
        if xs:  # room on both sides for the labels (one method alone: around it)
            low, high = min(xs), max(xs)
            pad = 0.2 * (high - low) if high > low else 0.1 * max(abs(high), 1.0)
            ax.set_xlim(low - pad, high + pad)
        ax.set_xlabel(title)
        ax.grid(alpha=0.3)
        placed.append((labels, marks))
    ends = [float(np.mean(v)) + sign * t_half_width(v) for v in
            ([100 * r["test"]["accuracy"] for r in runs] for runs in [*summaries.values(), *stopped.values()])
            for sign in (-1, 1)]
    low, high = min(ends), max(ends)  # every interval whole
    pad = max(0.3, 0.1 * (high - low))
    axes[0].set_ylim(low - pad, high + pad)
    axes[0].set_ylabel("test accuracy (%)")
    handles = [matplotlib.lines.Line2D([], [], marker="o", color="black", linestyle="-", label="final model"),
               matplotlib.lines.Line2D([], [], marker="o", color="black", markerfacecolor="white", linestyle="--",
                                       label="early-stopped model")]
    axes[0].legend(handles=handles if stopped else handles[:1], fontsize=8, loc="best")
    seeds = {len(runs) for runs in summaries.values()}
    fig.suptitle("test accuracy against compute: " + ("one seed" if seeds == {1} else
                 "mean with 95% t interval over seeds (not paired)"), fontsize=10)
    fig.tight_layout()
    fig.canvas.draw()  # the final layout and limits, for the labels' overlap test
    for ax, (labels, marks) in zip(axes, placed):
        _place_labels(ax, labels, marks, reach=apart + 4)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _pooled_reliability(runs: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    edges = np.array(runs[0]["reliability"]["edges"])
    # an array, not sum()'s start 0: runs is not empty
    count = cast(np.ndarray, sum(np.array(r["reliability"]["count"], dtype=float) for r in runs))
    conf = sum(np.array(r["reliability"]["confidence"]) * np.array(r["reliability"]["count"]) for r in runs)
    acc = sum(np.array(r["reliability"]["accuracy"]) * np.array(r["reliability"]["count"]) for r in runs)
    safe = np.maximum(count, 1)
    return edges, count, conf / safe, acc / safe


def plot_reliability(summaries: dict[str, list[dict[str, Any]]], path: Path) -> Path:
    fig, axes = plt.subplots(1, len(summaries), figsize=(3.8 * len(summaries), 3.8), squeeze=False)
    for ax, (method, runs) in zip(axes[0], summaries.items()):
        edges, count, conf, acc = _pooled_reliability(runs)
        centres = (edges[:-1] + edges[1:]) / 2
        width = edges[1] - edges[0]
        used = count > 0
        ax.bar(centres[used], acc[used], width=width, edgecolor="black", alpha=0.6, label="accuracy")
        ax.plot([0, 1], [0, 1], "k--", linewidth=1)
        ax.scatter(conf[used], acc[used], s=10, color="red", zorder=3, label="(confidence, accuracy)")
        ece = float(np.sum(np.abs(conf - acc) * count) / count.sum())
        ax.set_title(f"{method}: pooled ECE {100 * ece:.2f}%\n({len(edges) - 1} bins; table: mean over seeds)"
                     if len(runs) > 1 else f"{method}: ECE {100 * ece:.2f}% ({len(edges) - 1} bins)", fontsize=9)
        ax.set_xlabel("confidence")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
    axes[0][0].set_ylabel("accuracy")
    axes[0][0].legend(loc="upper left", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_corruption_heatmaps(results: dict[str, dict[str, Any]], path: Path, *, key: str = "accuracy") -> Path:
    """One heat map per model (corruption x severity, in %), on one colour scale so that the
    panels compare; ``results`` maps a label to :func:`otmdr.eval.corruption_grid.corruption_robustness`'s
    output (or to a mean of several)."""
    labels = list(results)
    first = results[labels[0]]
    names = list(first["corruptions"])
    severities = [str(s) for s in first["severities"]]
    grids = {label: 100 * np.array([[r["corruptions"][n][s][key] for s in severities] for n in names])
             for label, r in results.items()}
    low = min(g.min() for g in grids.values())
    high = max(g.max() for g in grids.values())
    fig, axes = plt.subplots(1, len(labels), figsize=(2.2 + 2.3 * len(labels), 0.3 * len(names) + 1.6),
                             squeeze=False)
    for ax, label in zip(axes[0], labels):
        grid = grids[label]
        image = ax.imshow(grid, cmap="viridis" if key == "accuracy" else "magma_r", vmin=low, vmax=high,
                          aspect="auto")
        for i in range(grid.shape[0]):
            for j in range(grid.shape[1]):
                ax.text(j, i, f"{grid[i, j]:.0f}", ha="center", va="center", fontsize=8,
                        color="white" if grid[i, j] < (low + high) / 2 else "black")
        ax.set_title(f"{label}\nmean {grid.mean():.1f}%", fontsize=9)
        ax.set_xticks(range(len(severities)), severities)
        ax.set_xlabel("severity")
        ax.set_yticks(range(len(names)), names if ax is axes[0][0] else [""] * len(names), fontsize=8)
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label=f"{key} (%)")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_robust_accuracy(curves: dict[str, dict[float, float | list[float]]], path: Path, *, title: str) -> Path:
    """Robust accuracy against the attack radius, one line per model (mean and spread when a
    value is a list over seeds)."""
    fig, ax = plt.subplots(figsize=(4.8, 3.6))
    for label, curve in curves.items():
        eps = np.array(list(curve), dtype=float)
        values = [np.atleast_1d(np.asarray(v, dtype=float)) * 100 for v in curve.values()]
        mean = np.array([v.mean() for v in values])
        ax.plot(eps, mean, marker="o", label=label)
        if max(len(v) for v in values) > 1:
            std = np.array([v.std() for v in values])
            ax.fill_between(eps, mean - std, mean + std, alpha=0.2)
    ticks = sorted({float(e) for curve in curves.values() for e in curve})
    ax.set_xticks(ticks, [format_epsilon(e) for e in ticks])
    ax.set_xlabel("epsilon (pixels on [0, 1]; 0: clean)")
    ax.set_ylabel("robust accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


REFERENCE_STYLES = ("--", ":", "-.")
MARKERS = ("o", "s", "^", "D", "P", "X")  # not "v": it marks a point below the axis


def _search_series(method: str, points: list[dict[str, Any]]) -> list[tuple[str, list[dict[str, Any]], list[str]]]:
    """A method's grid points as lines: (legend name, points, label of each point). A grid over
    one key is one line, its points labelled by their value and the key said once in the legend; a
    grid over several keys (rho x noise_std) is one line per value of the later keys, along the
    first, so that no line zigzags between unrelated settings."""
    settings = [dict(token.split("=", 1) for token in p["setting"].split() if "=" in token) for p in points]
    keys = list(dict.fromkeys(k for setting in settings for k in setting))
    varying = [k for k in keys if len({setting.get(k) for setting in settings}) > 1]
    if not varying or any(not setting for setting in settings):
        return [(method, points, [p["setting"] for p in points])]
    along, split_by = varying[0], varying[1:]
    groups: dict[str, tuple[list[dict[str, Any]], list[str]]] = {}
    for p, setting in zip(points, settings):
        group = " ".join(f"{k}={setting.get(k)}" for k in split_by)
        members, labels = groups.setdefault(group, ([], []))
        members.append(p)
        labels.append(setting.get(along, "?"))
    return [(f"{method} ({along}{', ' + group if group else ''})", members, labels)
            for group, (members, labels) in groups.items()]


def plot_search(points: list[dict[str, Any]], path: Path, *, metric: str) -> Path:
    """Validation score of every grid point against its measured radius ||theta~ - theta||, one
    line per method (the chosen point ringed): the picture that explains a comparison, since at
    equal radius SAM and OT-MDR often score alike. Methods with no radius (SGD) are a level line."""
    scale = 100.0 if metric in ("val_accuracy", "val_ece") else 1.0
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    methods = list(dict.fromkeys(p["method"] for p in points))
    every = [scale * p["score"] for p in points if p["score"] is not None]
    if not every:
        every = [0.0]
    typical = float(np.median(every))
    kept = [v for v in every if v >= 0.5 * typical] or every  # a collapsed point would squash the axis
    span = max(kept) - min(kept)
    bottom, top = min(kept) - 0.15 * span - 0.5, max(kept) + 0.15 * span + 0.5
    drawn = 0  # lines drawn so far
    below_axis = False  # a point drawn as ▼ at the bottom edge
    references = 0  # reference levels drawn so far
    for method in methods:
        mine = [p for p in points if p["method"] == method and p["score"] is not None]
        if not mine:
            continue
        if max(p["radius"] for p in mine) == 0:  # no perturbation: a reference level, named in the
            # legend (a label on the plot would collide with the points near the right edge)
            # one line, its chosen setting: a level per learning rate, unlabelled, reads as noise
            style = REFERENCE_STYLES[references % len(REFERENCE_STYLES)]
            references += 1
            shown = [p for p in mine if p.get("chosen")] or mine[:1]
            setting = f", {shown[0]['setting']}" if len(mine) > 1 and shown[0].get("setting") else ""
            ax.axhline(max(scale * shown[0]["score"], bottom), linestyle=style, color="gray", linewidth=1,
                       label=f"{method} (no radius{setting})")
            continue
        for name, series, labels in _search_series(method, mine):
            labelled = sorted(zip(series, labels), key=lambda pl: pl[0]["radius"])
            radii = np.array([p["radius"] for p, _ in labelled])
            actual = np.array([scale * p["score"] for p, _ in labelled])
            scores = np.maximum(actual, bottom)
            # the line's marker only on the points within the axis: one below it is the ▼ alone
            # (its marker, cut in half at the edge under the ▼, matched nothing in the legend)
            on_axis = [i for i, a in enumerate(actual) if a >= bottom]
            line, = ax.plot(radii, scores, marker=MARKERS[drawn % len(MARKERS)], markevery=on_axis, label=name)
            # SAM and OT-MDR points often sit at the same radius and score: one line's labels above
            # its points, the next one's below (offset past the ring of a chosen point)
            below, drawn = drawn % 2 == 1, drawn + 1
            for (p, text), x, y, a in zip(labelled, radii, scores, actual):
                off_scale = a < bottom
                if off_scale:
                    ax.scatter([x], [y], marker="v", s=60, color=line.get_color(), zorder=3, clip_on=False)
                    below_axis = True
                # a long label ("[0.0625,0.125]") laid flat runs into its neighbour's at the next
                # grid point; tilted away from the line it clears it
                tilt = (-45 if below else 45) if len(text) > 6 else 0
                ax.annotate(text + (f" ({a:.1f})" if off_scale else ""), (x, y), textcoords="offset points",
                            xytext=(5, -5 if below else 5), va="top" if below else "bottom", ha="left",
                            rotation=tilt, rotation_mode="anchor", fontsize=6, color=line.get_color())
                if p.get("chosen"):
                    ax.scatter([x], [y], s=140, facecolors="none", edgecolors=line.get_color(), linewidths=1.5)
    ax.set_ylim(bottom, top)
    radii_all = [p["radius"] for p in points if p["radius"]]
    if radii_all:  # log scale over the perturbed points (SGD is the level line)
        ax.set_xscale("log")
        ax.set_xlim(min(radii_all) / 1.6, max(radii_all) * 1.6)
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))  # 0.1, not 10^-1
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # no crowded minor labels
        ax.set_xticks(_log_ticks(min(radii_all) / 1.6, max(radii_all) * 1.6))
    ax.set_xlabel(f"measured radius {RADIUS_MATH} (last epoch, mean over steps)")
    unit = " (%)" if scale == 100.0 else ""
    ax.set_ylabel(f"{metric.replace('_', ' ')}{unit}")
    ax.set_title("grid search: validation score against radius\n(ringed: chosen; ▼ below the axis, value in brackets)",
                 fontsize=9)
    ax.grid(alpha=0.3)
    if below_axis:  # the ▼ in the legend as drawn (an empty scatter: a legend entry, no point)
        ax.scatter([], [], marker="v", s=60, color="gray", label="below the axis (value in brackets)")
    entries = len(ax.get_legend_handles_labels()[0])
    if entries > 5:  # a legend that tall covers points (a BNN search's noise levels): beside the axes
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    elif entries:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight" if entries > 5 else None)
    plt.close(fig)
    return path


def _log_ticks(low: float, high: float) -> list[float]:
    """The x ticks between ``low`` and ``high``: 1-2-5 over up to three decades, powers of ten over
    more (a BNN search from 0.0003 to 15 crowded every 1-2-5 label into the next: "0.0050.010.02")."""
    steps = (1, 2, 5) if math.log10(high / low) <= 3 else (1,)
    return [float(f"{m * 10.0 ** e:.6g}") for e in range(-5, 3) for m in steps if low <= m * 10.0 ** e <= high]


def plot_landscape(result: dict[str, Any], path: Path, *, title: str) -> Path:
    """The 1-D slice, the 2-D contour and the surface of :func:`otmdr.eval.landscape.landscape_evaluation`."""
    alphas = result["alphas"]
    surface = np.asarray(result["surface_2d"])
    grid_a, grid_b = np.meshgrid(alphas, alphas, indexing="ij")
    fig = plt.figure(figsize=(12, 3.6))
    ax = fig.add_subplot(1, 3, 1)
    ax.plot(alphas, result["slice_1d"])
    ax.set(xlabel="alpha", ylabel="training loss", title="1-D slice")
    ax = fig.add_subplot(1, 3, 2)
    contour = ax.contour(grid_a, grid_b, surface, levels=15)
    ax.clabel(contour, fontsize=6)
    ax.set(xlabel="alpha", ylabel="beta", title="2-D slice")
    ax = fig.add_subplot(1, 3, 3, projection="3d")
    ax.plot_surface(grid_a, grid_b, surface, cmap="viridis")
    ax.set(xlabel="alpha", ylabel="beta", zlabel="training loss")
    ax.set_title("surface")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_interpolation(result: dict[str, Any], path: Path, *, start: str, end: str) -> Path:
    """The training loss on the line from run ``start`` (alpha 0) to run ``end`` (alpha 1)."""
    fig, ax = plt.subplots(figsize=(4.5, 3.4))
    ax.plot(result["interpolation"]["alphas"], result["interpolation"]["loss"])
    ax.set(xlabel=f"alpha (0: {start}, 1: {end})", ylabel="training loss", title="linear interpolation")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
