"""dust's modules import each other without a cycle, and packages only import the layers below them (every import
counts, also one inside a function). The layers are drawn in docs/architecture.md."""

from __future__ import annotations

import ast
from pathlib import Path

import dust

SOURCE = Path(dust.__file__).resolve().parent


def module_imports() -> dict[str, set[str]]:
    """Each dust module -> the dust modules it imports anywhere in its file (``from a import b`` counts as a.b when
    that is a module, else as a)."""
    modules = {}
    for path in SOURCE.rglob("*.py"):
        parts = path.relative_to(SOURCE.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    edges: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                edges[name] |= {alias.name for alias in node.names if alias.name in modules}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    target = f"{node.module}.{alias.name}"
                    if target in modules or node.module in modules:
                        edges[name].add(target if target in modules else node.module)
        edges[name].discard(name)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while (w := stack.pop()) != v:
                component.append(w)
            if component:
                found.append(sorted([v, *component]))

    for v in edges:
        if v not in index:
            visit(v)
    return found


def test_dust_has_no_import_cycle():
    edges = module_imports()
    assert "dust.methods.registry" in edges["dust.methods.cps"]  # the walk sees the imports it should
    assert cycles(edges) == []


# Each package imports only packages of a lower (or its own) layer; ``dust`` is the package root (``__version__``).
LAYERS = {
    "dust": 0, "storage": 1, "config": 2, "data": 3,
    "models": 4, "losses": 4, "metrics": 4, "uncertainty": 4, "optim": 4,
    "inference": 5, "methods": 6, "engine": 7, "predict": 7, "report": 8, "results": 9, "workflows": 10,
    "benchmark": 11, "cli": 12, "__main__": 13,
}


def test_packages_import_only_the_layers_below_them():
    upward = []
    for module, targets in module_imports().items():
        package = module.split(".")[1] if "." in module else module
        assert package in LAYERS, f"{package}: give the new package a layer in LAYERS (and docs/architecture.md)"
        for target in targets:
            other = target.split(".")[1] if "." in target else target
            if LAYERS[other] > LAYERS[package]:
                upward.append(f"{module} -> {target}")
    assert upward == []


def test_the_cycle_finder_finds_a_lazy_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
