"""A finished sweep's tables: its results and the best config per shape, printed and written to the run
folder's ``summary.md``."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from a2a_bench.engine.results import SUMMARY_FILE
from a2a_bench.output import make_console
from a2a_bench.reports.fit import markdown, print_table
from a2a_bench.reports.report import best_per_shape, summary_table
from fused_a2a.files import atomic_write_text


def print_summary(results: pd.DataFrame, out_dir: Path, wide: bool) -> None:
    """Print the sweep's results and the best config per shape, fitted to the terminal, and write both
    whole to ``out_dir/summary.md``."""
    tables = [summary_table(results)]
    best = best_per_shape(results)
    if best is not None:
        tables.append(best)
    summary = out_dir / SUMMARY_FILE
    atomic_write_text(summary, "\n".join(markdown(t) for t in tables))
    console = make_console()
    for table in tables:
        print_table(console, table, wide, str(summary))
