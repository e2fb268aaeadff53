"""PyramidNet (Han, Kim & Kim, "Deep Pyramidal Residual Networks", CVPR 2017) for CIFAR.

The width grows additively by ``alpha / N`` channels per block (N blocks in all, over three
stages), starting from 16. Blocks are pre-activation-like without the first ReLU
(BN-conv-BN-ReLU-conv-BN for basic blocks, BN-conv1x1-BN-ReLU-conv3x3-BN-ReLU-conv1x1-BN for
bottlenecks whose output is 4x wider). Shortcuts are parameter-free: 2x2 average pooling where
the block downsamples, then zero padding of the missing channels. Depth is 6N+2 for basic
blocks and 9N+2 for bottlenecks (N blocks per stage).

Published sizes (CIFAR, the paper's comparison table): PyramidNet-110 (alpha 48, basic) 1.7M,
PyramidNet-164 (alpha 48, bottleneck) 1.7M, PyramidNet-272 (alpha 200, bottleneck) 26.0M —
the model of the SAM papers. OT-MDR uses PyramidNet-101 (alpha 64, bottleneck).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ._common import PreActHead, init_weights
from .registry import register_model


class _PyramidBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.out_planes = planes * self.expansion
        self.pool: nn.Module | None = nn.AvgPool2d(2, 2, ceil_mode=True) if stride != 1 else None
        self.residual = self._residual(in_planes, planes, stride)

    def _residual(self, in_planes: int, planes: int, stride: int) -> nn.Sequential:  # pragma: no cover
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        out = self.residual(x)
        shortcut = x if self.pool is None else self.pool(x)
        missing = out.shape[1] - shortcut.shape[1]
        if missing > 0:
            shortcut = F.pad(shortcut, (0, 0, 0, 0, 0, missing))
        return out + shortcut


class PyramidBasicBlock(_PyramidBlock):
    expansion = 1

    def _residual(self, in_planes: int, planes: int, stride: int) -> nn.Sequential:
        return nn.Sequential(
            nn.BatchNorm2d(in_planes),
            nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False), nn.BatchNorm2d(planes), nn.ReLU(inplace=True),
            nn.Conv2d(planes, planes, 3, 1, 1, bias=False), nn.BatchNorm2d(planes),
        )


class PyramidBottleneck(_PyramidBlock):
    expansion = 4

    def _residual(self, in_planes: int, planes: int, stride: int) -> nn.Sequential:
        return nn.Sequential(
            nn.BatchNorm2d(in_planes),
            nn.Conv2d(in_planes, planes, 1, bias=False), nn.BatchNorm2d(planes), nn.ReLU(inplace=True),
            nn.Conv2d(planes, planes, 3, stride, 1, bias=False), nn.BatchNorm2d(planes), nn.ReLU(inplace=True),
            nn.Conv2d(planes, planes * self.expansion, 1, bias=False), nn.BatchNorm2d(planes * self.expansion),
        )


class PyramidNet(nn.Module):
    """PyramidNet (Han et al. 2017) for CIFAR: additive widening, zero-padded identity shortcuts."""

    def __init__(self, depth: int = 110, alpha: float = 48, bottleneck: bool = False, num_classes: int = 10,
                 in_channels: int = 3):
        super().__init__()
        per_block = 9 if bottleneck else 6
        if depth < per_block + 2 or (depth - 2) % per_block:
            kind = ("9n+2 for bottleneck blocks (e.g. 101, 164, 272)" if bottleneck
                    else "6n+2 for basic blocks (e.g. 110)")
            raise ValueError(f"PyramidNet depth must be {kind}, got {depth}")
        n = (depth - 2) // per_block
        block = PyramidBottleneck if bottleneck else PyramidBasicBlock
        step = alpha / (3 * n)
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16))
        layers: list[nn.Module] = []
        in_planes, width = 16, 16.0
        for stage in range(3):
            for i in range(n):
                width += step
                layer = block(in_planes, int(round(width)), 2 if stage > 0 and i == 0 else 1)
                layers.append(layer)
                in_planes = layer.out_planes
        self.layers = nn.Sequential(*layers)
        self.head = PreActHead(in_planes, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.layers(self.stem(x)))


@register_model("pyramidnet101")
def pyramidnet101(num_classes: int = 10, in_channels: int = 3, depth: int = 101, alpha: float = 64,
                  bottleneck: bool = True) -> nn.Module:
    """PyramidNet-101 (Han et al. 2017), bottleneck blocks, alpha 64 (the OT-MDR paper's setting)."""
    return PyramidNet(depth, alpha, bottleneck, num_classes, in_channels)


@register_model("pyramidnet272")
def pyramidnet272(num_classes: int = 10, in_channels: int = 3, depth: int = 272, alpha: float = 200,
                  bottleneck: bool = True) -> nn.Module:
    """PyramidNet-272 (Han et al. 2017), bottleneck blocks, alpha 200 (the SAM papers' setting)."""
    return PyramidNet(depth, alpha, bottleneck, num_classes, in_channels)


@register_model("pyramidnet-small")
def pyramidnet_small(num_classes: int = 10, in_channels: int = 3, depth: int = 29, alpha: float = 48,
                     bottleneck: bool = True) -> nn.Module:
    """PyramidNet-29 (Han et al. 2017), bottleneck blocks, alpha 48: a CPU-sized PyramidNet."""
    return PyramidNet(depth, alpha, bottleneck, num_classes, in_channels)
