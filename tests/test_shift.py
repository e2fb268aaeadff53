"""Corruption robustness evaluation: parsing, the metric table and its summaries, the heat map."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from otmdr.data import DatasetSpec, ImageData
from otmdr.data.corruptions import corrupt
from otmdr.eval.metrics import accuracy
from otmdr.eval.corruption_grid import (corruption_robustness, format_corruption_table, generated_source,
                                        parse_corruptions, parse_severities)
from otmdr.report.plots import plot_corruption_heatmaps

SPEC = DatasetSpec("toy", 2, 1, 8, (0.5,), (0.25,), "", "", False)


class Brightness(nn.Module):
    """Class 1 iff the mean normalised pixel is positive: its accuracy on any image set is known."""

    def forward(self, x):
        m = x.mean(dim=(1, 2, 3))
        return torch.stack([-m, m], dim=1) * 10


def _clean(n: int = 40) -> ImageData:
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 2, (n,), generator=g)
    level = torch.where(labels == 1, 200, 60).to(torch.uint8)
    images = (level.view(-1, 1, 1, 1) + torch.randint(0, 20, (n, 1, 8, 8), generator=g)).to(torch.uint8)
    return ImageData(images, labels, ["dark", "bright"])


def test_parsing():
    assert parse_corruptions("all")[0] == "gaussian_noise" and len(parse_corruptions("all")) == 19
    assert parse_corruptions("fog, contrast") == ["fog", "contrast"]
    with pytest.raises(ValueError, match="unknown corruption"):
        parse_corruptions("fog,rain")
    assert parse_corruptions("spatter", available=["spatter", "fog"]) == ["spatter"]
    assert parse_severities("1-5") == [1, 2, 3, 4, 5]
    assert parse_severities("5,1,3") == [1, 3, 5]
    assert parse_severities("2") == [2]
    for bad in ("0-3", "6", "a", "", "1-"):
        with pytest.raises(ValueError):
            parse_severities(bad)


def test_metrics_per_cell_and_summaries_match_a_direct_computation():
    clean = _clean()
    model = Brightness()
    darkened = {1: 0, 2: 80, 3: 140}  # subtract from every pixel: bright images turn dark

    def source(name: str, severity: int):
        shift = darkened[severity] if name == "dark" else 0
        return (clean.images.int() - shift).clamp(0, 255).to(torch.uint8), clean.labels

    result = corruption_robustness(model, clean, SPEC, source, corruptions=["dark", "none"], severities=[1, 2, 3],
                                   batch_size=7)

    def direct(images):
        x = (images.float() / 255 - 0.5) / 0.25
        return accuracy(torch.softmax(model(x).double(), 1), clean.labels)

    expected = {s: direct(source("dark", s)[0]) for s in (1, 2, 3)}
    assert expected[1] == 1.0 and expected[3] < expected[1]  # the toy model is perfect on clean images
    for s in (1, 2, 3):
        assert result["corruptions"]["dark"][str(s)]["accuracy"] == pytest.approx(expected[s])
        assert result["corruptions"]["none"][str(s)]["accuracy"] == pytest.approx(1.0)
    assert result["clean"]["accuracy"] == pytest.approx(1.0)
    cells = [*expected.values(), 1.0, 1.0, 1.0]
    assert result["mean_corruption_accuracy"] == pytest.approx(np.mean(cells))
    assert result["relative_degradation"] == pytest.approx(1.0 - np.mean(cells))
    assert result["accuracy_per_corruption"]["dark"] == pytest.approx(np.mean(list(expected.values())))
    assert result["accuracy_per_severity"]["3"] == pytest.approx((expected[3] + 1.0) / 2)
    assert set(result["corruptions"]["dark"]["2"]) == {"accuracy", "nll", "brier", "ece"}
    table = format_corruption_table(result)
    assert table.splitlines()[0].split() == ["corruption", "s1", "s2", "s3", "mean"]
    assert "clean" in table and f"{100 * expected[3]:.2f}" in table
    assert format_corruption_table(result, markdown=True).startswith("| corruption | s1")


def test_images_of_the_wrong_shape_are_refused():
    clean = _clean()
    with pytest.raises(ValueError, match="shape"):
        corruption_robustness(Brightness(), clean, SPEC, lambda n, s: (clean.images[:, :, :4], clean.labels),
                              corruptions=["crop"], severities=[1])


def test_generated_source_is_the_corruption_function_and_is_seeded():
    clean = _clean(6)
    source = generated_source(clean.images, clean.labels, seed=3)
    images, labels = source("gaussian_noise", 2)
    assert torch.equal(images, corrupt(clean.images, "gaussian_noise", 2, seed=3))
    assert torch.equal(labels, clean.labels)
    assert torch.equal(source("gaussian_noise", 2)[0], images)
    assert not torch.equal(generated_source(clean.images, clean.labels, seed=4)("gaussian_noise", 2)[0], images)


def test_heatmap_is_written(tmp_path):
    clean = _clean()
    result = corruption_robustness(Brightness(), clean, SPEC, generated_source(clean.images, clean.labels),
                                   corruptions=["contrast", "gaussian_noise"], severities=[1, 5])
    path = plot_corruption_heatmaps({"a": result, "b": result}, tmp_path / "heat.png")
    assert path.stat().st_size > 5000


def test_folder_source_reads_the_subset_and_refuses_other_images(tmp_path):
    from otmdr.data import DatasetError, test_subset, write_corrupted
    from otmdr.eval.corruption_grid import folder_source

    full = _clean(30)
    write_corrupted(full.images, full.labels, tmp_path / "c", ["contrast"], seed=1)
    part = test_subset(full, 12)  # the subset `--test-limit 12` evaluates
    images, labels = folder_source(str(tmp_path / "c"), part, 12)("contrast", 4)
    expected = corrupt(full.images, "contrast", 4, seed=1)
    assert torch.equal(images, test_subset(ImageData(expected, full.labels, full.classes), 12).images)
    assert torch.equal(labels, part.labels)
    with pytest.raises(DatasetError, match="--test-limit 30"):
        folder_source(str(tmp_path / "c"), part)("contrast", 1)
    shuffled = ImageData(full.images, full.labels.roll(1), full.classes)
    with pytest.raises(DatasetError, match="labels differ"):
        folder_source(str(tmp_path / "c"), shuffled)("contrast", 1)


@pytest.mark.parametrize("old, new", [("shift", "corruption_grid"), ("robustness", "run_robustness")])
def test_the_old_module_names_work_one_more_release_with_a_warning(old, new):
    import importlib
    import sys

    sys.modules.pop(f"otmdr.eval.{old}", None)  # a fresh import warns again
    with pytest.warns(DeprecationWarning, match=f"otmdr.eval.{old} is renamed otmdr.eval.{new}"):
        alias = importlib.import_module(f"otmdr.eval.{old}")
    renamed = importlib.import_module(f"otmdr.eval.{new}")
    assert alias.__all__ == renamed.__all__
    assert all(getattr(alias, name) is getattr(renamed, name) for name in renamed.__all__)
