"""The package's modules import each other without a circle.

Read from the source (ast), so that every import counts: at the top, inside a function, and under
TYPE_CHECKING, which hides a circle from the interpreter but not from a reader."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "buffer_service"


def _name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    """The modules an import statement may name, by their full dotted name."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:  # relative: from its package, one level up per further dot
        package = module.split(".") if is_package else module.split(".")[:-1]
        base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    return [base, *(f"{base}.{alias.name}" for alias in node.names)]


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports (subpackages' modules by their dotted name)."""
    paths = {_name(path): path for path in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for module, path in paths.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        found: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = _targets(node, module, path.name == "__init__.py")
                # `from . import x` names the module x when there is one, else the package.
                modules = [n for n in names[1:] if n in paths] or [n for n in names[:1] if n in paths]
                found.update(modules)
        graph[module.removeprefix("buffer_service.")] = {
            m.removeprefix("buffer_service.") for m in found if m != module}
    return graph


def cycle(graph: dict[str, set[str]]) -> list[str]:
    """One circle of imports, as the path around it; [] when there is none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return []

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return []


def test_the_graph_sees_the_imports_it_must():
    graph = import_graph()
    # Guards the reader of the source: a graph that missed these would also miss a circle.
    assert {"store", "processor", "worker"} <= graph["service"]
    assert "store" in graph["processor"]


def test_no_module_imports_itself_back():
    assert cycle(import_graph()) == []


def test_a_circle_is_found():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set()}) == []
