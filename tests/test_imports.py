"""The code has no import circles: every module of ``lib/`` and ``apps/`` is read with ``ast`` (imports at
module level, inside functions and under ``TYPE_CHECKING`` alike, relative ones resolved) and the graph of
project-internal imports must be acyclic.

Why: a circle means two layers each need the other (a lower layer asking the upper one for work), which
makes either hard to change, test or reuse alone; a function-level import only hides it from Python.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: folders whose files are importable as modules (the library, the MONAI Label app's own root)
ROOTS = (REPO / "lib", REPO / "apps" / "ssl_medsam2")


def module_files(roots: tuple[Path, ...] = ROOTS) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` under the roots (packages by their ``__init__``)."""
    found: dict[str, Path] = {}
    for root in roots:
        for path in sorted(root.rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            if parts:
                found[".".join(parts)] = path
    return found


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int]]:
    """(imported project module, line) for every import statement in the file, wherever it stands."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    out = []

    def known(dotted: str) -> str | None:  # the longest prefix that is a project module
        parts = dotted.split(".")
        for i in range(len(parts), 0, -1):
            if ".".join(parts[:i]) in modules:
                return ".".join(parts[:i])
        return None

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(m, node.lineno) for a in node.names if (m := known(a.name))]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".") if package else []
                anchor = anchor[:len(anchor) - (node.level - 1)] if node.level > 1 else anchor
                base = ".".join(anchor + ([node.module] if node.module else []))
            for a in node.names:  # ``from pkg import sub`` names the submodule when it is one
                m = f"{base}.{a.name}" if f"{base}.{a.name}" in modules else known(base) if base else None
                if m:
                    out.append((m, node.lineno))
    return [(m, line) for m, line in out if m != name]


def import_graph(roots: tuple[Path, ...] = ROOTS) -> dict[str, dict[str, int]]:
    """module -> {imported module: first line}, project-internal imports only."""
    modules = module_files(roots)
    graph: dict[str, dict[str, int]] = {}
    for name, path in modules.items():
        edges: dict[str, int] = {}
        for target, line in imports_of(name, path, modules):
            edges.setdefault(target, line)
        graph[name] = edges
    return graph


def strongly_connected(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Tarjan's components with more than one module (each holds at least one circle)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    comps: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return comps


def one_circle(graph: dict[str, dict[str, int]], comp: list[str]) -> list[str]:
    """A shortest circle through the component's first module, as a list of modules (first == last)."""
    inside = set(comp)
    start = comp[0]
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v]):
                if w == start:
                    return paths[v] + [start]
                if w in inside and w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no circle through {start}")  # pragma: no cover - a component always has one


def describe(graph: dict[str, dict[str, int]], circle: list[str], roots: tuple[Path, ...] = ROOTS) -> str:
    """``a (file:line) -> b (file:line) -> ... -> a``: each module with the line that imports the next."""
    files = module_files(roots)
    where = {n: next(f.relative_to(r) for r in roots if f.is_relative_to(r)) for n, f in files.items()}
    return " -> ".join(f"{a} ({where[a]}:{graph[a][b]})" for a, b in zip(circle, circle[1:])) + f" -> {circle[-1]}"


def test_the_checker_sees_every_kind_of_import(tmp_path):
    """Module-level, function-level, TYPE_CHECKING and relative imports all make edges; a circle is named."""
    pkg = tmp_path / "lib" / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..c import x\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import a\n"
                              "x = 1\n")
    (pkg / "d.py").write_text("import pkg.c\nimport os\n")
    graph = import_graph((tmp_path / "lib",))
    assert graph["pkg.a"] == {"pkg.sub.b": 1}
    assert graph["pkg.sub.b"] == {"pkg.c": 2}
    assert graph["pkg.c"] == {"pkg.a": 3}
    assert graph["pkg.d"] == {"pkg.c": 1}
    comps = strongly_connected(graph)
    assert comps == [["pkg.a", "pkg.c", "pkg.sub.b"]]
    assert one_circle(graph, comps[0]) == ["pkg.a", "pkg.sub.b", "pkg.c", "pkg.a"]
    assert describe(graph, ["pkg.c", "pkg.a", "pkg.sub.b", "pkg.c"], (tmp_path / "lib",)).startswith(
        "pkg.c (pkg/c.py:3) -> pkg.a (pkg/a.py:1) -> pkg.sub.b (pkg/sub/b.py:2) -> pkg.c")


def test_lib_and_apps_have_no_import_circle():
    graph = import_graph()
    assert "ssl_medsam2.pseudo_label" in graph and "lib.trainers" in graph  # both roots were read
    circles = [f"{len(comp)} modules in a circle, e.g. {describe(graph, one_circle(graph, comp))}"
               for comp in strongly_connected(graph)]
    assert not circles, "import circles:\n" + "\n".join(circles)
