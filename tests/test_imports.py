"""The import graph of asmkit, read statically (ast): no cycle, and no private name of
another module imported, apart from ``asmkit._kernels`` and ``asmkit._validation``."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src" / "asmkit"
#: Modules whose private names any module may use.
SHARED_PRIVATE = {"asmkit._kernels", "asmkit._validation"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in sorted(SRC.rglob("*.py"))}


def _resolve(module: str, is_package: bool, level: int, target: str | None) -> str:
    """The absolute name of ``from <level dots><target> import ...`` in ``module``."""
    if level == 0:
        return target or ""
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def _imports(modules: dict[str, Path]):
    """(importer, imported module, imported name or None, line) for every import of an
    asmkit module, at module level and inside functions alike."""
    found = []
    for module, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                found += [
                    (module, alias.name, None, node.lineno)
                    for alias in node.names
                    if alias.name.split(".")[0] == "asmkit"
                ]
            elif isinstance(node, ast.ImportFrom):
                target = _resolve(module, is_package, node.level, node.module)
                if target.split(".")[0] != "asmkit":
                    continue
                for alias in node.names:
                    submodule = f"{target}.{alias.name}"
                    if submodule in modules:  # ``from . import storage``: a module
                        found.append((module, submodule, None, node.lineno))
                    else:
                        found.append((module, target, alias.name, node.lineno))
    return found


def test_the_graph_is_read():
    modules = _modules()
    assert {"asmkit", "asmkit.codebook", "asmkit.index", "asmkit.search"} <= set(modules)
    edges = {(a, b) for a, b, _, _ in _imports(modules)}
    assert ("asmkit.index", "asmkit.codebook") in edges


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of nodes, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}}) is None


def test_no_import_cycle():
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for importer, imported, _, _ in _imports(modules):
        # A package's ``__init__`` re-exports its modules; importing a module of a
        # package runs that ``__init__`` first, which is not an edge of the design.
        if imported != importer and not importer.startswith(imported + "."):
            graph.setdefault(importer, set()).add(imported)
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_private_name_of_another_module():
    offenders = [
        f"{importer} (line {line}) imports {imported}.{name}"
        for importer, imported, name, line in _imports(_modules())
        if name is not None
        and name.startswith("_")
        and not name.startswith("__")
        and imported != importer
        and imported not in SHARED_PRIVATE
    ]
    assert not offenders, "\n".join(offenders)


def test_relative_imports_resolve():
    assert _resolve("asmkit.codebook", False, 1, "_kernels") == "asmkit._kernels"
    assert _resolve("asmkit.compat.legacy", False, 2, None) == "asmkit"
    assert _resolve("asmkit.compat", True, 1, "legacy") == "asmkit.compat.legacy"
    assert _resolve("asmkit.index", False, 0, "asmkit.search") == "asmkit.search"
