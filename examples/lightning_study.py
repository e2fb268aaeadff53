"""Does OT-MDR help *my* model? The project's study protocol around a Lightning training loop.

Why this file exists: a user with their own training code (here a ``LightningModule``) should get
what ``otmdr compare`` gives the zoo without forking anything: each method's radius searched on a
validation split at seeds apart from the evaluation seeds, the chosen settings over several seeds,
paired intervals with equivalence (TOST) and Holm verdicts, the compute each method spent, and a
report with figures. The only contract is ``train(config, seed) -> metrics``
(:func:`otmdr.study.compare`); everything inside it is ordinary Lightning.

The optimizer is used in manual optimization: ``opt.step(loss_fn, batch=...)`` runs every pass of
a step itself (SAM: 2, OT-MDR: its ascent steps plus the final pass), which Lightning's automatic
optimization would otherwise drive through its closure.

    python examples/lightning_study.py                      # digits, 3 seeds: about a minute
    python examples/lightning_study.py --seeds 5 --epochs 30 --out runs/lightning-study
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, TensorDataset

from otmdr import OTMDR, SAM
from otmdr.study import compare


class Classifier(L.LightningModule):
    """An MLP on 8x8 digits, trained by SGD, SAM or OT-MDR as ``config`` says."""

    def __init__(self, config: dict) -> None:
        super().__init__()
        self.config = config
        self.automatic_optimization = False  # opt.step(loss_fn, batch=...) runs the passes
        self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 128), torch.nn.ReLU(),
                                       torch.nn.Linear(128, 10))
        self.gradient_evaluations = 0.0

    def configure_optimizers(self):
        method, lr = self.config["method"], self.config.get("lr", 0.05)
        base = dict(lr=lr, momentum=0.9, weight_decay=5e-4)
        if method == "sgd":
            return torch.optim.SGD(self.parameters(), **base)
        if method == "sam":
            return SAM(self.net, torch.optim.SGD, rho=self.config["rho"], **base)
        return OTMDR(self.net, torch.optim.SGD, rho=self.config["rho"], **base)

    def training_step(self, batch, _):
        opt = self.optimizers().optimizer
        if isinstance(opt, OTMDR):  # SAM and OT-MDR
            result = opt.step(lambda b: F.cross_entropy(self.net(b[0]), b[1]), batch=batch)
            self.gradient_evaluations += result.gradient_evaluations
            self.log("radius", result.perturbation_norm, on_epoch=True)
        else:
            opt.zero_grad()
            self.manual_backward(F.cross_entropy(self.net(batch[0]), batch[1]))
            opt.step()
            self.gradient_evaluations += 1.0


def _digits(seed: int) -> tuple[TensorDataset, TensorDataset, TensorDataset]:
    """Train / validation / test splits; 40% of the training labels replaced by a wrong class
    (the regime where sharpness-aware training is known to pay). The split and the noise depend
    on ``seed``; the test set is the same for every seed."""
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32).view(-1, 1, 8, 8)
    y = torch.tensor(y)
    x_rest, x_test, y_rest, y_test = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    x_train, x_val, y_train, y_val = train_test_split(x_rest, y_rest, test_size=0.2, random_state=seed)
    generator = torch.Generator().manual_seed(seed)
    flip = torch.rand(len(y_train), generator=generator) < 0.4
    wrong = (y_train + torch.randint(1, 10, (len(y_train),), generator=generator)) % 10
    y_noisy = torch.where(flip, wrong, y_train)
    return TensorDataset(x_train, y_noisy), TensorDataset(x_val, y_val), TensorDataset(x_test, y_test)


def _accuracy_and_nll(net: torch.nn.Module, data: TensorDataset) -> tuple[float, float]:
    x, y = data.tensors
    with torch.no_grad():
        logits = net(x)
    return float((logits.argmax(1) == y).float().mean()), float(F.cross_entropy(logits, y))


EPOCHS = 20


def train(config: dict, seed: int) -> dict:
    """The function the study calls: one Lightning fit, then validation and test metrics."""
    L.seed_everything(seed, workers=True, verbose=False)
    train_set, val_set, test_set = _digits(seed)
    model = Classifier(config)
    trainer = L.Trainer(max_epochs=config.get("epochs", EPOCHS), accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        deterministic=True)
    trainer.fit(model, DataLoader(train_set, batch_size=64, shuffle=True))
    model.eval()
    val_accuracy, _ = _accuracy_and_nll(model.net, val_set)
    test_accuracy, test_nll = _accuracy_and_nll(model.net, test_set)
    radius = float(trainer.callback_metrics.get("radius_epoch", 0.0))
    return {"val_accuracy": val_accuracy, "test_accuracy": test_accuracy, "test_nll": test_nll, "radius": radius,
            "gradient_evaluations": model.gradient_evaluations}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--out", type=Path, default=Path("runs/lightning-study"))
    args = parser.parse_args()
    methods = {"sgd": {"method": "sgd", "epochs": args.epochs},
               "sam": {"method": "sam", "rho": 0.1, "epochs": args.epochs},
               "otmdr": {"method": "otmdr", "rho": [0.05, 0.1], "epochs": args.epochs}}
    grid = {"sam": {"rho": [0.05, 0.1, 0.2]}, "otmdr": {"rho": [[0.025, 0.05], [0.05, 0.1], [0.1, 0.2]]}}
    compare(train, methods=methods, grid=grid, seeds=args.seeds, out=args.out, references=["sgd", "sam"],
            title="a Lightning module (examples/lightning_study.py)")


if __name__ == "__main__":
    main()
