"""Temperature scaling (Guo et al., 2017): one scalar T fitted on validation logits by NLL."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["CalibrationError", "fit_temperature"]


class CalibrationError(ValueError):
    """Temperature scaling cannot be fitted: the validation outputs are not finite."""


def fit_temperature(logits: Tensor, labels: Tensor, max_iter: int = 100) -> float:
    """The T > 0 minimising the NLL of softmax(logits / T); optimised over log T with L-BFGS.
    Non-finite logits (NaN in the inputs) raise :class:`CalibrationError` instead of a traceback
    deep inside L-BFGS."""
    logits, labels = logits.detach().float().cpu(), labels.detach().cpu()
    finite = torch.isfinite(logits).all(dim=1)
    if not bool(finite.all()):
        raise CalibrationError(
            f"the model's outputs on the validation split are not finite for {int((~finite).sum())} of "
            f"{len(logits)} images (NaN or inf in those inputs?), so temperature scaling cannot be fitted: "
            "check the validation data, or set eval.temperature_scaling=false")
    log_t = torch.zeros((), requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().exp())
