"""Tables for people: the sweep summary, the best config per shape, and the per-cluster tuning table,
as :class:`~a2a_bench.reports.fit.TextTable` (fitted to the terminal, or Markdown for files)."""

from __future__ import annotations

import json

import pandas as pd
from rich.table import Table

from a2a_bench.engine.workload import DTYPES, routing_key
from a2a_bench.reports.fit import Column, TextTable, markdown
from a2a_bench.reports.tune import DEFAULT_MODE, KEY, RULE, select, tunable
from fused_a2a.backends import BACKENDS
from fused_a2a.tuning.table import TuningEntry, TuningTable, VsDefault

SHAPE_COLUMNS = (Column("dtype", shape=True), Column("routing", shape=True), Column("hidden", right=True, shape=True),
                 Column("tokens", right=True, shape=True), Column("top-k", right=True, shape=True),
                 Column("experts", right=True, shape=True), Column("token bytes/rank", drop=4, right=True, shape=True))
SPREAD = "median (p10–p90) of the slowest rank, µs"


def us(value: float) -> str:
    """A time in µs with about four significant digits."""
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"


def spread(median: float, p10: float, p90: float) -> str:
    """``median (p10–p90)`` in µs."""
    return f"{us(median)} ({us(p10)}–{us(p90)})"


def size(nbytes: float) -> str:
    """A byte count in KiB, MiB or GiB."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes:.0f} B"


def knob_text(backend: str, knobs: dict) -> str:
    """The knobs that differ from the backend's defaults (``default`` when none does; every knob for a
    backend this process does not know)."""
    spec = BACKENDS.get(backend)
    defaults = spec.defaults() if spec is not None else {}
    changed = {k: v for k, v in knobs.items() if defaults.get(k, object()) != v}
    return " ".join(f"{k}={v}" for k, v in sorted(changed.items())) or "default"


def knob_pair(backend: str, dispatch: dict, combine: dict) -> str:
    """One cell for dispatch and combine knobs: once when they are the same, else ``dispatch | combine``."""
    d, c = knob_text(backend, dispatch), knob_text(backend, combine)
    return d if d == c else f"{d} | {c}"


def shape_cells(row) -> tuple[str, ...]:
    """The :data:`SHAPE_COLUMNS` cells of a results row or a tuning entry."""
    routing = str(row["routing"]) if row["routing"] == "uniform" or ":" in str(row["routing"]) else routing_key(str(row["routing"]), float(row["skew"]))
    tokens = int(row["num_tokens"])
    element = 1 if row["dtype"] == "fp8" else DTYPES[str(row["dtype"])].itemsize if row["dtype"] in DTYPES else 2
    return (str(row["dtype"]), routing, str(int(row["hidden"])), str(tokens), str(int(row["topk"])),
            str(int(row["num_experts"])), size(tokens * int(row["hidden"]) * element))


def _cell(row, column: str, ok: bool, text=us) -> str:
    value = row.get(column, "")
    if not ok or value == "" or pd.isna(value):
        return "-"
    return text(float(value))


def _pair(row, op_mode: str, ok: bool, text=us) -> str:
    d, c = _cell(row, f"dispatch_{op_mode}", ok, text), _cell(row, f"combine_{op_mode}", ok, text)
    return "-" if d == "-" else f"{d} / {c}"


def summary_table(results: pd.DataFrame, note_width: int = 48) -> TextTable:
    """One line per point: backend, the knobs that differ from its defaults, the workload columns that
    differ between rows (the others in the title), status, api-mode dispatch and combine (median,
    p10–p90), kernel medians, GB/s and the fraction of the link peak. A status longer than
    ``note_width`` is cut, with the whole of it in a numbered note under the table."""
    columns = (Column("backend"), Column("knobs"), *SHAPE_COLUMNS, Column("status"),
               Column("api dispatch µs", right=True), Column("api combine µs", right=True),
               Column("kernel µs (d / c)", drop=3, right=True), Column("algbw GB/s (d / c)", drop=5, right=True),
               Column("xbw / peak (d / c)", drop=6, right=True))
    rows, notes = [], {}
    for _, r in results.iterrows():
        ok = r["status"] == "ok"
        status = str(r["status"])
        if len(status) > note_width:
            number = notes.setdefault(status, len(notes) + 1)
            status = f"{status[:note_width - 6].rstrip()}… [{number}]"
        rows.append((str(r["backend"]), knob_text(str(r["backend"]), json.loads(r["knobs"])), *shape_cells(r), status,
                     _spread(r, "dispatch_api", ok), _spread(r, "combine_api", ok), _pair(r, "kernel_us_median", ok),
                     _pair(r, "algbw_gbps", ok, lambda v: f"{v:.1f}"), _pair(r, "xbw_frac_peak", ok, lambda v: f"{v:.2f}")))
    return TextTable(f"sweep results: api mode (the full fused_a2a call), {SPREAD}", columns, tuple(rows),
                     tuple(f"[{n}] {text}" for text, n in notes.items()))


def _spread(row, op_mode: str, ok: bool) -> str:
    if not ok or pd.isna(row.get(f"{op_mode}_us_median", float("nan"))):
        return "-"
    return spread(*(float(row[f"{op_mode}_us_{stat}"]) for stat in ("median", "p10", "p90")))


def verdict(vs: VsDefault | None, entry_is_default: bool = False) -> str:
    """The comparison with the default in words: ``1.62x (1.31–1.98)`` where the entry's config beat the
    default beyond the noise, ``kept default: 1.12x (0.93–1.41)`` where the fastest config did not,
    ``default is fastest``, or ``default not measured``."""
    if vs is None:
        return "default" if entry_is_default else "default not measured"
    interval = f"{vs.ratio:.2f}x ({vs.low:.2f}–{vs.high:.2f})"
    if not vs.kept_default:
        return interval
    return "default is fastest" if vs.ratio <= 1.0 else f"kept default: {interval}"


def best_per_shape(results: pd.DataFrame, by: str = DEFAULT_MODE) -> TextTable | None:
    """Per workload shape, the backend and knobs a training step should use: each backend's config
    chosen as ``tune`` chooses it (in mode ``by``, the default kept unless beaten beyond the noise),
    then the backend with the least round trip. ``None`` when no row is verified and ``ok``."""
    ok = tunable(results, by)
    if ok.empty:
        return None
    shape_keys = ["world_size", "dtype", "routing_key", "hidden", "num_tokens", "topk", "num_experts"]
    rows = []
    for _, shape in ok.groupby(shape_keys, sort=True):
        chosen = [(select(group, by), group) for _, group in shape.groupby(KEY, sort=True)]
        best, group = min(chosen, key=lambda t: t[0].stat(by))
        first = group.iloc[0]
        backend = str(first["backend"])
        default_knobs = BACKENDS[backend].defaults() if backend in BACKENDS else None
        is_default = json.loads(best.dispatch["knobs"]) == default_knobs == json.loads(best.combine["knobs"])
        rows.append((*shape_cells(first), backend,
                     knob_pair(backend, json.loads(best.dispatch["knobs"]), json.loads(best.combine["knobs"])),
                     spread(best.stat(by), best.stat(by, "p10"), best.stat(by, "p90")),
                     f"{us(float(best.dispatch[f'dispatch_{by}_us_median']))} / {us(float(best.combine[f'combine_{by}_us_median']))}",
                     verdict(best.vs_default, is_default)))
    columns = (*SHAPE_COLUMNS, Column("backend"), Column("knobs"), Column(f"{by} round trip µs", right=True),
               Column("dispatch / combine µs", drop=2, right=True), Column("vs default"))
    return TextTable(f"best per shape by the {by} round trip (dispatch + combine), {SPREAD}", columns, tuple(rows),
                     (f"vs default: the default's round trip over the fastest config's, with the interval their "
                      f"p10–p90 give; {RULE}.",))


def _mode_pair(measured: dict, mode: str, selected_by: str) -> str:
    """``"<dispatch> / <combine>"`` µs of one timing mode (a table written before modes were recorded has
    only the selection mode's, as ``dispatch_us``)."""
    d, c = measured.get(f"dispatch_{mode}_us"), measured.get(f"combine_{mode}_us")
    if d is None and mode == selected_by:
        d, c = measured.get("dispatch_us"), measured.get("combine_us")
    return "-" if d is None or c is None else f"{us(d)} / {us(c)}"


def knee(frontier) -> int | None:
    """The fewest SMs whose dispatch + combine time is within 5% of the frontier's best (``None`` if empty)."""
    if not frontier:
        return None
    best = min(d + c for _, d, c in frontier)
    return min(sms for sms, d, c in frontier if d + c <= 1.05 * best)


def entry_verdict(entry: TuningEntry) -> str:
    """:func:`verdict` of an entry; an entry without ``vs_default`` (a table written before it was
    recorded) gets the ratio of its default's times, without an interval."""
    m = entry.measured
    if entry.vs_default is None and "default_dispatch_us" in m:
        return f"{(m['default_dispatch_us'] + m['default_combine_us']) / (m['dispatch_us'] + m['combine_us']):.2f}x (no interval recorded)"
    spec = BACKENDS.get(entry.backend)
    return verdict(entry.vs_default, spec is not None and entry.dispatch == spec.defaults() == entry.combine)


def tuning_table(table: TuningTable) -> TextTable:
    """The tuning table's entries: key, knobs, the mode that chose them, api and kernel µs, the
    comparison with the default, GB/s, fraction of the link peak, knee."""
    columns = (Column("backend"), Column("build", drop=6), Column("ranks", right=True, shape=True), *SHAPE_COLUMNS[:6],
               Column("knobs (d | c)"), Column("chosen by", drop=1, shape=True),
               Column("api µs (d / c)", right=True), Column("kernel µs (d / c)", drop=3, right=True),
               Column("vs default"), Column("algbw GB/s (d / c)", drop=5, right=True),
               Column("xbw / peak (d / c)", drop=7, right=True), Column("knee SMs (within 5%)", drop=4, right=True))
    rows = []
    for e in table.entries:
        m = e.measured
        peak = m.get("link_peak_gbps") or 0.0
        frac = f"{m['dispatch_xbw_gbps'] / peak:.2f} / {m['combine_xbw_gbps'] / peak:.2f}" if peak else "n/a"
        sms = knee(e.frontier)
        shape = {"dtype": e.dtype, "routing": e.routing, "hidden": e.hidden, "num_tokens": e.num_tokens, "topk": e.topk,
                 "num_experts": e.num_experts, "skew": 1.0}
        rows.append((e.backend, e.build or "?", str(e.world_size), *shape_cells(shape)[:6],
                     knob_pair(e.backend, e.dispatch, e.combine), e.selected_by,
                     _mode_pair(m, "api", e.selected_by), _mode_pair(m, "kernel", e.selected_by), entry_verdict(e),
                     f"{m['dispatch_algbw_gbps']:.1f} / {m['combine_algbw_gbps']:.1f}", frac,
                     "n/a" if sms is None else str(sms)))
    notes = [f"vs default: the default's round trip over the entry's fastest config, in the mode that chose it, "
             f"with its interval; {RULE}."]
    if any(e.selected_by != "api" for e in table.entries):
        notes.append("An entry chosen by kernel mode ranks the buffer's cached calls, not the full call a training "
                     "step makes; a2a-bench tune ranks by api unless told --by kernel.")
    return TextTable(f"tuning table of {table.cluster['id']} ({len(table.entries)} entries)", columns, tuple(rows),
                     tuple(notes))


def tuning_markdown(table: TuningTable) -> str:
    """The tuning table as Markdown (``TABLE.md``): every column."""
    c = table.cluster
    return "\n".join([
        f"# Tuning table: {c['id']}",
        "",
        f"GPU: {c.get('gpu') or 'none (CPU, gloo)'}; {c.get('gpus_per_node')} per node, {c.get('nodes')} node(s); "
        f"intranode link: {c.get('intranode_link') or 'n/a'}. Created {table.created} by a2a-bench {table.tool_version}.",
        "Times are medians of the slowest rank: api mode (the full fused_a2a call a training step makes) and kernel "
        "mode (the buffer's cached calls); \"chosen by\" is the mode the config was selected by. Knobs: those that "
        "differ from the backend's defaults.",
        "",
        markdown(tuning_table(table)),
    ])


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
