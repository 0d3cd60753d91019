"""``results.csv``: one row per point, appended as soon as the point ends (the one reader and writer)."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any

import pandas as pd

RESULTS_FILE = "results.csv"
RUN_FILE = "run.json"

MODES = ("kernel", "api", "seed", "graph")
_TIMED = [f"{op}_{mode}_us_{stat}" for mode in MODES for op in ("dispatch", "combine")
          for stat in ("median", "p10", "p90", "min", "max")]

COLUMNS = [
    "point_id", "status", "verified", "backend", "knobs", "is_default", "num_sms", "world_size", "cluster",
    "build", "torch", "dtype", "hidden", "num_tokens", "topk", "num_experts", "routing", "skew", "seed",
    "inputs_hash", "recv_tokens", "recv_tokens_max", "imbalance_rank", "expert_tokens_mean", "expert_tokens_max",
    "imbalance_expert", "compile_s", "graph_status", *_TIMED,
    "dispatch_algbw_gbps", "dispatch_xbw_gbps", "combine_algbw_gbps", "combine_xbw_gbps",
    "link_peak_gbps", "dispatch_xbw_frac_peak", "combine_xbw_frac_peak", "warmup", "iters", "timestamp",
]


class ResultsError(ValueError):
    """A run folder without readable results (the CLI exits with status 2)."""


def append_row(path: Path, row: dict[str, Any]) -> None:
    """Append one row (unknown keys rejected, missing ones empty), flushed to disk before returning.

    A torn last line left by a killed writer is cut off first, so rows never merge.
    """
    unknown = set(row) - set(COLUMNS)
    if unknown:
        raise ValueError(f"unknown result columns: {sorted(unknown)}")
    _drop_torn_tail(path)
    new = not path.exists() or path.stat().st_size == 0
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    if new:
        writer.writeheader()
    writer.writerow({key: row.get(key, "") for key in COLUMNS})
    with open(path, "a", encoding="utf-8") as f:
        f.write(buf.getvalue())
        f.flush()
        os.fsync(f.fileno())


def read_results(path: Path) -> pd.DataFrame:
    """All complete rows of ``path`` (a torn last line is ignored); ``ResultsError`` if there are none."""
    if not path.exists():
        raise ResultsError(f"no {path.name} in {path.parent}: run a sweep into this folder first")
    text = path.read_text(encoding="utf-8")
    if not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
    if not text.strip():
        raise ResultsError(f"{path} holds no rows")
    frame = pd.read_csv(io.StringIO(text), keep_default_na=False, na_values=[""])
    if list(frame.columns) != COLUMNS:
        raise ResultsError(f"{path} has unexpected columns (not written by this version of a2a-bench)")
    return frame


def _drop_torn_tail(path: Path) -> None:
    if not path.exists():
        return
    with open(path, "rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)
