"""The package's layers only look down (docs/design.md, "Layers").

Every module under ``src/otmdr`` is parsed with ``ast`` (function-level imports included, nothing
is imported) and its ``otmdr`` imports checked against three rules:

1. no import circle between modules;
2. no module imports a layer above its own, nor a sibling package of its layer (``optim``,
   ``models`` and ``data`` know nothing of each other);
3. no private name (a ``_name`` path component) is imported, or read as ``module._name``, from
   another top-level unit (``otmdr.data`` and ``otmdr.config`` are units; ``otmdr._atomic`` and
   ``otmdr._lock`` are the library's own shared helpers, open to every unit).

The last test runs the checker on a small made-up package with one violation of each rule, so
the checker itself is shown to fail when it should.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

#: the layers, lowest first: a module may import its own unit and any unit of a lower layer
LAYERS: list[set[str]] = [
    {"otmdr._signals"},  # the stop-signal policy and the test-only pause hook (the atomic writer pauses)
    {"otmdr._atomic", "otmdr._lock", "otmdr._version"},  # file-system and version helpers
    {"otmdr.optim", "otmdr.models", "otmdr.data"},  # independent of each other
    {"otmdr.config"},  # an experiment's config, validated against the three registries below it
    {"otmdr.eval"},  # metrics, robustness, sharpness of a model; evaluating a config's run
    {"otmdr.train"},  # builders, the loop, run folders, checkpoints, studies, distributed strategies
    {"otmdr.report"},  # tables, statistics and figures of what training and evaluation wrote
    {"otmdr.study"},  # the compare protocol and report for the user's own training function
    {"otmdr.cli"},  # parses, calls the layers below, prints
    {"otmdr", "otmdr.__main__"},  # the package's facade and ``python -m otmdr``
]


@dataclass(frozen=True)
class Edge:
    importer: str  # module name
    target: str  # module imported (or whose name is imported)
    names: tuple[str, ...]  # full dotted paths of what is used: modules, or module.name
    line: int
    type_only: bool = False  # under ``if TYPE_CHECKING:``: never runs, so it closes no circle


def module_names(src: Path) -> dict[str, Path]:
    names = {}
    for path in sorted((src / "otmdr").rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def unit(module: str) -> str:
    """``otmdr.train.loop`` -> ``otmdr.train``; ``otmdr.config`` -> itself; ``otmdr`` -> itself."""
    return ".".join(module.split(".")[:2])


def layer_of(module: str) -> int:
    for index, units in enumerate(LAYERS):
        if unit(module) in units:
            return index
    raise AssertionError(f"{module} belongs to no layer: add its unit {unit(module)} to LAYERS")


def imports(src: Path) -> list[Edge]:
    """Every ``otmdr`` import of every module, resolved to the module it loads."""
    modules = module_names(src)
    edges = []
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        tree = ast.parse(path.read_text(), str(path))
        typing_only = {id(inner) for node in ast.walk(tree) if isinstance(node, ast.If)
                       and "TYPE_CHECKING" in ast.unparse(node.test) for inner in ast.walk(node)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == "otmdr":
                        edges.append(Edge(name, alias.name, (alias.name,), node.lineno, id(node) in typing_only))
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target.split(".")[0] != "otmdr":
                    continue
                for alias in node.names:
                    full = f"{target}.{alias.name}"
                    # ``from . import loop`` loads the module otmdr.x.loop, not otmdr.x's __init__
                    edges.append(Edge(name, full if full in modules else target, (full,), node.lineno,
                                      id(node) in typing_only))
    return edges


def attribute_reads(src: Path) -> list[Edge]:
    """``module._name`` where ``module`` was bound by an import of an otmdr module."""
    modules = module_names(src)
    edges = []
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        tree = ast.parse(path.read_text(), str(path))
        bound: dict[str, str] = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in modules and alias.asname:
                        bound[alias.asname] = alias.name
            elif isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                for alias in node.names:
                    if f"{target}.{alias.name}" in modules:
                        bound[alias.asname or alias.name] = f"{target}.{alias.name}"
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                module = bound[node.value.id]
                edges.append(Edge(name, module, (f"{module}.{node.attr}",), node.lineno))
    return edges


def cycles(edges: list[Edge]) -> list[list[str]]:
    """The import circles (strongly connected components of more than one module, or a
    module importing itself)."""
    graph: dict[str, set[str]] = {}
    for edge in edges:
        if edge.type_only:
            continue
        graph.setdefault(edge.importer, set()).add(edge.target)
        graph.setdefault(edge.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(node: str) -> None:  # Tarjan's algorithm; the graph has ~100 nodes
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph[node]:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def upward(edges: list[Edge]) -> list[str]:
    """Imports of a higher layer, or of another unit of the same layer."""
    problems = []
    for edge in edges:
        mine, theirs = unit(edge.importer), unit(edge.target)
        if mine == theirs:
            continue
        if layer_of(edge.target) > layer_of(edge.importer):
            problems.append(f"{edge.importer}:{edge.line} imports {edge.target}, a layer above it")
        elif layer_of(edge.target) == layer_of(edge.importer):
            problems.append(f"{edge.importer}:{edge.line} imports {edge.target}, a sibling of its layer")
    return problems


def private_crossings(edges: list[Edge]) -> list[str]:
    problems = []
    for edge in edges:
        for full in edge.names:
            parts = full.split(".")
            private = [i for i, p in enumerate(parts) if p.startswith("_") and not p.startswith("__")]
            if not private:
                continue
            owner = ".".join(parts[: private[0]])
            if owner == "otmdr":  # otmdr._atomic, otmdr._lock: the library's own helpers
                continue
            if unit(owner) != unit(edge.importer):
                problems.append(f"{edge.importer}:{edge.line} uses {full}, private to {unit(owner)}")
    return problems


def test_no_import_circle():
    assert cycles(imports(SRC)) == []


def test_no_module_imports_a_layer_above_it():
    assert upward(imports(SRC)) == []


def test_no_private_name_crosses_units():
    assert private_crossings(imports(SRC) + attribute_reads(SRC)) == []


def test_every_module_has_a_layer():
    for module in module_names(SRC):
        layer_of(module)


def test_the_checker_finds_each_kind_of_violation(tmp_path):
    files = {
        "otmdr/__init__.py": "",
        "otmdr/_atomic.py": "",
        "otmdr/config.py": "def _parse(): pass\n",
        "otmdr/models/__init__.py": "",
        "otmdr/models/registry.py": "def f():\n    from .ensemble import E\n",
        "otmdr/models/ensemble.py": "from typing import TYPE_CHECKING\nfrom .registry import f\nE = 1\n"
                                    "if TYPE_CHECKING:\n    from .small import S\n",
        "otmdr/models/small.py": "from .ensemble import E\nS = 1\n",
        "otmdr/data/__init__.py": "from ..models import registry\n",
        "otmdr/eval/__init__.py": "def g():\n    from ..train.loop import AUTOCAST\n",
        "otmdr/train/__init__.py": "from .. import config\nx = config._parse\nfrom .._atomic import w\n",
        "otmdr/train/loop.py": "AUTOCAST = {}\nfrom ..config import _parse\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    edges = imports(tmp_path)
    assert cycles(edges) == [["otmdr.models.ensemble", "otmdr.models.registry"]]
    assert upward(edges) == ["otmdr.data:1 imports otmdr.models.registry, a sibling of its layer",
                             "otmdr.eval:2 imports otmdr.train.loop, a layer above it"]
    assert private_crossings(edges + attribute_reads(tmp_path)) == [
        "otmdr.train.loop:2 uses otmdr.config._parse, private to otmdr.config",
        "otmdr.train:2 uses otmdr.config._parse, private to otmdr.config"]
