"""Model registry: shapes, published parameter counts, options, clear errors."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from otmdr.models import count_parameters, create_model, describe_models, list_models
from otmdr.models.densenet import DenseNet
from otmdr.models.pyramidnet import PyramidNet

# Big models: parameter counts and a single 32x32 forward pass on a batch of 1 only.
BIG = {"wrn28-10", "pyramidnet101", "pyramidnet272", "densenet121"}


pytestmark = pytest.mark.usefixtures("one_thread")


@functools.cache
def _default_model(name: str) -> nn.Module:
    """Each registered model for 10 classes and 3 channels, built once for the whole module."""
    torch.manual_seed(0)
    return create_model(name)


@pytest.mark.parametrize("name,in_channels,size", [("mlp", 1, 28), ("lenet", 1, 28), ("lenet", 3, 32),
                                                   ("resnet20", 3, 32), ("resnet20", 1, 28)])
def test_output_shapes(name, in_channels, size):
    kwargs = {"input_size": size} if name in ("mlp", "bayes-mlp") else {}
    model = create_model(name, num_classes=7, in_channels=in_channels, **kwargs)
    assert model(torch.randn(2, in_channels, size, size)).shape == (2, 7)


@pytest.mark.parametrize("name", sorted(set(list_models()) - BIG))
@pytest.mark.parametrize("in_channels,size", [(3, 32), (1, 28)])
def test_every_model_maps_cifar_and_mnist_shaped_batches_to_logits(name, in_channels, size):
    kwargs = {"input_size": size} if name in ("mlp", "bayes-mlp") else {}
    model = create_model(name, num_classes=7, in_channels=in_channels, **kwargs)
    with torch.no_grad():
        out = model(torch.randn(2, in_channels, size, size))  # training mode: batch statistics
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", sorted(BIG))
def test_big_models_forward_one_cifar_image(name):
    # One thread runs each of these in well under a second (WRN-28-10, the slowest, ~0.3 s).
    model = _default_model(name).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 32, 32))
    assert out.shape == (1, 10)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", sorted(set(list_models()) - {"mlp", "bayes-mlp"}))
def test_convolutional_models_take_any_input_of_at_least_8x8(name):
    model = _default_model(name).train()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 8, 8)).shape == (2, 10)


def test_mnist_shaped_inputs_reach_the_code_paths_of_the_big_models():
    # Odd feature-map sizes (28 -> 14 -> 7 -> 4 or 3) through scaled-down versions of the big ones.
    for model in (PyramidNet(depth=20, alpha=12, bottleneck=True, in_channels=1),
                  PyramidNet(depth=14, alpha=12, bottleneck=False, in_channels=1),
                  DenseNet((1, 2, 1, 1), growth_rate=8, in_channels=1),
                  create_model("wrn16-4", in_channels=1)):
        with torch.no_grad():
            assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.parametrize("name", ["resnet10", "preact-resnet18", "wrn16-4", "pyramidnet-small", "mobilenet",
                                  "efficientnet-b0"])
def test_every_parameter_gets_a_gradient(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=5)
    loss = nn.functional.cross_entropy(model(torch.randn(2, 3, 16, 16)), torch.tensor([0, 3]))
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing


@pytest.mark.parametrize("name,millions", [("resnet20", 0.27), ("resnet32", 0.46), ("resnet56", 0.85)])
def test_parameter_counts_match_the_published_ones(name, millions):
    assert count_parameters(create_model(name)) / 1e6 == pytest.approx(millions, abs=0.01)


@pytest.mark.parametrize(
    "name,millions,tolerance",
    [
        # He et al. 2016 (CIFAR ResNets): ResNet-20 0.27M, ResNet-110 1.7M.
        ("resnet20", 0.27, 0.01),
        ("resnet110", 1.7, 0.05),
        # CIFAR ResNet-18 / PreAct ResNet-18 with 64-512 channels (kuangliu/pytorch-cifar): 11.17M.
        # Ours: 11,173,962, and 11,172,170 for the pre-activation net, whose final BN-ReLU adds 1,024.
        ("resnet18", 11.17, 0.01),
        ("preact-resnet18", 11.17, 0.01),
        # Zagoruyko & Komodakis 2016: WRN-28-10 36.5M, WRN-16-4 2.7M (ours: 36,479,194 and 2,748,890).
        ("wrn28-10", 36.5, 0.05),
        ("wrn16-4", 2.75, 0.01),
        # DenseNet-BC-121 with the CIFAR stem (kuangliu/pytorch-cifar): 6.96M (ours: 6,956,298).
        ("densenet121", 6.96, 0.01),
        # MobileNetV1, CIFAR variant (kuangliu/pytorch-cifar): 3.2M (ours: 3,217,226).
        ("mobilenet", 3.2, 0.03),
        # EfficientNet-B0 (Tan & Le 2019): 5.3M for ImageNet, i.e. 4.01M without the 1280x1000
        # classifier; a 10-way classifier brings it to 4.02M (ours: 4,020,358).
        ("efficientnet-b0", 4.02, 0.01),
        # Han et al. 2017: PyramidNet-272 (alpha 200, bottleneck) 26.0M (ours: 26,210,842).
        ("pyramidnet272", 26.0, 0.25),
    ],
)
def test_parameter_counts_of_the_model_zoo(name, millions, tolerance):
    assert count_parameters(_default_model(name)) / 1e6 == pytest.approx(millions, abs=tolerance)


@pytest.mark.parametrize(
    "depth,alpha,bottleneck,millions",
    # Han et al. 2017, CIFAR table: PyramidNet-110 (alpha 48) 1.7M, PyramidNet-164 (alpha 48, bottleneck) 1.7M.
    [(110, 48, False, 1.7), (164, 48, True, 1.7)],
)
def test_pyramidnet_matches_the_published_sizes(depth, alpha, bottleneck, millions):
    with torch.device("meta"):
        model = PyramidNet(depth, alpha, bottleneck)
    assert count_parameters(model) / 1e6 == pytest.approx(millions, abs=0.1)


def test_pyramidnet_widens_additively_to_16_plus_alpha():
    model = create_model("pyramidnet101")
    assert len(model.layers) == 33  # (101 - 2) / 9 = 11 bottlenecks per stage
    assert model.head.fc.in_features == 4 * (16 + 64)
    assert count_parameters(create_model("pyramidnet-small")) < count_parameters(model)


def test_create_model_forwards_options():
    model = create_model("wrn16-4", dropout=0.3)
    assert {block.dropout for block in model.layers} == {0.3}
    assert {block.dropout for block in create_model("wrn16-4").layers} == {0.0}
    x = torch.randn(2, 3, 16, 16)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x))  # dropout is off in evaluation
    assert create_model("pyramidnet101", depth=29, alpha=48).head.fc.in_features == 4 * (16 + 48)
    assert create_model("resnet18", width=16).fc.in_features == 128
    assert create_model("densenet121", growth_rate=12).fc.in_features < create_model("densenet121").fc.in_features
    assert create_model("efficientnet-b0", dropout=0.5).dropout.p == 0.5
    assert create_model("mlp", input_size=32, in_channels=3, hidden=(64,)).net[1].in_features == 3 * 32 * 32
    with pytest.raises(TypeError):
        create_model("resnet18", dropout=0.3)
    with pytest.raises(ValueError, match="depth"):
        create_model("pyramidnet101", depth=100)


def test_convolutions_are_kaiming_initialised_and_batch_norm_is_identity():
    torch.manual_seed(0)
    model = create_model("resnet18")
    for module in model.modules():
        if isinstance(module, nn.Conv2d) and module.weight.numel() >= 10_000:
            fan_out = module.out_channels * module.kernel_size[0] * module.kernel_size[1]
            assert module.weight.std().item() == pytest.approx((2 / fan_out) ** 0.5, rel=0.1)
        elif isinstance(module, nn.BatchNorm2d):
            assert torch.equal(module.weight, torch.ones_like(module.weight))
            assert torch.equal(module.bias, torch.zeros_like(module.bias))


def test_describe_models_lists_every_model_with_its_size_and_description():
    rows = describe_models()
    assert [name for name, _, _ in rows] == list_models()
    for name, parameters, description in rows:
        assert description and "\n" not in description, name
        if name in {"resnet20", "wrn16-4", "pyramidnet-small", "efficientnet-b0", "mlp", "wrn28-10"}:
            assert parameters == count_parameters(_default_model(name)), name
    sizes = {name: parameters for name, parameters, _ in rows}
    assert sizes["wrn28-10"] == 36_479_194
    assert sizes["resnet18"] == 11_173_962


def test_unknown_model_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown model 'resnet7'.*resnet20"):
        create_model("resnet7")
    assert {"mlp", "lenet", "resnet20"} <= set(list_models())
    new = {"preact-resnet18", "resnet10", "resnet18", "wrn16-4", "wrn28-10", "pyramidnet101", "pyramidnet-small",
           "densenet121", "mobilenet", "efficientnet-b0"}
    assert new <= set(list_models())
