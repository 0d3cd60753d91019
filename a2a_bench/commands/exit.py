"""How a command body ends with a status of its own (the CLI exits with it)."""

from __future__ import annotations


class CommandExit(Exception):
    """The command ends with exit status ``code`` (its lines, if any, are printed)."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code
