"""Frictions a new user hit (issue 28, item 6): each fixed, each pinned here."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from otmdr.cli import main

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "configs" / "demo.yaml")


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("frictions") / "run"
    assert main(["train", "--config", DEMO, "--out", str(out), "--set", "train.epochs=1", "--set",
                 "train.progress=false", "--set", "model.options={hidden: [16]}"]) == 0
    return out


def _tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*")) if p.name != ".lock"}


def _refused(capsys, args: list[str]) -> str:
    """``args`` exits 2 with one readable line and no traceback; that line."""
    capsys.readouterr()
    assert main(args) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("otmdr: error: "), captured.err
    assert "Traceback" not in captured.err + captured.out
    return lines[0]


# 1 ---------------------------------------------------------------- --eps above 1 on [0, 1] pixels
@pytest.mark.parametrize("attack, eps, expected", [
    ("pgd", "8", "--eps 8 is above 1 on [0, 1] pixels: did you mean 8/255 = 0.0314? write --eps 8/255"),
    ("fgsm", "8", "--eps 8 is above 1 on [0, 1] pixels: did you mean 8/255 = 0.0314? write --eps 8/255"),
    ("pgd", "1/255,4,8", "--eps 4 is above 1 on [0, 1] pixels: did you mean 4/255 = 0.0157? "
                         "write --eps 1/255,4/255,8/255"),
])
def test_eval_refuses_an_linf_eps_above_one_and_suggests_the_fraction(run, tmp_path, capsys, attack, eps, expected):
    before = _tree(run)
    line = _refused(capsys, ["eval", str(run), "--attack", attack, "--eps", eps, "--test-limit", "20",
                             "--steps", "1", "--json", str(tmp_path / "e.json")])
    assert expected in line, line
    assert _tree(run) == before and not (tmp_path / "e.json").exists()


def test_eval_accepts_an_l2_eps_above_one(run, tmp_path, capsys):
    """An L2 radius is a norm over every pixel: 2 is an ordinary MNIST radius."""
    assert main(["eval", str(run), "--attack", "pgd", "--norm", "l2", "--eps", "2", "--test-limit", "20",
                 "--steps", "1", "--no-temperature-scaling"]) == 0


# 2 ----------------------------------------------------- relative mCE near a zero baseline degradation
def _corruption_result(clean: float, cells: dict[str, list[float]]) -> dict:
    table = {n: {str(s): {"accuracy": a} for s, a in zip((1, 3), accs)} for n, accs in cells.items()}
    return {"clean": {"accuracy": clean}, "corruptions": table, "severities": [1, 3],
            "mean_corruption_accuracy": float(np.mean([a for v in cells.values() for a in v]))}


def test_relative_mce_is_na_with_a_reason_when_the_baseline_barely_degrades(capsys):
    from otmdr.cli.evaluate import _print_mce
    from otmdr.eval.run_robustness import corruption_errors

    model = _corruption_result(0.9, {"fog": [0.8, 0.6], "brightness": [0.85, 0.8], "contrast": [0.8, 0.7]})
    # the baseline's error under brightness does not rise (0 + 0.2 points: the old ratio was 1900 %),
    # under contrast it rises by 0.5 points on average: a ratio of noise
    base = _corruption_result(0.8, {"fog": [0.6, 0.4], "brightness": [0.8, 0.798], "contrast": [0.8, 0.79]})
    mce = corruption_errors(model, base)
    assert mce["relative_ce"]["fog"] == pytest.approx((0.1 + 0.3) / (0.2 + 0.4))
    assert mce["relative_ce"]["brightness"] is None and mce["relative_ce"]["contrast"] is None
    assert set(mce["relative_ce_not_available"]) == {"brightness", "contrast"}
    assert "baseline" in mce["relative_ce_not_available"]["brightness"]
    assert mce["relative_mce"] == pytest.approx(0.4 / 0.6)  # over the corruptions where it is defined
    assert mce["relative_mce_corruptions"] == ["fog"]
    json.dumps(mce, allow_nan=False)  # valid JSON: no NaN
    _print_mce({"baseline": "runs/sgd", **mce})
    out = capsys.readouterr().out
    assert "nan" not in out.lower() and "1900" not in out
    assert "n/a" in out and "relative mCE 66.7% over 1 of 3 corruptions" in out
    assert "brightness, contrast" in out and "1 point" in out

    nothing = corruption_errors(model, _corruption_result(0.8, {n: [0.8, 0.8] for n in ("fog", "brightness",
                                                                                          "contrast")}))
    assert nothing["relative_mce"] is None and nothing["relative_mce_corruptions"] == []
    json.dumps(nothing, allow_nan=False)
    _print_mce({"baseline": "runs/sgd", **nothing})
    out = capsys.readouterr().out
    assert "nan" not in out.lower() and re.search(r"relative mCE n/a \(the baseline's error rises by less than", out)


# 3 -------------------------------------------------------------------- no silent overwrites
@pytest.mark.parametrize("command", [
    ["eval", "{run}", "--test-limit", "20", "--json", "{target}"],
    ["sharpness", "{run}", "--samples", "16", "--iterations", "2", "--probes", "1", "--json", "{target}"],
    ["landscape", "{run}", "--samples", "16", "--points", "2", "--out", "{folder}"],
], ids=["eval", "sharpness", "landscape"])
def test_an_existing_result_is_never_overwritten_silently(run, tmp_path, capsys, command):
    folder = tmp_path / "results"
    folder.mkdir()
    target = folder / ("landscape.json" if command[0] == "landscape" else "out.json")
    target.write_text('{"mine": true}')
    before = _tree(tmp_path)
    line = _refused(capsys, [a.format(run=run, target=target, folder=folder) for a in command])
    assert str(target) in line and "already exists" in line and "pass --force to replace it" in line, line
    assert _tree(tmp_path) == before
    assert main([a.format(run=run, target=target, folder=folder) for a in command] + ["--force"]) == 0
    assert "mine" not in json.loads(target.read_text())  # asked for: replaced


def test_eval_json_records_the_checkpoint_and_its_sha256(run, tmp_path):
    target = tmp_path / "eval.json"
    assert main(["eval", str(run), "--test-limit", "20", "--no-temperature-scaling", "--json", str(target)]) == 0
    used = run / "checkpoints" / "last.pt"
    assert json.loads(target.read_text())["checkpoint"] == {
        "path": str(used), "sha256": hashlib.sha256(used.read_bytes()).hexdigest()}


# 4 ------------------------------------------------------------------------------- progress
class _Bar:
    closed: list[tuple[int, int]] = []

    def __init__(self, *_, total=None, **__):
        self.total, self.n = total, 0

    def update(self, n=1):
        self.n += n

    def refresh(self):
        pass

    def close(self):
        _Bar.closed.append((self.n, self.total))


def test_the_sharpness_progress_bar_reaches_100_percent(run, monkeypatch, capsys):
    """The power iteration stops early once it converges: the bar stopped at 73/129 passes."""
    import tqdm.auto

    monkeypatch.setattr(tqdm.auto, "tqdm", _Bar)
    _Bar.closed = []
    assert main(["sharpness", str(run), "--samples", "32", "--probes", "1", "--iterations", "50"]) == 0
    assert len(_Bar.closed) == 1 and _Bar.closed[0][0] == _Bar.closed[0][1], _Bar.closed


def test_benchmark_progress_lines_name_the_run(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("robustness_benchmark", ROOT / "benchmarks" / "robustness.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    command = [sys.executable, "-c", "pass", "sharpness", "runs/study/sam-seed1", "--json", "x.json"]
    module._run(command, tmp_path / "log")
    out = capsys.readouterr().out
    assert "started: sharpness runs/study/sam-seed1" in out and "done in" in out, out
    assert out.strip().splitlines()[-1].endswith(": sharpness runs/study/sam-seed1") and "-c pass" not in out, out


# 5 ----------------------------------------------------------------------- the search figure
def test_a_wide_search_figure_keeps_its_labels_and_points_apart(tmp_path, monkeypatch):
    """A BNN search spans five decades of radius (0.0003 to 15, its noise levels) and seven legend
    entries: the 1-2-5 tick labels ran into one another ("0.0050.010.02") and the legend covered the
    chosen point. Over more than three decades the ticks are powers of ten; a legend of more than
    five entries sits beside the axes. A narrow search keeps its 1-2-5 ticks and inner legend."""
    from otmdr.report import plots

    figures = []
    monkeypatch.setattr(plots.plt, "close", lambda fig=None: figures.append(fig))
    wide = [{"method": "sgd", "setting": "lr=1e-3", "score": 0.876, "radius": 0.0, "chosen": True}]
    wide += [{"method": "sam", "setting": f"rho={r}", "score": 0.88 - r, "radius": r, "chosen": r == 0.0005}
             for r in (0.00025, 0.0005, 0.005, 0.05)]
    wide += [{"method": "otmdr", "setting": f"rho=[{r},{2 * r}] noise_std={n}", "score": 0.87 - r,  # a line per noise
              "radius": 550 * n + r, "chosen": False} for n in (1e-3, 3e-3, 0.009, 0.027) for r in (0.005, 0.01)]
    plots.plot_search(wide, tmp_path / "wide.png", metric="val_accuracy")
    narrow = [{"method": "sam", "setting": f"rho={r}", "score": 0.8 + r, "radius": r, "chosen": r == 0.1}
              for r in (0.02, 0.05, 0.1, 0.2, 0.5)]
    plots.plot_search(narrow, tmp_path / "narrow.png", metric="val_accuracy")
    wide_ax, narrow_ax = figures[0].axes[0], figures[1].axes[0]
    assert list(wide_ax.get_xticks()) == [0.001, 0.01, 0.1, 1.0, 10.0]
    assert list(narrow_ax.get_xticks()) == [0.02, 0.05, 0.1, 0.2, 0.5]
    for fig, ax, outside in ((figures[0], wide_ax, True), (figures[1], narrow_ax, False)):
        fig.canvas.draw()
        legend = ax.get_legend().get_window_extent()
        assert (legend.x0 >= ax.get_window_extent().x1) == outside


def test_search_figure_draws_each_line_marker_only_where_its_legend_says(tmp_path, monkeypatch):
    """A point below the axis was drawn with its line's marker cut in half at the edge under the
    ▼: the legend's marker matched no drawn point there. Now the line marks the points on the
    axis only, and the ▼ has its own legend entry."""
    from otmdr.report import plots

    figures = []
    monkeypatch.setattr(plots.plt, "close", lambda fig=None: figures.append(fig))
    points = [{"method": "sgd", "setting": "default", "score": 0.8, "radius": 0.0, "chosen": True}]
    points += [{"method": "sam", "setting": f"rho={r}", "score": s, "radius": r, "chosen": r == 0.05}
               for r, s in ((0.02, 0.82), (0.05, 0.81), (0.1, 0.80), (0.5, 0.2))]  # 0.5: far below the axis
    plots.plot_search(points, tmp_path / "search.png", metric="val_accuracy")
    ax = figures[0].axes[0]
    legend = ax.get_legend()
    handles = dict(zip([t.get_text() for t in legend.get_texts()], legend.legend_handles))
    line = next(ln for ln in ax.get_lines() if ln.get_label() == "sam (rho)")
    assert handles["sam (rho)"].get_marker() == line.get_marker() == "o"
    bottom = ax.get_ylim()[0]
    ys = np.asarray(line.get_ydata(), dtype=float)
    marked = line.get_markevery()
    shown = ys[marked] if marked is not None else ys
    assert (shown > bottom).all(), (ys, marked)  # no marker cut in half at the bottom edge
    below = [label for label in handles if "below the axis" in label]
    assert below and handles[below[0]].get_paths()  # the ▼ is explained in the legend


def _label_corners(text, renderer):
    """The four display-space corners of a drawn label, rotated as drawn (its window extent is the
    axis-aligned box around them, which overlaps its neighbour's whenever both are tilted)."""
    rotation = text.get_rotation()
    text.set_rotation(0)
    flat = text.get_window_extent(renderer)
    text.set_rotation(rotation)
    angle = np.radians(rotation)
    anchor = np.array([flat.x0, flat.y1 if text.get_va() == "top" else flat.y0])
    corners = np.array([[0, 0], [flat.width, 0], [flat.width, flat.height], [0, flat.height]])
    if text.get_va() == "top":
        corners[:, 1] -= flat.height
    turn = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    return anchor + corners @ turn.T


def _rectangles_overlap(a, b):
    """Separating-axis test for two convex quadrilaterals."""
    for quad in (a, b):
        for i in range(4):
            edge = quad[(i + 1) % 4] - quad[i]
            axis = np.array([-edge[1], edge[0]])
            pa, pb = a @ axis, b @ axis
            if pa.max() <= pb.min() or pb.max() <= pa.min():
                return False
    return True


@pytest.mark.parametrize("slope", [0.01, -0.01, 0.0])
def test_search_figure_labels_of_neighbouring_grid_points_do_not_overlap(tmp_path, monkeypatch, slope):
    """OT-MDR's labels ("[0.0025,0.005]") laid flat ran into the next grid point's on the noisy
    CIFAR-10 study's figure, a factor of two apart in radius; tilted, no two labels of a line
    overlap, whether the score rises, falls or stays level along it."""
    from otmdr.report import plots

    figures = []
    monkeypatch.setattr(plots.plt, "close", lambda fig=None: figures.append(fig))
    rhos = [0.00125 * 2**i for i in range(8)]
    points = [{"method": "otmdr", "setting": f"rho=[{r:g},{2 * r:g}]", "score": 0.45 + slope * i,
               "radius": 3.7 * r, "chosen": i == 7} for i, r in enumerate(rhos)]
    plots.plot_search(points, tmp_path / "search.png", metric="val_accuracy")
    fig = figures[0]
    renderer = fig.canvas.get_renderer()
    quads = [_label_corners(text, renderer) for text in fig.axes[0].texts]
    assert len(quads) == 8
    overlapping = [(i, j) for i in range(8) for j in range(i + 1, 8) if _rectangles_overlap(quads[i], quads[j])]
    assert not overlapping, overlapping


# 6 ------------------------------------------------------------------ step(loss_fn) without batch
def test_step_with_a_batch_loss_function_but_no_batch_says_what_is_missing():
    import torch
    import torch.nn.functional as F

    from otmdr import OTMDR

    model = torch.nn.Linear(4, 3)
    opt = OTMDR(model, torch.optim.SGD, lr=0.1)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(TypeError, match=re.escape(
            "step(loss_fn) called without batch=...: pass the batch, opt.step(loss_fn, batch=(x, y)), or give "
            "a closure that takes no argument")):
        opt.step(lambda b: F.cross_entropy(model(b[0]), b[1]))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    opt.step(lambda b: F.cross_entropy(model(b[0]), b[1]), batch=(x, y))  # the optimizer still works

    def broken():  # a TypeError inside a closure that takes no argument is the closure's own
        return F.cross_entropy(model(x), y) + "oops"

    opt.zero_grad()
    with pytest.raises(TypeError) as raised:
        opt.step(broken)
    assert "without batch" not in str(raised.value)


# 7 --------------------------------------------------------------------- docs/optimizer.md
def test_the_first_optimizer_example_steps_the_schedule_once_per_epoch():
    import torch

    text = (ROOT / "docs" / "optimizer.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    assert "\n    sched.step()" in code and "\n        sched.step()" not in code  # in the epoch loop
    model = torch.nn.Linear(4, 3)
    loader = [(torch.randn(8, 4), torch.randint(0, 3, (8,)))]
    scope = {"model": model, "loader": loader}
    exec(compile(code, "docs/optimizer.md", "exec"), scope)
    assert scope["sched"].last_epoch == 200 and scope["opt"].param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-9)
