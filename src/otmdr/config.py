"""Experiment configuration: typed sections, loaded from YAML, overridden by ``--set key=value``.

Every key is checked: an unknown key or a value of the wrong type, outside its choices or outside
its range is a :class:`ConfigError` whose message names the key (``optim.lr``) and what was
expected, so the CLI can print one line instead of a traceback. A number's range is declared once,
next to its field (``bounded(...)``, a :class:`Bound` in the field's metadata): the check, ``otmdr
config`` and the CLI options that mirror a key (``otmdr train --epochs``) all read it there.

YAML is imported where it is used: the CLI's parser reads the bounds here, and ``otmdr --help``
needs the core dependencies only.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .optim.config import PRESETS, PerturbationConfig

if TYPE_CHECKING:
    import yaml

__all__ = ["ConfigError", "ExperimentConfig", "otmdr_options", "efficiency_options", "load_config", "describe_config",
           "comparable_config", "apply_overrides", "config_to_dict", "config_from_dict", "parse_number", "Bound",
           "BOUNDS", "SEED", "resolve_factory", "import_plugins", "PLUGINS_ENV", "LOGGERS", "check_loggers"]

METHODS = ("sgd", "sam", "asam", "otmdr")


class ConfigError(ValueError):
    """A configuration problem, with a message that names the key and the fix."""


@dataclass(frozen=True)
class Bound:
    """The allowed values of a number: ``low <= x <= high``, ``<`` at an end marked open, finite.

    ``why`` says why the upper end is where it is (shown when a value passes it): the upper ends
    are not limits of the arithmetic but the point past which a value is a typo or a run that
    would not finish (an array too large to allocate, weeks of compute), refused before any work.
    """

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    why: str = ""

    def text(self) -> str:
        """``>= 0``, ``> 0``, ``in [1, 1000]``, ``in [0, 1)``: how ``otmdr config`` and errors show it."""
        if self.low is not None and self.high is not None:
            return (f"in {'(' if self.low_open else '['}{_shown(self.low)}, {_shown(self.high)}"
                    f"{')' if self.high_open else ']'}")
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {_shown(self.low)}"
        if self.high is not None:
            return f"{'<' if self.high_open else '<='} {_shown(self.high)}"
        return "any finite number"

    def problem(self, value: float) -> str | None:
        """None for an allowed value, else what is wrong: ``must be in [1, 1000], got 0``."""
        if isinstance(value, float) and not math.isfinite(value):
            return f"must be a finite number ({self.text()}), got {value!r}"
        low, high = self.low, self.high
        if low is not None and (value <= low if self.low_open else value < low):
            return f"must be {self.text()}, got {value!r}"
        if high is not None and (value >= high if self.high_open else value > high):
            return f"must be {self.text()}, got {value!r}" + (f" ({self.why})" if self.why else "")
        return None


def _shown(number: float) -> str:
    return str(int(number)) if float(number).is_integer() else repr(number)


def bounded(default: Any = None, low: float | None = None, high: float | None = None, *, low_open: bool = False,
            high_open: bool = False, why: str = "", factory: Any = None, like: Bound | None = None) -> Any:
    """A dataclass field whose value (each item, for a list) must lie in ``Bound(low, high, ...)``
    (or in ``like``, a Bound shared with other fields and options, such as SEED)."""
    metadata = {"bound": like or Bound(low, high, low_open, high_open, why)}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


#: Seeds: what numpy and most tools accept, so a seed can be reused elsewhere (torch takes 64 bits).
SEED = Bound(0, 2**32 - 1, why="the seed range of numpy and most tools")
_EPOCHS = "past 100000 epochs a run does not finish; train.epochs counts passes over the training split"
_WIDTH = "a padding or square wider than any image otmdr reads (CIFAR's usual: 4 and 16)"
_THREADS = "more threads than cores only slow torch down"
_BINS = "more bins hold too few images each to estimate anything (15 is usual)"
_SAMPLES = "each is one more pass over the evaluated sets (30 is the release's)"
_PARTICLES = "each particle is one more set of ascent passes per step (K <= 4 in the paper)"


@dataclass
class DataConfig:
    name: str = "digits"  # a registered dataset (otmdr datasets); with data.factory, set to the factory's path
    factory: str | None = None  # "module:function" returning your own splits (docs/your-model.md)
    options: dict[str, Any] = field(default_factory=dict)  # keyword arguments of data.factory
    dir: str | None = None  # the directory (or archive) holding the dataset; not needed for digits
    cache_dir: str | None = None  # where decoded image folders are cached (default ~/.cache/otmdr)
    val_fraction: float = bounded(0.1, 0, 1, high_open=True)  # of the training set, held out (seeded) for validation
    train_limit: int | None = bounded(None, 1)  # use a seeded subset of this many training images
    test_limit: int | None = bounded(None, 1)  # evaluate on a fixed random subset of N test images (data.test_subset)
    batch_size: int = bounded(128, 1)  # the global batch: under torchrun split over (and divisible by) the processes
    eval_batch_size: int = bounded(512, 1)
    crop_padding: int = bounded(0, 0, 128, why=_WIDTH)  # random crop with this zero padding
    flip: bool = False  # random horizontal flip
    cutout: int = bounded(0, 0, 512, why=_WIDTH)  # cutout square size (0: off)
    # synthetic label noise on the training split (otmdr.data.noise): the fraction of wrong labels,
    # drawn once over the training file with its own seed, independent of train.seed
    label_noise: float = bounded(0.0, 0, 1, high_open=True)  # fraction of training labels replaced by a wrong class
    label_noise_kind: str = "symmetric"  # symmetric (uniform over the other classes) | pairflip (c -> c+1)
    label_noise_seed: int = bounded(0, like=SEED)  # which labels are wrong: independent of train.seed
    noisy_val: bool = False  # also corrupt the validation labels (a user who only has noisy labels)


@dataclass
class ModelConfig:
    name: str = "mlp"  # a registered model (otmdr models); with model.factory, set to the factory's path
    factory: str | None = None  # "module:function" building your own model (docs/your-model.md)
    options: dict[str, Any] = field(default_factory=dict)  # passed to the model builder (or model.factory)


@dataclass
class OptimConfig:
    method: str = "otmdr"  # sgd | sam | asam | otmdr
    base: str = "sgd"  # sgd | adam | adamw: the base optimizer of sam/asam/otmdr (and sgd's own)
    lr: float = bounded(0.1, 0)
    momentum: float = bounded(0.9, 0, 1, high_open=True)  # base sgd (1 or more never forgets a gradient)
    nesterov: bool = False  # Nesterov momentum (base sgd)
    weight_decay: float = bounded(5e-4, 0)
    max_grad_norm: float | None = bounded(None, 0, low_open=True)  # clip the gradient norm to this (null: off)


@dataclass
class SAMConfig:
    rho: float = bounded(0.05, 0)  # radius (the measured radius equals it)
    bn_policy: str = "clean"  # ascent | clean | all | none: passes that update batch-norm statistics
    sync_ascent: bool = False  # torchrun: all-reduce the ascent gradient (one shared neighbour), not per process


@dataclass
class ASAMConfig:
    rho: float = bounded(0.5, 0)  # radius in the |theta|-rescaled space
    adaptive_eta: float = bounded(0.01, 0)  # T = |theta| + adaptive_eta (was asam.eta, still read)
    bn_policy: str = "clean"  # ascent | clean | all | none
    sync_ascent: bool = False  # torchrun: all-reduce the ascent gradient (one shared neighbour), not per process


@dataclass
class OTMDRConfig:
    preset: str = "default"  # default | release (the authors' code): fills rho, normalize, bn_policy left unset
    rho: list[float] | None = None  # radius of each ascent step (unset: default [0.02, 0.04], release [0.05, 0.1])
    split: list[float] | None = None  # batch fraction per ascent step (default: equal parts)
    merge: bool = True  # step i moves along the sum of the ascent gradients so far
    normalize: str | None = None  # merged (default: by the merged direction's norm) | step (release: its own's)
    reduce: str = "sum"  # sum | mean, of the merged direction (and the particles unless particle_reduce)
    particle_reduce: str | None = None  # None: as reduce; the release's K > 1 "mode 1.1": reduce sum, this mean
    noise_std: float = bounded(0.0, 0)  # Langevin noise std per coordinate after each ascent step
    adaptive: bool = False  # ASAM-style scaling by |theta| + adaptive_eta
    adaptive_eta: float = bounded(0.0, 0)  # ASAM-style T = |theta| + adaptive_eta
    particles: int = bounded(1, 1, 1024, why=_PARTICLES)  # K particles, each on its own random split (cost: linear)
    bn_policy: str | None = None  # clean (default) | ascent (release) | all | none
    # torchrun: all-reduce the ascent gradients too (every process moves to the same neighbour,
    # as one process with the global batch would); false: each process ascends on its own shard
    # under no_sync (per-replica neighbours, SAM's m-sharpness) and only the final gradient is reduced
    sync_ascent: bool = False  # torchrun: all-reduce the ascent gradients (false: per-process neighbours)

    def __post_init__(self) -> None:
        # the preset's values are written in, so a saved config.yaml says what ran; an unknown
        # preset is left for _check_values to report with the key named
        preset = PRESETS.get(self.preset)
        if preset is not None:
            for name, value in dataclasses.asdict(preset).items():
                if getattr(self, name) is None:
                    setattr(self, name, list(value) if isinstance(value, tuple) else value)


def otmdr_options(section: OTMDRConfig) -> dict[str, Any]:
    """The ``otmdr`` config section as keyword arguments of :class:`otmdr.optim.OTMDR` (the
    preset is already applied to the section's values)."""
    options = dataclasses.asdict(section)
    del options["preset"]
    assert section.rho is not None, "the preset fills rho in when the config is read"
    options["rho"] = tuple(section.rho)
    options["split"] = None if section.split is None else tuple(section.split)
    return options


@dataclass
class EfficiencyConfig:
    """Cheaper sharpness-aware steps (methods sam, asam, otmdr; sgd takes none of these keys)."""

    interval: int = bounded(1, 1)  # the sharpness-aware step every k-th step only (1: every step)
    reuse: bool = False  # with interval > 1, the steps between are LookSAM steps (plain gradient + stored component)
    reuse_alpha: float = bounded(0.7, 0)  # LookSAM's alpha: weight of the stored component in a reuse step
    phase_start: float = bounded(0.0, 0, 1, high_open=True)  # plain steps until this fraction of the steps (0: off)
    trigger: list[float] | None = bounded(None)  # AE-SAM thresholds c: [c] or [c_first, c_last] (null: off)
    trigger_decay: float = bounded(0.9, 0, 1, low_open=True, high_open=True)  # AE-SAM: decay of the norm statistics
    momentum_ascent: str = "none"  # none | first | all: ascent steps along the momentum buffer (MSAM)


def efficiency_options(section: EfficiencyConfig) -> dict[str, Any]:
    """The ``efficiency`` config section as keyword arguments of :class:`otmdr.optim.OTMDR`
    (and SAM, ASAM): ``interval`` is ``ascent_interval``, ``trigger`` a tuple (or None)."""
    return {"ascent_interval": section.interval, "reuse": section.reuse, "reuse_alpha": section.reuse_alpha,
            "phase_start": section.phase_start,
            "trigger": None if section.trigger is None else tuple(section.trigger),
            "trigger_decay": section.trigger_decay, "momentum_ascent": section.momentum_ascent}


@dataclass
class ScheduleConfig:
    name: str = "cosine"  # cosine | step | constant
    warmup_epochs: float = bounded(0.0, 0, 100000, why=_EPOCHS)  # linear warm-up (fractions of an epoch allowed)
    milestones: list[float] = bounded(factory=list, low=0, low_open=True)  # epochs, for "step"
    gamma: float = bounded(0.1, 0)  # step decay factor


@dataclass
class TrainConfig:
    epochs: int = bounded(10, 1, 100000, why=_EPOCHS)
    label_smoothing: float = bounded(0.0, 0, 1, high_open=True)
    seed: int = bounded(0, like=SEED)  # initialisation, data order, validation split, optimizer noise
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "fp32"  # fp32 | bf16 | fp16 (fp16 uses a GradScaler)
    channels_last: bool = False
    progress: bool = True
    threads: int | None = bounded(None, 1, 1024, why=_THREADS)  # torch CPU threads (default: torch's choice)
    sync_batchnorm: bool = False  # torchrun on CUDA: batch-norm statistics over the global batch (SyncBatchNorm)
    # under torchrun: ddp replicates the model (DistributedDataParallel), fsdp shards parameters, gradients and
    # optimizer state over the processes (FSDP2, docs/distributed.md); fsdp without torchrun is refused
    strategy: str = "ddp"  # ddp | fsdp: how the processes of a torchrun launch share the model
    # where every epoch's metrics also stream (rank 0): RUN/tensorboard/, RUN/wandb/ (offline unless WANDB_MODE
    # says otherwise), each an extra (pip install 'otmdr[tensorboard]'); csv is RUN/metrics.csv, always written
    loggers: list[str] = field(default_factory=list)  # csv | tensorboard | wandb: stream the metrics to these too


@dataclass
class EnsembleConfig:
    """How an ensemble model (e.g. ``lenet-x3``) is trained."""

    # joint: loss on the averaged probability, one global perturbation norm (the release);
    # per-member: each member its own loss and its own perturbation norm (the paper's
    # formulation; with optim.method=sgd this is a classic deep ensemble trained in one loop)
    regime: str = "joint"


@dataclass
class BayesConfig:
    """Bayesian (``bayes-*``) models: loss = NLL + kl_weight * KL(q || prior), KL summed over layers."""

    kl_weight: float = bounded(5.0e-6, 0)  # the release's beta; 1/N (N = training-set size) is the textbook ELBO
    # whether the sigma gradients count in the ascent norm although only the means move (the
    # release's BNN step: true; ours by default: the norm of the moved means only)
    sigma_in_norm: bool = False
    test_samples: int = bounded(30, 1, 1000, why=_SAMPLES)  # Monte-Carlo samples of the predictive at evaluation


@dataclass
class EvalConfig:
    ece_bins: int = bounded(15, 1, 1000, why=_BINS)  # equal-width confidence bins of the ECE
    temperature_scaling: bool = True  # also report metrics after fitting T on the validation split


@dataclass
class ExperimentConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sam: SAMConfig = field(default_factory=SAMConfig)
    asam: ASAMConfig = field(default_factory=ASAMConfig)
    otmdr: OTMDRConfig = field(default_factory=OTMDRConfig)
    efficiency: EfficiencyConfig = field(default_factory=EfficiencyConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    ensemble: EnsembleConfig = field(default_factory=EnsembleConfig)
    bayes: BayesConfig = field(default_factory=BayesConfig)


CHOICES = {
    "optim.method": METHODS,
    "optim.base": ("sgd", "adam", "adamw"),
    "sam.bn_policy": ("ascent", "clean", "all", "none"),
    "asam.bn_policy": ("ascent", "clean", "all", "none"),
    "otmdr.preset": tuple(PRESETS),
    "otmdr.bn_policy": ("ascent", "clean", "all", "none"),
    "otmdr.normalize": ("step", "merged"),
    "data.label_noise_kind": ("symmetric", "pairflip"),
    "otmdr.reduce": ("sum", "mean"),
    "otmdr.particle_reduce": (None, "sum", "mean"),
    "schedule.name": ("cosine", "step", "constant"),
    "train.precision": ("fp32", "bf16", "fp16"),
    "train.strategy": ("ddp", "fsdp"),
    "ensemble.regime": ("joint", "per-member"),
    "efficiency.momentum_ascent": ("none", "first", "all"),
}
#: ``train.loggers``: each logger and the package it needs, which is also its extra (``otmdr[tensorboard]``)
LOGGERS: dict[str, str | None] = {"csv": None, "tensorboard": "tensorboard", "wandb": "wandb"}
#: Every number's allowed range, ``section.key -> Bound``, read from the fields' ``bounded(...)``
#: declarations. ``otmdr.rho`` and ``otmdr.split`` are the optimizer's own options, checked by
#: ``PerturbationConfig`` (with the section named).
BOUNDS: dict[str, Bound] = {
    f"{section.name}.{f.name}": f.metadata["bound"]
    for section in dataclasses.fields(ExperimentConfig)
    for f in dataclasses.fields(typing.get_type_hints(ExperimentConfig)[section.name])
    if "bound" in f.metadata
}


def config_from_dict(data: dict[str, Any]) -> ExperimentConfig:
    """Build and validate a config from nested dicts (as read from YAML).

    The plugin modules of ``$OTMDR_IMPORT`` (``--import``) are imported first, so a model or
    dataset they register is known here, in worker processes too. A config with a factory
    (``model.factory``, ``data.factory``) records the factory's path as ``model.name`` /
    ``data.name``: summaries and reports name what ran."""
    import_plugins()
    config = _build(ExperimentConfig, data or {}, "")
    if config.model.factory is not None:
        config.model.name = config.model.factory
    if config.data.factory is not None:
        config.data.name = config.data.factory
    _check_values(config)
    return config


def config_to_dict(config: ExperimentConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read a YAML config (or start from the defaults), apply ``key=value`` overrides, validate."""
    import yaml

    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist (the configs/ folder has examples)")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError:
            raise ConfigError(f"config file {path} is not a text file (not UTF-8): pass a YAML config") from None
        except yaml.YAMLError as error:
            raise ConfigError(f"config file {path} is not valid YAML: {_yaml_problem(error)}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(data).__name__}")
    config = config_from_dict(apply_overrides(data, overrides or []))
    _refuse_one_step(config)
    check_loggers(config.train.loggers)  # a new run's (a saved run's config stays readable without them)
    return config


def check_loggers(kinds: list[str]) -> None:
    """Every logger of ``train.loggers`` can be imported here, or a one-line ConfigError naming the extra
    (before any run folder is made: ``otmdr train`` and ``otmdr compare`` check it when they read the config)."""
    import importlib.util

    for kind in kinds:
        package = LOGGERS.get(kind)
        if package is None:
            continue
        try:
            found = importlib.util.find_spec(package) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            raise ConfigError(f"config key train.loggers: {kind} needs the {package} package, which is not installed: "
                              f"pip install 'otmdr[{package}]'")


def _refuse_one_step(config: ExperimentConfig) -> None:
    """A new config (not a saved run's, which stays readable) whose ``otmdr`` section is SAM or
    ASAM under OT-MDR's name: one ascent step on the whole batch, no noise, one particle."""
    from .optim.config import sam_equivalent

    section = config.otmdr
    same = sam_equivalent(PerturbationConfig(**otmdr_options(section)))
    if same is None:
        return
    rho = section.rho[0] if section.rho else 0.0
    pair = f"[{rho / 2:g},{rho:g}]"
    instead = (f"method asam with asam.rho={rho:g} asam.adaptive_eta={section.adaptive_eta:g}" if same == "ASAM"
               else f"method sam with sam.rho={rho:g}")
    grid = f"otmdr.rho={pair},[{rho:g},{2 * rho:g}]"
    raise ConfigError(f"config key otmdr.rho: {section.rho} has one entry, and OT-MDR with one ascent step is "
                      f"{same}: use {instead} (--method / --methods {same.lower()}), or give one radius per ascent "
                      f"step: otmdr.rho={pair} (in a --grid, bracket each value: {grid})")


#: The environment variable listing plugin modules (comma-separated) that every otmdr process
#: imports before it reads a config: ``--import`` adds to it, so worker processes inherit it.
PLUGINS_ENV = "OTMDR_IMPORT"


def _importable_here() -> None:
    """The current folder on ``sys.path`` (last, shadowing nothing), as ``python -m`` has it: a
    user's module beside their config is found by the ``otmdr`` command and its workers too."""
    import os
    import sys

    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)


def _import(module: str, what: str) -> types.ModuleType:
    """Import ``module`` or raise a one-line ConfigError that names ``what`` asked for it."""
    import importlib

    _importable_here()
    if not module or not all(part.isidentifier() for part in module.split(".")):
        raise ConfigError(f"{what}: {module!r} is not a module name (dotted Python names, e.g. mypkg.models)")
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        if error.name and module != error.name and not module.startswith(error.name + "."):
            where = _user_frame(error)  # the module exists; something it imports does not
            raise ConfigError(f"{what}: importing {module} failed{where}: {error}: install it") from None
        raise ConfigError(f"{what}: cannot import {module} ({error}): run otmdr from the folder that holds it or "
                          "add that folder to PYTHONPATH") from None
    except Exception as error:  # noqa: BLE001 - the user's module failed: say where, in one line
        first = (str(error).strip().splitlines() or [""])[0]
        raise ConfigError(f"{what}: importing {module} raised {type(error).__name__}"
                          f"{': ' + first if first else ''}{_user_frame(error)}: fix the module") from None


def _user_frame(error: BaseException) -> str:
    """`` (at path.py:12)``: the innermost frame of ``error`` outside importlib, or empty."""
    import traceback

    frames = [f for f in traceback.extract_tb(error.__traceback__) if "importlib" not in f.filename]
    return f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""


def import_plugins(modules: list[str] | tuple[str, ...] = ()) -> list[str]:
    """Import ``modules`` and those named in ``$OTMDR_IMPORT`` (comma-separated), e.g. modules
    whose ``register_model`` / ``register_dataset`` decorators add models and datasets; returns
    the names imported. A module that cannot be imported is a one-line ConfigError."""
    import os

    names = [m.strip() for m in os.environ.get(PLUGINS_ENV, "").split(",") if m.strip()]
    names += [m for m in modules if m not in names]
    for name in names:
        _import(name, f"--import {name}")
    return names


def resolve_factory(key: str, path: str) -> Any:
    """The callable a factory key names, ``"package.module:function"`` (``function`` may be a
    dotted attribute path, ``module:Class.build``). ``key`` (``model.factory``) is named in
    every error: not ``module:function``, not importable, no such attribute, not callable."""
    module, colon, attribute = path.partition(":")
    if not colon or not module.strip() or not attribute.strip():
        raise ConfigError(f"config key {key}: {path!r} must look like module:function (e.g. mypkg.models:build), "
                          "the module importable from the current folder or PYTHONPATH")
    target: Any = _import(module.strip(), f"config key {key}")
    for part in attribute.strip().split("."):
        if not hasattr(target, part):
            public = sorted(n for n in dir(target) if not n.startswith("_") and callable(getattr(target, n, None)))
            close = difflib.get_close_matches(part, public, n=1)
            hint = f"; did you mean {module.strip()}:{close[0]}?" if close else (
                f"; it defines {', '.join(public[:8])}" if public else "")
            raise ConfigError(f"config key {key}: {module.strip()} has no attribute {part!r}{hint}")
        target = getattr(target, part)
    if not callable(target):
        raise ConfigError(f"config key {key}: {path} is a {type(target).__name__}, not a function: name the function "
                          "that builds it")
    return target


def _yaml_problem(error: yaml.YAMLError) -> str:
    """One line: the problem and where (YAML's own message spans 5-7 lines with excerpts)."""
    mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"{where}{problem}"


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``["optim.lr=0.05", "otmdr.rho=[0.1,0.2]"]`` applied to nested dicts (values parsed as YAML)."""
    import yaml

    data = _deep_copy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} must look like section.key=value (e.g. optim.lr=0.05)")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        parts = key.strip().split(".")
        node = data
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
            node = child
        node[parts[-1]] = value
    return data


def _deep_copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data


#: Keys renamed, old name -> new name: a config (or a saved run's config.yaml) with the old key is
#: read as the new one, with a warning, for one release.
RENAMED_KEYS = {"asam.eta": "asam.adaptive_eta"}


def _renamed(data: dict[str, Any], prefix: str) -> dict[str, Any]:
    for old, new in RENAMED_KEYS.items():
        section, _, key = old.rpartition(".")
        if prefix != section + "." or key not in data:
            continue
        new_key = new.rpartition(".")[2]
        if new_key in data:
            raise ConfigError(f"config keys {old} and {new} are the same setting ({old} is its old name): keep {new}")
        warnings.warn(f"config key {old} is now {new}; the old name is read for one more release", FutureWarning,
                      stacklevel=2)
        data = {(new_key if k == key else k): v for k, v in data.items()}
    return data


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"config section {prefix.rstrip('.') or '<top>'} must be a mapping, got {data!r}")
    data = _renamed(data, prefix)
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else f"; known keys: {', '.join(names)}"
            raise ConfigError(f"unknown config key {prefix}{key}{hint}")
    values = {}
    for name in names:
        if name in data:
            values[name] = _coerce(hints[name], data[name], f"{prefix}{name}")
    return cls(**values)


def _coerce(hint: Any, value: Any, key: str) -> Any:
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return _build(hint, value, key + ".")
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, key)
    if origin is list:
        if isinstance(value, str) and "," in value:
            raise ConfigError(f"config key {key}: {value!r} is text, not a list; write a list in brackets: "
                              f"{key}=[{value}]")
        items = value if isinstance(value, (list, tuple)) else [value]
        return [_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(items)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key}: expected a mapping, got {value!r}")
        return dict(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key {key}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key {key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # "8/255" style fractions and "5e-4" written as strings
            try:
                value = parse_number(value)
            except ValueError:
                raise ConfigError(f"config key {key}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key {key}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"config key {key}: expected a finite number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key {key}: expected a string, got {value!r}")
        return value
    return value


def parse_number(text: str) -> float:
    """A number written as text: ``5e-4``, ``8/255``. Raises ValueError (never ZeroDivisionError)."""
    if "/" in text:
        numerator, denominator = text.split("/", 1)
        if float(denominator) == 0:
            raise ValueError(f"{text!r} divides by zero")
        return float(numerator) / float(denominator)
    return float(text)


def _check_values(config: ExperimentConfig) -> None:
    flat = _flatten(config_to_dict(config))
    for key, choices in CHOICES.items():
        if flat[key] not in choices:
            shown = ", ".join("null" if c is None else c for c in choices)
            raise ConfigError(f"config key {key}: {flat[key]!r} is not one of {shown}")
    for key, bound in BOUNDS.items():
        values = flat[key] if isinstance(flat[key], list) else [flat[key]]
        for i, value in enumerate(values):
            problem = None if value is None else bound.problem(value)
            if problem:
                where = f"{key}[{i}]" if isinstance(flat[key], list) else key
                raise ConfigError(f"config key {where}: {problem}")
    for kind in config.train.loggers:
        if kind not in LOGGERS:
            raise ConfigError(f"config key train.loggers: {kind!r} is not one of {', '.join(LOGGERS)}")
    device = config.train.device
    if not (device in ("auto", "cpu", "cuda") or device.startswith("cuda:")):
        raise ConfigError(f"config key train.device: {device!r} is not auto, cpu, cuda or cuda:N")
    from .models import list_models
    from .models.registry import is_known_model

    if config.model.factory is not None:
        _check_factory("model.factory", config.model.factory, config.model.options, "model.options",
                       given=("num_classes", "in_channels", "image_size"))
    elif not is_known_model(config.model.name):
        raise ConfigError(f"config key model.name: unknown model {config.model.name!r}; known models: "
                          f"{', '.join(list_models())} (otmdr models lists them; a model that a plugin module "
                          "registers needs --import MODULE, and your own builder model.factory=module:function)")
    from .data import DatasetError, DatasetSpec, get_spec, registered_loader

    spec: DatasetSpec | None = None
    if config.data.factory is not None:
        _check_factory("data.factory", config.data.factory, config.data.options, "data.options", given=())
    else:
        if config.data.options and registered_loader(config.data.name) is None:
            raise ConfigError(f"config key data.options: {config.data.options} is passed to data.factory (or a "
                              "registered dataset's loader), which is not set: set data.factory=module:function "
                              "or remove data.options")
        try:
            spec = get_spec(config.data.name)
        except DatasetError as error:
            raise ConfigError(f"config key data.name: {error}") from None
    if config.model.options and config.model.factory is None:  # sizes and names checked now, before a run folder
        from .models import check_model_options

        try:
            check_model_options(config.model.name, config.model.options,
                                num_classes=(spec.num_classes if spec else 0) or 10,
                                in_channels=(spec.in_channels if spec else 0) or 3)
        except TypeError as error:  # an option the builder does not take
            raise ConfigError(f"config key model.options: {config.model.name} does not accept "
                              f"{config.model.options}: {error}") from None
        except ValueError as error:  # a size it refuses, named: hidden[0] must be ...
            raise ConfigError(f"config key model.options: {config.model.name}: {error}") from None
    # the optimizer's own validation (rho, split, ...) with the key named
    try:
        PerturbationConfig(**otmdr_options(config.otmdr))
    except ValueError as error:
        raise ConfigError(f"config section otmdr: {error}") from None
    _check_efficiency(config)


def _check_efficiency(config: ExperimentConfig) -> None:
    """The ``efficiency`` keys that depend on each other or on the method (their ranges and choices
    are checked with every other key's)."""
    section, defaults = config.efficiency, EfficiencyConfig()
    if config.optim.method == "sgd":
        for f in dataclasses.fields(EfficiencyConfig):
            value = getattr(section, f.name)
            if value != getattr(defaults, f.name):
                shown = _yaml_text(value)
                raise ConfigError(f"config key efficiency.{f.name}: {shown} applies to methods sam, asam and otmdr "
                                  "only, not to optim.method=sgd: remove it, or choose one of those methods (otmdr "
                                  "compare: name a variant, METHOD+VARIANT such as sam+interval, or give the key "
                                  "to one method with --grid METHOD:KEY=...)")
    if section.trigger is not None and len(section.trigger) not in (1, 2):
        raise ConfigError(f"config key efficiency.trigger: {_yaml_text(section.trigger)} must hold one threshold "
                          "[c] or two, [c_first, c_last] (null: off)")
    if section.reuse and section.interval < 2:
        raise ConfigError("config key efficiency.reuse: true needs efficiency.interval >= 2 (the steps between "
                          "two sharpness-aware steps reuse its component): set efficiency.interval=5, say, or "
                          "efficiency.reuse=false")
    if config.optim.method == "sgd":
        return
    # the optimizer's own validation of the combinations (with the method's ascent steps), the section named
    method = config.optim.method
    steps = (otmdr_options(config.otmdr) if method == "otmdr"
             else {"rho": (getattr(config, method).rho,), "split": (1.0,)})
    try:
        PerturbationConfig(**steps, **efficiency_options(section))
    except ValueError as error:
        raise ConfigError(f"config section efficiency: {error}") from None


def _yaml_text(value: Any) -> str:
    """A config value as it is written in YAML and ``--set``: ``true``, ``[-1.0, 1.0]``, ``null``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_yaml_text(v) for v in value) + "]"
    return str(value)


def _check_factory(key: str, path: str, options: dict[str, Any], options_key: str, given: tuple[str, ...]) -> None:
    """The factory is importable and callable, and takes every key of ``options`` (read from its
    signature: nothing is called here); ``given`` are the arguments otmdr passes itself."""
    import inspect

    factory = resolve_factory(key, path)
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # a builtin or an extension: its call will tell
        return
    taken = [o for o in options if o in given]
    if taken:
        raise ConfigError(f"config key {options_key}: {', '.join(map(str, taken))} come(s) from the data, not from "
                          f"{options_key}: remove {'them' if len(taken) > 1 else 'it'}")
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    names = [n for n, p in parameters.items()
             if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
    unknown = [str(o) for o in options if o not in names]
    if unknown:
        takes = ", ".join(n for n in names if n not in given) or "no options"
        raise ConfigError(f"config key {options_key}: {path} takes no argument {', '.join(map(repr, unknown))} "
                          f"(it takes: {takes})")
    needed = [n for n, p in parameters.items() if p.default is inspect.Parameter.empty
              and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
              and n not in given and n not in options]
    if needed:
        passed = f"otmdr passes {', '.join(given)}; " if given else ""
        raise ConfigError(f"config key {key}: {path} needs argument(s) {', '.join(needed)}, which nothing gives: "
                          f"{passed}set {options_key}={{{needed[0]}: ...}} or give {needed[0]} a default")


def comparable_config(data: dict[str, Any]) -> dict[str, Any]:
    """What decides a run's result, for checking that a saved run is the run asked for: the config
    read through the current schema (keys added since take their defaults), without the thread
    and progress settings, the loggers and without the sections of the other methods (an OT-MDR run does not
    read ``sam.rho``)."""
    resolved = config_to_dict(config_from_dict(data))
    unused = {s for s in ("sam", "asam", "otmdr") if s != resolved["optim"]["method"]}
    resolved["train"] = {k: v for k, v in resolved["train"].items() if k not in ("threads", "progress", "loggers")}
    resolved["otmdr"].pop("preset")  # already applied to the values it sets
    return {section: values for section, values in resolved.items() if section not in unused}


def describe_config(config: ExperimentConfig) -> str:
    """The config as YAML with every key annotated: its comment in this module, its choices or
    range. ``otmdr config`` prints it, so the keys are listed somewhere besides the source."""
    import inspect
    import re

    import yaml

    notes: dict[str, str] = {}
    for field_ in dataclasses.fields(ExperimentConfig):
        source = inspect.getsource(typing.get_type_hints(ExperimentConfig)[field_.name])
        for line in source.splitlines():
            match = re.match(r"\s+(\w+): [^=]+=.*?#\s*(.+)$", line)
            if match:
                notes[f"{field_.name}.{match.group(1)}"] = match.group(2).strip()
    for key, choices in CHOICES.items():
        shown = " | ".join("null" if c is None else str(c) for c in choices)
        if not all(str(c) in notes.get(key, "") for c in choices if c is not None):
            notes[key] = shown + (f"; {notes[key]}" if key in notes else "")
    for key, bound in BOUNDS.items():  # the range first: comments say what, the bound how much
        notes[key] = bound.text() + (f"; {notes[key]}" if key in notes else "")
    lines = []
    for section, values in config_to_dict(config).items():
        lines.append(f"{section}:")
        for key, value in values.items():
            text = yaml.safe_dump({key: value}, default_flow_style=True, width=1000).strip()[1:-1]
            note = notes.get(f"{section}.{key}")
            lines.append(f"  {text}" + (f"  # {note}" if note else ""))
    return "\n".join(lines)


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and key != "options":
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
