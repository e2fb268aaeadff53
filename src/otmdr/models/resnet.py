"""ResNet-10/18 and PreAct ResNet-18 in their CIFAR form (3x3 stem, no max-pool).

The block layout follows He et al. (2016) with four stages of 64-128-256-512 channels, the
variant popularised for CIFAR by the ``pytorch-cifar`` repository: ResNet-18 has 11.17M
parameters for 10 classes. The pre-activation network follows He et al., "Identity Mappings
in Deep Residual Networks" (2016): BN-ReLU before each convolution, a final BN-ReLU before
pooling.
"""

from __future__ import annotations

from torch import Tensor, nn

from ._common import PreActHead, check_sizes, init_weights, residual_stages
from .registry import register_model
from .resnet_cifar import BasicBlock


class ResNet(nn.Module):
    """Post-activation ResNet with basic blocks, four stages (strides 1, 2, 2, 2)."""

    def __init__(self, num_blocks: tuple[int, ...], num_classes: int = 10, in_channels: int = 3, width: int = 64):
        super().__init__()
        check_sizes(width=width)
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU(inplace=True))
        stages = [(width * 2**stage, blocks, 1 if stage == 0 else 2) for stage, blocks in enumerate(num_blocks)]
        self.layers, in_planes = residual_stages(BasicBlock, width, stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.layers(self.stem(x))).flatten(1))


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3, BN-ReLU-conv3x3; the projection shortcut sees the activated input."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(self.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet(nn.Module):
    """Pre-activation ResNet with basic blocks, four stages (strides 1, 2, 2, 2)."""

    def __init__(self, num_blocks: tuple[int, ...], num_classes: int = 10, in_channels: int = 3, width: int = 64):
        super().__init__()
        check_sizes(width=width)
        self.stem = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        stages = [(width * 2**stage, blocks, 1 if stage == 0 else 2) for stage, blocks in enumerate(num_blocks)]
        self.layers, in_planes = residual_stages(PreActBlock, width, stages)
        self.head = PreActHead(in_planes, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.layers(self.stem(x)))


@register_model("resnet10")
def resnet10(num_classes: int = 10, in_channels: int = 3, width: int = 64) -> nn.Module:
    """ResNet-10 (CIFAR stem), basic blocks [1, 1, 1, 1], 64-512 channels."""
    return ResNet((1, 1, 1, 1), num_classes, in_channels, width)


@register_model("resnet18")
def resnet18(num_classes: int = 10, in_channels: int = 3, width: int = 64) -> nn.Module:
    """ResNet-18 (CIFAR stem), basic blocks [2, 2, 2, 2], 64-512 channels."""
    return ResNet((2, 2, 2, 2), num_classes, in_channels, width)


@register_model("preact-resnet18")
def preact_resnet18(num_classes: int = 10, in_channels: int = 3, width: int = 64) -> nn.Module:
    """PreAct ResNet-18 (He et al. 2016, identity mappings), CIFAR stem, 64-512 channels."""
    return PreActResNet((2, 2, 2, 2), num_classes, in_channels, width)
