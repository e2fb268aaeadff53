"""DenseNet-BC (Huang et al., "Densely Connected Convolutional Networks", CVPR 2017), CIFAR stem.

DenseNet-121 keeps the ImageNet block configuration [6, 12, 24, 16] with growth rate 32 and
compression 0.5, but its stem is a single 3x3 convolution to 2x growth channels with no
max-pool, so a 32x32 input reaches the last block at 4x4. This is the CIFAR DenseNet-121 of
the ``pytorch-cifar`` repository, which has 6.96M parameters for 10 classes (6,956,298).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ._common import init_weights
from .registry import register_model


class DenseLayer(nn.Module):
    """BN-ReLU-conv1x1 (4 x growth), BN-ReLU-conv3x3 (growth); its output is concatenated to its input."""

    def __init__(self, in_planes: int, growth_rate: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm2d(in_planes), nn.ReLU(inplace=True), nn.Conv2d(in_planes, 4 * growth_rate, 1, bias=False),
            nn.BatchNorm2d(4 * growth_rate), nn.ReLU(inplace=True),
            nn.Conv2d(4 * growth_rate, growth_rate, 3, 1, 1, bias=False),
        )

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([x, self.body(x)], 1)


class Transition(nn.Sequential):
    """BN-ReLU-conv1x1 (compression), 2x2 average pooling."""

    def __init__(self, in_planes: int, out_planes: int):
        super().__init__(nn.BatchNorm2d(in_planes), nn.ReLU(inplace=True),
                         nn.Conv2d(in_planes, out_planes, 1, bias=False), nn.AvgPool2d(2))


class DenseNet(nn.Module):
    """DenseNet-BC (Huang et al. 2017) with a CIFAR 3x3 stem: bottleneck layers, compressed transitions."""

    def __init__(self, block_config: tuple[int, ...] = (6, 12, 24, 16), growth_rate: int = 32, reduction: float = 0.5,
                 num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        if not 0.0 < reduction <= 1.0:
            raise ValueError(f"reduction must be in (0, 1], got {reduction}")
        planes = 2 * growth_rate
        layers: list[nn.Module] = [nn.Conv2d(in_channels, planes, 3, 1, 1, bias=False)]
        for i, count in enumerate(block_config):
            for _ in range(count):
                layers.append(DenseLayer(planes, growth_rate))
                planes += growth_rate
            if i < len(block_config) - 1:
                out_planes = int(math.floor(planes * reduction))
                layers.append(Transition(planes, out_planes))
                planes = out_planes
        layers += [nn.BatchNorm2d(planes), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1)]
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(planes, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x).flatten(1))


@register_model("densenet121")
def densenet121(num_classes: int = 10, in_channels: int = 3, growth_rate: int = 32,
                reduction: float = 0.5) -> nn.Module:
    """DenseNet-BC-121 (Huang et al. 2017), growth 32, blocks [6, 12, 24, 16], CIFAR 3x3 stem."""
    return DenseNet((6, 12, 24, 16), growth_rate, reduction, num_classes, in_channels)
