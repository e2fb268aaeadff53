"""SAM and ASAM: the one-step special case of OT-MDR, as named presets."""

from __future__ import annotations

from typing import Any

import torch
from torch.optim import Optimizer

from .otmdr import OTMDR

__all__ = ["SAM", "ASAM"]


class SAM(OTMDR):
    """Sharpness-Aware Minimization (Foret et al., ICLR 2021).

    One ascent step of radius ``rho`` on the whole batch, then the base optimizer with the
    gradient at the perturbed weights. Batch-norm statistics are updated in the clean pass only.
    Every other :class:`OTMDR` keyword (``model``, ``max_grad_norm``, ``ascent_interval``, ...)
    and the base optimizer's own keywords (``lr``, ``momentum``, ...) are accepted.
    """

    def __init__(
        self,
        params: Any,
        base_optimizer: type[Optimizer] | Optimizer = torch.optim.SGD,
        *,
        rho: float = 0.05,
        adaptive: bool = False,
        adaptive_eta: float = 0.0,
        bn_policy: str = "clean",
        **kwargs: Any,
    ) -> None:
        if "preset" in kwargs:
            raise ValueError("preset is an OT-MDR option (SAM's one step has nothing to take from it): remove it")
        if not isinstance(rho, (int, float)) or isinstance(rho, bool):
            raise ValueError(f"SAM takes one radius, got rho={rho!r}; use OTMDR for several ascent steps")
        super().__init__(
            params, base_optimizer, rho=(rho,), split=(1.0,), merge=False, adaptive=adaptive,
            adaptive_eta=adaptive_eta, bn_policy=bn_policy, **kwargs,
        )


class ASAM(SAM):
    """Adaptive SAM (Kwon et al., ICML 2021): the ascent is scaled element-wise by |theta| + eta.

    Defaults follow the ASAM paper's CIFAR setting (rho 0.5, eta 0.01).
    """

    def __init__(
        self,
        params: Any,
        base_optimizer: type[Optimizer] | Optimizer = torch.optim.SGD,
        *,
        rho: float = 0.5,
        adaptive_eta: float = 0.01,
        **kwargs: Any,
    ) -> None:
        super().__init__(params, base_optimizer, rho=rho, adaptive=True, adaptive_eta=adaptive_eta, **kwargs)
