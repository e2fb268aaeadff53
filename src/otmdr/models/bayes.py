"""Mean-field Gaussian Bayesian layers (method.md section 4): ``BayesLinear`` and ``BayesConv2d``.

Every weight ``w`` (and bias) has a variational posterior ``q(w) = N(mu, sigma^2)`` with
``sigma = softplus(rho)``; ``mu`` and the raw scale ``rho`` are the trained parameters
(``weight_mu``, ``weight_rho``, ``bias_mu``, ``bias_rho``). The prior is ``N(0, prior_std^2)``.
Defaults are the release's: prior std 0.1, ``mu ~ N(0, 0.1^2)``, ``rho ~ N(-5, 0.1^2)`` (so sigma
starts at about softplus(-5) = 0.0067).

Sampling. Each forward pass draws a fresh ``eps ~ N(0, I)`` of the weight's shape (one sample
shared by the whole batch: the plain reparameterisation ``w = mu + sigma * eps``, not the local
reparameterisation trick) and remembers it. A layer is in one of three modes:

- ``"sample"`` (default): a new eps every forward;
- ``"fixed"``: reuse the last drawn eps (one is drawn if there is none yet);
- ``"mean"``: ``w = mu``, no noise (debugging, comparisons with a deterministic net).

Model-level controls: :func:`fixed_sample` (context: one eps per layer drawn on entry and reused
by every forward inside the block, as OT-MDR needs to reuse the same eps for the final full-batch
pass), :func:`mean_weights` (context), :func:`resample` and :func:`set_sample_mode`.

Loss (negative ELBO) used by the trainer::

    loss = mean over the batch of the NLL  +  beta * kl_divergence(model)

where :func:`kl_divergence` is the closed-form KL(q || prior) *summed* over every weight and bias
of every Bayesian layer (not averaged), and ``beta`` is a fixed weight: the release uses
``beta = 5e-6`` (:data:`RELEASE_KL_WEIGHT`). The textbook per-example ELBO, ``NLL + KL / N`` with
``N`` the size of the training set, is the special case ``beta = 1 / N`` (5e-6 is about 1/N for
N = 200,000, i.e. the KL is down-weighted about 4x for CIFAR's 50,000 images).

OT-MDR perturbs only the means and trains the scales: build the optimizer's param groups with
:func:`bayes_param_groups` (means and every non-Bayesian parameter with ``perturb=True``, the
``*_rho`` with ``perturb=False``). :func:`bayesianize` turns a built deterministic model into its
Bayesian counterpart by replacing every ``nn.Linear`` / ``nn.Conv2d`` (batch norm stays
deterministic).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "RELEASE_KL_WEIGHT",
    "SAMPLE_MODES",
    "BayesLayer",
    "BayesLinear",
    "BayesConv2d",
    "bayes_layers",
    "posterior_mean",
    "is_bayesian",
    "kl_divergence",
    "negative_elbo",
    "resample",
    "set_sample_mode",
    "fixed_sample",
    "mean_weights",
    "bayes_param_groups",
    "bayesianize",
]

#: KL weight beta of the release (loss = NLL + beta * summed KL).
RELEASE_KL_WEIGHT = 5e-6

SAMPLE_MODES = ("sample", "fixed", "mean")


def _log_softplus(rho: Tensor) -> Tensor:
    """``log(softplus(rho))``, finite (= rho to 1e-9) where softplus underflows, e.g. rho = -200."""
    return torch.where(rho < -20, rho, torch.log(F.softplus(rho.clamp(min=-20))))


class BayesLayer(nn.Module):
    """Base class: Gaussian weights ``N(mu, softplus(rho)^2)``, prior ``N(0, prior_std^2)``.

    Subclasses call :meth:`_init_params` with the weight shape and implement ``_forward(x, w, b)``.
    """

    sample_mode: str

    def _init_params(self, weight_shape: tuple[int, ...], bias: bool, prior_std: float, mu_init_std: float,
                     rho_init_mean: float, rho_init_std: float, device: Any = None, dtype: Any = None) -> None:
        if not prior_std > 0:
            raise ValueError(f"prior_std must be > 0, got {prior_std}")
        if not mu_init_std >= 0 or not rho_init_std >= 0:
            raise ValueError(f"init stds must be >= 0, got mu_init_std={mu_init_std}, rho_init_std={rho_init_std}")
        factory = {"device": device, "dtype": dtype}
        self.prior_std = float(prior_std)
        self.mu_init_std = float(mu_init_std)
        self.rho_init_mean = float(rho_init_mean)
        self.rho_init_std = float(rho_init_std)
        self.weight_mu = nn.Parameter(torch.empty(weight_shape, **factory))
        self.weight_rho = nn.Parameter(torch.empty(weight_shape, **factory))
        if bias:
            self.bias_mu = nn.Parameter(torch.empty(weight_shape[0], **factory))
            self.bias_rho = nn.Parameter(torch.empty(weight_shape[0], **factory))
        else:
            self.register_parameter("bias_mu", None)
            self.register_parameter("bias_rho", None)
        self.sample_mode = "sample"
        # The last drawn noise. Plain attributes, not buffers: they are not state (no checkpoint)
        # and DDP must not broadcast them every forward; _apply keeps them on the right device.
        self.weight_eps: Tensor | None = None
        self.bias_eps: Tensor | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Release initialisation: ``mu ~ N(0, mu_init_std^2)``, ``rho ~ N(rho_init_mean, rho_init_std^2)``."""
        for mu, rho in self._pairs():
            nn.init.normal_(mu, 0.0, self.mu_init_std)
            nn.init.normal_(rho, self.rho_init_mean, self.rho_init_std)
        self.weight_eps = self.bias_eps = None

    def _pairs(self) -> list[tuple[Tensor, Tensor]]:
        pairs: list[tuple[Tensor, Tensor]] = [(self.weight_mu, self.weight_rho)]
        if self.bias_mu is not None:
            pairs.append((self.bias_mu, self.bias_rho))
        return pairs

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        if self.weight_eps is not None:
            self.weight_eps = fn(self.weight_eps)
        if self.bias_eps is not None:
            self.bias_eps = fn(self.bias_eps)
        return self

    # ------------------------------------------------------------------------------ sampling
    @property
    def weight_sigma(self) -> Tensor:
        return F.softplus(self.weight_rho)

    @property
    def bias_sigma(self) -> Tensor | None:
        return None if self.bias_rho is None else F.softplus(self.bias_rho)

    def resample(self) -> None:
        """Draw a new eps now (used by the next forward in ``"fixed"`` mode)."""
        with torch.no_grad():
            self.weight_eps = torch.randn_like(self.weight_mu)
            self.bias_eps = None if self.bias_mu is None else torch.randn_like(self.bias_mu)

    def sampled_weights(self) -> tuple[Tensor, Tensor | None]:
        """The ``(weight, bias)`` the next forward uses, following :attr:`sample_mode`."""
        mode = self.sample_mode
        if mode == "mean":
            return self.weight_mu, self.bias_mu
        if mode == "sample" or self.weight_eps is None:
            self.resample()
        elif mode != "fixed":
            raise ValueError(f"sample_mode must be one of {SAMPLE_MODES}, got {mode!r}")
        assert self.weight_eps is not None
        weight = self.weight_mu + F.softplus(self.weight_rho) * self.weight_eps
        bias = None
        if self.bias_mu is not None:
            assert self.bias_eps is not None  # drawn together with weight_eps
            bias = self.bias_mu + F.softplus(self.bias_rho) * self.bias_eps
        return weight, bias

    def forward(self, x: Tensor) -> Tensor:
        weight, bias = self.sampled_weights()
        return self._forward(x, weight, bias)

    def _forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        raise NotImplementedError

    # ------------------------------------------------------------------------------------ KL
    def kl_divergence(self) -> Tensor:
        """Closed-form KL(q || prior) summed over all weights and biases of this layer.

        Per element: ``log(p / sigma) + (sigma^2 + mu^2) / (2 p^2) - 1/2`` with ``p = prior_std``.
        """
        p2 = self.prior_std**2
        total = None
        for mu, rho in self._pairs():
            sigma = F.softplus(rho)
            kl = (math.log(self.prior_std) - _log_softplus(rho) + (sigma * sigma + mu * mu) / (2 * p2) - 0.5).sum()
            total = kl if total is None else total + kl
        assert total is not None
        return total

    def _prior_repr(self) -> str:
        s = f"prior_std={self.prior_std}"
        if self.sample_mode != "sample":
            s += f", sample_mode={self.sample_mode!r}"
        return s


class BayesLinear(BayesLayer):
    """``nn.Linear`` with mean-field Gaussian weights (see the module docstring)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, prior_std: float = 0.1,
                 mu_init_std: float = 0.1, rho_init_mean: float = -5.0, rho_init_std: float = 0.1,
                 device: Any = None, dtype: Any = None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self._init_params((out_features, in_features), bias, prior_std, mu_init_std, rho_init_mean, rho_init_std,
                          device, dtype)

    def _forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.linear(x, weight, bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias_mu is not None}, {self._prior_repr()}")


def _pair(v: int | tuple[int, ...]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


class BayesConv2d(BayesLayer):
    """``nn.Conv2d`` (zero padding) with mean-field Gaussian weights (see the module docstring)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int],
                 stride: int | tuple[int, int] = 1, padding: int | tuple[int, int] = 0, bias: bool = True,
                 prior_std: float = 0.1, mu_init_std: float = 0.1, rho_init_mean: float = -5.0,
                 rho_init_std: float = 0.1, dilation: int | tuple[int, int] = 1, groups: int = 1,
                 device: Any = None, dtype: Any = None):
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"channels ({in_channels}, {out_channels}) must be divisible by groups={groups}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.padding = _pair(padding)
        self.dilation = _pair(dilation)
        self.groups = groups
        shape = (out_channels, in_channels // groups, *self.kernel_size)
        self._init_params(shape, bias, prior_std, mu_init_std, rho_init_mean, rho_init_std, device, dtype)

    def _forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
             f"padding={self.padding}")
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        return s + f", bias={self.bias_mu is not None}, {self._prior_repr()}"


# ---------------------------------------------------------------------------- model-level helpers
def bayes_layers(model: nn.Module) -> Iterator[BayesLayer]:
    """Every Bayesian layer of ``model`` (including ``model`` itself), in module order."""
    return (m for m in model.modules() if isinstance(m, BayesLayer))


def is_bayesian(model: nn.Module) -> bool:
    """Whether ``model`` contains at least one Bayesian layer."""
    return any(True for _ in bayes_layers(model))


def kl_divergence(model: nn.Module) -> Tensor:
    """KL(q || prior) summed over every Bayesian layer of ``model`` (a zero tensor if none)."""
    total = None
    for layer in bayes_layers(model):
        kl = layer.kl_divergence()
        total = kl if total is None else total + kl
    if total is None:
        p = next(model.parameters(), None)
        return torch.zeros((), device=None if p is None else p.device)
    return total


def negative_elbo(nll: Tensor, model: nn.Module, kl_weight: float = RELEASE_KL_WEIGHT) -> Tensor:
    """``nll + kl_weight * kl_divergence(model)``: the training loss, ``nll`` the batch-mean NLL."""
    return nll + kl_weight * kl_divergence(model)


def resample(model: nn.Module) -> None:
    """Draw a new eps in every Bayesian layer of ``model`` (used by the next forward in fixed mode)."""
    for layer in bayes_layers(model):
        layer.resample()


def set_sample_mode(model: nn.Module, mode: str) -> dict[BayesLayer, str]:
    """Put every Bayesian layer in ``mode`` (``"sample"``, ``"fixed"`` or ``"mean"``); returns the old modes."""
    if mode not in SAMPLE_MODES:
        raise ValueError(f"sample mode must be one of {SAMPLE_MODES}, got {mode!r}")
    previous = {}
    for layer in bayes_layers(model):
        previous[layer] = layer.sample_mode
        layer.sample_mode = mode
    return previous


def _restore(previous: Mapping[BayesLayer, str]) -> None:
    for layer, mode in previous.items():
        layer.sample_mode = mode


@contextlib.contextmanager
def fixed_sample(model: nn.Module, new_sample: bool = True) -> Iterator[nn.Module]:
    """Inside the block every forward of a Bayesian layer reuses one eps.

    On entry each layer draws a new eps (``new_sample=True``) or keeps its last drawn one
    (``new_sample=False``: reuse the sample of the previous forward; one is drawn where there is
    none). The previous modes are restored on exit; the eps stays the last drawn one.
    """
    if new_sample:
        resample(model)
    previous = set_sample_mode(model, "fixed")
    try:
        yield model
    finally:
        _restore(previous)


@contextlib.contextmanager
def mean_weights(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block every Bayesian layer uses its means (``w = mu``), no sampling."""
    previous = set_sample_mode(model, "mean")
    try:
        yield model
    finally:
        _restore(previous)


@contextlib.contextmanager
def posterior_mean(model: nn.Module) -> Iterator[nn.Module]:
    """The deterministic network of the posterior means, with the scales frozen.

    Sharpness and loss landscapes are defined for one set of weights: inside the block the
    Bayesian layers use ``w = mu`` and their ``*_rho`` parameters have ``requires_grad=False``,
    so Hessians and directions cover the means only (the parameters OT-MDR perturbs). A
    model without Bayesian layers passes through unchanged.
    """
    scales = [rho for layer in bayes_layers(model) for _, rho in layer._pairs()]
    flags = [rho.requires_grad for rho in scales]
    for rho in scales:
        rho.requires_grad_(False)
    try:
        with mean_weights(model):
            yield model
    finally:
        for rho, flag in zip(scales, flags):
            rho.requires_grad_(flag)


def bayes_param_groups(model: nn.Module, scale_group_options: Mapping[str, Any] | None = None,
                       **group_options: Any) -> list[dict[str, Any]]:
    """Param groups for OT-MDR / SAM on a Bayesian model: perturb the means, train the scales.

    Returns ``[{"params": means, "perturb": True, **group_options},
    {"params": scales, "perturb": False, **group_options, **scale_group_options}]`` where the
    means are every ``*_mu`` plus every non-Bayesian parameter (batch norm, ...) and the scales
    every ``*_rho``. A group that would be empty (no Bayesian layer, or a model made only of
    Bayesian parameters' scales) is left out. Parameters keep ``model.parameters()`` order.
    """
    if "params" in group_options or "perturb" in group_options:
        raise ValueError("bayes_param_groups sets 'params' and 'perturb' itself")
    scale_ids = {id(rho) for layer in bayes_layers(model) for _, rho in layer._pairs()}
    means: list[nn.Parameter] = []
    scales: list[nn.Parameter] = []
    for p in model.parameters():
        (scales if id(p) in scale_ids else means).append(p)
    groups = []
    if means:
        groups.append({"params": means, "perturb": True, **group_options})
    if scales:
        groups.append({"params": scales, "perturb": False, **group_options, **dict(scale_group_options or {})})
    return groups


def bayesianize(module: nn.Module, **prior_kwargs: Any) -> nn.Module:
    """Replace every ``nn.Linear`` / ``nn.Conv2d`` in ``module`` (in place) by a Bayesian layer.

    The new layers have the same shapes, strides, padding, dilation, groups and bias flag, on the
    same device and dtype, and the fresh release initialisation (nothing is copied from the
    deterministic weights). ``prior_kwargs``: ``prior_std``, ``mu_init_std``, ``rho_init_mean``,
    ``rho_init_std``. Everything else (batch norm, activations, pooling) is left as it is.
    Returns ``module`` (or the replacement, if ``module`` itself is a Linear / Conv2d).
    """
    allowed = {"prior_std", "mu_init_std", "rho_init_mean", "rho_init_std"}
    unknown = set(prior_kwargs) - allowed
    if unknown:
        raise TypeError(f"unknown Bayesian layer option(s) {sorted(unknown)}; known: {sorted(allowed)}")

    def convert(m: nn.Module) -> nn.Module | None:
        if type(m) is nn.Linear:
            return BayesLinear(m.in_features, m.out_features, m.bias is not None, **prior_kwargs,
                               device=m.weight.device, dtype=m.weight.dtype)
        if type(m) is nn.Conv2d:
            if m.padding_mode != "zeros" or isinstance(m.padding, str):
                raise ValueError(f"bayesianize supports zero padding given as numbers only, got {m}")
            # _pair: torch types a Conv2d's kernel_size, stride, padding and dilation as tuple[int, ...]
            return BayesConv2d(m.in_channels, m.out_channels, _pair(m.kernel_size), _pair(m.stride), _pair(m.padding),
                               m.bias is not None, dilation=_pair(m.dilation), groups=m.groups, **prior_kwargs,
                               device=m.weight.device, dtype=m.weight.dtype)
        if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)):
            raise TypeError(f"bayesianize does not know how to convert {type(m).__name__}")
        return None

    replacement = convert(module)
    if replacement is not None:
        return replacement
    for name, child in list(module.named_children()):
        new = convert(child)
        if new is not None:
            setattr(module, name, new)
        else:
            bayesianize(child, **prior_kwargs)
    return module
