"""Where the CLI may write: output folders and files are checked before any work, one line per problem."""

from __future__ import annotations

import os
from pathlib import Path

from a2a_bench.engine.spec import SpecError


def check_out_dir(path: Path, option: str = "--out") -> None:
    """Raise ``SpecError`` unless ``path`` is a folder this process can write into, or can create.

    Nothing is created: a missing folder is fine when its nearest existing ancestor is a writable folder.
    """
    path = Path(path)
    if path.exists():
        if not path.is_dir():
            raise SpecError(f"{option} {path}: is a file, not a folder")
        if not _writable(path):
            raise SpecError(f"{option} {path}: the folder is not writable")
        return
    _check_creatable(path, option)


def check_out_file(path: Path, option: str = "--out") -> None:
    """Raise ``SpecError`` unless ``path`` names a file this process can write (replace) or create."""
    path = Path(path)
    if path.is_dir():
        raise SpecError(f"{option} {path}: is a folder, not a file")
    if path.exists() and not os.access(path, os.W_OK):
        raise SpecError(f"{option} {path}: the file is not writable")
    parent = path.parent
    if parent.exists():
        if not parent.is_dir():
            raise SpecError(f"{option} {path}: {parent} is a file, not a folder")
        if not _writable(parent):
            raise SpecError(f"{option} {path}: its folder {parent} is not writable")
        return
    _check_creatable(parent, option, shown=path)


def _check_creatable(path: Path, option: str, shown: Path | None = None) -> None:
    shown = shown or path
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise SpecError(f"{option} {shown}: {ancestor} is a file, not a folder")
    if not _writable(ancestor):
        raise SpecError(f"{option} {shown}: cannot create it, {ancestor} is not writable")


def _writable(folder: Path) -> bool:
    return os.access(folder, os.W_OK | os.X_OK)
