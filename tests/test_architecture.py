"""The project's import graph, read with `ast` (nothing is imported): no circles, tests/ and tools/
never import each other, and no project module is imported inside a function (only optional
third-party dependencies may be)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("reference", "conformance", "tests", "tools")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> str:
    """The absolute module name an ImportFrom refers to."""
    if node.level == 0:
        return node.module or ""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = package[:len(package) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _targets(module: str, path: Path, modules: dict) -> list[tuple[str, bool]]:
    """(imported project module, inside a function?) for every import of the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    in_function = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            in_function.update(id(n) for n in ast.walk(node) if n is not node)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            source = _resolve(module, path, node)
            # `from package import submodule` imports the submodule; otherwise the module itself.
            names = [f"{source}.{a.name}" if f"{source}.{a.name}" in modules else source for a in node.names]
        else:
            continue
        for name in names:
            if module.startswith("tools.") and name in {m.split(".")[-1] for m in modules if m.startswith("tools.")}:
                name = f"tools.{name}"          # tools put their own folder on sys.path
            while name and name not in modules:
                name = name.rpartition(".")[0]  # `import a.b.c` of a package: its deepest project module
            if name and name != module:
                found.append((name, id(node) in in_function))
    return found


def _graph() -> dict[str, list[tuple[str, bool]]]:
    modules = _modules()
    return {m: _targets(m, p, modules) for m, p in modules.items()}


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
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
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_no_import_circles():
    """No module reaches itself through imports, counting imports inside functions too."""
    graph = _graph()
    cycles = _cycles({m: {t for t, _ in targets} for m, targets in graph.items()})
    assert cycles == [], f"import circles: {cycles}"


def test_tests_and_tools_do_not_import_each_other():
    """tests/ run tools as programs and tools never import tests: neither depends on the other's insides."""
    crossing = [f"{m} -> {t}" for m, targets in _graph().items() for t, _ in targets
                if {m.split(".")[0], t.split(".")[0]} == {"tests", "tools"}]
    assert crossing == []


def test_no_project_import_inside_a_function():
    """Imports inside functions are for optional dependencies only, never for the project's own modules."""
    inside = [f"{m} -> {t}" for m, targets in _graph().items() for t, nested in targets if nested]
    assert inside == []


def test_the_checker_finds_a_circle():
    """The cycle finder itself can fail: a -> b -> a is reported, a tree is not."""
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
    assert _cycles({"a": {"b"}, "b": {"c"}}) == []
