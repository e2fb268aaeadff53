"""Wide residual networks (Zagoruyko & Komodakis, 2016) for CIFAR.

WRN-d-k: (d - 4) / 6 pre-activation basic blocks per stage, 16k-32k-64k channels, dropout
between the two convolutions of a block (0 by default), 1x1 convolution shortcuts where the
shape changes. The paper gives 36.5M parameters for WRN-28-10 and 2.7M for WRN-16-4 (CIFAR-10);
this implementation has 36,479,194 and 2,748,890.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ._common import PreActHead, init_weights, residual_stages
from .registry import register_model


class WideBlock(nn.Module):
    """BN-ReLU-conv3x3(stride), BN-ReLU-dropout-conv3x3, plus the (projected) input."""

    def __init__(self, in_planes: int, planes: int, stride: int, dropout: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.dropout = dropout
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = F.relu(self.bn2(self.conv1(out)))
        if self.dropout > 0:
            out = F.dropout(out, self.dropout, self.training)
        return self.conv2(out) + shortcut


class WideResNet(nn.Module):
    """WideResNet-depth-k (Zagoruyko & Komodakis 2016): pre-activation blocks, 16k-32k-64k channels."""

    def __init__(self, depth: int = 28, widen_factor: int = 10, num_classes: int = 10, in_channels: int = 3,
                 dropout: float = 0.0):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n+4 (16, 22, 28, 40), got {depth}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        n = (depth - 4) // 6
        widths = (16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.stem = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        stages = [(planes, n, 1 if stage == 0 else 2) for stage, planes in enumerate(widths)]
        block = lambda i, o, stride: WideBlock(i, o, stride, dropout)  # noqa: E731
        self.layers, in_planes = residual_stages(block, 16, stages)
        self.head = PreActHead(in_planes, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.layers(self.stem(x)))


@register_model("wrn16-4")
def wrn16_4(num_classes: int = 10, in_channels: int = 3, dropout: float = 0.0) -> nn.Module:
    """WideResNet-16-4 (Zagoruyko & Komodakis 2016), pre-activation blocks, optional dropout."""
    return WideResNet(16, 4, num_classes, in_channels, dropout)


@register_model("wrn28-10")
def wrn28_10(num_classes: int = 10, in_channels: int = 3, dropout: float = 0.0) -> nn.Module:
    """WideResNet-28-10 (Zagoruyko & Komodakis 2016), pre-activation blocks, optional dropout."""
    return WideResNet(28, 10, num_classes, in_channels, dropout)
