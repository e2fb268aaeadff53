"""AutoAttack (Croce & Hein, 2020) through the optional package ``pyautoattack``.

AutoAttack runs a fixed sequence of parameter-free attacks (APGD-CE, targeted APGD, targeted FAB,
Square for the standard version; APGD-CE and APGD-DLR with expectation over transformation for
randomized models such as Bayesian networks), each on the points the earlier ones left correctly
classified. Its robust accuracy is a much harder bar than hand-tuned PGD.

``pyautoattack`` is imported only when an evaluation runs, so ``otmdr`` works without it; a missing
package raises :class:`MissingDependencyError`. As with :mod:`otmdr.eval.attacks`, the model must
take [0, 1] images (wrap it with :class:`~otmdr.eval.attacks.Normalized`); it runs in eval mode and
gets its mode back afterwards.

Around pyautoattack 0.2 this module also: runs the stages one at a time to report the accuracy
after each (the package only returns the final examples); caps the number of target classes at
``n_classes - 1`` (the package asks for 9 and fails with an IndexError on fewer than 10 classes);
casts its float32 inputs to the model's dtype; keeps the caller's random state and trace function
(the package reseeds the global generator and calls ``sys.settrace(None)``).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import sys
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ._mode import eval_mode

__all__ = ["MissingDependencyError", "autoattack_accuracy", "ATTACKS", "VERSION_ATTACKS"]

_INSTALL_HINT = ("AutoAttack needs the optional package pyautoattack: pip install 'otmdr[autoattack]' "
                 "(or pip install pyautoattack)")
_NORMS = {"linf": "Linf", "l2": "L2"}
#: the attacks pyautoattack can run (``version="custom"`` picks from these)
ATTACKS = ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t")
#: the sequence of each fixed version (pyautoattack 0.2, L-infinity and L2)
VERSION_ATTACKS = {"standard": ("apgd-ce", "apgd-t", "fab-t", "square"), "rand": ("apgd-ce", "apgd-dlr")}
# The DLR loss divides by the gap between the largest and third-largest logit, its targeted form
# by the gap to the mean of the third and fourth: fewer classes and pyautoattack fails on indexing.
_MIN_CLASSES = {"apgd-dlr": 3, "apgd-t": 4}
_TARGETED = ("apgd-t", "fab-t")


class MissingDependencyError(ImportError):
    """An optional package a feature needs is not installed; the message says how to install it."""


def _import_autoattack() -> Any:
    try:
        import pyautoattack
    except ImportError as exc:
        if exc.name != "pyautoattack":  # installed but broken: show the real failure
            raise
        raise MissingDependencyError(_INSTALL_HINT) from exc
    return pyautoattack


class _Float32Inputs(nn.Module):
    """pyautoattack casts images to float32; run the model in its own dtype and return float32
    logits so that float64 (or half) models work too."""

    def __init__(self, model: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.model = model
        self.dtype = dtype

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x.to(self.dtype)).to(torch.float32)


class _DropRepeats(logging.Filter):
    """Each stage is a separate pyautoattack run that repeats its checks' warnings: show each once."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[tuple[int, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.levelno, record.getMessage())
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


@contextlib.contextmanager
def _autoattack_logging(verbose: bool) -> Iterator[logging.Logger]:
    """Without ``verbose`` only the 'auto-attack' logger's warnings (its sanity checks) get
    through; with it the logger stays as the application configured it."""
    logger = logging.getLogger("auto-attack")
    level = logger.level
    repeats = _DropRepeats()
    if not verbose and logger.getEffectiveLevel() < logging.WARNING:
        logger.setLevel(logging.WARNING)
    logger.addFilter(repeats)
    try:
        yield logger
    finally:
        logger.removeFilter(repeats)
        logger.setLevel(level)


@contextlib.contextmanager
def _keep_trace_function() -> Iterator[None]:
    """pyautoattack's dynamic-defence check ends with ``sys.settrace(None)``, which would switch
    off a debugger or coverage for the rest of the program: put the caller's back."""
    tracer = sys.gettrace()
    try:
        yield
    finally:
        if sys.gettrace() is not tracer:
            sys.settrace(tracer)


def _rng_devices(device: torch.device) -> list[int]:
    if device.type != "cuda":
        return []
    current = torch.cuda.current_device()
    return sorted({current, current if device.index is None else device.index})


def _collect(data: tuple[Tensor, Tensor] | Iterable[tuple[Tensor, Tensor]],
             max_examples: int | None) -> tuple[Tensor, Tensor]:
    """All examples in one tensor: AutoAttack runs each stage over the whole set."""
    if isinstance(data, Sequence) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        data = [(data[0], data[1])]
    xs: list[Tensor] = []
    ys: list[Tensor] = []
    n = 0
    for x, y in data:
        xs.append(x.detach())
        ys.append(y.detach())
        n += len(y)
        if max_examples is not None and n >= max_examples:
            break
    if n == 0:
        raise ValueError("AutoAttack: no examples to attack")
    x, y = torch.cat(xs)[:max_examples], torch.cat(ys)[:max_examples].long()
    if x.dim() != 4 or len(x) != len(y):
        raise ValueError(f"AutoAttack needs images (N, C, H, W) and N labels, got {tuple(x.shape)} "
                         f"and {tuple(y.shape)}")
    x = x.to(torch.float32)
    if float(x.min()) < -1e-5 or float(x.max()) > 1 + 1e-5:
        raise ValueError(f"AutoAttack needs images in [0, 1] (got values in [{float(x.min()):.3g}, "
                         f"{float(x.max()):.3g}]): undo the normalisation and wrap the model with "
                         "otmdr.eval.attacks.Normalized")
    return x.clamp(0.0, 1.0), y


def _check_attacks(version: str, attacks: Sequence[str] | None) -> list[str]:
    if version == "custom":
        if not attacks:
            raise ValueError(f"version='custom' needs attacks, a list from {list(ATTACKS)}")
        unknown = [a for a in attacks if a not in ATTACKS]
        if unknown or len(set(attacks)) != len(attacks):
            raise ValueError(f"attacks must be distinct names from {list(ATTACKS)}, got {list(attacks)}")
        return list(attacks)
    if version not in VERSION_ATTACKS:
        raise ValueError(f"unknown AutoAttack version {version!r}: choose standard, rand or custom")
    if attacks is not None:
        raise ValueError(f"attacks are fixed by version={version!r}; pass version='custom' to choose them")
    return list(VERSION_ATTACKS[version])


def _check_classes(attacks: list[str], n_classes: int, version: str) -> None:
    impossible = [a for a in attacks if n_classes < _MIN_CLASSES.get(a, 2)]
    if not impossible:
        return
    needs = " and ".join(f"{a} needs at least {_MIN_CLASSES[a]}" for a in impossible)
    feasible = [a for a in attacks if a not in impossible] or ["apgd-ce"]
    eot = ", eot_iter=20" if version == "rand" else ""
    raise ValueError(f"the model has {n_classes} classes but AutoAttack's {needs} ({version} version); "
                     f"run version='custom', attacks={feasible}{eot} instead")


def _perturbation_size(delta: Tensor, norm: str) -> float:
    flat = delta.flatten(1)
    sizes = flat.abs().amax(dim=1) if norm == "linf" else flat.norm(dim=1)
    return float(sizes.max()) if len(sizes) else 0.0


def autoattack_accuracy(model: nn.Module, data: tuple[Tensor, Tensor] | Iterable[tuple[Tensor, Tensor]],
                        eps: float, *, norm: str = "linf", version: str = "standard",
                        attacks: Sequence[str] | None = None, batch_size: int = 250, seed: int | None = 0,
                        eot_iter: int | None = None, max_examples: int | None = None,
                        verbose: bool = False) -> dict[str, Any]:
    """Clean and AutoAttack robust accuracy of ``model`` (inputs in [0, 1]) within the ``norm``
    ball of radius ``eps``.

    ``data`` is ``(images, labels)`` or an iterable of such batches (the first ``max_examples``
    are used). ``version``: ``"standard"`` (APGD-CE, APGD-T, FAB-T, Square), ``"rand"`` (APGD-CE
    and APGD-DLR averaging 20 gradient samples: for randomized models such as Bayesian networks)
    or ``"custom"`` with ``attacks`` from :data:`ATTACKS` (pyautoattack's defaults: 5 restarts of
    100 APGD / FAB steps, 5000 Square queries, 9 target classes). ``eot_iter`` overrides APGD's
    gradient samples per step. ``seed`` seeds every stage (``None``: from the clock); the caller's
    random state is left as it was.

    Returns ``clean_accuracy``; ``robust_accuracy`` (after every stage); ``stages``, the robust
    accuracy after each attack in order; ``n_examples``; ``max_perturbation`` (the largest
    ``norm`` of an adversarial example's perturbation: eps up to float32 rounding); and
    ``settings`` (eps, norm, version, attacks, n_classes, n_target_classes, eot_iter, seed,
    batch_size, pyautoattack's version).

    Raises :class:`MissingDependencyError` without pyautoattack, and ``ValueError`` when an
    attack of the sequence cannot run with the model's number of classes (the message names the
    ``version="custom"`` call that can).
    """
    if norm not in _NORMS:
        raise ValueError(f"unknown norm {norm!r}: choose linf or l2")
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"need a finite eps >= 0, got {eps}")
    if batch_size < 1 or (max_examples is not None and max_examples < 1) or (eot_iter is not None and eot_iter < 1):
        raise ValueError(f"need batch_size, max_examples and eot_iter >= 1, got {batch_size}, {max_examples}, "
                         f"{eot_iter}")
    sequence = _check_attacks(version, attacks)
    pyautoattack = _import_autoattack()
    x, y = _collect(data, max_examples)

    tensors = list(itertools.chain(model.parameters(), model.buffers()))
    device = tensors[0].device if tensors else x.device
    dtype = next((t.dtype for t in tensors if t.is_floating_point()), torch.float32)
    attacked = _Float32Inputs(model, dtype)

    with _autoattack_logging(verbose) as logger, _keep_trace_function(), eval_mode(model), \
            torch.random.fork_rng(devices=_rng_devices(device)):
        with torch.no_grad():
            logits = torch.cat([attacked(x[i:i + batch_size].to(device)) for i in range(0, len(x), batch_size)])
        n_classes = logits.shape[1]
        _check_classes(sequence, n_classes, version)
        runner = pyautoattack.AutoAttack(attacked, attacks=sequence if version == "custom" else None,
                                         device=device, eps=float(eps), norm=_NORMS[norm], seed=seed,
                                         version=version)
        for attack in (runner.apgd_targeted, runner.fab):  # "all other classes" when there are < 10
            attack.n_target_classes = min(attack.n_target_classes, n_classes - 1)
        if eot_iter is not None:
            runner.apgd.eot_iter = runner.apgd_targeted.eot_iter = eot_iter

        robust = logits.argmax(dim=1).cpu() == y.cpu()
        clean_accuracy = robust.sum().item() / len(robust)
        x_adv = x.clone()
        stages: dict[str, float] = {}
        # One pyautoattack run per stage, on the points still robust: the same sequence as its own
        # loop, which reports the accuracy after each stage only in its log.
        for attack in sequence:
            remaining = robust.nonzero().flatten()
            if len(remaining):
                runner.attacks_to_run = [attack]
                adv, predicted = runner.run_standard_evaluation(x[remaining], y[remaining], batch_size=batch_size)
                fooled = predicted.cpu() != y[remaining].cpu()
                robust[remaining[fooled]] = False
                x_adv[remaining[fooled]] = adv[fooled].to(x_adv)
            stages[attack] = robust.sum().item() / len(robust)
        at = sequence.index("square") if "square" in sequence else 0
        if at > 0:  # pyautoattack's own check, which running stage by stage bypasses
            before = stages[sequence[at - 1]]
            if stages["square"] < before - 0.002:
                drop = before - stages["square"]
                logger.warning(f"Square Attack lowered the robust accuracy by a further {drop:.2%}: "
                               "the gradient-based attacks may be unreliable on this model (gradient masking?)")

    return {
        "clean_accuracy": clean_accuracy,
        "robust_accuracy": stages[sequence[-1]],
        "stages": stages,
        "n_examples": len(y),
        "max_perturbation": _perturbation_size(x_adv - x, norm),
        "settings": {
            "eps": float(eps), "norm": norm, "version": version, "attacks": sequence,
            "n_classes": n_classes,
            "n_target_classes": runner.apgd_targeted.n_target_classes if set(sequence) & set(_TARGETED) else None,
            "eot_iter": runner.apgd.eot_iter, "seed": seed, "batch_size": batch_size,
            "pyautoattack": getattr(pyautoattack, "__version__", "unknown"),
        },
    }
