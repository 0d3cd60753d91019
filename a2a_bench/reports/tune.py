"""Turn a sweep's results into tuning-table entries: the fastest verified config per shape.

"Fastest" is by one timing mode (``--by``): ``kernel`` (default, DeepEP's convention), ``api`` (what a
training step pays), ``seed`` (the seed path: HybridEP's permute path) or ``graph`` (CUDA-graph replay).
Entries are keyed by routing and by the backend build the rows were measured with, and record every
mode's median of the chosen configs.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from a2a_bench import __version__
from a2a_bench.engine.results import (
    RESULTS_FILE, RUN_FILE, ResultsError, read_results, read_run_info, refuse_incomparable,
)
from a2a_bench.engine.runner import routing_key
from fused_a2a.tuning.resolve import TABLE_NAME, TUNING_DIR_ENV, tuning_dirs
from fused_a2a.tuning.table import SCHEMA, TuningEntry, TuningTable, update_table

KEY = ["backend", "world_size", "dtype", "routing_key", "build", "hidden", "num_tokens", "topk", "num_experts"]
MODES = ("kernel", "api", "seed", "graph")


def select_entry(rows: pd.DataFrame, by: str = "kernel") -> TuningEntry:
    """The entry for one key's rows (all ``ok``, verified and timed in mode ``by``).

    For each SM count, the best dispatch config and the best combine config are chosen separately
    (their ``by``-mode medians); the SM count whose two bests sum lowest wins, since a DeepEP handle
    ties dispatch and combine to one SM count. ``frontier`` keeps the bests of every SM count.
    ``measured`` holds the chosen configs' ``by``-mode medians as ``dispatch_us``/``combine_us`` and
    every mode's as ``<op>_<mode>_us``.
    """
    first = rows.iloc[0]
    d_col, c_col = f"dispatch_{by}_us_median", f"combine_{by}_us_median"
    sms = rows["num_sms"].astype(str)
    best_by_sms = []
    for value, group in rows.groupby(sms, sort=False):
        d = group.loc[group[d_col].idxmin()]
        c = group.loc[group[c_col].idxmin()]
        best_by_sms.append((value, d, c))
    _, d, c = min(best_by_sms, key=lambda t: t[1][d_col] + t[2][c_col])
    measured = {
        "dispatch_us": float(d[d_col]),
        "combine_us": float(c[c_col]),
        **{f"dispatch_{mode}_us": float(d[f"dispatch_{mode}_us_median"]) for mode in MODES
           if pd.notna(d[f"dispatch_{mode}_us_median"])},
        **{f"combine_{mode}_us": float(c[f"combine_{mode}_us_median"]) for mode in MODES
           if pd.notna(c[f"combine_{mode}_us_median"])},
        "dispatch_algbw_gbps": float(d["dispatch_algbw_gbps"]),
        "combine_algbw_gbps": float(c["combine_algbw_gbps"]),
        "dispatch_xbw_gbps": float(d["dispatch_xbw_gbps"]),
        "combine_xbw_gbps": float(c["combine_xbw_gbps"]),
        "link_peak_gbps": float(d["link_peak_gbps"]),
    }
    defaults = rows[rows["is_default"].astype(str).str.lower() == "true"]
    if len(defaults):
        measured["default_dispatch_us"] = float(defaults[d_col].min())
        measured["default_combine_us"] = float(defaults[c_col].min())
    frontier = ()
    if any(v != "" for v, _, _ in best_by_sms):
        frontier = tuple(sorted((int(float(v)), float(bd[d_col]), float(bc[c_col])) for v, bd, bc in best_by_sms))
    return TuningEntry(
        backend=str(first["backend"]), world_size=int(first["world_size"]), dtype=str(first["dtype"]),
        hidden=int(first["hidden"]), num_tokens=int(first["num_tokens"]), topk=int(first["topk"]),
        num_experts=int(first["num_experts"]), dispatch=json.loads(d["knobs"]), combine=json.loads(c["knobs"]),
        measured=measured, frontier=frontier, routing=str(first["routing_key"]), build=str(first["build"]) or None,
        selected_by=by,
    )


def build_table(results: pd.DataFrame, cluster: dict, routing: str | None = None, by: str = "kernel") -> TuningTable:
    """A table with one entry per key (routing and backend build included) of the verified ``ok`` rows
    timed in mode ``by``; only the rows of ``routing`` (``uniform``, ``zipf:<s>``, ``hot:<f>``) when
    given, else one entry per routing measured.

    Raises:
        ResultsError: no such rows, or an unknown mode.
    """
    if by not in MODES:
        raise ResultsError(f"--by must be one of {', '.join(MODES)}, got {by!r}")
    keyed = results.assign(
        routing_key=[routing_key(r, s) for r, s in zip(results["routing"], results["skew"])],
        build=results["build"].fillna("").astype(str),
        num_sms=results["num_sms"].astype(object).where(results["num_sms"].notna(), "").astype(str),
    )
    ok = keyed[(keyed["status"] == "ok") & (keyed["verified"].astype(str).str.lower() == "true")
               & keyed[f"dispatch_{by}_us_median"].notna() & keyed[f"combine_{by}_us_median"].notna()]
    if routing is not None:
        ok = ok[ok["routing_key"] == routing]
    if ok.empty:
        which = f"{routing} routing" if routing is not None else "any routing"
        raise ResultsError(f"no verified 'ok' rows timed in {by} mode with {which} to tune from")
    entries = tuple(select_entry(group, by) for _, group in ok.groupby(KEY, sort=True))
    created = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return TuningTable(schema=SCHEMA, cluster=cluster, created=created, tool_version=__version__, entries=entries)


def tune(run_dir: Path, out_root: Path, routing: str | None = None, by: str = "kernel") -> tuple[Path, TuningTable]:
    """Write (merge) ``out_root/<cluster-id>/tuning.json`` from ``run_dir``; returns its path and the merged table.

    Raises:
        ResultsError: ``results.csv`` or ``run.json`` is missing or not valid (the cluster id must be
            a name, never a path), holds nothing to tune from, or rows timed by time slices
            (:func:`~a2a_bench.engine.results.refuse_incomparable`); nothing is written.
    """
    results = read_results(run_dir / RESULTS_FILE)
    refuse_incomparable(results, run_dir / RESULTS_FILE)
    cluster = read_run_info(run_dir / RUN_FILE).cluster
    table = build_table(results, cluster, routing, by)
    path = out_root / cluster["id"] / TABLE_NAME
    return path, update_table(path, table)


def default_out_root() -> Path:
    """Where ``tune`` writes without ``--out``: ``$FUSED_A2A_TUNING_DIR`` (a cluster's own tables), else
    ``./tuning_results``."""
    return Path(os.environ.get(TUNING_DIR_ENV) or "tuning_results")


def library_reads(path: Path) -> str:
    """One sentence: whether ``fused_a2a`` on this machine reads the table at ``path``
    (``<root>/<cluster-id>/tuning.json``), and if not, what makes it read it."""
    root, cluster = path.parent.parent.resolve(), path.parent.name
    dirs = [d.resolve() for d in tuning_dirs()]
    first = next((d for d in dirs if (d / cluster / TABLE_NAME).exists()), None)
    if first == root:
        return f"fused_a2a reads it there (tables of {cluster} are looked for in: {', '.join(map(str, dirs))})"
    if root in dirs:
        return f"fused_a2a reads {first / cluster / TABLE_NAME} first, not this one"
    return (f"fused_a2a does not read {root}: run the jobs that should use it with "
            f"{TUNING_DIR_ENV}={root}")
