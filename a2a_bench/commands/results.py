"""``a2a-bench plot``, ``compare`` and ``search-check``: a sweep's results read back, drawn and compared."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from a2a_bench.engine.results import RESULTS_FILE, read_results
from a2a_bench.engine.spec import SpecError
from a2a_bench.output import make_console
from a2a_bench.engine.writable import check_out_dir


def plot(run_dir: Path, out: Optional[Path], metric: str) -> None:
    """The PNG plots of ``run_dir``'s results (``metric``: ``gbps`` or ``time``) into ``out``; their paths printed."""
    from a2a_bench.reports.plot import METRICS, plot_run

    if metric not in METRICS:
        raise SpecError(f"--metric must be one of {', '.join(METRICS)}, got {metric!r}")
    out = out or run_dir / "plots"
    check_out_dir(out)
    for path in plot_run(read_results(run_dir / RESULTS_FILE), out, metric):
        print(path)


def compare(run_dir: Path, hidden: int, tokens: int, dtype: Optional[str], topk: Optional[int], experts: Optional[int],
            routing: str, by: str, wide: bool) -> None:
    """Backends side by side for one shape of ``run_dir``'s results."""
    from a2a_bench.reports.compare import compare_table
    from a2a_bench.reports.fit import print_table

    table = compare_table(read_results(run_dir / RESULTS_FILE), hidden, tokens, dtype, topk, experts, routing, by)
    print_table(make_console(), table, wide, str(run_dir / RESULTS_FILE))


def search_check(default_run: Path, exhaustive_run: Path, within: float) -> None:
    """The default search's choices against an exhaustive sweep's, ``within`` percent."""
    from a2a_bench.reports.search_check import check_search, search_table, summary

    if not within > 0:
        raise SpecError(f"--within must be a positive percentage, got {within:g}")
    checks = check_search(default_run, exhaustive_run)
    console = make_console()
    console.print(search_table(checks, within / 100))
    console.print(summary(checks, within / 100), markup=False, highlight=False)

