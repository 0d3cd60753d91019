"""Turn a sweep's results into tuning-table entries: the fastest verified config per shape, kept only
when it beats the backend's default beyond the noise.

"Fastest" is by one timing mode (``--by``): ``api`` (default: the full call a training step pays),
``kernel`` (the buffer's cached calls, DeepEP's convention), ``seed`` (the seed path: HybridEP's permute
path) or ``graph`` (CUDA-graph replay). Entries are keyed by routing and by the backend build the rows
were measured with, and record every mode's median of the chosen configs.

The rule (:data:`RULE`): a round trip's spread is the p10-p90 range of dispatch + combine (the sums
of the two operations' p10s and p90s). The fastest config replaces the default only when the ranges
do not overlap, i.e. the default's p10 is slower than the fastest config's p90; otherwise the entry
keeps the default's knobs. Either way the entry records the ratio default / fastest with the interval
[default p10 / fastest p90, default p90 / fastest p10] (``vs_default``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from a2a_bench import __version__
from a2a_bench.engine.results import (
    RESULTS_FILE, RUN_FILE, ResultsError, read_results, read_run_info, refuse_incomparable,
)
from a2a_bench.engine.workload import routing_key
from fused_a2a.tuning.resolve import TABLE_NAME, TUNING_DIR_ENV, tuning_dirs
from fused_a2a.tuning.table import SCHEMA, SELECTION_MODES, TuningEntry, TuningTable, VsDefault, update_table

KEY = ["backend", "world_size", "dtype", "routing_key", "build", "hidden", "num_tokens", "topk", "num_experts"]
DEFAULT_MODE = "api"
RULE = ("a config replaces the backend's default only when their dispatch + combine p10-p90 ranges do not overlap "
        "(the default's p10 is slower than the config's p90)")


def round_trip(row: pd.Series, mode: str, stat: str = "median") -> float:
    """Dispatch + combine of one row in ``mode``, µs: the sum of the two operations' ``stat``
    (``median``, ``p10`` or ``p90``)."""
    return float(row[f"dispatch_{mode}_us_{stat}"]) + float(row[f"combine_{mode}_us_{stat}"])


def vs_default(best: tuple[pd.Series, pd.Series], default: pd.Series, by: str) -> VsDefault:
    """The fastest config (its dispatch row and combine row) against the default's row, in mode ``by``
    (:data:`RULE`)."""
    d, c = best
    fast = {stat: float(d[f"dispatch_{by}_us_{stat}"]) + float(c[f"combine_{by}_us_{stat}"]) for stat in ("median", "p10", "p90")}
    slow = {stat: round_trip(default, by, stat) for stat in ("median", "p10", "p90")}
    low, ratio, high = slow["p10"] / fast["p90"], slow["median"] / fast["median"], slow["p90"] / fast["p10"]
    return VsDefault(round(ratio, 4), round(min(low, ratio), 4), round(max(high, ratio), 4), kept_default=not low > 1.0,
                     best_dispatch=json.loads(d["knobs"]), best_combine=json.loads(c["knobs"]))


@dataclass(frozen=True)
class Selection:
    """What :func:`select` chose for one key's rows.

    Attributes:
        dispatch, combine: the rows whose dispatch and whose combine the entry takes (the default's
            row for both when the default was kept).
        frontier_rows: ``(num_sms, dispatch row, combine row)``: the fastest of each SM count.
        default: the default config's row (``None``: not measured).
        vs_default: the fastest config against the default (``None`` without a default row).
    """

    dispatch: pd.Series
    combine: pd.Series
    frontier_rows: tuple
    default: pd.Series | None
    vs_default: VsDefault | None

    def stat(self, by: str, stat: str = "median") -> float:
        """The chosen round trip's ``stat`` in mode ``by``: the dispatch row's plus the combine row's, µs."""
        return float(self.dispatch[f"dispatch_{by}_us_{stat}"]) + float(self.combine[f"combine_{by}_us_{stat}"])


def select(rows: pd.DataFrame, by: str = DEFAULT_MODE) -> Selection:
    """Choose one key's configs from its rows (all ``ok``, verified and timed in mode ``by``).

    For each SM count, the best dispatch config and the best combine config are chosen separately
    (their ``by``-mode medians); the SM count whose two bests sum lowest wins, since a DeepEP handle
    ties dispatch and combine to one SM count. Where the default config was measured, the winner is
    held against it (:data:`RULE`) and the default's row is taken unless the winner beats it beyond
    the noise.
    """
    d_col, c_col = f"dispatch_{by}_us_median", f"combine_{by}_us_median"
    sms = rows["num_sms"].astype(str)
    best_by_sms = []
    for value, group in rows.groupby(sms, sort=False):
        best_by_sms.append((value, group.loc[group[d_col].idxmin()], group.loc[group[c_col].idxmin()]))
    _, d, c = min(best_by_sms, key=lambda t: t[1][d_col] + t[2][c_col])
    defaults = rows[rows["is_default"].astype(str).str.lower() == "true"]
    default = compared = None
    if len(defaults):
        default = defaults.loc[(defaults[d_col] + defaults[c_col]).idxmin()]
        compared = vs_default((d, c), default, by)
        if compared.kept_default:
            d = c = default
    return Selection(d, c, tuple(best_by_sms), default, compared)


def select_entry(rows: pd.DataFrame, by: str = DEFAULT_MODE) -> TuningEntry:
    """The entry for one key's rows (all ``ok``, verified and timed in mode ``by``), chosen by
    :func:`select`. ``frontier`` keeps the bests of every SM count; ``measured`` holds the entry's
    configs' ``by``-mode medians as ``dispatch_us``/``combine_us`` and every mode's as
    ``<op>_<mode>_us``; ``vs_default`` the comparison with the default.
    """
    first = rows.iloc[0]
    d_col, c_col = f"dispatch_{by}_us_median", f"combine_{by}_us_median"
    chosen = select(rows, by)
    d, c = chosen.dispatch, chosen.combine
    measured = {
        "dispatch_us": float(d[d_col]),
        "combine_us": float(c[c_col]),
        **{f"dispatch_{mode}_us": float(d[f"dispatch_{mode}_us_median"]) for mode in SELECTION_MODES
           if pd.notna(d[f"dispatch_{mode}_us_median"])},
        **{f"combine_{mode}_us": float(c[f"combine_{mode}_us_median"]) for mode in SELECTION_MODES
           if pd.notna(c[f"combine_{mode}_us_median"])},
        "dispatch_algbw_gbps": float(d["dispatch_algbw_gbps"]),
        "combine_algbw_gbps": float(c["combine_algbw_gbps"]),
        "dispatch_xbw_gbps": float(d["dispatch_xbw_gbps"]),
        "combine_xbw_gbps": float(c["combine_xbw_gbps"]),
        "link_peak_gbps": float(d["link_peak_gbps"]),
    }
    if chosen.default is not None:
        measured["default_dispatch_us"] = float(chosen.default[d_col])
        measured["default_combine_us"] = float(chosen.default[c_col])
    frontier = ()
    if any(v != "" for v, _, _ in chosen.frontier_rows):
        frontier = tuple(sorted((int(float(v)), float(bd[d_col]), float(bc[c_col])) for v, bd, bc in chosen.frontier_rows))
    return TuningEntry(
        backend=str(first["backend"]), world_size=int(first["world_size"]), dtype=str(first["dtype"]),
        hidden=int(first["hidden"]), num_tokens=int(first["num_tokens"]), topk=int(first["topk"]),
        num_experts=int(first["num_experts"]), dispatch=json.loads(d["knobs"]), combine=json.loads(c["knobs"]),
        measured=measured, frontier=frontier, routing=str(first["routing_key"]), build=str(first["build"]) or None,
        selected_by=by, vs_default=chosen.vs_default,
    )


def tunable(results: pd.DataFrame, by: str, routing: str | None = None) -> pd.DataFrame:
    """The verified ``ok`` rows timed in mode ``by`` (of ``routing`` when given), with the columns
    :data:`KEY` groups by (``routing_key``, ``build`` and ``num_sms`` as text).

    Raises:
        ResultsError: an unknown mode.
    """
    if by not in SELECTION_MODES:
        raise ResultsError(f"--by must be one of {', '.join(SELECTION_MODES)}, got {by!r}")
    keyed = results.assign(
        routing_key=[routing_key(r, s) for r, s in zip(results["routing"], results["skew"])],
        build=results["build"].fillna("").astype(str),
        num_sms=results["num_sms"].astype(object).where(results["num_sms"].notna(), "").astype(str),
    )
    ok = keyed[(keyed["status"] == "ok") & (keyed["verified"].astype(str).str.lower() == "true")
               & keyed[f"dispatch_{by}_us_median"].notna() & keyed[f"combine_{by}_us_median"].notna()]
    return ok if routing is None else ok[ok["routing_key"] == routing]


def build_table(results: pd.DataFrame, cluster: dict, routing: str | None = None, by: str = DEFAULT_MODE) -> TuningTable:
    """A table with one entry per key (routing and backend build included) of the verified ``ok`` rows
    timed in mode ``by``; only the rows of ``routing`` (``uniform``, ``zipf:<s>``, ``hot:<f>``) when
    given, else one entry per routing measured.

    Raises:
        ResultsError: no such rows, or an unknown mode.
    """
    ok = tunable(results, by, routing)
    if ok.empty:
        which = f"{routing} routing" if routing is not None else "any routing"
        raise ResultsError(f"no verified 'ok' rows timed in {by} mode with {which} to tune from")
    entries = tuple(select_entry(group, by) for _, group in ok.groupby(KEY, sort=True))
    created = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return TuningTable(schema=SCHEMA, cluster=cluster, created=created, tool_version=__version__, entries=entries)


def tune(run_dir: Path, out_root: Path, routing: str | None = None, by: str = DEFAULT_MODE) -> tuple[Path, TuningTable]:
    """Write (merge) ``out_root/<cluster-id>/tuning.json`` from ``run_dir``; returns its path and the merged table.

    Raises:
        ResultsError: ``results.csv`` or ``run.json`` is missing or not valid (the cluster id must be
            a name, never a path), holds nothing to tune from, or rows timed by time slices
            (:func:`~a2a_bench.engine.results.refuse_incomparable`); nothing is written.
    """
    table = tuned_table(run_dir, routing, by)
    path = out_root / table.cluster["id"] / TABLE_NAME
    return path, update_table(path, table)


def tuned_table(run_dir: Path, routing: str | None = None, by: str = DEFAULT_MODE) -> TuningTable:
    """The table :func:`tune` merges in, built from ``run_dir`` (writes nothing; raises as :func:`tune`)."""
    results = read_results(run_dir / RESULTS_FILE)
    refuse_incomparable(results, run_dir / RESULTS_FILE)
    cluster = read_run_info(run_dir / RUN_FILE).cluster
    return build_table(results, cluster, routing, by)


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
