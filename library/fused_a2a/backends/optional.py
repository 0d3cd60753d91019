"""Import optional backend libraries without failing: remember why one is unavailable."""

from __future__ import annotations

import importlib
import subprocess
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
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


def distribution_version(optional: OptionalModule, distributions: tuple[str, ...]) -> str | None:
    """The installed library's version and build, as precisely as the install records it.

    In order: the package metadata of the first of ``distributions`` installed (DeepEP's setup
    writes its git commit there: ``1.2.1+94a9f8f``); the module's ``__version__``; for a build used
    in place (a source checkout on ``PYTHONPATH``), ``git:<commit>`` of that checkout when the package
    sits at its top (a checkout without its ``.git`` inside another repository is not that repository's
    commit). ``None`` when the module is not importable, ``"unknown"`` when nothing records a version.
    """
    if optional.module is None:
        return None
    for name in distributions:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    declared = getattr(optional.module, "__version__", None)
    if declared:
        return str(declared)
    commit = _git_commit(Path(getattr(optional.module, "__file__", "") or ".").resolve().parent)
    return f"git:{commit}" if commit else "unknown"


def _git_commit(package: Path) -> str | None:
    """The short commit of the git checkout whose top folder holds the ``package`` folder, else ``None``."""
    try:
        out = subprocess.run(["git", "-C", str(package), "rev-parse", "--show-toplevel", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=5, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.stdout.split()
    if len(lines) != 2 or Path(lines[0]).resolve() != package.resolve().parent:
        return None
    return lines[1]
