"""MobileNetV1 (Howard et al. 2017) and EfficientNet-B0 (Tan & Le 2019) in CIFAR form.

MobileNetV1: a 3x3 stride-1 stem to 32 channels and 13 depthwise-separable blocks
(depthwise 3x3-BN-ReLU, pointwise 1x1-BN-ReLU) up to 1024 channels, four of them with stride 2;
3.22M parameters for 10 classes (the ``pytorch-cifar`` figure, 3,217,226).

EfficientNet-B0: the paper's seven MBConv stages (expansion, kernel, squeeze-excitation at 1/4
of the block input, swish) and its 1x1 head to 1280 channels; for 32x32 inputs the stem and the
second stage have stride 1, so the input is downsampled 8x (not 32x). 4.02M parameters for 10
classes — the ImageNet B0's 5.29M less its 1000-way classifier.
"""

from __future__ import annotations

from torch import Tensor, nn

from ._common import DropPath, init_weights
from .registry import register_model

# (output channels, stride) of MobileNetV1's depthwise-separable blocks.
_MOBILENET_V1 = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1), (512, 1), (512, 1), (512, 1),
                 (512, 1), (1024, 2), (1024, 1))


def _conv_bn(in_planes: int, out_planes: int, kernel: int, stride: int = 1, groups: int = 1,
             activation: type[nn.Module] | None = nn.ReLU) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(in_planes, out_planes, kernel, stride, kernel // 2, groups=groups, bias=False),
                               nn.BatchNorm2d(out_planes)]
    if activation is not None:
        layers.append(activation(inplace=True))
    return layers


class MobileNetV1(nn.Module):
    """MobileNetV1 (Howard et al. 2017), CIFAR stride-1 stem, depthwise-separable blocks."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width_mult: float = 1.0):
        super().__init__()
        if width_mult <= 0:
            raise ValueError(f"width_mult must be positive, got {width_mult}")
        planes = max(8, int(32 * width_mult))
        layers = _conv_bn(in_channels, planes, 3)
        for channels, stride in _MOBILENET_V1:
            out_planes = max(8, int(channels * width_mult))
            layers += _conv_bn(planes, planes, 3, stride, groups=planes)  # depthwise
            layers += _conv_bn(planes, out_planes, 1)  # pointwise
            planes = out_planes
        layers.append(nn.AdaptiveAvgPool2d(1))
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(planes, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x).flatten(1))


class SqueezeExcitation(nn.Module):
    def __init__(self, planes: int, squeezed: int):
        super().__init__()
        self.gate = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(planes, squeezed, 1), nn.SiLU(inplace=True),
                                  nn.Conv2d(squeezed, planes, 1), nn.Sigmoid())

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gate(x)


class MBConv(nn.Module):
    """Inverted residual: expand 1x1, depthwise kxk, squeeze-excitation, project 1x1 (no activation)."""

    def __init__(self, in_planes: int, out_planes: int, expansion: int, kernel: int, stride: int, drop_path: float):
        super().__init__()
        hidden = in_planes * expansion
        layers: list[nn.Module] = []
        if expansion != 1:
            layers += _conv_bn(in_planes, hidden, 1, activation=nn.SiLU)
        layers += _conv_bn(hidden, hidden, kernel, stride, groups=hidden, activation=nn.SiLU)
        layers.append(SqueezeExcitation(hidden, max(1, in_planes // 4)))
        layers += _conv_bn(hidden, out_planes, 1, activation=None)
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and in_planes == out_planes
        self.drop_path = DropPath(drop_path) if self.residual else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = self.body(x)
        return x + self.drop_path(out) if self.residual else out


# EfficientNet-B0 stages: (expansion, kernel, ImageNet stride, output channels, repeats).
_EFFICIENTNET_B0 = ((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3), (6, 5, 1, 112, 3),
                    (6, 5, 2, 192, 4), (6, 3, 1, 320, 1))


class EfficientNet(nn.Module):
    """EfficientNet-B0 (Tan & Le 2019), CIFAR strides: MBConv, squeeze-excitation, swish."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, dropout: float = 0.2, drop_path: float = 0.2,
                 stem_stride: int = 1, cifar_strides: bool = True):
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        layers = _conv_bn(in_channels, 32, 3, stem_stride, activation=nn.SiLU)
        planes = 32
        total = sum(stage[-1] for stage in _EFFICIENTNET_B0)
        index = 0
        for stage, (expansion, kernel, stride, channels, repeats) in enumerate(_EFFICIENTNET_B0):
            if cifar_strides and stage == 1:
                stride = 1
            for i in range(repeats):
                layers.append(MBConv(planes, channels, expansion, kernel, stride if i == 0 else 1,
                                     drop_path * index / total))
                planes = channels
                index += 1
        layers += _conv_bn(planes, 1280, 1, activation=nn.SiLU)
        layers.append(nn.AdaptiveAvgPool2d(1))
        self.features = nn.Sequential(*layers)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(1280, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.dropout(self.features(x).flatten(1)))


@register_model("mobilenet")
def mobilenet(num_classes: int = 10, in_channels: int = 3, width_mult: float = 1.0) -> nn.Module:
    """MobileNetV1 (Howard et al. 2017), CIFAR stride-1 stem, depthwise-separable blocks to 1024 channels."""
    return MobileNetV1(num_classes, in_channels, width_mult)


@register_model("efficientnet-b0")
def efficientnet_b0(num_classes: int = 10, in_channels: int = 3, dropout: float = 0.2,
                    drop_path: float = 0.2) -> nn.Module:
    """EfficientNet-B0 (Tan & Le 2019), MBConv + squeeze-excitation + swish, CIFAR stride-1 stem."""
    return EfficientNet(num_classes, in_channels, dropout, drop_path)
