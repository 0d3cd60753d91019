"""Dependencies point one way: a2a_bench -> fused_a2a; inside the library, backends import only the
layer below them (base, autograd, checks), never knob resolution, the seed functions or each other."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

LIBRARY = Path(__file__).resolve().parents[1] / "library" / "fused_a2a"
BACKENDS = LIBRARY / "backends"
# what a backend module may import from fused_a2a: the layer below backends
BELOW_BACKENDS = {
    "fused_a2a.autograd", "fused_a2a.checks", "fused_a2a.fp8", "fused_a2a.environment", "fused_a2a.backends.base",
    "fused_a2a.backends.optional", "fused_a2a.backends.chunk_config", "fused_a2a.groups", "fused_a2a.shared_errors",
}
# a backend's own helper modules
OWN_HELPERS = {
    "uccl.py": {"fused_a2a.backends.uccl_buffer"},
    "torch_a2a.py": {"fused_a2a.backends.torch_routing"},
    "torch_routing.py": {"fused_a2a.backends.torch_routing_kernels"},
    "hybridep.py": {"fused_a2a.backends.hybridep_routing"},
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
