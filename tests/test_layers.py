"""dust's packages form layers: nothing imports a package that (directly or not) imports it back.

Every import counts, also the ones inside functions and under ``TYPE_CHECKING``: a cycle held apart by lazy
loading is still a cycle for a reader. Layers, bottom up: config, storage, data, models, losses, metrics,
uncertainty, inference -> methods -> engine -> report -> workflows, benchmark, results' users -> cli.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import dust

PACKAGE = Path(dust.__file__).parent


def _unit(module: str) -> str:
    """``dust.engine.trainer`` -> ``dust.engine``; ``dust.workflows`` -> ``dust.workflows``."""
    return ".".join(module.split(".")[:2])


def _import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            for target in targets:
                where = PACKAGE.parent / Path(*target.split("."))
                is_dust_module = target.startswith("dust.") and (where.is_dir() or where.with_suffix(".py").is_file())
                if is_dust_module and _unit(target) != _unit(module):
                    graph.setdefault(_unit(module), set()).add(_unit(target))
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt]
            if nxt not in state and (found := visit(nxt, path + [nxt])):
                return found
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start, [start])):
            return found
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}}) is None


def test_no_package_imports_itself_back():
    graph = _import_graph()
    assert "dust.methods" in graph["dust.engine"] and "dust.engine" in graph["dust.report"]  # the walk sees them
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_lower_layers_never_reach_up():
    graph = _import_graph()
    assert not graph.get("dust.methods", set()) & {"dust.engine", "dust.report", "dust.workflows", "dust.cli"}
    assert not graph.get("dust.engine", set()) & {"dust.report", "dust.workflows", "dust.benchmark", "dust.cli"}


def test_the_trainer_imports_on_its_own():
    result = subprocess.run([sys.executable, "-c", "import dust.engine.trainer"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
