"""``a2a-bench tune``, ``table`` and ``export``: tuning tables made from a sweep, printed, and given to other
tools."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from a2a_bench.engine.results import ResultsError
from a2a_bench.output import make_console
from a2a_bench.engine.writable import check_out_dir, check_out_file
from a2a_bench.reports.export import check_request, describe, find_entry, load_table, render
from a2a_bench.reports.fit import print_table
from a2a_bench.reports.report import tuning_markdown, tuning_table
from a2a_bench.reports.tables import MARKDOWN_NAME, check_printable, machine_ids, machine_tables, publish
from a2a_bench.reports.tune import default_out_root, library_reads
from fused_a2a.files import atomic_write_text
from fused_a2a.tuning.resolve import declared_routing, tuning_dirs
from fused_a2a.tuning.table import read_table


def tune(run_dir: Path, out: Optional[Path], routing: Optional[str], by: str, wide: bool) -> None:
    """Tune ``run_dir`` into the tables under ``out`` (default: :func:`default_out_root`), the rows of
    ``routing`` only when given, selecting by mode ``by``."""
    out = out or default_out_root()
    check_out_dir(out)
    tune_and_print(run_dir, out, None if routing is None else declared_routing(routing), by, wide)


def tune_and_print(run_dir: Path, out: Path, routing: Optional[str], by: str, wide: bool) -> None:
    """Tune ``run_dir`` into ``out`` and print the table, where it went and how a job uses it."""
    path, table = publish(run_dir, out, routing, by)
    console = make_console()
    print_table(console, tuning_table(table), wide, str(path.parent / MARKDOWN_NAME))
    e = table.entries[0]
    console.print(f"wrote {path}; {library_reads(path)}", markup=False, highlight=False)
    console.print(f"the whole table as Markdown: {path.parent / MARKDOWN_NAME}; jobs get these knobs from "
                  f"fused_a2a.dispatch/combine and fused_a2a.compat; what a call uses: a2a-bench show --backend "
                  f"{e.backend} --hidden {e.hidden} --tokens {e.num_tokens} --world-size {e.world_size}",
                  markup=False, highlight=False)


def table(cluster_dir: Optional[Path], wide: bool) -> None:
    """Print a cluster's tuning table (``cluster_dir``, else this machine's of every world size) and write
    it as Markdown beside it."""
    folders = [cluster_dir] if cluster_dir is not None else machine_tables()
    if not folders:
        raise ResultsError(f"no tuning table for this machine yet: looked for {machine_ids()} in "
                           f"{' or '.join(map(str, tuning_dirs()))}; make one with a2a-bench sweep --nproc 2 --tune, "
                           "or pass a CLUSTER_DIR")
    tables = []
    for folder in folders:
        path = folder / "tuning.json"
        tuning = read_table(path)
        check_printable(tuning, str(path))
        check_out_file(folder / MARKDOWN_NAME, "CLUSTER_DIR")
        tables.append((folder, tuning))
    console = make_console()
    for folder, tuning in tables:
        atomic_write_text(folder / MARKDOWN_NAME, tuning_markdown(tuning))
        print_table(console, tuning_table(tuning), wide, str(folder / MARKDOWN_NAME))
        console.print(f"wrote {folder / MARKDOWN_NAME}", markup=False, highlight=False)


def export(fmt: str, backend: str, hidden: int, tokens: int, world_size: int, dtype: str, topk: Optional[int],
           experts: Optional[int], cluster_dir: Optional[Path], out: Optional[Path], routing: str) -> None:
    """The table entry for a call in format ``fmt``, printed or written atomically to ``out``."""
    check_request(fmt, backend)
    if out is not None:
        check_out_file(out)
    entry = find_entry(load_table(cluster_dir, world_size), backend, world_size, dtype, hidden, tokens, topk, experts,
                       declared_routing(routing))
    text = render(fmt, entry)
    if out is None:
        print(text, end="")
        return
    atomic_write_text(out, text)
    print(f"wrote {out} (entry: {describe(entry)})")
