"""Hyper-parameter grids of a comparison: ``--grid [METHOD:]section.key=v1,v2,...``.

A key of the ``sam``, ``asam`` or ``otmdr`` section applies to that method only, a key of the
``efficiency`` section to every sharpness-aware method (not to ``sgd``); any other key
(``optim.lr``, ``train.label_smoothing``, ...) applies to every compared method, or to one
method with the ``METHOD:`` prefix (``otmdr+reuse:efficiency.interval=2,5,10``: that variant
only). Several keys for one method form their Cartesian product. Values are YAML, separated by
commas outside brackets: ``otmdr.rho=[0.01,0.02],[0.05,0.1]``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np
import yaml

from ..config import ConfigError

__all__ = ["GridPoint", "parse_grid", "beyond_edges", "edge_steps", "METHOD_SECTIONS"]

#: config sections read by one method only
METHOD_SECTIONS = ("sam", "asam", "otmdr")
#: config sections read by every sharpness-aware method, and by sgd never
PERTURBING_SECTIONS = ("efficiency",)
#: keys a grid may not vary: the comparison itself sets them
RESERVED = {"optim.method": "--methods", "train.seed": "--seeds", "ensemble.regime": "--methods METHOD/REGIME"}


@dataclass(frozen=True)
class GridPoint:
    """One setting of one method: config overrides and a short label for tables and folders."""

    method: str
    overrides: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        return " ".join(o.split(".", 1)[1] for o in self.overrides) or "default"


def _split_values(text: str) -> list[str]:
    values, depth, current = [], 0, ""
    for char in text:
        depth += {"[": 1, "{": 1, "]": -1, "}": -1}.get(char, 0)
        if char == "," and depth == 0:
            values.append(current.strip())
            current = ""
        else:
            current += char
    values.append(current.strip())
    return values


def _method_name(method: str) -> str:
    """``sam+reuse/joint@compute`` -> ``sam``: the optimizer whose config section a compared method reads."""
    return _variant_name(method).partition("+")[0]


def _variant_name(method: str) -> str:
    """``sam+reuse/joint@compute`` -> ``sam+reuse``: the method and its variant, without regime and budget."""
    return method.partition("@")[0].partition("/")[0]


def parse_grid(specs: list[str], methods: list[str]) -> dict[str, list[GridPoint]]:
    """The grid points of every method of ``methods`` (a method without a grid gets one point,
    its config as given). Raises :class:`ConfigError` naming the faulty ``--grid``; the values
    themselves are checked when the configs are built (:func:`otmdr.train.study.plan`)."""
    axes: dict[str, dict[str, list[str]]] = {m: {} for m in methods}
    for spec in specs:
        where = f"--grid {spec!r}"
        target, colon, assignment = spec.partition(":") if ":" in spec.partition("=")[0] else ("", "", spec)
        key, eq, raw = assignment.partition("=")
        key = key.strip()
        if not eq or not key or not raw.strip():
            raise ConfigError(f"{where}: expected [METHOD:]section.key=v1,v2,... e.g. --grid sam.rho=0.02,0.05,0.1")
        section, dot, name = key.partition(".")
        if not dot or not section or not name:
            raise ConfigError(f"{where}: {key!r} is not a section.key name (e.g. sam.rho, optim.lr)")
        if key in RESERVED:
            raise ConfigError(f"{where}: {key} is set by the comparison itself; use {RESERVED[key]}")
        values = _split_values(raw)
        for value in values:
            if not value:
                raise ConfigError(f"{where}: an empty value (two commas in a row, or a trailing comma)")
            try:
                yaml.safe_load(value)
            except yaml.YAMLError:
                raise ConfigError(f"{where}: {value!r} is not a valid value") from None
        if len(set(values)) != len(values):
            raise ConfigError(f"{where}: a value is repeated")
        if colon:
            target = target.strip()
            # exactly that method first; else that method (and variant) under any regime or budget;
            # else, for a plain name, its variants too (``otmdr:`` with --methods otmdr+reuse)
            chosen = ([m for m in methods if m == target] or [m for m in methods if _variant_name(m) == target]
                      or [m for m in methods if _method_name(m) == target])
            if not chosen:
                raise ConfigError(f"{where}: method {target!r} is not compared (--methods {','.join(methods)})")
        elif section in METHOD_SECTIONS:
            chosen = [m for m in methods if _method_name(m) == section]
            if not chosen:
                raise ConfigError(f"{where}: {key} is read by method {section} only, which is not in --methods "
                                  f"{','.join(methods)}")
        elif section in PERTURBING_SECTIONS:
            chosen = [m for m in methods if _method_name(m) != "sgd"]
            if not chosen:
                raise ConfigError(f"{where}: {key} is read by methods sam, asam and otmdr only, none of which is in "
                                  f"--methods {','.join(methods)}")
        else:
            chosen = list(methods)
        for method in chosen:
            if section in METHOD_SECTIONS and _method_name(method) != section:
                raise ConfigError(f"{where}: {key} does not apply to method {method} (only {section} reads the "
                                  f"{section} section)")
            if section in PERTURBING_SECTIONS and _method_name(method) == "sgd":
                raise ConfigError(f"{where}: {key} does not apply to method {method} (the {section} section is "
                                  "read by sam, asam and otmdr only)")
            if key in axes[method]:
                raise ConfigError(f"{where}: {key} is given twice for method {method}")
            axes[method][key] = values
    grid: dict[str, list[GridPoint]] = {}
    for method, keys in axes.items():
        combos = itertools.product(*([f"{k}={v}" for v in vs] for k, vs in keys.items()))
        grid[method] = [GridPoint(method, tuple(combo)) for combo in combos]
    return grid


def _values(point: GridPoint) -> dict[str, Any]:
    """The point's values by key; ``5e-4`` (a string to YAML, a number to the config) as a number."""
    def value(raw: str) -> Any:
        loaded = yaml.safe_load(raw)
        if isinstance(loaded, str):
            try:
                return float(loaded)
            except ValueError:
                return loaded
        return loaded
    return {key.strip(): value(raw) for key, _, raw in (o.partition("=") for o in point.overrides)}


def _size(value: Any) -> float | None:
    """Where a value sits on its key's line: a positive number itself, a list of positive numbers
    (OT-MDR's radius pair) its sum; None for anything that cannot be stepped geometrically."""
    def positive(x: Any) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0
    if positive(value):
        return float(value)
    if isinstance(value, list) and value and all(positive(x) for x in value):
        return float(sum(value))
    return None


def _format(value: Any) -> str:
    """A grid value as ``--grid`` would spell it: positional decimals (YAML reads ``1e-05`` as a
    string), pairs without spaces."""
    if isinstance(value, list):
        return "[" + ",".join(_format(x) for x in value) + "]"
    if isinstance(value, int):
        return str(value)
    return np.format_float_positional(value, trim="-")


def edge_steps(points: list[dict[str, Any]], chosen: dict[str, Any]) -> list[tuple[str, Any]]:
    """The steps one past ``chosen``, as ``(key, value)``, along each key at whose smallest or
    largest value it sits, among the ``points`` that share its other keys (two values or more on
    that line): a geometric step as large as the last (lr 0.1, 0.2, 0.4 chosen: 0.8; a radius pair scales as a
    whole; integers round). Keys whose values are not positive numbers, or pairs of them, are left
    alone, as is a step whose value the line already has."""
    steps = []
    for key, value in chosen.items():
        size = _size(value)
        line = [p[key] for p in points if key in p and all(p.get(k) == x for k, x in chosen.items() if k != key)]
        sizes = sorted({s for s in map(_size, line) if s is not None})
        if size is None or len(sizes) < 2 or sizes[0] < size < sizes[-1]:
            continue
        factor = size / (sizes[-2] if size == sizes[-1] else sizes[1])
        if isinstance(value, int):
            step: Any = round(value * factor)
        else:  # 10 significant digits: 0.1 x 3 is 0.3, not 0.30000000000000004
            step = [float(f"{x * factor:.10g}") for x in value] if isinstance(value, list) else \
                float(f"{value * factor:.10g}")
        reached = _size(step)
        if reached is None or any(np.isclose(s, reached) for s in sizes):
            continue
        steps.append((key, step))
    return steps


def beyond_edges(points: list[GridPoint], chosen: GridPoint) -> list[GridPoint]:
    """:func:`edge_steps` of a method's grid points: the new points, the stepped key written as
    ``--grid`` would spell it, the others as given."""
    return [GridPoint(chosen.method, tuple(f"{key}={_format(value)}" if o.partition("=")[0].strip() == key else o
                                           for o in chosen.overrides))
            for key, value in edge_steps([_values(p) for p in points], _values(chosen))]
