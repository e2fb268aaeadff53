"""Helpers shared by the model definitions: weight initialisation and small layers."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn


#: The widest layer a size option (``hidden``, ``width``) may ask for: a square dense layer of
#: 16384 units is 268M parameters (1 GiB in float32); a typo such as 10**12 is refused with its
#: name instead of failing deep in an allocation.
MAX_WIDTH = 16384


def check_sizes(**sizes: int | Sequence[int]) -> None:
    """Each layer size given as an option is a whole number in [1, MAX_WIDTH]; a ValueError names
    the option (``hidden[1]``) and the value, so the CLI can print it as one line."""
    for name, value in sizes.items():
        items = ([(f"{name}[{i}]", v) for i, v in enumerate(value)] if isinstance(value, (list, tuple))
                 else [(name, value)])
        for label, size in items:
            if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= MAX_WIDTH:
                raise ValueError(f"{label} must be a whole number of units in [1, {MAX_WIDTH}], got {size!r} "
                                 "(a layer needs at least one unit; a wider one will not fit in memory)")


def init_weights(model: nn.Module) -> None:
    """Kaiming-normal (fan-out, ReLU gain) convolutions, unit/zero batch norm, zero biases.

    Linear layers keep PyTorch's default initialisation apart from a zero bias.
    """
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.BatchNorm2d, nn.BatchNorm1d)):
            if module.weight is not None:
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)


def residual_stages(block: Callable[[int, int, int], nn.Module], in_planes: int,
                    stages: Sequence[tuple[int, int, int]]) -> tuple[nn.Sequential, int]:
    """Stack ``blocks`` blocks per ``(planes, blocks, stride)`` stage; the first block of a stage
    takes the stride. Returns the stack and its output channels."""
    layers: list[nn.Module] = []
    for planes, blocks, stride in stages:
        for i in range(blocks):
            layers.append(block(in_planes, planes, stride if i == 0 else 1))
            in_planes = planes
    return nn.Sequential(*layers), in_planes


class PreActHead(nn.Module):
    """BN-ReLU, global average pooling and a linear classifier: the head of pre-activation nets."""

    def __init__(self, in_planes: int, num_classes: int):
        super().__init__()
        self.features = nn.Sequential(nn.BatchNorm2d(in_planes), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1))
        self.fc = nn.Linear(in_planes, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x).flatten(1))


class DropPath(nn.Module):
    """Stochastic depth on a residual branch: drops whole samples with probability ``p`` in training."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop-path probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = torch.empty((x.shape[0],) + (1,) * (x.dim() - 1), dtype=x.dtype, device=x.device).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"
