"""Bayesian (mean-field Gaussian) versions of the small models and the ResNets.

Each is the deterministic model of the registry passed through :func:`~otmdr.models.bayes.bayesianize`:
every ``nn.Linear`` / ``nn.Conv2d`` becomes a ``BayesLinear`` / ``BayesConv2d`` of the same shape
with the release initialisation, batch norm stays deterministic. The release's BNN uses softplus
activations: ``bayes-mlp`` defaults to softplus; the CNNs keep the ReLU of their deterministic
architecture by default (batch norm in front of every activation), ``activation="softplus"``
switches them. The options ``prior_std``, ``mu_init_std``, ``rho_init_mean`` and ``rho_init_std``
go to every Bayesian layer (defaults: 0.1, 0.1, -5, 0.1 as released).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .bayes import bayesianize
from .registry import create_model, register_model

ACTIVATIONS = {"relu": nn.ReLU, "softplus": nn.Softplus}


def set_activation(module: nn.Module, activation: str) -> nn.Module:
    """Replace every ``nn.ReLU`` in ``module`` by the named activation (``"relu"`` leaves it as is)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    if activation == "relu":
        return module
    for name, child in list(module.named_children()):
        if isinstance(child, nn.ReLU):
            setattr(module, name, ACTIVATIONS[activation]())
        else:
            set_activation(child, activation)
    return module


def _bayes(name: str, activation: str, prior_kwargs: dict[str, Any], **options: Any) -> nn.Module:
    model = create_model(name, **options)
    return bayesianize(set_activation(model, activation), **prior_kwargs)


@register_model("bayes-mlp")
def bayes_mlp(num_classes: int = 10, in_channels: int = 1, input_size: int = 28, hidden: tuple[int, ...] = (256, 256),
              activation: str = "softplus", batch_norm: bool = False, **prior_kwargs: Any) -> nn.Module:
    """Bayesian MLP (mean-field Gaussian), softplus hidden layers (default 256-256) as released."""
    return _bayes("mlp", activation, prior_kwargs, num_classes=num_classes, in_channels=in_channels,
                  input_size=input_size, hidden=tuple(hidden), batch_norm=batch_norm)


@register_model("bayes-lenet")
def bayes_lenet(num_classes: int = 10, in_channels: int = 1, width: int = 32, activation: str = "relu",
                **prior_kwargs: Any) -> nn.Module:
    """Bayesian LeNet-style CNN (mean-field Gaussian conv/dense layers, deterministic batch norm)."""
    return _bayes("lenet", activation, prior_kwargs, num_classes=num_classes, in_channels=in_channels, width=width)


@register_model("bayes-resnet20")
def bayes_resnet20(num_classes: int = 10, in_channels: int = 3, activation: str = "relu",
                   **prior_kwargs: Any) -> nn.Module:
    """Bayesian ResNet-20 (CIFAR, 16-32-64 channels), mean-field Gaussian convs, deterministic batch norm."""
    return _bayes("resnet20", activation, prior_kwargs, num_classes=num_classes, in_channels=in_channels)


@register_model("bayes-resnet10")
def bayes_resnet10(num_classes: int = 10, in_channels: int = 3, width: int = 64, activation: str = "relu",
                   **prior_kwargs: Any) -> nn.Module:
    """Bayesian ResNet-10 (CIFAR stem, 64-512 channels), mean-field Gaussian convs, deterministic batch norm."""
    return _bayes("resnet10", activation, prior_kwargs, num_classes=num_classes, in_channels=in_channels, width=width)


@register_model("bayes-resnet18")
def bayes_resnet18(num_classes: int = 10, in_channels: int = 3, width: int = 64, activation: str = "relu",
                   **prior_kwargs: Any) -> nn.Module:
    """Bayesian ResNet-18 (CIFAR stem, 64-512 channels), mean-field Gaussian convs, deterministic batch norm."""
    return _bayes("resnet18", activation, prior_kwargs, num_classes=num_classes, in_channels=in_channels, width=width)
