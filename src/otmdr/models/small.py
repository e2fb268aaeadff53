"""Small models for CPU-scale runs: an MLP and a LeNet-style CNN."""

from __future__ import annotations

from torch import Tensor, nn

from ._common import check_sizes
from .registry import register_model


class MLP(nn.Module):
    """Flattens its input; hidden layers with ReLU (and optional batch norm)."""

    def __init__(self, in_features: int, num_classes: int, hidden: tuple[int, ...] = (256, 256),
                 batch_norm: bool = False):
        super().__init__()
        check_sizes(hidden=tuple(hidden))
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers.append(nn.Linear(width, h))
            if batch_norm:
                layers.append(nn.BatchNorm1d(h))
            layers.append(nn.ReLU(inplace=True))
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class LeNet(nn.Module):
    """LeNet-style CNN: two conv/pool stages (with batch norm) and two dense layers."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 32):
        super().__init__()
        check_sizes(width=width)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(4),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(2 * width * 16, 128), nn.ReLU(inplace=True), nn.Linear(128, num_classes)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


@register_model("mlp")
def mlp(num_classes: int = 10, in_channels: int = 1, input_size: int = 28, hidden: tuple[int, ...] = (256, 256),
        batch_norm: bool = False) -> nn.Module:
    """MLP on flattened inputs, ReLU hidden layers (default 256-256), optional batch norm."""
    return MLP(in_channels * input_size * input_size, num_classes, tuple(hidden), batch_norm)


@register_model("lenet")
def lenet(num_classes: int = 10, in_channels: int = 1, width: int = 32) -> nn.Module:
    """LeNet-style CNN: two conv-BN-ReLU-pool stages and two dense layers."""
    return LeNet(in_channels, num_classes, width)
