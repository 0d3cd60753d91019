"""Tables that fit the terminal: the same rows as a rich table of the columns that fit the console's
width (``$COLUMNS``, the terminal's, or unlimited in a log), every column with ``--wide``, and as
Markdown for files.

A column says how readily it leaves (``drop``: 0 never, larger numbers first) and whether it is a
workload column (``shape``): a workload column whose value is the same in every row moves into the
title, so the columns left are the ones that tell the rows apart.
"""

from __future__ import annotations

from dataclasses import dataclass

from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

UNLIMITED = 10**6


@dataclass(frozen=True)
class Column:
    """One column of a :class:`TextTable`.

    Attributes:
        name: its header.
        drop: 0: always shown; when the table is too wide, columns leave in order of larger ``drop``
            first (ties: the rightmost first).
        right: right-aligned (numbers).
        shape: a workload column: shown in the title instead when every row holds the same value.
    """

    name: str
    drop: int = 0
    right: bool = False
    shape: bool = False


@dataclass(frozen=True)
class TextTable:
    """Rows of text cells under named columns, with a title and notes printed under the table."""

    title: str
    columns: tuple[Column, ...]
    rows: tuple[tuple[str, ...], ...]
    notes: tuple[str, ...] = ()

    def constant(self) -> dict[str, str]:
        """The workload columns whose value is the same in every row (column name -> value)."""
        if not self.rows:
            return {}
        return {c.name: self.rows[0][i] for i, c in enumerate(self.columns)
                if c.shape and all(row[i] == self.rows[0][i] for row in self.rows)}

    def heading(self) -> str:
        """The title, followed by the workload columns every row shares."""
        shared = self.constant()
        return self.title + ("" if not shared else "; " + ", ".join(f"{k} {v}" for k, v in shared.items()))

    def shown(self) -> list[int]:
        """Indexes of the columns a full rendering shows (shared workload columns are in the title)."""
        shared = self.constant()
        return [i for i, c in enumerate(self.columns) if c.name not in shared]


def rich_table(table: TextTable, columns: list[int], caption: str | None = None) -> Table:
    """``table`` as a rich :class:`Table` of the columns ``columns`` (indexes), in order."""
    out = Table(title=table.heading(), caption=caption, caption_justify="left")
    for i in columns:
        out.add_column(table.columns[i].name, justify="right" if table.columns[i].right else "left")
    for row in table.rows:
        out.add_row(*(row[i] for i in columns))
    return out


def natural_width(renderable) -> int:
    """The width (characters) ``renderable`` takes when nothing wraps."""
    console = Console(width=UNLIMITED)
    return Measurement.get(console, console.options, renderable).maximum


def fit(table: TextTable, width: int | None) -> tuple[list[int], list[str]]:
    """The columns of ``table`` that fit in ``width`` characters (``None``: all), and the names of
    those left out. Columns leave by their ``drop`` (see :class:`Column`) until the table fits or only
    ``drop == 0`` columns are left (rich then wraps their cells)."""
    columns = table.shown()
    left_out: list[str] = []
    if width is None:
        return columns, left_out
    while natural_width(rich_table(table, columns)) > width:
        candidates = [i for i in columns if table.columns[i].drop > 0]
        if not candidates:
            break
        victim = max(candidates, key=lambda i: (table.columns[i].drop, i))
        columns.remove(victim)
        left_out.append(table.columns[victim].name)
    return columns, left_out


def print_table(console: Console, table: TextTable, wide: bool = False, full: str | None = None) -> None:
    """Print ``table`` on ``console``: the columns that fit its width, or with ``wide`` every column
    at its natural width (wider than the terminal, if need be). A caption names the columns left out
    and where they are: ``--wide``, and ``full`` (a file holding the whole table) when given."""
    if wide:
        rendered = rich_table(table, table.shown())
        Console(file=console.file, width=max(console.width, natural_width(rendered)),
                highlight=False).print(rendered)
    else:
        columns, left_out = fit(table, console.width)
        caption = None
        if left_out:
            caption = (f"left out to fit {console.width} columns: {', '.join(left_out)} (--wide shows them"
                       + (f"; {full} has them" if full else "") + ")")
        console.print(rich_table(table, columns, caption))
    for note in table.notes:
        console.print(note, markup=False, highlight=False)


def markdown(table: TextTable) -> str:
    """``table`` as Markdown: a ``##`` heading, every column, then its notes."""
    columns = table.shown()
    cell = lambda text: text.replace("|", "\\|")
    lines = [f"## {table.heading()}", "", "| " + " | ".join(table.columns[i].name for i in columns) + " |",
             "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row[i]) for i in columns) + " |" for row in table.rows]
    if table.notes:
        lines += ["", *table.notes]
    return "\n".join(lines) + "\n"
