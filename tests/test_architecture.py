"""Dependencies point one way: a2a_bench -> fused_a2a; inside the library, backends import only the
layer below them (base, autograd, checks), never knob resolution, the seed functions or each other, and no
two library modules import each other, directly or around a circle, at module level or inside a function."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

LIBRARY = Path(__file__).resolve().parents[1] / "library" / "fused_a2a"
BACKENDS = LIBRARY / "backends"
# what a backend module may import from fused_a2a: the layer below backends
BELOW_BACKENDS = {
    "fused_a2a.autograd", "fused_a2a.checks", "fused_a2a.fp8", "fused_a2a.env_snapshot", "fused_a2a.shape", "fused_a2a.backends.base",
    "fused_a2a.backends.optional", "fused_a2a.backends.chunk_config", "fused_a2a.groups", "fused_a2a.shared_errors",
}
# a backend's own helper modules
OWN_HELPERS = {
    "uccl.py": {"fused_a2a.backends.uccl_buffer"},
    "torch_a2a.py": {"fused_a2a.backends.torch_routing"},
    "torch_routing.py": {"fused_a2a.backends.torch_routing_kernels"},
    "hybridep.py": {"fused_a2a.backends.hybridep_adapter", "fused_a2a.backends.hybridep_buffer"},
    "hybridep_adapter.py": {"fused_a2a.backends.hybridep_buffer", "fused_a2a.backends.hybridep_routing"},
}


def fused_a2a_imports(path: Path) -> set[str]:
    """Every ``fused_a2a``/``a2a_bench`` module that ``path`` imports (``from x import y`` gives ``x`` and ``x.y``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name.split(".")[0] in ("fused_a2a", "a2a_bench")}


def is_module(name: str) -> bool:
    parts = name.split(".")
    return (LIBRARY.parent.joinpath(*parts).with_suffix(".py")).exists() or (LIBRARY.parent.joinpath(*parts) / "__init__.py").exists()


BACKEND_MODULES = sorted(p for p in BACKENDS.glob("*.py") if p.name != "__init__.py")


@pytest.mark.parametrize("path", BACKEND_MODULES, ids=lambda p: p.name)
def test_backend_modules_import_only_the_layer_below(path: Path) -> None:
    allowed = BELOW_BACKENDS | OWN_HELPERS.get(path.name, set())
    upward = sorted(name for name in fused_a2a_imports(path) if is_module(name) and name not in allowed)
    assert upward == [], f"{path.name} imports {upward}"


def test_the_registry_imports_backends_and_nothing_above() -> None:
    imported = {name for name in fused_a2a_imports(BACKENDS / "__init__.py") if is_module(name)}
    above = {name for name in imported if not name.startswith("fused_a2a.backends") and name not in BELOW_BACKENDS}
    assert above == set()


@pytest.mark.parametrize("path", sorted(LIBRARY.rglob("*.py")), ids=lambda p: str(p.relative_to(LIBRARY)))
def test_the_library_never_imports_the_tool(path: Path) -> None:
    assert not any(name.startswith("a2a_bench") for name in fused_a2a_imports(path))


def test_the_check_sees_an_upward_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("from fused_a2a.tuning.resolve import resolve\nfrom fused_a2a.backends import deepep\n")
    assert {"fused_a2a.tuning.resolve", "fused_a2a.backends.deepep"} <= fused_a2a_imports(bad)
    assert is_module("fused_a2a.tuning.resolve") and not is_module("fused_a2a.tuning.resolve.resolve")


def module_name(path: Path) -> str:
    parts = path.relative_to(LIBRARY.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Library module -> the library modules it imports, wherever the import statement stands (a function's
    body included). A module's import of a package that holds it adds no edge: Python runs that package's
    ``__init__`` before the module in any case."""
    graph = {}
    for path in LIBRARY.rglob("*.py"):
        name = module_name(path)
        graph[name] = {imported for imported in fused_a2a_imports(path)
                       if is_module(imported) and imported != name and not name.startswith(imported + ".")}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One circle through each module that lies on one (depth-first search), as the modules around it."""
    found, state, stack = [], {}, []

    def visit(name: str) -> None:
        state[name] = "open"
        stack.append(name)
        for imported in sorted(graph.get(name, ())):
            if state.get(imported) == "open":
                found.append(stack[stack.index(imported):] + [imported])
            elif imported not in state:
                visit(imported)
        stack.pop()
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name)
    return found


def test_no_import_circle_in_the_library() -> None:
    assert circles(import_graph()) == []


def test_the_circle_check_sees_a_deferred_import(tmp_path: Path) -> None:
    deferred = tmp_path / "deferred.py"
    deferred.write_text("def clear():\n    from fused_a2a.tuning import agreement\n")
    assert "fused_a2a.tuning.agreement" in fused_a2a_imports(deferred)
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
