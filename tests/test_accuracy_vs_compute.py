"""The report's figure of test accuracy against compute (issue 25): the ratios it plots, the figure,
and when ``otmdr compare``'s report draws and links it."""

from __future__ import annotations

import pytest

from otmdr.report import write_compare_report
from otmdr.report.compare import compute_reference
from otmdr.report.plots import compute_ratios, mean_compute, plot_accuracy_vs_compute


def _run(method: str, seed: int, accuracy: float, *, evaluations: float | None = 100.0,
         seconds: list[float] | None = None, early: float | None = None, train_seconds: bool = True) -> dict:
    """A run summary with the keys the report reads (shaped like train.loop's summary.json)."""
    seconds = seconds if seconds is not None else [1.0, 1.0]
    bins = 4
    summary = {
        "method": method, "seed": seed, "dataset": "synthetic", "model": "mlp", "parameters": 1000,
        "epochs": len(seconds), "seconds_per_epoch": sorted(seconds)[len(seconds) // 2], "passes_per_step": 1.0,
        "perturbation_norm": 0.0,
        "test": {"accuracy": accuracy, "nll": 0.5, "brier": 0.3, "ece": 0.05, "ece_bins": bins},
        "reliability": {"edges": [i / bins for i in range(bins + 1)], "count": [1, 2, 3, 4],
                        "confidence": [0.1, 0.4, 0.6, 0.9], "accuracy": [0.0, 0.5, 0.67, 1.0]},
        "history": [{"epoch": e + 1, "seconds": s, "train_loss": 1.0 / (e + 1), "val_accuracy": 0.8}
                    for e, s in enumerate(seconds)],
    }
    if evaluations is not None:
        summary["compute"] = {"gradient_evaluations": evaluations}
        if train_seconds:
            summary["compute"]["train_seconds"] = sum(seconds)
    if early is not None:
        summary["early_stopped"] = {"epoch": 1, "val_accuracy": 0.8,
                                    "test": {"accuracy": early, "nll": 0.5, "brier": 0.3, "ece": 0.05}}
    return summary


def _study(sam_evaluations: float | None = 200.0, **extra) -> dict[str, list[dict]]:
    """SGD (100 and 120 evaluations, 2 s and 4 s) and SAM (``sam_evaluations`` and 1.2 times that,
    default twice SGD's; 3 s and 5 s)."""
    more = None if sam_evaluations is None else 1.2 * sam_evaluations
    return {"sgd": [_run("sgd", 0, 0.80, evaluations=100.0, seconds=[1.0, 1.0], early=0.81, **extra),
                    _run("sgd", 1, 0.82, evaluations=120.0, seconds=[2.0, 2.0], early=0.83, **extra)],
            "sam": [_run("sam", 0, 0.84, evaluations=sam_evaluations, seconds=[1.5, 1.5], early=0.85, **extra),
                    _run("sam", 1, 0.86, evaluations=more, seconds=[2.5, 2.5], early=0.85, **extra)]}


def test_the_ratios_are_means_over_seeds_divided_by_the_reference_mean():
    summaries = _study()
    assert mean_compute(summaries["sgd"]) == pytest.approx((110.0, 3.0))
    ratios = compute_ratios(summaries, "sgd")
    # sam: mean(200, 240) / mean(100, 120) = 220 / 110; seconds mean(3, 5) / mean(2, 4) = 4 / 3
    assert ratios["sgd"] == pytest.approx((1.0, 1.0))
    assert ratios["sam"] == pytest.approx((2.0, 4.0 / 3.0))
    assert compute_ratios(summaries, "sam")["sgd"] == pytest.approx((0.5, 0.75))


def test_the_time_falls_back_to_the_history_and_a_missing_number_is_none():
    summaries = _study(train_seconds=False)  # no compute.train_seconds: the sum of the history's seconds
    assert compute_ratios(summaries, "sgd")["sam"] == pytest.approx((2.0, 4.0 / 3.0))
    summaries["sam"][1]["compute"] = {}
    del summaries["sam"][1]["history"]
    assert compute_ratios(summaries, "sgd")["sam"] == (None, None)  # one seed without it: no mean


def test_the_figure_is_written_with_the_points_at_the_ratios(tmp_path, monkeypatch):
    import otmdr.report.plots as plots

    figures = []
    close = plots.plt.close
    monkeypatch.setattr(plots.plt, "close", lambda fig: (figures.append(fig), close(fig)))
    path = plot_accuracy_vs_compute(_study(), tmp_path / "a.png", reference="sgd", guides=(1.3,))
    assert path == tmp_path / "a.png" and path.stat().st_size > 10000
    (fig,) = figures
    for ax, sam_x in zip(fig.axes, (2.0, 4.0 / 3.0)):  # gradient evaluations, then wall-clock
        points = sorted((round(float(line.get_xdata()[0]), 9), round(float(line.get_ydata()[0]), 9),
                         line.get_markerfacecolor() == "white")
                        for line in ax.get_lines() if line.get_marker() == "o")
        # (x, mean test accuracy %, hollow): final and early-stopped model of each method
        assert points == [(1.0, 81.0, False), (1.0, 82.0, True), (round(sam_x, 9), 85.0, False),
                          (round(sam_x, 9), 85.0, True)]
        assert [line.get_xdata()[0] for line in ax.get_lines() if line.get_linestyle() == ":"] == [1.3]
    one_seed = {m: runs[:1] for m, runs in _study().items()}
    for runs in one_seed.values():  # no early-stopped model, no intervals: still drawn
        del runs[0]["early_stopped"]
    assert plot_accuracy_vs_compute(one_seed, tmp_path / "b.png", reference="sam").stat().st_size > 10000


def test_the_reference_is_the_reports_first_else_the_cheapest():
    summaries = _study()
    assert compute_reference(summaries, ["sam", "sgd"]) == "sam"
    summaries["sam"] = [{**r, "compute": {"gradient_evaluations": 0.0}} for r in summaries["sam"]]
    assert compute_reference({**summaries, "otmdr": _study()["sam"]}, ["sam"]) == "sgd"  # sam spent nothing
    assert compute_reference(_study(sam_evaluations=100.45), ["sgd"]) is None  # 1.0045x: equal compute
    assert compute_reference(_study(sam_evaluations=101.5), ["sgd"]) == "sgd"  # 1.015x: drawn
    assert compute_reference(_study(sam_evaluations=None), ["sgd"]) is None  # sam's runs did not count


def _report(tmp_path, summaries):
    report = write_compare_report(tmp_path, summaries, command="otmdr compare", config_text="")
    return report.read_text(), tmp_path / "figures" / "accuracy_vs_compute.png"


def test_the_report_draws_it_when_compute_differs_and_not_when_it_is_equal(tmp_path):
    text, figure = _report(tmp_path, _study())
    assert figure.stat().st_size > 10000
    assert "![test accuracy against compute](figures/accuracy_vs_compute.png)" in text
    assert "multiples of sgd's" in text and "early-stopped model (hollow)" in text and "not paired" in text
    assert text.index("figures/test_accuracy.png") < text.index("figures/accuracy_vs_compute.png")
    text, figure = _report(tmp_path, _study(sam_evaluations=100.0))  # the same folder: the old figure goes
    assert not figure.exists() and "accuracy_vs_compute" not in text
    text, figure = _report(tmp_path, _study(sam_evaluations=None))  # not counted: no figure
    assert not figure.exists() and "accuracy_vs_compute" not in text


def test_a_label_pushed_off_its_point_gets_a_leader_line(tmp_path, monkeypatch):
    """Crowded points (four methods at one compute, within a point of accuracy) push labels above or
    below their point, where each would read as a neighbour's: those get a line to their point; a
    label beside its point gets none."""
    import otmdr.report.plots as plots

    figures = []
    close = plots.plt.close
    monkeypatch.setattr(plots.plt, "close", lambda fig: (figures.append(fig), close(fig)))
    crowded = {name: [_run(name, s, accuracy + 0.002 * s, evaluations=100.0, early=accuracy) for s in range(2)]
               for name, accuracy in (("sgd", 0.800), ("sgd+one", 0.803), ("sgd+two", 0.806), ("sgd+three", 0.809),
                                      ("far", 0.300))}  # stretches the y axis: the four sit within a few pixels
    plot_accuracy_vs_compute(crowded, tmp_path / "c.png", reference="sgd")
    texts = [a for a in figures[0].axes[0].texts if a.get_text() in crowded and a.get_text() != "far"]
    assert len(texts) == 4
    beside = [a for a in texts if a.xyann[1] == 0]
    pushed = [a for a in texts if a.xyann[1] != 0]
    assert beside and pushed  # at most one label per side fits beside its point here
    assert all(a.arrow_patch is None for a in beside) and all(a.arrow_patch is not None for a in pushed)
