"""Turn a sweep's results into tuning-table entries: the fastest verified config per shape."""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from a2a_bench import __version__
from a2a_bench.results import RESULTS_FILE, RUN_FILE, ResultsError, read_results, read_run_info
from fused_a2a.tuning.resolve import TABLE_NAME, TUNING_DIR_ENV, tuning_dirs
from fused_a2a.tuning.table import SCHEMA, TuningEntry, TuningTable, update_table

KEY = ["backend", "world_size", "dtype", "hidden", "num_tokens", "topk", "num_experts"]


def select_entry(rows: pd.DataFrame) -> TuningEntry:
    """The entry for one key's rows (all ``ok`` and verified).

    For each SM count, the best dispatch config and the best combine config are chosen separately
    (their kernel-mode medians); the SM count whose two bests sum lowest wins, since a DeepEP handle
    ties dispatch and combine to one SM count. ``frontier`` keeps the bests of every SM count.
    """
    first = rows.iloc[0]
    sms = rows["num_sms"].astype(str)
    best_by_sms = []
    for value, group in rows.groupby(sms, sort=False):
        d = group.loc[group["dispatch_kernel_us_median"].idxmin()]
        c = group.loc[group["combine_kernel_us_median"].idxmin()]
        best_by_sms.append((value, d, c))
    _, d, c = min(best_by_sms, key=lambda t: t[1]["dispatch_kernel_us_median"] + t[2]["combine_kernel_us_median"])
    measured = {
        "dispatch_us": float(d["dispatch_kernel_us_median"]),
        "combine_us": float(c["combine_kernel_us_median"]),
        "dispatch_algbw_gbps": float(d["dispatch_algbw_gbps"]),
        "combine_algbw_gbps": float(c["combine_algbw_gbps"]),
        "dispatch_xbw_gbps": float(d["dispatch_xbw_gbps"]),
        "combine_xbw_gbps": float(c["combine_xbw_gbps"]),
        "link_peak_gbps": float(d["link_peak_gbps"]),
    }
    defaults = rows[rows["is_default"].astype(str).str.lower() == "true"]
    if len(defaults):
        measured["default_dispatch_us"] = float(defaults["dispatch_kernel_us_median"].min())
        measured["default_combine_us"] = float(defaults["combine_kernel_us_median"].min())
    frontier = ()
    if any(v != "" for v, _, _ in best_by_sms):
        frontier = tuple(sorted(
            (int(float(v)), float(bd["dispatch_kernel_us_median"]), float(bc["combine_kernel_us_median"]))
            for v, bd, bc in best_by_sms
        ))
    return TuningEntry(
        backend=str(first["backend"]), world_size=int(first["world_size"]), dtype=str(first["dtype"]),
        hidden=int(first["hidden"]), num_tokens=int(first["num_tokens"]), topk=int(first["topk"]),
        num_experts=int(first["num_experts"]), dispatch=json.loads(d["knobs"]), combine=json.loads(c["knobs"]),
        measured=measured, frontier=frontier,
    )


def build_table(results: pd.DataFrame, cluster: dict, routing: str = "uniform") -> TuningTable:
    """A table with one entry per key of the verified ``ok`` rows of ``routing``; ``ResultsError`` if none."""
    ok = results[(results["status"] == "ok") & (results["verified"].astype(str).str.lower() == "true")
                 & (results["routing"] == routing)]
    if ok.empty:
        raise ResultsError(f"no verified 'ok' rows with {routing} routing to tune from")
    ok = ok.assign(num_sms=ok["num_sms"].fillna("").astype(str))
    entries = tuple(select_entry(group) for _, group in ok.groupby(KEY, sort=True))
    created = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return TuningTable(schema=SCHEMA, cluster=cluster, created=created, tool_version=__version__, entries=entries)


def tune(run_dir: Path, out_root: Path, routing: str = "uniform") -> tuple[Path, TuningTable]:
    """Write (merge) ``out_root/<cluster-id>/tuning.json`` from ``run_dir``; returns its path and the merged table.

    Raises:
        ResultsError: ``results.csv`` or ``run.json`` is missing or not valid (the cluster id must be
            a name, never a path), or holds nothing to tune from; nothing is written.
    """
    results = read_results(run_dir / RESULTS_FILE)
    cluster = read_run_info(run_dir / RUN_FILE).cluster
    table = build_table(results, cluster, routing)
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
