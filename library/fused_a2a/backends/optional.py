"""Import optional backend libraries without failing: remember why one is unavailable."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType


@dataclass(frozen=True)
class OptionalModule:
    """The outcome of importing an optional library.

    Attributes:
        name: the import name (``deep_ep``, ``uccl.ep``).
        install_hint: what a user installs to get it.
        module: the imported module, or ``None``.
        reason: why the import failed (``None`` when it succeeded).
    """

    name: str
    install_hint: str
    module: ModuleType | None
    reason: str | None

    @property
    def available(self) -> bool:
        return self.module is not None

    def require(self, what: str) -> ModuleType:
        """Return the module, or raise ``RuntimeError`` naming what to install."""
        if self.module is None:
            raise RuntimeError(f"{what} needs {self.name}, which is not available ({self.reason}); {self.install_hint}")
        return self.module


def try_import(name: str, install_hint: str) -> OptionalModule:
    """Import ``name``; any failure (missing package, broken extension) is recorded, not raised."""
    try:
        module = importlib.import_module(name)
    except Exception as exc:  # a broken wheel raises OSError or RuntimeError, not only ImportError
        return OptionalModule(name, install_hint, None, f"{type(exc).__name__}: {exc}".splitlines()[0])
    return OptionalModule(name, install_hint, module, None)
