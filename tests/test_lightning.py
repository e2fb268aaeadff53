"""Lightning's automatic optimization drives the closure form; manual optimization the primitives."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from otmdr import OTMDR
from otmdr.optim import frozen_batchnorm
from conftest import data, require_oracle, tiny_mlp

L = require_oracle("lightning", "the closure form under Lightning's automatic optimization")


class Automatic(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = tiny_mlp(dtype=torch.float32, batch_norm=True)
        self.calls = 0

    def training_step(self, batch, _):
        self.calls += 1
        return F.cross_entropy(self.net(batch[0]), batch[1])

    def configure_optimizers(self):
        return OTMDR(self.net, torch.optim.SGD, lr=0.1)


class Manual(Automatic):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, _):
        opt = self.optimizers().optimizer
        x, y = batch
        opt.zero_grad()
        for part in (slice(0, 8), slice(8, 16)):
            self.manual_backward(F.cross_entropy(self.net(x[part]), y[part]))
            opt.perturb()
        self.manual_backward(F.cross_entropy(self.net(x), y))
        opt.descend()


def _loader():
    x, y = data(64, dtype=torch.float32)
    return DataLoader(TensorDataset(x, y), batch_size=16)


def _fit(module):
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, _loader())
    return trainer


def _closure_form_by_primitives():
    """What docs/optimizer.md says the closure form does, written with the primitives: every pass
    (2 ascent steps, the final pass) on the whole batch, batch norm updated by the clean pass only.
    Returns the trained network and each step's clean loss."""
    net = tiny_mlp(dtype=torch.float32, batch_norm=True)
    opt = OTMDR(net, torch.optim.SGD, lr=0.1)
    clean = []
    for x, y in _loader():
        opt.zero_grad()
        for i, move in enumerate((opt.perturb, opt.perturb, opt.descend)):
            with frozen_batchnorm(net) if i else contextlib.nullcontext():
                loss = F.cross_entropy(net(x), y)
                loss.backward()
            clean += [float(loss)] if i == 0 else []
            move()
    return net, clean


def _assert_same_network(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (name, p), (_, q) in zip([*a.named_parameters(), *a.named_buffers()], [*b.named_parameters(),
                                                                              *b.named_buffers()]):
        torch.testing.assert_close(p, q, msg=lambda text, name=name: f"{name}: {text}")


def test_automatic_optimization_calls_the_closure_for_every_pass():
    module = Automatic()
    trainer = _fit(module)
    assert module.calls == 4 * 3  # 4 batches x (2 ascent passes + the final pass)
    assert trainer.optimizers[0].step_count == 4
    _assert_same_network(module.net, _closure_form_by_primitives()[0])  # weights and batch-norm statistics


def test_manual_optimization_with_the_primitives_equals_the_one_call_step():
    module = Manual()
    _fit(module)
    reference = tiny_mlp(dtype=torch.float32, batch_norm=True)
    opt = OTMDR(reference, torch.optim.SGD, lr=0.1)
    for x, y in _loader():
        opt.step(lambda b: F.cross_entropy(reference(b[0]), b[1]), batch=(x, y))
    for p, q in zip(module.net.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q)


class Logging(Automatic):
    """Logs the clean loss once per optimizer step, as docs/optimizer.md says."""

    def __init__(self):
        super().__init__()
        self.logged = []

    def training_step(self, batch, _):
        loss = super().training_step(batch, _)
        if self.optimizers().optimizer.first_pass:
            self.logged.append(float(loss))
        return loss


def test_the_clean_loss_can_be_logged_once_per_step():
    module = Logging()
    _fit(module)
    assert module.calls == 12
    assert module.logged == pytest.approx(_closure_form_by_primitives()[1], rel=1e-6)  # the loss at the centre


def test_lightning_gradient_accumulation_is_reported_not_silently_dropped():
    module = Automatic()
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accumulate_grad_batches=2)
    with pytest.warns(UserWarning, match="accumulate_grad_batches"):
        trainer.fit(module, _loader())
