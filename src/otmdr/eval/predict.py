"""Run a model over a data split and collect logits (eval mode, no gradients)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

__all__ = ["predict_logits"]


@torch.no_grad()
def predict_logits(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], *,
                   autocast_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """Logits (float32, CPU) and labels for every batch, with the model in eval mode."""
    was_training = model.training
    model.eval()
    logits, labels = [], []
    try:
        for x, y in batches:
            if autocast_dtype is not None:
                with torch.autocast(x.device.type, dtype=autocast_dtype):
                    out = model(x)
            else:
                out = model(x)
            logits.append(out.float().cpu())
            labels.append(y.cpu())
    finally:
        model.train(was_training)
    return torch.cat(logits), torch.cat(labels)
