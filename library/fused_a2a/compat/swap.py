"""Put a stand-in in place of a framework's ``fused_a2a`` module, in this process.

:func:`install` registers the stand-in in ``sys.modules`` under the framework's module name. Every later
``from <that module> import name`` (what the frameworks' dispatchers do), ``importlib.import_module`` and
``mock.patch("<module>.name")`` then gets the stand-in, whether or not the framework's packages exist:
Python looks the full name up in ``sys.modules`` before it imports any parent package.

The stand-in is also made an attribute of its parent package, so that ``import <module>`` followed by
attribute access and string paths resolved attribute by attribute (pytest's ``monkeypatch.setattr``)
find it too: at once if the parent is imported, else right after the parent is imported (a one-shot hook
on ``sys.meta_path`` that wraps the parent's loader for that one import). Without the framework installed
there is no parent to attach to: ``import <module>`` and ``from <parent> import fused_a2a`` then fail as
they would without the stand-in (no fake parent package is made, so feature checks such as
``importlib.util.find_spec("megatron")`` stay truthful).
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys
import threading
import warnings
from types import ModuleType
from typing import Any

# framework -> the module the stand-in replaces
FRAMEWORKS: dict[str, str] = {
    "automodel": "nemo_automodel.components.moe.megatron.fused_a2a",
    "megatron": "megatron.core.transformer.moe.fused_a2a",
}
# framework -> the stand-in
STAND_INS: dict[str, str] = {
    "automodel": "fused_a2a.compat.automodel",
    "megatron": "fused_a2a.compat.megatron",
}

_lock = threading.RLock()
_installed: dict[str, ModuleType | None] = {}  # framework -> what its module name held before install


def framework_module(framework: str) -> str:
    """The module name :func:`install` replaces for ``framework``.

    Raises:
        ValueError: an unknown framework name.
    """
    if framework not in FRAMEWORKS:
        raise ValueError(f"unknown framework {framework!r}; choose from {', '.join(sorted(FRAMEWORKS))}")
    return FRAMEWORKS[framework]


def stand_in(framework: str) -> ModuleType:
    """The stand-in module for ``framework`` (imported on first use).

    Raises:
        ValueError: an unknown framework name.
    """
    framework_module(framework)
    return importlib.import_module(STAND_INS[framework])


def install(framework: str) -> ModuleType | None:
    """Make ``framework``'s ``fused_a2a`` module this library's stand-in, in this process.

    Call it before the framework imports the module (first lines of the training script)::

        import fused_a2a.compat; fused_a2a.compat.install("megatron")   # or "automodel"

    If the framework already imported its own module, the stand-in still replaces it, with a
    ``RuntimeWarning``: modules that already did ``from <module> import name`` keep the originals.
    Installing twice is a no-op.

    Args:
        framework: ``"automodel"`` (``nemo_automodel.components.moe.megatron.fused_a2a``) or
            ``"megatron"`` (``megatron.core.transformer.moe.fused_a2a``).

    Returns:
        the module the framework's module name held before (``None`` if it was not imported yet, or
        if the stand-in was already installed).

    Raises:
        ValueError: an unknown framework name.
    """
    name = framework_module(framework)
    module = stand_in(framework)
    with _lock:
        previous = sys.modules.get(name)
        if previous is module:
            return None
        if previous is not None:
            warnings.warn(f"fused_a2a.compat: {name} was imported before install({framework!r}); code that already "
                          "imported names from it keeps the originals", RuntimeWarning, stacklevel=2)
        sys.modules[name] = module
        _attach(name, module)
        _installed[framework] = previous
    return previous


def uninstall(framework: str) -> None:
    """Undo :func:`install`: the module name holds what it held before (or nothing), and its parent
    package's attribute likewise. A no-op if the stand-in is not installed.

    Raises:
        ValueError: an unknown framework name.
    """
    name = framework_module(framework)
    with _lock:
        if framework not in _installed:
            return
        previous = _installed.pop(framework)
        _HOOK.forget(name)
        if previous is None:
            sys.modules.pop(name, None)
        else:
            sys.modules[name] = previous
        parent_name, _, child = name.rpartition(".")
        parent = sys.modules.get(parent_name)
        if parent is not None:
            if previous is None:
                parent.__dict__.pop(child, None)
            else:
                setattr(parent, child, previous)


def replaced() -> dict[str, str]:
    """Which framework modules are stand-ins in this process: framework -> module name (for ``a2a-bench show``)."""
    with _lock:
        live = {}
        for framework in sorted(_installed):
            module = sys.modules.get(STAND_INS[framework])
            if module is not None and sys.modules.get(FRAMEWORKS[framework]) is module:
                live[framework] = FRAMEWORKS[framework]
        return live


def _attach(name: str, module: ModuleType) -> None:
    """Make ``module`` the attribute of its parent package now, or once the parent is imported."""
    parent_name, _, child = name.rpartition(".")
    parent = sys.modules.get(parent_name)
    if parent is not None:
        setattr(parent, child, module)
    else:
        _HOOK.expect(parent_name, child, module)


class _AttachLoader(importlib.abc.Loader):
    """Loads a package with its own loader, then sets the stand-ins as its attributes and puts the
    package's own loader back on it (nothing outlives the import). Everything else is delegated."""

    def __init__(self, loader: Any, hook: _AttachOnImport) -> None:
        self._loader = loader
        self._hook = hook

    def create_module(self, spec):
        create = getattr(self._loader, "create_module", None)
        return create(spec) if create is not None else None

    def exec_module(self, module: ModuleType) -> None:
        try:
            self._loader.exec_module(module)
        finally:
            module.__loader__ = self._loader
            if getattr(module, "__spec__", None) is not None and module.__spec__.loader is self:
                module.__spec__.loader = self._loader
        self._hook.loaded(module)

    def __getattr__(self, name: str):
        return getattr(self._loader, name)


class _AttachOnImport(importlib.abc.MetaPathFinder):
    """A ``sys.meta_path`` entry that attaches stand-ins to their parent packages once those are imported.

    It finds nothing itself: for a parent package it is waiting for, it asks the finders after it
    and wraps the loader of the spec they return. It leaves ``sys.meta_path`` when it waits for nothing.
    """

    def __init__(self) -> None:
        self._pending: dict[str, dict[str, ModuleType]] = {}  # parent package -> {attribute: stand-in}
        self._finding: set[str] = set()

    def expect(self, parent: str, child: str, module: ModuleType) -> None:
        self._pending.setdefault(parent, {})[child] = module
        if self not in sys.meta_path:
            sys.meta_path.insert(0, self)

    def forget(self, name: str) -> None:
        parent, _, child = name.rpartition(".")
        children = self._pending.get(parent, {})
        children.pop(child, None)
        if not children:
            self._pending.pop(parent, None)
        self._leave_if_idle()

    def loaded(self, package: ModuleType) -> None:
        with _lock:
            for child, module in self._pending.pop(package.__name__, {}).items():
                setattr(package, child, module)
            self._leave_if_idle()

    def _leave_if_idle(self) -> None:
        if not self._pending and self in sys.meta_path:
            sys.meta_path.remove(self)

    def find_spec(self, fullname: str, path=None, target=None):
        if fullname not in self._pending or fullname in self._finding:
            return None
        self._finding.add(fullname)
        try:
            for finder in list(sys.meta_path):
                find = getattr(finder, "find_spec", None)
                if finder is self or find is None:
                    continue
                spec = find(fullname, path, target)
                if spec is not None:
                    break
            else:
                return None
        finally:
            self._finding.discard(fullname)
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _AttachLoader(spec.loader, self)
        return spec


_HOOK = _AttachOnImport()
