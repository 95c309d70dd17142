"""Import cycles among the repository's own modules.

Reads every ``.py`` file of the project's packages with ``ast`` (nothing is imported or
run) and prints each cycle of the import graph, one line each, as ``a -> b -> a``.  Every
import counts wherever it is written, inside a function too: an import deferred into a
function still ties the two modules together, it only hides the knot from Python.  Imports
under ``if TYPE_CHECKING:`` do not count: they never run.

    .venv/bin/python scripts/importcycles.py        # exit code 1 when there is a cycle

tests/test_layout.py runs the same check.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("broker", "bus", "edge", "workers", "zchannels", "bench", "tests", "examples")


# Folders of the repository that are installed inside the zchannels package (zchannels/ holds
# a symlink to each), so their modules are named zchannels.<folder>.<module>.
INSIDE_ZCHANNELS = ("broker", "bus", "edge", "workers")


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    if parts[0] in INSIDE_ZCHANNELS:
        parts.insert(0, "zchannels")
    return ".".join(parts)


def project_modules(root: Path = ROOT) -> dict[str, Path]:
    """Dotted name -> file, for every module of the project's packages."""
    found = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            # zchannels/edge ... are symlinks to the folders scanned as themselves
            if "node_modules" not in path.parts and not (
                    path.parts[len(root.parts)] == "zchannels" and len(path.parts) > len(root.parts) + 2):
                found[module_name(path, root)] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imported_names(tree: ast.AST, module: str, is_package: bool):
    """Every dotted name an import statement of the tree may load, TYPE_CHECKING blocks left out."""
    todo = [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            todo.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:   # relative: from the module's package, one level up per extra dot
                package = module.split(".") if is_package else module.split(".")[:-1]
                package = package[:len(package) - (node.level - 1)]
                base = ".".join(package + ([base] if base else []))
            yield base
            for alias in node.names:   # `from pkg import mod` loads pkg.mod
                yield f"{base}.{alias.name}"
        todo.extend(ast.iter_child_nodes(node))


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Module -> the project modules it imports (a name that is not a module counts as its
    nearest enclosing module: ``from bus.wire import pack`` is an import of ``bus.wire``)."""
    modules = project_modules(root)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        targets = set()
        for imported in _imported_names(tree, name, path.name == "__init__.py"):
            while imported and imported not in modules:
                imported = imported.rpartition(".")[0]
            if imported and imported != name:
                targets.add(imported)
        graph[name] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan), each
    given as a shortest closed path through the component's first module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph) + 100))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_shortest_loop(graph, component) for component in sorted(components)]


def _shortest_loop(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    start, members = component[0], set(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:   # breadth first, back to start
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & members):
                if w == start:
                    return paths[v] + [start]
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    return component   # unreachable for a strongly connected component


def main() -> int:
    found = cycles(import_graph())
    for loop in found:
        print(" -> ".join(loop))
    print(f"{len(found)} import cycle(s) among {len(project_modules())} modules", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
