"""The learning-curve figure's radius panel starts at zero, without an offset: a radius held at
rho (0.02, with 1e-8 of float jitter) once drew as a climb from -1 to +1.5 on a "1e-8+2e-2" axis."""

from pathlib import Path

import matplotlib.pyplot as plt
import pytest

from otmdr.report.plots import RADIUS_MATH, plot_learning_curves


def test_a_constant_radius_draws_flat_from_zero(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    history = [{"train_loss": 1.0 / e, "val_accuracy": 0.5, "val_nll": 1.0, "perturbation_norm": 0.02 + 1e-8 * e}
               for e in range(1, 11)]
    closed = []
    monkeypatch.setattr(plt, "close", closed.append)
    plot_learning_curves({"sam": [{"history": history}, {"history": history}]}, tmp_path / "curves.png")
    radius = closed[0].axes[-1]
    assert radius.get_title() == f"measured radius {RADIUS_MATH}"
    low, high = radius.get_ylim()
    assert low == 0 and high >= 0.021  # the line clear of the frame
    assert radius.yaxis.get_major_formatter().get_offset() == ""
    assert (tmp_path / "curves.png").is_file()


def test_sgd_stays_off_the_radius_panel_and_equal_radii_stay_apart(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """SGD's zero radius drew on the panel's bottom frame, and SAM-step's line lay hidden under
    SAM-cosine's, both held at the same rho (the schedule-confound study's figures)."""
    def runs(radius: float) -> list[dict]:
        return [{"history": [{"train_loss": 1.0 / e, "val_accuracy": 0.5, "val_nll": 1.0, "perturbation_norm": radius}
                             for e in range(1, 6)]}]
    closed = []
    monkeypatch.setattr(plt, "close", closed.append)
    plot_learning_curves({"sgd": runs(0.0), "sam-step": runs(0.05), "sam-cosine": runs(0.05)}, tmp_path / "c.png")
    loss, *_, radius = closed[0].axes
    assert [line.get_label() for line in loss.get_lines()] == ["sgd", "sam-step", "sam-cosine"]
    drawn = radius.get_lines()
    assert [line.get_label() for line in drawn] == ["sam-step", "sam-cosine"]
    assert drawn[0].get_linestyle() != drawn[1].get_linestyle()
    assert drawn[0].get_color() == loss.get_lines()[1].get_color()  # a method keeps its colour across panels
