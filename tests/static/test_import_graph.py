"""The import graph of our packages: no cycles, and a client that imports nothing server-side.

Every ``.py`` file under ``libs/diffmesh/src`` and ``services/*/src`` is parsed with
``ast`` (nothing is imported). Every import counts — at module level, inside functions,
and under ``if TYPE_CHECKING:`` — resolved to the module it names within our packages
(``from pkg import name`` is an edge to ``pkg.name`` when that is a module, else to
``pkg``). Module granularity; the implicit import of a parent package's ``__init__`` is
not an edge of the cycle check (Python runs it first, before the child exists), but it is
part of what a client imports.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SOURCE_ROOTS = [REPO / "libs" / "diffmesh" / "src", *sorted((REPO / "services").glob("*/src"))]

CLIENT_ROOTS = ["diffmesh.client"]
"""Modules a client application imports; they and everything they import are client-side."""

SERVER_SIDE = ("diffmesh.server", "diffmesh.interceptors", "grpc_health", "grpc_reflection")
"""What no client-side module may import (server bootstrap, server interceptors, health, reflection)."""


@dataclass
class ImportGraph:
    """Our modules and, for each, the modules it imports (ours) and every name it imports."""

    modules: dict[str, Path] = field(default_factory=dict)
    edges: dict[str, set[str]] = field(default_factory=dict)
    imported: dict[str, set[str]] = field(default_factory=dict)

    def is_ours(self, name: str) -> bool:
        return name in self.modules

    def ours_for(self, name: str) -> str | None:
        """The longest prefix of ``name`` that is one of our modules."""
        parts = name.split(".")
        for end in range(len(parts), 0, -1):
            candidate = ".".join(parts[:end])
            if candidate in self.modules:
                return candidate
        return None


def _module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(module: str, path: Path, is_package: bool) -> Iterator[tuple[str, list[str]]]:
    """(imported module, names imported from it) for every import statement of the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, []
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".") if package else []
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            yield target, [alias.name for alias in node.names]


def build_graph(roots: list[Path] = SOURCE_ROOTS) -> ImportGraph:
    """Parses every module under ``roots`` and resolves its imports."""
    graph = ImportGraph()
    files = [(root, path) for root in roots for path in sorted(root.rglob("*.py"))]
    for root, path in files:
        graph.modules[_module_name(root, path)] = path
    for root, path in files:
        module = _module_name(root, path)
        edges: set[str] = set()
        names: set[str] = set()
        for target, imported_names in _imports(module, path, path.name == "__init__.py"):
            names.add(target)
            candidates = [f"{target}.{n}" for n in imported_names if n != "*"] or [target]
            for candidate in candidates:
                names.add(candidate)
                ours = candidate if graph.is_ours(candidate) else graph.ours_for(target)
                if ours is not None and ours != module:
                    edges.add(ours)
        graph.edges[module] = edges
        graph.imported[module] = names
    return graph


def strongly_connected(graph: ImportGraph) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for start in sorted(graph.modules):
        if start in index:
            continue
        work = [(start, iter(sorted(graph.edges.get(start, ()))))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.edges.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    out.append(sorted(component))
    return out


def a_cycle(graph: ImportGraph, component: list[str]) -> list[str]:
    """One cycle through the first module of a strongly connected component: a → … → a."""
    members = set(component)
    start = component[0]
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(graph.edges[node] & members):
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [start, *reversed(path[:-1]), start] if node != start else [start, start]
                if child not in parents:
                    parents[child] = node
                    following.append(child)
        frontier = following
    raise AssertionError(f"no cycle in {component}")


def path_to(graph: ImportGraph, roots: list[str], goal: str) -> list[str]:
    """A shortest import path from one of ``roots`` to ``goal`` (parent packages included)."""
    parents: dict[str, str | None] = {r: None for r in roots}
    frontier = list(roots)
    while frontier:
        following = []
        for node in frontier:
            if node == goal:
                path = [node]
                while parents[path[-1]] is not None:
                    path.append(parents[path[-1]])  # type: ignore[arg-type]
                return path[::-1]
            for child in sorted(_client_children(graph, node)):
                if child not in parents:
                    parents[child] = node
                    following.append(child)
        frontier = following
    return [*roots, "…", goal]


def _client_children(graph: ImportGraph, module: str) -> set[str]:
    children = set(graph.edges.get(module, ()))
    for child in list(children):  # importing a.b.c runs a and a.b first
        parts = child.split(".")
        children |= {".".join(parts[:end]) for end in range(1, len(parts)) if graph.is_ours(".".join(parts[:end]))}
    return children


def client_side(graph: ImportGraph, roots: list[str] = CLIENT_ROOTS) -> set[str]:
    """The client roots and every module of ours they import, transitively."""
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        todo += _client_children(graph, module)
    return seen


@pytest.fixture(scope="module")
def graph() -> ImportGraph:
    return build_graph()


def test_the_graph_covers_our_packages(graph: ImportGraph) -> None:
    for module in ["diffmesh.client", "diffmesh.server", "diffmesh_router.app", "diffmesh_coordinator.app",
                   "diffmesh_instance_manager.app", "diffmesh_worker.app"]:
        assert graph.is_ours(module), module
    assert "diffmesh.server" in graph.edges["diffmesh_router.app"] or any(
        "diffmesh.server" in graph.edges[m] for m in graph.modules if m.startswith("diffmesh_router")
    ), "imports were not resolved"


def test_relative_and_lazy_imports_are_resolved(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.sub import b\n")
    (pkg / "sub" / "__init__.py").write_text("from . import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..a import x\n")
    g = build_graph([tmp_path])
    assert g.edges["pkg.a"] == {"pkg.sub.b"}
    assert g.edges["pkg.sub"] == {"pkg.sub.b"}
    assert g.edges["pkg.sub.b"] == {"pkg.a"}
    assert strongly_connected(g) == [["pkg.a", "pkg.sub.b"]]
    assert a_cycle(g, ["pkg.a", "pkg.sub.b"]) == ["pkg.a", "pkg.sub.b", "pkg.a"]
    assert client_side(g, ["pkg.a"]) == {"pkg.a", "pkg.sub.b", "pkg", "pkg.sub"}


def test_no_import_cycles(graph: ImportGraph) -> None:
    cycles = [
        " → ".join(a_cycle(graph, component)) + f"  (all of {', '.join(component)} import each other)"
        for component in strongly_connected(graph)
    ]
    assert cycles == [], "import cycles:\n  " + "\n  ".join(cycles)


def test_client_side_imports_nothing_server_side(graph: ImportGraph) -> None:
    offenders = []
    for module in sorted(client_side(graph)):
        names = graph.imported.get(module, set())
        for bad in SERVER_SIDE:
            if any(name == bad or name.startswith(bad + ".") for name in names):
                via = " → ".join(path_to(graph, CLIENT_ROOTS, module))
                offenders.append(f"{module} imports {bad} (client path: {via})")
    assert offenders == [], "client-side modules import server-side code:\n  " + "\n  ".join(offenders)
