"""Dependencies point one way: a2a_bench -> fused_a2a; inside the library, backends import only the
layer below them (base, autograd, checks), never knob resolution, the seed functions or each other, and no
two library modules import each other, directly or around a circle, at module level or inside a function.
Inside a2a_bench, packages are layered (:data:`A2A_LAYERS`), no module import circle exists, and no code
names a backend (:func:`backend_mentions` says what counts)."""

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
    "fused_a2a.layout",
    "fused_a2a.backends.direct", "fused_a2a.backends.frameworks",
}
# a backend's own helper modules
OWN_HELPERS = {
    "uccl.py": {"fused_a2a.backends.uccl_buffer"},
    "torch_a2a.py": {"fused_a2a.backends.torch_routing", "fused_a2a.backends.torch_stages"},
    "torch_routing.py": {"fused_a2a.backends.torch_routing_kernels"},
    "torch_stages.py": {"fused_a2a.backends.torch_routing", "fused_a2a.backends.torch_routing_kernels"},
    "hybridep.py": {"fused_a2a.backends.hybridep_adapter", "fused_a2a.backends.hybridep_buffer",
                    "fused_a2a.backends.hybridep_direct", "fused_a2a.backends.hybridep_knobs"},
    "hybridep_adapter.py": {"fused_a2a.backends.hybridep_buffer", "fused_a2a.backends.hybridep_routing"},
    "hybridep_direct.py": {"fused_a2a.backends.hybridep_buffer", "fused_a2a.backends.hybridep_knobs",
                           "fused_a2a.backends.hybridep_routing"},
    "hybridep_knobs.py": {"fused_a2a.backends.hybridep_buffer"},
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


def module_name(path: Path, root: Path) -> str:
    """The dotted name of the module at ``path`` under the import root ``root``."""
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Library module -> the library modules it imports, wherever the import statement stands (a function's
    body included). A module's import of a package that holds it adds no edge: Python runs that package's
    ``__init__`` before the module in any case."""
    graph = {}
    for path in LIBRARY.rglob("*.py"):
        name = module_name(path, LIBRARY.parent)
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


# ---------------------------------------------------------------------------------------------------
# a2a_bench: layers, no circles, no backend names

TOOL = LIBRARY.parent.parent / "a2a_bench"
TOOL_MODULES = sorted(TOOL.rglob("*.py"))
# each a2a_bench package (or top-level module) and the ones it may import: every arrow points down
A2A_LAYERS: dict[str, set[str]] = {
    "a2a_bench": set(),  # __init__: the version
    "a2a_bench.output": set(),
    "a2a_bench.launch": {"a2a_bench"},
    "a2a_bench.engine": {"a2a_bench", "a2a_bench.output", "a2a_bench.launch"},
    "a2a_bench.bench": {"a2a_bench", "a2a_bench.output", "a2a_bench.engine"},
    "a2a_bench.reports": {"a2a_bench", "a2a_bench.output", "a2a_bench.engine"},
    "a2a_bench.commands": {"a2a_bench", "a2a_bench.output", "a2a_bench.launch", "a2a_bench.engine", "a2a_bench.bench",
                           "a2a_bench.reports"},
    "a2a_bench.cli": {"a2a_bench", "a2a_bench.output", "a2a_bench.launch", "a2a_bench.engine", "a2a_bench.commands"},
    "a2a_bench.__main__": {"a2a_bench.cli"},
}
CLI_MAX_LINES = 350


def layer(module: str) -> str:
    """The :data:`A2A_LAYERS` key of an a2a_bench module: its package, or itself at the top level."""
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 and (TOOL / parts[1]).is_dir() else module


def tool_imports(path: Path) -> set[str]:
    """The a2a_bench modules ``path`` imports, deferred imports included (``from a.b import c``: ``a.b.c``
    when that is a module, else ``a.b``)."""
    names = set()
    for name in fused_a2a_imports(path):
        if name.startswith("a2a_bench"):
            names.add(name if is_tool_module(name) else name.rsplit(".", 1)[0])
    return {name for name in names if is_tool_module(name)}


def is_tool_module(name: str) -> bool:
    parts = name.split(".")
    return TOOL.parent.joinpath(*parts).with_suffix(".py").exists() or (TOOL.parent.joinpath(*parts) / "__init__.py").exists()


@pytest.mark.parametrize("path", TOOL_MODULES, ids=lambda p: str(p.relative_to(TOOL)))
def test_a2a_bench_imports_only_the_layers_below(path: Path) -> None:
    own = layer(module_name(path, TOOL.parent))
    allowed = A2A_LAYERS[own] | {own}
    upward = sorted(name for name in tool_imports(path) if layer(name) not in allowed)
    assert upward == [], f"{module_name(path, TOOL.parent)} ({own}) imports {upward}"


def test_a2a_bench_has_no_import_circle() -> None:
    graph = {}
    for path in TOOL_MODULES:
        name = module_name(path, TOOL.parent)
        # a module's own package __init__ runs first: no circle
        graph[name] = tool_imports(path) - {name, name.rsplit(".", 1)[0]}
    assert circles(graph) == []


def test_cli_only_parses() -> None:
    lines = len((TOOL / "cli.py").read_text().splitlines())
    assert lines <= CLI_MAX_LINES, f"cli.py has {lines} lines: command bodies go to a2a_bench/commands"


# Backend names: the registered ones and the backend modules of fused_a2a.backends. "torch" is also the
# PyTorch library's name: it may name that library where a file records versions (TORCH_AS_LIBRARY).
BACKEND_WORDS = ("deepep", "hybridep", "uccl")
BACKEND_NAMES = {*BACKEND_WORDS, "torch"}
BACKEND_MODULE_NAMES = {p.stem for p in BACKENDS.glob("*.py")} - {"__init__", "base", "direct", "frameworks", "optional"}
TORCH_AS_LIBRARY = {"engine/results.py", "engine/runner.py", "engine/versions.py"}  # the results column, versions key


def docstrings(tree: ast.AST) -> set[int]:
    """ids of the docstring nodes of a module, its classes and functions (text for readers)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                found.add(id(body[0].value))
    return found


def backend_mentions(source: str, torch_is_library: bool = False) -> list[str]:
    """Where code names a backend. Counted: an import of a backend's module (``fused_a2a.backends.deepep``,
    ``from fused_a2a.backends import hybridep``); a string constant that is exactly a backend name
    (``backend == "deepep"``, ``{"uccl": ...}``, ``backend="torch"``); an identifier holding a backend's
    name (``hybridep.current_buffer``, ``seed_deepep``). Not counted, since they are text for users and
    readers: docstrings, comments, and strings in which a backend name is part of longer text (help strings,
    messages: ``"Backends, comma list (torch, deepep, hybridep, uccl)."``)."""
    tree = ast.parse(source)
    skip = docstrings(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            modules = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
        elif isinstance(node, ast.Import):
            modules = [a.name for a in node.names]
        else:
            modules = []
        for name in modules:
            parts = name.split(".")
            if parts[:2] == ["fused_a2a", "backends"] and len(parts) > 2 and parts[2] in BACKEND_MODULE_NAMES:
                found.append(f"line {node.lineno}: imports {name}")
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
            word = node.value.strip().lower()
            if word in BACKEND_NAMES and not (word == "torch" and torch_is_library):
                found.append(f"line {node.lineno}: string {node.value!r}")
        names = []
        if isinstance(node, ast.Name):
            names = [node.id]
        elif isinstance(node, ast.Attribute):
            names = [node.attr]
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names = [node.name]
        elif isinstance(node, ast.arg):
            names = [node.arg]
        elif isinstance(node, ast.alias):
            names = [node.asname or node.name]
        for name in names:
            if any(word in name.lower() for word in BACKEND_WORDS):
                found.append(f"line {getattr(node, 'lineno', '?')}: name {name}")
    return found


@pytest.mark.parametrize("path", TOOL_MODULES, ids=lambda p: str(p.relative_to(TOOL)))
def test_a2a_bench_names_no_backend(path: Path) -> None:
    relative = str(path.relative_to(TOOL))
    assert backend_mentions(path.read_text(), relative in TORCH_AS_LIBRARY) == []


def test_the_backend_name_check_sees_what_it_forbids_and_spares_text() -> None:
    bad = ('from fused_a2a.backends import hybridep\nimport fused_a2a.backends.deepep\nif backend == "uccl":\n    pass\n'
           'x = {"deepep": 1}\nfused_a2a.dispatch(x, backend="torch")\nseed_deepep = 1\n')
    assert len(backend_mentions(bad)) >= 6
    text = ('"""Backends: deepep, hybridep."""\nhelp = "Backends, comma list (torch, deepep, hybridep, uccl)."\n'
            'message = f"use --backend {name}, not deepep"\n')
    assert backend_mentions(text) == []
    assert backend_mentions('columns = ["torch"]\n', torch_is_library=True) == []


def test_one_list_of_timing_modes_and_one_routing_key() -> None:
    """The timing modes are the tuning table's (``SELECTION_MODES``), written nowhere in a2a_bench; the
    routing key (``zipf:<skew>``) is formatted only beside ``WorkloadSpec``."""
    from fused_a2a.tuning.table import SELECTION_MODES

    for path in TOOL_MODULES:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Tuple) and all(isinstance(e, ast.Constant) for e in node.elts):
                assert tuple(e.value for e in node.elts) != SELECTION_MODES, f"{path}: line {node.lineno}"
            if isinstance(node, ast.JoinedStr) and path.name != "workload.py":
                values = node.values
                for before, after in zip(values, values[1:]):
                    routing_like = (isinstance(before, ast.Constant) and str(before.value).endswith(":")
                                    and isinstance(after, ast.FormattedValue) and after.format_spec is not None
                                    and ast.unparse(after.format_spec) == "f'g'")
                    assert not routing_like, f"{path}: line {node.lineno} formats a routing key"
