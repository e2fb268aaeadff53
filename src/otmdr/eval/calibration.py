"""Temperature scaling (Guo et al., 2017): one scalar T fitted on validation logits by NLL."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["fit_temperature"]


def fit_temperature(logits: Tensor, labels: Tensor, max_iter: int = 100) -> float:
    """The T > 0 minimising the NLL of softmax(logits / T); optimised over log T with L-BFGS."""
    logits, labels = logits.detach().float().cpu(), labels.detach().cpu()
    log_t = torch.zeros((), requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().exp())
