"""Experiment configuration: typed sections, loaded from YAML, overridden by ``--set key=value``.

Every key is checked: an unknown key or a value of the wrong type or outside its choices is a
:class:`ConfigError` whose message names the key (``optim.lr``) and what was expected, so the CLI
can print one line instead of a traceback.
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
from typing import Any

import yaml

from .optim.config import PRESETS

__all__ = ["ConfigError", "ExperimentConfig", "otmdr_options", "load_config", "describe_config", "comparable_config",
           "apply_overrides", "config_to_dict", "config_from_dict", "parse_number"]

METHODS = ("sgd", "sam", "asam", "otmdr")


class ConfigError(ValueError):
    """A configuration problem, with a message that names the key and the fix."""


@dataclass
class DataConfig:
    name: str = "digits"
    dir: str | None = None  # the directory (or archive) holding the dataset; not needed for digits
    cache_dir: str | None = None  # where decoded image folders are cached (default ~/.cache/otmdr)
    val_fraction: float = 0.1  # of the training set, held out (seeded) for validation
    train_limit: int | None = None  # use a seeded subset of this many training images
    test_limit: int | None = None  # evaluate on a fixed random subset of N test images (otmdr.data.test_subset)
    batch_size: int = 128  # the global batch: under torchrun split over the processes (divisible by their number)
    eval_batch_size: int = 512
    crop_padding: int = 0  # random crop with this zero padding
    flip: bool = False  # random horizontal flip
    cutout: int = 0  # cutout square size (0: off)
    # synthetic label noise on the training split (otmdr.data.noise): the fraction of wrong labels,
    # drawn once over the training file with its own seed, independent of train.seed
    label_noise: float = 0.0  # fraction of training labels replaced by a wrong class, in [0, 1)
    label_noise_kind: str = "symmetric"  # symmetric (uniform over the other classes) | pairflip (c -> c+1)
    label_noise_seed: int = 0  # which labels are wrong: independent of train.seed
    noisy_val: bool = False  # also corrupt the validation labels (a user who only has noisy labels)


@dataclass
class ModelConfig:
    name: str = "mlp"
    options: dict[str, Any] = field(default_factory=dict)  # passed to the model builder


@dataclass
class OptimConfig:
    method: str = "otmdr"  # sgd | sam | asam | otmdr
    base: str = "sgd"  # sgd | adam | adamw: the base optimizer of sam/asam/otmdr (and sgd's own)
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False  # Nesterov momentum (base sgd)
    weight_decay: float = 5e-4
    max_grad_norm: float | None = None


@dataclass
class SAMConfig:
    rho: float = 0.05  # radius, >= 0 (the measured radius equals it)
    bn_policy: str = "clean"  # ascent | clean | all | none: passes that update batch-norm statistics
    sync_ascent: bool = False  # torchrun: all-reduce the ascent gradient (one shared neighbour), not per process


@dataclass
class ASAMConfig:
    rho: float = 0.5  # radius in the |theta|-rescaled space
    adaptive_eta: float = 0.01  # T = |theta| + adaptive_eta (was asam.eta, still read)
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
    noise_std: float = 0.0  # Langevin noise std per coordinate after each ascent step
    adaptive: bool = False  # ASAM-style scaling by |theta| + adaptive_eta
    adaptive_eta: float = 0.0  # >= 0
    particles: int = 1  # K particles, each on its own random split (cost grows linearly)
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
class ScheduleConfig:
    name: str = "cosine"  # cosine | step | constant
    warmup_epochs: float = 0.0  # linear warm-up (fractions of an epoch allowed)
    milestones: list[float] = field(default_factory=list)  # epochs, for "step"
    gamma: float = 0.1  # step decay factor


@dataclass
class TrainConfig:
    epochs: int = 10  # > 0
    label_smoothing: float = 0.0  # in [0, 1)
    seed: int = 0  # initialisation, data order, validation split, optimizer noise
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "fp32"  # fp32 | bf16 | fp16 (fp16 uses a GradScaler)
    channels_last: bool = False
    progress: bool = True
    threads: int | None = None  # torch CPU threads (default: torch's choice)
    sync_batchnorm: bool = False  # torchrun on CUDA: batch-norm statistics over the global batch (SyncBatchNorm)


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

    kl_weight: float = 5.0e-6  # the release's beta; 1/N (N = training-set size) is the textbook ELBO
    # whether the sigma gradients count in the ascent norm although only the means move (the
    # release's BNN step: true; ours by default: the norm of the moved means only)
    sigma_in_norm: bool = False
    test_samples: int = 30  # Monte-Carlo samples of the predictive at evaluation


@dataclass
class EvalConfig:
    ece_bins: int = 15  # equal-width confidence bins of the ECE
    temperature_scaling: bool = True  # also report metrics after fitting T on the validation split


@dataclass
class ExperimentConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sam: SAMConfig = field(default_factory=SAMConfig)
    asam: ASAMConfig = field(default_factory=ASAMConfig)
    otmdr: OTMDRConfig = field(default_factory=OTMDRConfig)
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
    "ensemble.regime": ("joint", "per-member"),
}
POSITIVE = {"data.batch_size", "data.eval_batch_size", "train.epochs", "eval.ece_bins", "otmdr.particles",
            "data.train_limit", "data.test_limit", "train.threads", "optim.max_grad_norm", "bayes.test_samples"}
NON_NEGATIVE = {"optim.lr", "optim.momentum", "optim.weight_decay", "sam.rho", "asam.rho", "asam.adaptive_eta",
                "otmdr.noise_std", "otmdr.adaptive_eta", "schedule.warmup_epochs", "schedule.gamma",
                "train.label_smoothing", "data.crop_padding", "data.cutout", "bayes.kl_weight"}


def config_from_dict(data: dict[str, Any]) -> ExperimentConfig:
    """Build and validate a config from nested dicts (as read from YAML)."""
    config = _build(ExperimentConfig, data or {}, "")
    _check_values(config)
    return config


def config_to_dict(config: ExperimentConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read a YAML config (or start from the defaults), apply ``key=value`` overrides, validate."""
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
    return config_from_dict(apply_overrides(data, overrides or []))


def _yaml_problem(error: yaml.YAMLError) -> str:
    """One line: the problem and where (YAML's own message spans 5-7 lines with excerpts)."""
    mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"{where}{problem}"


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``["optim.lr=0.05", "otmdr.rho=[0.1,0.2]"]`` applied to nested dicts (values parsed as YAML)."""
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
    for key in POSITIVE:
        if flat[key] is not None and flat[key] <= 0:
            raise ConfigError(f"config key {key}: must be > 0, got {flat[key]!r}")
    for key in NON_NEGATIVE:
        if flat[key] < 0:
            raise ConfigError(f"config key {key}: must be >= 0, got {flat[key]!r}")
    if not 0.0 <= config.data.val_fraction < 1.0:
        raise ConfigError(f"config key data.val_fraction: must be in [0, 1), got {config.data.val_fraction!r}")
    if not 0.0 <= config.data.label_noise < 1.0:
        raise ConfigError(f"config key data.label_noise: must be in [0, 1), got {config.data.label_noise!r}")
    if not 0.0 <= config.train.label_smoothing < 1.0:
        raise ConfigError(f"config key train.label_smoothing: must be in [0, 1), got {config.train.label_smoothing!r}")
    device = config.train.device
    if not (device in ("auto", "cpu", "cuda") or device.startswith("cuda:")):
        raise ConfigError(f"config key train.device: {device!r} is not auto, cpu, cuda or cuda:N")
    from .models import list_models
    from .models.registry import is_known_model

    if not is_known_model(config.model.name):
        raise ConfigError(f"config key model.name: unknown model {config.model.name!r}; known models: "
                          f"{', '.join(list_models())} (otmdr models lists them)")
    from .data import DatasetError, get_spec

    try:
        get_spec(config.data.name)
    except DatasetError as error:
        raise ConfigError(f"config key data.name: {error}") from None
    # the optimizer's own validation (rho, split, ...) with the key named
    from .optim import PerturbationConfig

    try:
        PerturbationConfig(**otmdr_options(config.otmdr))
    except ValueError as error:
        raise ConfigError(f"config section otmdr: {error}") from None


def comparable_config(data: dict[str, Any]) -> dict[str, Any]:
    """What decides a run's result, for checking that a saved run is the run asked for: the config
    read through the current schema (keys added since take their defaults), without the thread
    and progress settings and without the sections of the other methods (an OT-MDR run does not
    read ``sam.rho``)."""
    resolved = config_to_dict(config_from_dict(data))
    unused = {s for s in ("sam", "asam", "otmdr") if s != resolved["optim"]["method"]}
    resolved["train"] = {k: v for k, v in resolved["train"].items() if k not in ("threads", "progress")}
    resolved["otmdr"].pop("preset")  # already applied to the values it sets
    return {section: values for section, values in resolved.items() if section not in unused}


def describe_config(config: ExperimentConfig) -> str:
    """The config as YAML with every key annotated: its comment in this module, its choices or
    range. ``otmdr config`` prints it, so the keys are listed somewhere besides the source."""
    import inspect
    import re

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
    for key in POSITIVE:
        notes.setdefault(key, "> 0")
    for key in NON_NEGATIVE:
        notes.setdefault(key, ">= 0")
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
