"""Batch-norm running statistics across the passes of one step.

Every policy is implemented by saving and restoring the running buffers (mean, var and
``num_batches_tracked``) around a pass, never by changing ``momentum``: that works for
``momentum=None`` (cumulative averages) and for any subclass of ``_BatchNorm`` (SyncBatchNorm too).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

__all__ = ["BN_POLICIES", "BatchNormState", "frozen_batchnorm"]

#: Which passes of a step update the running statistics.
#:  - ``ascent``: every ascent pass, not the final one (the OT-MDR release; for SAM = ``clean``);
#:  - ``clean``: only the first pass, at the unperturbed weights (common SAM practice);
#:  - ``all``: every pass;  ``none``: no pass.
BN_POLICIES = ("ascent", "clean", "all", "none")


class BatchNormState:
    """The running buffers of a model's batch-norm layers, to snapshot and put back."""

    def __init__(self, model: nn.Module | None):
        self.buffers: list[Tensor] = []
        self._slots: dict[str, list[Tensor]] = {}  # snapshots, allocated once and reused every step
        if model is None:
            return
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
                for name in ("running_mean", "running_var", "num_batches_tracked"):
                    buffer = getattr(module, name, None)
                    if buffer is not None:
                        self.buffers.append(buffer)

    def __bool__(self) -> bool:
        return bool(self.buffers)

    def save(self, slot: str = "step") -> list[Tensor]:
        """Copy the running buffers into the reusable snapshot ``slot`` (one fused copy, no
        allocation after the first call) and return it; valid until the next save to that slot."""
        saved = self._slots.get(slot)
        if saved is None:
            saved = self._slots[slot] = [torch.empty_like(b) for b in self.buffers]
        with torch.no_grad():
            torch._foreach_copy_(saved, self.buffers)
        return saved

    def load(self, snapshot: list[Tensor]) -> None:
        with torch.no_grad():
            torch._foreach_copy_(self.buffers, snapshot)

    def load_where(self, condition: Tensor, snapshot: list[Tensor]) -> None:
        """Put the snapshot back where ``condition`` (0-dim bool) is true, without a host sync."""
        with torch.no_grad():
            for buffer, saved in zip(self.buffers, snapshot):
                buffer.copy_(torch.where(condition.to(buffer.device), saved, buffer))

    @contextlib.contextmanager
    def frozen(self, freeze: bool = True) -> Iterator[None]:
        """Run the body; if ``freeze``, the running statistics are as before it afterwards."""
        if not freeze or not self.buffers:
            yield
            return
        snapshot = self.save("frozen")
        try:
            yield
        finally:
            self.load(snapshot)


def frozen_batchnorm(model: nn.Module) -> contextlib.AbstractContextManager[None]:
    """Context manager for custom loops: batch-norm statistics updated inside it are undone."""
    return BatchNormState(model).frozen(True)
