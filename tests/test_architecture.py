"""The house rules of docs/architecture.md, checked on the source: which layer may import which (every import,
including those inside functions), no import cycle between modules or between layers, and short files and
functions."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "dpokit"

CORE = {"errors", "config", "runtime", "data", "models", "losses", "train"}
# What each layer may import (besides itself); docs/architecture.md gives the reason for each rule.
ALLOWED = {
    "errors": set(),
    "config": {"errors"},
    "runtime": {"errors", "config"},
    "data": {"errors", "config"},
    "models": {"errors", "config", "data", "runtime"},
    "losses": {"errors", "config", "data", "models"},
    "train": {"errors", "config", "data", "models", "losses", "runtime"},
    "eval": CORE,
    "judges": CORE | {"eval"},
    "api": CORE | {"eval"},
    "experiments": CORE | {"eval", "judges", "api"},
    "cli": CORE | {"eval", "judges", "api", "experiments", "dpokit"},
    "dpokit": {"errors", "config", "api"},  # the package's __init__: the public names, imported lazily
}
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80
MAX_TOP_LEVEL_MODULES = 10


def _modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(SRC).with_suffix("").parts)
        modules[name.removesuffix(".__init__")] = path
    return modules


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The dpokit module an imported dotted name lives in (`dpokit.config.TrainConfig` -> `dpokit.config`)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str) -> set[str]:
    """Every dpokit module that `module` imports, at the top or inside a function."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant)):
            names = [node.args[0].value]
        else:
            continue
        found |= {target for name in names if name.startswith("dpokit") and (target := _resolve(name))}
    return found - {module}


GRAPH = {module: _imports(module) for module in MODULES}


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "dpokit"


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in graph.get(node, ()):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                other = stack.pop()
                on_stack.discard(other)
                component.append(other)
                if other == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycle_between_modules():
    assert _cycles(GRAPH) == []


def test_no_import_cycle_between_layers():
    layers = defaultdict(set)
    for module, imported in GRAPH.items():
        layers[_layer(module)] |= {_layer(other) for other in imported} - {_layer(module)}
    assert _cycles(layers) == []


def test_each_layer_imports_only_the_layers_below_it():
    assert set(ALLOWED) >= {_layer(module) for module in MODULES}, "a new layer needs its rule here and in the docs"
    wrong = sorted(f"{module} imports {other}" for module, imported in GRAPH.items() for other in imported
                   if _layer(other) != _layer(module) and _layer(other) not in ALLOWED[_layer(module)])
    assert wrong == []


def test_the_core_imports_no_application_layer():
    """Named on its own because it is the rule that keeps dpokit a library: data, models, losses and train know
    nothing of evaluation, judges, experiments or the command line."""
    wrong = [f"{module} imports {other}" for module, imported in GRAPH.items() if _layer(module) in CORE
             for other in imported if _layer(other) in {"eval", "judges", "experiments", "cli", "api"}]
    assert wrong == []


def test_few_modules_at_the_top():
    top = [path.name for path in PACKAGE.glob("*.py")]
    assert len(top) <= MAX_TOP_LEVEL_MODULES, top


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_short_modules_and_functions(path):
    text = path.read_text()
    assert len(text.splitlines()) <= MAX_MODULE_LINES
    long = [f"{node.name} ({node.end_lineno - node.lineno + 1} lines)" for node in ast.walk(ast.parse(text))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert long == []


def test_the_rules_can_fail():
    """The checks find what they look for: a cycle, and a layer that imports above itself."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert "judges" not in ALLOWED["train"] and "cli" not in ALLOWED["experiments"]
