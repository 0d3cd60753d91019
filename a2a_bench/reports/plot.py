"""PNG plots of a sweep's results: bandwidth against SM count (or tokens), with the link peak; or
(``metric="time"``) dispatch and combine time against SM count, every backend of a shape in one
figure, each backend's knee marked.

Figures are drawn with :class:`matplotlib.figure.Figure` and saved through the Agg renderer, so no
GUI backend is needed and pyplot's global state is never touched.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from a2a_bench.engine.results import ResultsError
from a2a_bench.engine.workload import routing_key
from a2a_bench.reports.report import knee

METRICS = ("gbps", "time")
BANDWIDTHS = ["dispatch_algbw_gbps", "combine_algbw_gbps", "dispatch_xbw_gbps", "combine_xbw_gbps"]
SMS_GROUP = ["backend", "world_size", "dtype", "hidden", "num_tokens", "topk", "num_experts", "routing", "skew"]
TOKENS_GROUP = ["backend", "world_size", "dtype", "topk", "num_experts", "routing", "skew"]
TIME_GROUP = SMS_GROUP[1:]
TIMES = ["dispatch_kernel_us_median", "combine_kernel_us_median"]
_STYLE = {"dispatch": "C0", "combine": "C1"}


def plot_run(results: pd.DataFrame, out_dir: Path, metric: str = "gbps") -> list[Path]:
    """Write one PNG per group of ``ok`` rows to ``out_dir`` (created); return their paths.

    ``metric="gbps"``:

    * Rows with a ``num_sms`` value: one plot per shape (:data:`SMS_GROUP`), GB/s against SMs
      (:func:`sms_series`), algbw solid, xbw dashed, and the link peak as a dotted line.
    * Rows without one (e.g. torch): one plot per backend and workload (:data:`TOKENS_GROUP`), two
      panels (dispatch, combine) of GB/s against tokens per rank, one colour per hidden size
      (:func:`tokens_series`), the best knob setting at each point.

    ``metric="time"``: one plot per shape (:data:`TIME_GROUP`) with rows with a ``num_sms`` value, two
    panels (dispatch, combine) of kernel-mode µs against SMs, one line per backend (:func:`time_series`),
    its knee (the fewest SMs within 5% of its best dispatch + combine time) as a dotted vertical line,
    its default config as a cross; a backend without an SM knob (torch) as a dashed level.

    Raises:
        ResultsError: no ``ok`` rows, or (``time``) none with an SM count, or an unknown metric
            (nothing is written).
    """
    if metric not in METRICS:
        raise ResultsError(f"--metric must be one of {', '.join(METRICS)}, got {metric!r}")
    ok = results[results["status"] == "ok"]
    if ok.empty:
        raise ResultsError("no 'ok' rows to plot")
    has_sms = ok["num_sms"].notna()
    if metric == "time":
        if not has_sms.any():
            raise ResultsError("no 'ok' rows with an SM count (num_sms) to plot time against")
        out_dir.mkdir(parents=True, exist_ok=True)
        return [_save(_time_figure(dict(zip(TIME_GROUP, key)), rows), out_dir,
                      _file_name(dict(zip(TIME_GROUP, key)), TIME_GROUP) + "_time")
                for key, rows in ok.groupby(TIME_GROUP, sort=True) if rows["num_sms"].notna().any()]
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for key, rows in ok[has_sms].groupby(SMS_GROUP, sort=True):
        shape = dict(zip(SMS_GROUP, key))
        paths.append(_save(_sms_figure(shape, rows), out_dir, _file_name(shape, SMS_GROUP)))
    for key, rows in ok[~has_sms].groupby(TOKENS_GROUP, sort=True):
        shape = dict(zip(TOKENS_GROUP, key))
        paths.append(_save(_tokens_figure(shape, rows), out_dir, _file_name(shape, TOKENS_GROUP) + "_tokens"))
    return paths


def sms_series(rows: pd.DataFrame) -> pd.DataFrame:
    """The best (highest) of each of :data:`BANDWIDTHS` (GB/s, kernel mode) at each SM count of one
    shape's rows; index ``num_sms`` (int), ascending."""
    best = rows.groupby(rows["num_sms"].astype(int))[BANDWIDTHS].max()
    return best.sort_index()


def tokens_series(rows: pd.DataFrame) -> pd.DataFrame:
    """The best of each of :data:`BANDWIDTHS` (GB/s, kernel mode) over knob settings at each
    ``(hidden, num_tokens)`` of one workload's rows; index ascending."""
    return rows.groupby(["hidden", "num_tokens"])[BANDWIDTHS].max().sort_index()


def time_series(rows: pd.DataFrame) -> pd.DataFrame:
    """The best (lowest) dispatch and combine kernel-mode medians (µs, :data:`TIMES`), each over the
    configs at each SM count of one backend's rows of one shape; index ``num_sms`` (int), ascending."""
    return rows.groupby(rows["num_sms"].astype(int))[TIMES].min().sort_index()


def _sharing(rows: pd.DataFrame) -> str:
    """How the rows' ranks shared GPUs, for a title (empty when they did not)."""
    if "gpu_sharing" not in rows or rows["gpu_sharing"].isna().all():
        return ""
    mode, per_gpu = rows["gpu_sharing"].iloc[0], rows["ranks_per_gpu"].iloc[0]
    words = {"mps": f"{per_gpu} ranks per GPU under MPS", "timeslice": f"{per_gpu} ranks per GPU, time-sliced: not comparable"}
    return f" ({words[mode]})" if mode in words else ""


def _time_figure(shape: dict, rows: pd.DataFrame) -> Figure:
    fig = Figure(figsize=(11, 5), layout="constrained")
    axes = fig.subplots(1, 2)
    backends = list(dict.fromkeys(rows["backend"]))
    for i, backend in enumerate(backends):
        own, colour = rows[rows["backend"] == backend], f"C{i % 10}"
        if own["num_sms"].isna().all():
            for ax, column in zip(axes, TIMES):
                ax.axhline(float(own[column].min()), color=colour, linestyle="--", label=f"{backend} (no SM knob)")
            continue
        own = own[own["num_sms"].notna()]
        series = time_series(own)
        at = knee([(sms, d, c) for sms, (d, c) in series.iterrows()])
        defaults = own[own["is_default"].astype(str).str.lower() == "true"]
        for ax, column in zip(axes, TIMES):
            ax.plot(series.index, series[column], color=colour, marker="o", label=backend)
            ax.axvline(at, color=colour, linestyle=":", label=f"{backend} knee: {at} SMs")
            ax.plot([at], [series.loc[at, column]], color=colour, marker="*", markersize=14, linestyle="none")
            if len(defaults):
                ax.plot(defaults["num_sms"].astype(int), defaults[column], color=colour, marker="x", markersize=10,
                        markeredgewidth=2, linestyle="none", label=f"{backend} default")
    ticks = sorted(rows["num_sms"].dropna().astype(int).unique())
    for ax, op in zip(axes, ("dispatch", "combine")):
        ax.set_xticks(ticks)
        ax.set_xlabel("SMs (num_sms)")
        ax.set_ylabel(f"{op} µs (kernel mode, best config per SM count)")
        ax.set_ylim(bottom=0)
        ax.set_title(op)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    cluster = str(rows["cluster"].iloc[0]) if "cluster" in rows else ""
    fig.suptitle(textwrap.fill(f"{cluster}{_sharing(rows)}: " + _title(shape).split(": ", 1)[1]
                               + "; knee = fewest SMs within 5% of the best dispatch + combine", 110), fontsize=10)
    return fig


def _title(shape: dict) -> str:
    parts = [f"{shape.get('backend', 'backends')}:"]
    if "hidden" in shape:
        parts.append(f"hidden {shape['hidden']}, {shape['num_tokens']} tokens/rank,")
    parts.append(f"top-{shape['topk']} of {shape['num_experts']} experts, {shape['world_size']} ranks, "
                 f"{shape['dtype']}, {_routing(shape)}")
    return " ".join(parts)


def _routing(shape: dict) -> str:
    return routing_key(shape["routing"], shape["skew"])


def _peak(ax, rows: pd.DataFrame) -> None:
    peak = float(rows["link_peak_gbps"].max())
    if peak > 0:
        ax.axhline(peak, color="grey", linestyle=":", label=f"link peak {peak:.0f} GB/s")


def _sms_figure(shape: dict, rows: pd.DataFrame) -> Figure:
    series = sms_series(rows)
    fig = Figure(figsize=(8, 5), layout="constrained")
    ax = fig.subplots()
    for op, colour in _STYLE.items():
        ax.plot(series.index, series[f"{op}_algbw_gbps"], color=colour, marker="o", label=f"{op} algbw")
        ax.plot(series.index, series[f"{op}_xbw_gbps"], color=colour, marker=".", linestyle="--", label=f"{op} xbw")
    _peak(ax, rows)
    ax.set_xticks(series.index)
    ax.set_xlabel("SMs (num_sms)")
    ax.set_ylabel("GB/s (kernel mode, best config per SM count)")
    ax.set_ylim(bottom=0)
    ax.set_title(_title(shape), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def _tokens_figure(shape: dict, rows: pd.DataFrame) -> Figure:
    series = tokens_series(rows)
    fig = Figure(figsize=(11, 5), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    for ax, op in zip(axes, _STYLE):
        for i, (hidden, by_tokens) in enumerate(series.groupby(level="hidden")):
            tokens = by_tokens.index.get_level_values("num_tokens")
            colour = f"C{i % 10}"
            ax.plot(tokens, by_tokens[f"{op}_algbw_gbps"], color=colour, marker="o", label=f"hidden {hidden} algbw")
            ax.plot(tokens, by_tokens[f"{op}_xbw_gbps"], color=colour, marker=".", linestyle="--", label=f"hidden {hidden} xbw")
        _peak(ax, rows)
        ticks = sorted(series.index.get_level_values("num_tokens").unique())
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, labels=[str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("tokens per rank")
        ax.set_title(op)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("GB/s (kernel mode, best knobs per point)")
    axes[1].legend(fontsize=8)
    fig.suptitle(_title(shape), fontsize=10)
    return fig


def _file_name(shape: dict, fields: list[str]) -> str:
    prefix = {"world_size": "w", "hidden": "h", "num_tokens": "t", "topk": "k", "num_experts": "e"}
    words = [f"{prefix.get(name, '')}{shape[name]}" for name in fields if name not in ("routing", "skew")]
    words.append(_routing(shape).replace(":", ""))
    return "_".join(re.sub(r"[^A-Za-z0-9.-]+", "-", str(word)) for word in words)


def _save(fig: Figure, out_dir: Path, stem: str) -> Path:
    path = out_dir / f"{stem}.png"
    fig.savefig(path, dpi=110)
    return path
