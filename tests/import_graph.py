"""The import graph of a package source tree, read from the AST alone (nothing is imported).

Every `import a.b` and `from a.b import c` counts, at module level and inside functions, classes
and `try` blocks, since all of those execute; imports under `if TYPE_CHECKING:` do not. Relative
imports are resolved against the importing module. `from pkg.engine import ops` is an edge to
`pkg.engine.ops` when that is a module of the tree, else to `pkg.engine`; a package is its
`__init__.py`. Initialising the parent packages of an imported module is not counted as an edge
(every submodule import would otherwise touch the root `__init__`).
"""

from __future__ import annotations

import ast
from collections import deque
from pathlib import Path

# module -> imported module -> line numbers of the import statements
Graph = dict[str, dict[str, list[int]]]


def module_names(root: Path) -> dict[str, Path]:
    """Dotted module name of every .py file under the package directory `root`."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = [root.name, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    if isinstance(test, ast.Name):
        return test.id == "TYPE_CHECKING"
    return isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"


class _Imports(ast.NodeVisitor):
    """Collects (absolute dotted name, imported names or None, line) of every executed import."""

    def __init__(self, package: str):
        self.package = package  # the package relative imports start from
        self.found: list[tuple[str, list[str] | None, int]] = []

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node.test):
            for child in node.orelse:  # the else branch does run
                self.visit(child)
        else:
            self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self.found.append((alias.name, None, node.lineno))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        if node.level:
            anchor = self.package.split(".")
            anchor = anchor[: len(anchor) - (node.level - 1)]
            base = ".".join([*anchor, *([base] if base else [])])
        self.found.append((base, [alias.name for alias in node.names], node.lineno))


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The module of the tree that `import name` executes: `name` or its longest known prefix."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def build_graph(root: Path) -> Graph:
    """Edges between the modules of the package at `root`; imports from outside it are dropped."""
    modules = module_names(root)
    graph: Graph = {}
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        visitor = _Imports(package)
        visitor.visit(ast.parse(path.read_text(), filename=str(path)))
        edges: dict[str, list[int]] = {}
        for name, imported, line in visitor.found:
            if name != root.name and not name.startswith(root.name + "."):
                continue
            if imported is None:
                targets = [_resolve(name, modules)]
            else:
                targets = [
                    f"{name}.{item}" if f"{name}.{item}" in modules else _resolve(name, modules)
                    for item in imported
                ]
            for target in targets:
                if target is None or target == module:
                    continue
                lines = edges.setdefault(target, [])
                if line not in lines:
                    lines.append(line)
        graph[module] = edges
    return graph


def find_cycles(graph: Graph) -> list[list[str]]:
    """Closed paths [a, b, ..., a]: the shortest cycle through each module that is on one."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(node: str) -> None:  # Tarjan; the trees are small, recursion depth is fine
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, {}):
            if nxt not in index:
                connect(nxt)
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
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)

    cycles: list[list[str]] = []
    for component in sorted(components):
        for start in component:  # a shortest cycle through each member, each cycle once
            cycle = _shortest_cycle(graph, start, set(component))
            turn = cycle.index(min(cycle[:-1]))
            canonical = [*cycle[turn:-1], *cycle[:turn], cycle[turn]]
            if canonical not in cycles:
                cycles.append(canonical)
    return cycles


def _shortest_cycle(graph: Graph, start: str, members: set[str]) -> list[str]:
    """Breadth-first inside the strongly connected `members` from `start` back to `start`."""
    parent: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for nxt in sorted(graph[node]):
            if nxt == start:
                path = [node]
                while path[-1] != start:
                    path.append(parent[path[-1]])
                return [start, *reversed(path[:-1]), start]
            if nxt in members and nxt not in parent:
                parent[nxt] = node
                queue.append(nxt)
    raise AssertionError(f"{start} is on no cycle of {sorted(members)}")


def describe_cycle(cycle: list[str], graph: Graph) -> str:
    """`a -> b (line 3) -> a (line 7)`: the path with the line of each import."""
    steps = [cycle[0]]
    for src, dst in zip(cycle[:-1], cycle[1:], strict=True):
        lines = ",".join(str(n) for n in graph[src][dst])
        steps.append(f"{dst} (line {lines} of {src})")
    return " -> ".join(steps)


def layer_of(module: str) -> str:
    """`sparselora.engine.ops` -> "engine"; `sparselora.config` -> "config"; root -> ""."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def violations(graph: Graph, layer: str, forbidden: set[str] | None) -> list[str]:
    """Imports from modules of `layer` into the `forbidden` layers (None: into any module)."""
    found = []
    for src in sorted(graph):
        if layer_of(src) != layer:
            continue
        for dst, lines in sorted(graph[src].items()):
            if forbidden is None or layer_of(dst) in forbidden:
                found.append(f"{src} -> {dst} (line {','.join(map(str, lines))})")
    return found
