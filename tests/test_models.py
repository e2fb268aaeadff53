"""Model registry: shapes, published parameter counts, clear errors."""

from __future__ import annotations

import pytest
import torch

from otmdr.models import count_parameters, create_model, list_models


@pytest.mark.parametrize("name,in_channels,size", [("mlp", 1, 28), ("lenet", 1, 28), ("lenet", 3, 32), ("resnet20", 3, 32), ("resnet20", 1, 28)])
def test_output_shapes(name, in_channels, size):
    kwargs = {"input_size": size} if name == "mlp" else {}
    model = create_model(name, num_classes=7, in_channels=in_channels, **kwargs)
    assert model(torch.randn(2, in_channels, size, size)).shape == (2, 7)


@pytest.mark.parametrize("name,millions", [("resnet20", 0.27), ("resnet32", 0.46), ("resnet56", 0.85)])
def test_parameter_counts_match_the_published_ones(name, millions):
    assert count_parameters(create_model(name)) / 1e6 == pytest.approx(millions, abs=0.01)


def test_unknown_model_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown model 'resnet7'.*resnet20"):
        create_model("resnet7")
    assert {"mlp", "lenet", "resnet20"} <= set(list_models())
