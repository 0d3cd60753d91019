"""Tables for people: the sweep summary and the per-cluster tuning table (terminal and Markdown)."""

from __future__ import annotations

import json

import pandas as pd
from rich.table import Table

from fused_a2a.tuning.table import TuningEntry, TuningTable


def summary_table(results: pd.DataFrame) -> Table:
    """One line per point: backend, knobs, shape, status, kernel-mode µs and GB/s."""
    table = Table(title="sweep results (kernel mode, median of the slowest rank)")
    for column in ("backend", "knobs", "dtype", "hidden", "tokens", "status", "disp µs", "comb µs",
                   "disp GB/s", "comb GB/s", "xbw/peak"):
        table.add_column(column, justify="right" if "µs" in column or "GB" in column else "left")
    for _, r in results.iterrows():
        ok = r["status"] == "ok"
        table.add_row(
            str(r["backend"]), _knobs(json.loads(r["knobs"])), str(r["dtype"]), str(r["hidden"]), str(r["num_tokens"]), str(r["status"])[:60],
            _num(r["dispatch_kernel_us_median"], ok), _num(r["combine_kernel_us_median"], ok),
            _num(r["dispatch_algbw_gbps"], ok), _num(r["combine_algbw_gbps"], ok),
            _num(r["dispatch_xbw_frac_peak"], ok, "{:.2f}"),
        )
    return table


def entry_cells(entry: TuningEntry) -> list[str]:
    """The cells of one tuning entry, as :data:`TUNING_COLUMNS` names them."""
    m = entry.measured
    speedup = "n/a"
    if "default_dispatch_us" in m:
        speedup = f"{(m['default_dispatch_us'] + m['default_combine_us']) / (m['dispatch_us'] + m['combine_us']):.2f}x"
    peak = m.get("link_peak_gbps") or 0.0
    frac = f"{m['dispatch_xbw_gbps'] / peak:.2f} / {m['combine_xbw_gbps'] / peak:.2f}" if peak else "n/a"
    return [
        entry.backend, entry.build or "?", str(entry.world_size), entry.dtype, entry.routing, str(entry.hidden),
        str(entry.num_tokens), f"{entry.topk}/{entry.num_experts}", _knobs(entry.dispatch), _knobs(entry.combine),
        entry.selected_by, _mode_pair(m, "kernel"), _mode_pair(m, "api"),
        f"{m['dispatch_algbw_gbps']:.1f} / {m['combine_algbw_gbps']:.1f}", speedup, frac, _knee(entry),
    ]


def _mode_pair(measured: dict, mode: str) -> str:
    """``"<dispatch> / <combine>"`` µs of one timing mode (a table written before modes were recorded has
    only the selection mode's, as ``dispatch_us``)."""
    d, c = measured.get(f"dispatch_{mode}_us"), measured.get(f"combine_{mode}_us")
    if d is None and mode == "kernel":
        d, c = measured.get("dispatch_us"), measured.get("combine_us")
    return "-" if d is None or c is None else f"{d:.1f} / {c:.1f}"


def knee(frontier) -> int | None:
    """The fewest SMs whose dispatch + combine time is within 5% of the frontier's best (``None`` if empty)."""
    if not frontier:
        return None
    best = min(d + c for _, d, c in frontier)
    return min(sms for sms, d, c in frontier if d + c <= 1.05 * best)


def _knee(entry: TuningEntry) -> str:
    sms = knee(entry.frontier)
    return "n/a" if sms is None else str(sms)


TUNING_COLUMNS = ["backend", "build", "ranks", "dtype", "routing", "hidden", "tokens", "topk/experts", "dispatch knobs",
                  "combine knobs", "chosen by", "kernel µs (d / c)", "api µs (d / c)", "algbw GB/s (d / c)",
                  "speedup vs default", "xbw / peak (d / c)", "knee SMs (within 5%)"]


def tuning_rich(table: TuningTable) -> Table:
    """The tuning table for the terminal."""
    out = Table(title=f"tuning table of {table.cluster['id']} ({len(table.entries)} entries)")
    for column in TUNING_COLUMNS:
        out.add_column(column)
    for entry in table.entries:
        out.add_row(*entry_cells(entry))
    return out


def tuning_markdown(table: TuningTable) -> str:
    """The tuning table as Markdown (``TABLE.md``)."""
    c = table.cluster
    lines = [
        f"# Tuning table: {c['id']}",
        "",
        f"GPU: {c.get('gpu') or 'none (CPU, gloo)'}; {c.get('gpus_per_node')} per node, {c.get('nodes')} node(s); "
        f"intranode link: {c.get('intranode_link') or 'n/a'}. Created {table.created} by a2a-bench {table.tool_version}.",
        "Times are medians of the slowest rank: kernel mode (the buffer's cached calls) and api mode (the full "
        "fused_a2a call a training step makes); \"chosen by\" is the mode the config was selected by, and the "
        "speedup over the backend's default knobs is in that mode.",
        "",
        "| " + " | ".join(TUNING_COLUMNS) + " |",
        "|" + "---|" * len(TUNING_COLUMNS),
    ]
    lines += ["| " + " | ".join(entry_cells(e)) + " |" for e in table.entries]
    return "\n".join(lines) + "\n"


def _knobs(knobs: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted(knobs.items())) or "-"


def _num(value, ok: bool, fmt: str = "{:.1f}") -> str:
    if not ok or value == "" or pd.isna(value):
        return "-"
    return fmt.format(float(value))


def _stats(s) -> str:
    return "–" if s is None else f"{s.median:.1f} ({s.p10:.1f}–{s.p90:.1f})"


def breakdown_table(rows) -> Table:
    """The torch backend's dispatch stages (:class:`a2a_bench.bench.breakdown.Breakdown`): µs per call, median (p10–p90)."""
    stages = list(rows[0].stages) if rows else []
    table = Table(title="torch backend: api dispatch, stage by stage (slowest rank, µs per call, median (p10–p90))")
    for column in ("shape", "impl", "plan", *stages, "api dispatch", "kernel dispatch", "api / kernel"):
        table.add_column(column, justify="left" if column in ("shape", "impl", "plan") else "right")
    for r in rows:
        w = r.workload
        table.add_row(f"{w.dtype} h{w.hidden} n{w.num_tokens} k{w.topk} e{w.num_experts}", r.impl, r.plan,
                      *(_stats(r.stages[name]) for name in stages), _stats(r.api), _stats(r.kernel), f"{r.ratio:.2f}x")
    return table


def overhead_table(rows) -> Table:
    """Host time fused_a2a adds per dispatch + combine (:class:`a2a_bench.bench.overhead.Overhead`), µs."""
    table = Table(title="host µs per dispatch + combine over calling the buffer directly "
                        "(buffer answering at once; slowest rank; median (p10–p90) of 50-call batches; "
                        "with grad, also the direct calls in a bare autograd.Function.apply each)")
    for column in ("backend", "path", "grad", "through fused_a2a", "buffer directly", "added", "bare autograd",
                   "added beyond bare"):
        table.add_column(column, justify="left" if column in ("backend", "path", "grad") else "right")
    for r in rows:
        table.add_row(r.backend, r.path, "yes" if r.grad else "no", _stats(r.wrapped), _stats(r.direct), _stats(r.added),
                      _stats(r.bare), _stats(r.beyond_bare))
    return table


def paths_table(rows) -> Table:
    """Per-call µs of each path (:class:`a2a_bench.bench.paths.PathTimes`) with the ratios the targets name:
    api over raw, seed over the library calls it wraps."""
    table = Table(title="µs per call, slowest rank, median (p10–p90); raw: the library's own uncached call; "
                        "kernel: cached dispatch; seed raw: the library calls the seed path wraps where they differ")
    for column in ("backend", "shape", "op", "raw", "api", "api/raw", "kernel", "seed raw", "seed", "seed/raw"):
        table.add_column(column, justify="left" if column in ("backend", "shape", "op") else "right")
    for r in rows:
        w = r.workload
        shape = f"h{w.hidden} n{w.num_tokens} k{w.topk} e{w.num_experts}"
        for op in ("dispatch", "combine"):
            times = getattr(r, op)
            seed_base = "seed raw" if "seed raw" in times else "raw"
            api_ratio, seed_ratio = r.ratio(op, "api", "raw"), r.ratio(op, "seed", seed_base)
            table.add_row(r.backend, shape, op, *(_stats(times.get(p)) for p in ("raw", "api")),
                          "–" if api_ratio is None else f"{api_ratio:.2f}x",
                          *(_stats(times.get(p)) for p in ("kernel", "seed raw", "seed")),
                          "–" if seed_ratio is None else f"{seed_ratio:.2f}x")
    return table
