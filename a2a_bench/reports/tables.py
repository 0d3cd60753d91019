"""The tuning tables ``a2a-bench tune`` writes and ``a2a-bench table`` prints: writing one with its
``TABLE.md``, finding this machine's, and checking they hold times."""

from __future__ import annotations

import os
import re
from pathlib import Path

from a2a_bench.engine.writable import check_out_file
from a2a_bench.reports.report import tuning_markdown
from a2a_bench.reports.tune import DEFAULT_MODE, tuned_table
from fused_a2a.cluster import CLUSTER_ID_ENV, cluster_id, cluster_id_problem, detect_cluster
from fused_a2a.files import atomic_write_text
from fused_a2a.tuning.resolve import TABLE_NAME, tuning_dirs
from fused_a2a.tuning.table import TuningFileError, TuningTable, update_table

MARKDOWN_NAME = "TABLE.md"

# the measured values a printed entry needs; times must be positive
NEEDED = ("dispatch_us", "combine_us", "dispatch_algbw_gbps", "combine_algbw_gbps")
_SENTINEL = 987654321


def publish(run_dir: Path, out_root: Path, routing: str | None = None, by: str = DEFAULT_MODE) -> tuple[Path, TuningTable]:
    """Tune ``run_dir`` into ``out_root/<cluster-id>/tuning.json`` (merged) and write the merged table
    whole as Markdown next to it (``TABLE.md``); returns the JSON's path and the merged table.

    Raises:
        ResultsError, TuningFileError, SpecError: as :func:`a2a_bench.reports.tune.tune`, or ``TABLE.md``
            cannot be written; nothing is written then.
    """
    table = tuned_table(run_dir, routing, by)
    path = out_root / table.cluster["id"] / TABLE_NAME
    check_out_file(path.parent / MARKDOWN_NAME)
    merged = update_table(path, table)
    atomic_write_text(path.parent / MARKDOWN_NAME, tuning_markdown(merged))
    return path, merged


def machine_ids() -> str:
    """This machine's cluster ids for any world size, in words (``cpu-gloo-x<ranks>``, ...)."""
    override = os.environ.get(CLUSTER_ID_ENV)
    if override and cluster_id_problem(override) is None:
        return f"{override} (${CLUSTER_ID_ENV})"
    info = detect_cluster()
    head, _, link = cluster_id(info.gpu, _SENTINEL, 1, info.intranode_link).partition(f"-x{_SENTINEL}")
    return f"{head}-x<ranks>{link} (any number of ranks)"


def machine_pattern() -> re.Pattern:
    """The cluster ids of this machine for any world size: ``$FUSED_A2A_CLUSTER_ID`` when set, else
    its GPU model (``cpu-gloo`` on CPU) with any GPU count, any node count, its link or none (a table
    of one GPU names no link), and any GPU sharing (``-mps2``, ``-ts2``)."""
    override = os.environ.get(CLUSTER_ID_ENV)
    if override and cluster_id_problem(override) is None:
        return re.compile(re.escape(override) + "$")
    info = detect_cluster()
    head, _, link = cluster_id(info.gpu, _SENTINEL, 1, info.intranode_link).partition(f"-x{_SENTINEL}")
    tail = f"({re.escape(link)})?" if link else "(-[a-z0-9]+)?"
    return re.compile(re.escape(head) + r"-x\d+(-n\d+)?" + tail + r"(-(mps|ts)\d+)?$")


def machine_tables() -> list[Path]:
    """The folders of this machine's tables (:func:`machine_pattern`) in the folders the library
    reads (:func:`fused_a2a.tuning.resolve.tuning_dirs`); for an id in several, the one it reads first."""
    pattern = machine_pattern()
    found: dict[str, Path] = {}
    for root in tuning_dirs():
        if not root.is_dir():
            continue
        for folder in sorted(root.iterdir()):
            if folder.name not in found and pattern.match(folder.name) and (folder / TABLE_NAME).is_file():
                found[folder.name] = folder
    return [found[name] for name in sorted(found)]


def check_printable(table: TuningTable, source: str) -> None:
    """Raise :class:`TuningFileError` (naming ``source`` and the entry) unless every entry holds the
    measured values a printed row shows (:data:`NEEDED`, the default's times in pairs, the bandwidths
    behind the fraction of the link peak) and every time (``*_us``) is positive."""
    for i, entry in enumerate(table.entries):
        m = entry.measured
        where = f"entries[{i}] ({entry.backend}, hidden {entry.hidden}, {entry.num_tokens} tokens)"
        needed = list(NEEDED)
        if "default_dispatch_us" in m or "default_combine_us" in m:
            needed += ["default_dispatch_us", "default_combine_us"]
        if m.get("link_peak_gbps"):
            needed += ["dispatch_xbw_gbps", "combine_xbw_gbps"]
        missing = [key for key in needed if key not in m]
        if missing:
            raise TuningFileError(source, f"{where} lacks measured.{missing[0]} (tables written by a2a-bench tune have it)")
        for key, value in m.items():
            if key.endswith("_us") and not value > 0:
                raise TuningFileError(source, f"{where}: measured.{key} must be a positive time, got {value:g}")
