"""Backends side by side for one shape of a sweep's results: each backend's best config by one timing
mode (``api`` by default: what a training step pays)."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pandas as pd

from a2a_bench.engine.results import ResultsError
from a2a_bench.engine.spec import REFERENCE, parse_routing
from a2a_bench.engine.workload import routing_key
from a2a_bench.reports.fit import Column, TextTable
from a2a_bench.reports.tune import DEFAULT_MODE
from fused_a2a.tuning.table import SELECTION_MODES

SHAPE = ["world_size", "dtype", "hidden", "num_tokens", "topk", "num_experts", "routing", "skew"]


@dataclass(frozen=True)
class BackendRow:
    """One backend's best verified config for the shape (``None``: not measured).

    Attributes:
        backend, world_size: what ran.
        status: ``"ok"``, or (cut to 60 characters) the status of its first row when none is verified and ``ok``.
        knobs: the best config's knobs (least dispatch + combine median in the mode it was chosen by).
        dispatch_us, combine_us: that config's kernel-mode medians, µs.
        dispatch_api_us, combine_api_us: its api-mode medians, µs.
        dispatch_graph_us, combine_graph_us: its graph-mode medians, µs (``None``: not captured).
        dispatch_algbw_gbps, combine_algbw_gbps: its algbw, GB/s.
        default_dispatch_us, default_combine_us: the backend's default config, medians in the mode the
            best was chosen by, µs.
        speedup_vs_torch: torch's best round trip over this one's, in that mode (> 1: faster).
    """

    backend: str
    world_size: int
    status: str
    knobs: dict | None = None
    dispatch_us: float | None = None
    combine_us: float | None = None
    dispatch_api_us: float | None = None
    combine_api_us: float | None = None
    dispatch_graph_us: float | None = None
    combine_graph_us: float | None = None
    dispatch_algbw_gbps: float | None = None
    combine_algbw_gbps: float | None = None
    default_dispatch_us: float | None = None
    default_combine_us: float | None = None
    speedup_vs_torch: float | None = None


def shape_rows(
    results: pd.DataFrame,
    hidden: int,
    num_tokens: int,
    dtype: str | None = None,
    topk: int | None = None,
    num_experts: int | None = None,
    routing: str = "uniform",
) -> pd.DataFrame:
    """The rows (any status) of one shape; ``None`` filters match anything but must leave one shape.

    Raises:
        SpecError: a malformed ``routing``.
        ResultsError: no rows for the shape (the message lists the shapes there are), or several
            dtypes/top-k/expert counts match (pick one).
    """
    name, skew = parse_routing(routing)
    mask = (results["hidden"] == hidden) & (results["num_tokens"] == num_tokens) & (results["routing"] == name)
    mask &= (results["skew"] - skew).abs() < 1e-9
    for column, wanted in (("dtype", dtype), ("topk", topk), ("num_experts", num_experts)):
        if wanted is not None:
            mask &= results[column] == wanted
    rows = results[mask]
    if rows.empty:
        wanted_text = f"hidden {hidden}, {num_tokens} tokens, {routing}" + "".join(
            f", {label} {value}" for label, value in (("dtype", dtype), ("topk", topk), ("experts", num_experts)) if value is not None)
        raise ResultsError(f"no rows for {wanted_text}; shapes in the results: {_shapes(results)}")
    if len(rows.groupby(["dtype", "topk", "num_experts"])) > 1:
        raise ResultsError(f"several shapes match: {_shapes(rows)}; pick one with --dtype, --topk, --experts")
    return rows


def compare_rows(rows: pd.DataFrame, by: str = DEFAULT_MODE) -> list[BackendRow]:
    """One :class:`BackendRow` per (backend, world size) of one shape's rows, sorted by backend.

    The best config is the verified ``ok`` row with the least dispatch + combine median in mode ``by``
    (one config for both operations, as a caller passing one set of knobs runs).

    Raises:
        ResultsError: ``by`` is not a timing mode.
    """
    if by not in SELECTION_MODES:
        raise ResultsError(f"--by must be one of {', '.join(SELECTION_MODES)}, got {by!r}")
    d_col, c_col = f"dispatch_{by}_us_median", f"combine_{by}_us_median"
    ok = rows[(rows["status"] == "ok") & (rows["verified"].astype(str).str.lower() == "true")
              & rows[d_col].notna() & rows[c_col].notna()]
    best: dict[tuple[str, int], pd.Series] = {}
    for (backend, world_size), group in ok.groupby(["backend", "world_size"], sort=True):
        total = group[d_col] + group[c_col]
        best[(str(backend), int(world_size))] = group.loc[total.idxmin()]
    out = []
    for (backend, world_size), group in rows.groupby(["backend", "world_size"], sort=True):
        key = (str(backend), int(world_size))
        if key not in best:
            out.append(BackendRow(key[0], key[1], str(group["status"].iloc[0])[:60]))
            continue
        r = best[key]
        defaults = ok[(ok["backend"] == backend) & (ok["world_size"] == world_size)
                      & (ok["is_default"].astype(str).str.lower() == "true")]
        torch = best.get((REFERENCE, key[1]))
        out.append(BackendRow(
            backend=key[0], world_size=key[1], status="ok", knobs=json.loads(r["knobs"]),
            dispatch_us=_maybe(r["dispatch_kernel_us_median"]), combine_us=_maybe(r["combine_kernel_us_median"]),
            dispatch_api_us=_maybe(r["dispatch_api_us_median"]), combine_api_us=_maybe(r["combine_api_us_median"]),
            dispatch_graph_us=_maybe(r["dispatch_graph_us_median"]), combine_graph_us=_maybe(r["combine_graph_us_median"]),
            dispatch_algbw_gbps=float(r["dispatch_algbw_gbps"]), combine_algbw_gbps=float(r["combine_algbw_gbps"]),
            default_dispatch_us=float(defaults[d_col].min()) if len(defaults) else None,
            default_combine_us=float(defaults[c_col].min()) if len(defaults) else None,
            speedup_vs_torch=None if torch is None else float((torch[d_col] + torch[c_col]) / (r[d_col] + r[c_col])),
        ))
    return out


def routing_shift(results: pd.DataFrame, rows: pd.DataFrame, best: list[BackendRow],
                  by: str = DEFAULT_MODE) -> dict[str, tuple[str, str]]:
    """For a skewed routing's best configs: each backend's best config of the same shape under uniform
    routing and the ratio of the skewed best's dispatch + combine time to the uniform best's, in mode
    ``by`` (``"-"`` where uniform was not measured)."""
    first = rows.iloc[0]
    uniform = results[(results["hidden"] == first["hidden"]) & (results["num_tokens"] == first["num_tokens"])
                      & (results["dtype"] == first["dtype"]) & (results["topk"] == first["topk"])
                      & (results["num_experts"] == first["num_experts"]) & (results["routing"] == "uniform")]
    by_backend = {(b.backend, b.world_size): b for b in compare_rows(uniform, by)} if len(uniform) else {}
    shift = {}
    for b in best:
        base = by_backend.get((b.backend, b.world_size))
        if b.knobs is None or base is None or base.knobs is None:
            shift[b.backend] = ("-", "-")
            continue
        same = "same" if base.knobs == b.knobs else " ".join(f"{k}={v}" for k, v in sorted(base.knobs.items())) or "-"
        ratio = _round_trip(b, by) / _round_trip(base, by)
        shift[b.backend] = (same, f"{ratio:.2f}x")
    return shift


def _round_trip(row: BackendRow, by: str) -> float:
    prefix = "" if by == "kernel" else f"{by}_"
    return getattr(row, f"dispatch_{prefix}us") + getattr(row, f"combine_{prefix}us")


def compare_table(
    results: pd.DataFrame,
    hidden: int,
    num_tokens: int,
    dtype: str | None = None,
    topk: int | None = None,
    num_experts: int | None = None,
    routing: str = "uniform",
    by: str = DEFAULT_MODE,
) -> TextTable:
    """Backends side by side for one shape (:func:`shape_rows`, :func:`compare_rows` by mode ``by``).

    Times are medians of the slowest rank in µs, bandwidths GB/s; "speedup vs torch" is torch's best
    dispatch + combine time over the backend's in mode ``by`` (``n/a`` where torch was not measured).
    For a skewed ``routing``, two more columns show each backend's best config under uniform routing
    and the skewed time over the uniform one (:func:`routing_shift`).

    Raises:
        ResultsError, SpecError: as :func:`shape_rows` and :func:`compare_rows`.
    """
    rows = shape_rows(results, hidden, num_tokens, dtype, topk, num_experts, routing)
    first = rows.iloc[0]
    best = compare_rows(rows, by)
    shift = routing_shift(results, rows, best, by) if first["routing"] != "uniform" else None
    columns = [Column("backend"), Column("ranks", right=True, shape=True), Column(f"best knobs (by {by})"),
               Column("kernel µs (d / c)", right=True, drop=3 if by != "kernel" else 0),
               Column("api µs (d / c)", right=True, drop=0 if by == "api" else 2),
               Column("graph µs (d / c)", right=True, drop=0 if by == "graph" else 4),
               Column("algbw GB/s (d / c)", right=True, drop=5), Column(f"default {by} µs (d / c)", right=True, drop=1),
               Column("speedup vs torch", right=True)]
    if shift is not None:
        columns += [Column("best knobs with uniform routing", drop=2), Column("time vs uniform", right=True, drop=1)]
    cells = []
    for b in best:
        knobs = b.status if b.knobs is None else (" ".join(f"{k}={v}" for k, v in sorted(b.knobs.items())) or "-")
        cells.append((
            b.backend, str(b.world_size), knobs,
            _pair(b.dispatch_us, b.combine_us), _pair(b.dispatch_api_us, b.combine_api_us),
            _pair(b.dispatch_graph_us, b.combine_graph_us),
            _pair(b.dispatch_algbw_gbps, b.combine_algbw_gbps), _pair(b.default_dispatch_us, b.default_combine_us),
            "n/a" if b.speedup_vs_torch is None else f"{b.speedup_vs_torch:.2f}x",
            *(shift[b.backend] if shift is not None else ()),
        ))
    title = (f"hidden {hidden}, {num_tokens} tokens/rank, {first['dtype']}, top-{first['topk']}, "
             f"{first['num_experts']} experts, {routing} routing: each backend's best config by the {by} round trip "
             f"(medians of the slowest rank)")
    return TextTable(title, tuple(columns), tuple(cells))


def _maybe(value) -> float | None:
    return None if pd.isna(value) or value == "" else float(value)


def _pair(d: float | None, c: float | None) -> str:
    return "-" if d is None or c is None else f"{d:.1f} / {c:.1f}"


def _shapes(rows: pd.DataFrame) -> str:
    shapes = rows[SHAPE].drop_duplicates().sort_values(SHAPE)
    return "; ".join(
        f"hidden {s.hidden}, {s.num_tokens} tokens, {s.dtype}, top-{s.topk}, {s.num_experts} experts, "
        f"{routing_key(s.routing, s.skew)}, {s.world_size} ranks"
        for s in shapes.itertuples()
    )
