"""Where the CLI prints (and logs): a terminal gets rich's live output, a file or pipe (a Slurm log) gets plain
lines and tables at their full width (rich would cut them to 80 columns)."""

from __future__ import annotations

import logging
import os

from rich.console import Console

FILE_WIDTH = 1000


def make_console(stderr: bool = False) -> Console:
    """A console on stdout (or stderr): the terminal's width on a terminal; elsewhere ``$COLUMNS``
    when set, else wide enough that no table is cut (tables keep their natural width)."""
    console = Console(stderr=stderr)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(stderr=stderr, width=FILE_WIDTH)
    return console


def log_to_stderr() -> None:
    """Send the ``a2a_bench`` logger's records (INFO and up) to stderr as ``a2a-bench: <message>`` lines."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("a2a-bench: %(message)s"))
    logging.getLogger("a2a_bench").addHandler(handler)
    logging.getLogger("a2a_bench").setLevel(logging.INFO)
