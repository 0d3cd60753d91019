"""A run folder's files: ``results.csv`` (one row per point, appended as soon as the point ends) and
``run.json`` (what was run, where); the one reader and writer of each, validating what it reads."""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import pandas as pd

from a2a_bench.engine.spec import file_keys
from fused_a2a.cluster import cluster_id_problem
from fused_a2a.files import atomic_write_text
from fused_a2a.tuning.table import SELECTION_MODES

RESULTS_FILE = "results.csv"
RUN_FILE = "run.json"
SUMMARY_FILE = "summary.md"  # the sweep's tables, as Markdown (:mod:`a2a_bench.reports.summary` writes it)

_TIMED = [f"{op}_{mode}_us_{stat}" for mode in SELECTION_MODES for op in ("dispatch", "combine")
          for stat in ("median", "p10", "p90", "min", "max")]

COLUMNS = [
    "point_id", "status", "verified", "backend", "knobs", "is_default", "num_sms", "world_size", "cluster",
    "gpu_sharing", "ranks_per_gpu", "comparable", "build", "torch", "dtype", "hidden", "num_tokens", "topk",
    "num_experts", "routing", "skew", "seed",
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


def read_results(path: Path, allow_empty: bool = False) -> pd.DataFrame:
    """All complete rows of ``path`` (a torn last line is ignored), their values type-checked
    (:func:`check_types`).

    Args:
        path: a ``results.csv``.
        allow_empty: a missing file, or one without a complete row, gives an empty frame (else an error).

    Raises:
        ResultsError: the file is missing, unreadable, holds no rows, has another header, or a value
            of the wrong type (the message names the file, and the row and column).
    """
    if not path.exists():
        if allow_empty:
            return pd.DataFrame(columns=COLUMNS)
        raise ResultsError(f"no {path.name} in {path.parent}: run a sweep into this folder first")
    check_header(path)
    text = read_text(path)
    if not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
    if text.count("\n") < 2 and allow_empty:
        return pd.DataFrame(columns=COLUMNS)
    if not text.strip():
        raise ResultsError(f"{path} holds no rows")
    try:
        frame = pd.read_csv(io.StringIO(text), keep_default_na=False, na_values=[""])
    except (ValueError, pd.errors.ParserError) as exc:
        raise ResultsError(f"{path} is not a CSV file: {str(exc).strip().splitlines()[0]}") from None
    check_types(frame, path)
    return frame


def check_header(path: Path) -> None:
    """Raise ``ResultsError`` unless ``path`` is missing, empty, or begins with this tool's header
    (:data:`COLUMNS`; a header torn by a kill mid-write counts as this tool's)."""
    if not path.exists():
        return
    try:
        with open(path, encoding="utf-8") as f:
            line = f.readline(len(",".join(COLUMNS)) + 2)
    except (OSError, UnicodeDecodeError):
        read_text(path)  # raises the error that names the file
        raise
    first, newline = line.rstrip("\n"), line.endswith("\n")
    expected = ",".join(COLUMNS)
    if first != expected and (newline or not expected.startswith(first)):
        raise ResultsError(f"{path} has unexpected columns (not written by this version of a2a-bench)")


def refuse_incomparable(results: pd.DataFrame, source: Path) -> None:
    """Raise ``ResultsError`` when rows of ``results`` (read from ``source``) were timed while ranks
    time-sliced a GPU (``comparable`` false, ``--share-gpu timeslice``): their times say nothing about
    the knobs, so nothing may be chosen from them."""
    if "comparable" not in results.columns:
        return
    bad = results[results["comparable"].astype(str).str.lower() == "false"]
    if len(bad):
        raise ResultsError(f"{source}: {len(bad)} of {len(results)} rows were timed with ranks time-slicing a GPU "
                           "(--share-gpu timeslice): their times are not comparable, so there is nothing to choose "
                           "from; sweep again with --share-gpu mps")


def read_text(path: Path) -> str:
    """The UTF-8 text of ``path``; ``ResultsError`` naming the file when it cannot be read."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ResultsError(f"cannot read {path}: it is not UTF-8 text") from None
    except OSError as exc:
        raise ResultsError(f"cannot read {path}: {exc.strerror or exc}") from None


_INT_COLUMNS = ("world_size", "ranks_per_gpu", "hidden", "num_tokens", "topk", "num_experts", "seed", "warmup", "iters")
_BOOL_COLUMNS = ("verified", "is_default", "comparable")


def column_kind(name: str) -> str:
    """How a ``results.csv`` column is typed: ``"int"`` (never empty), ``"number"`` (empty allowed),
    ``"bool"`` or ``"text"``."""
    if name in _INT_COLUMNS:
        return "int"
    if name in _BOOL_COLUMNS:
        return "bool"
    if name in ("num_sms", "recv_tokens", "skew") or "_us_" in name or name.endswith(("_gbps", "_frac_peak")):
        return "number"
    return "text"


def check_types(frame: pd.DataFrame, path: Path) -> None:
    """Raise ``ResultsError`` for the first value of ``frame`` (read from ``path``) of the wrong type
    (:func:`column_kind`), naming its row (the file's line number) and column."""
    for name in frame.columns:
        kind = column_kind(name)
        column = frame[name]
        if kind == "text" or (kind == "bool" and column.dtype == bool):
            continue
        if kind == "bool":
            bad = ~column.astype(str).isin(("True", "False", "true", "false"))
            _raise_first(frame, name, bad, path, "true or false")
            continue
        numbers = pd.to_numeric(column, errors="coerce")
        _raise_first(frame, name, numbers.isna() & column.notna(), path, "a number")
        if kind == "int":
            _raise_first(frame, name, numbers.isna() | (numbers % 1 != 0), path, "an integer")


def _raise_first(frame: pd.DataFrame, name: str, bad: pd.Series, path: Path, what: str) -> None:
    if bad.any():
        index = int(bad.to_numpy().nonzero()[0][0])
        value = frame[name].iloc[index]
        shown = "nothing" if pd.isna(value) else repr(value)
        raise ResultsError(f"{path}: line {index + 2} has {shown} in column {name}, not {what}")


@dataclass(frozen=True)
class Invocation:
    """One sweep command that wrote a run folder (an entry of ``run.json``'s ``history``).

    Attributes:
        command: its command line (rank 0's).
        started: when it started, ISO 8601 UTC (``None``: a folder written before the history was kept).
        spec: its grid (:meth:`a2a_bench.engine.spec.SweepSpec.to_json`).
        points: grid points of its grid.
        done: points of its grid already in ``results.csv`` when it started.
        extend: it was allowed to change the grid (``--extend``).
        job: the torchrun job it ran in (``$TORCHELASTIC_RUN_ID``; empty outside torchrun).
        restarts: times torchrun restarted its ranks.
    """

    command: list
    started: str | None
    spec: dict
    points: int
    done: int
    extend: bool = False
    job: str = ""
    restarts: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


_INVOCATION_CHECKS = {
    "command": (lambda v: isinstance(v, list), "a list"), "started": (lambda v: v is None or isinstance(v, str), "a time"),
    "spec": (lambda v: isinstance(v, dict), "an object"), "points": (lambda v: _count(v), "a count"),
    "done": (lambda v: _count(v), "a count"), "extend": (lambda v: isinstance(v, bool), "true or false"),
    "job": (lambda v: isinstance(v, str), "a string"), "restarts": (lambda v: _count(v), "a count"),
}


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


@dataclass(frozen=True)
class RunInfo:
    """``run.json``: what a sweep ran and where.

    The top-level ``spec``, ``command``, ``points`` and ``resumed_with_done`` describe the latest sweep
    into the folder (what a ``--resume`` continues); ``history`` every sweep that wrote it, oldest first.

    Attributes:
        spec: the sweep's grid (:meth:`a2a_bench.engine.spec.SweepSpec.to_json`).
        cluster: the cluster fingerprint (:meth:`fused_a2a.cluster.ClusterInfo.to_json`; ``id`` a name).
        world_size: ranks of the sweep.
        versions: versions of a2a_bench, torch, NCCL and the backend libraries (``None``: absent).
        command: the command line of rank 0.
        points: grid points of the sweep.
        resumed_with_done: points of its grid already in ``results.csv`` when it started.
        history: the invocations that wrote the folder (:class:`Invocation`); empty in a ``run.json``
            written before it was kept.
    """

    spec: dict[str, Any]
    cluster: dict[str, Any]
    world_size: int
    versions: dict[str, Any]
    command: list[str]
    points: int
    resumed_with_done: int
    history: tuple[Invocation, ...] = field(default=())

    def to_json(self) -> dict[str, Any]:
        return {**{f.name: getattr(self, f.name) for f in fields(self) if f.name != "history"},
                "history": [entry.to_json() for entry in self.history]}

    def invocations(self) -> tuple[Invocation, ...]:
        """:attr:`history`, or for a ``run.json`` written before it was kept, its one sweep."""
        return self.history or (Invocation(list(self.command), None, dict(self.spec), self.points,
                                           self.resumed_with_done),)


def write_run_info(path: Path, info: RunInfo) -> None:
    """Write ``run.json`` atomically."""
    atomic_write_text(path, json.dumps(info.to_json(), indent=2) + "\n")


def read_run_info(path: Path) -> RunInfo:
    """Read and validate ``run.json``.

    Raises:
        ResultsError: the file is missing or unreadable, not JSON, or not this tool's: a missing or
            unknown key, a value of the wrong type, a spec with other keys than :class:`SweepSpec`'s,
            a cluster without an ``id`` that is a name (never a path), or a history entry that is not
            an :class:`Invocation` (``history`` itself may be absent: files written before it was kept).
    """
    if not path.exists():
        raise ResultsError(f"no {path.name} in {path.parent}: run a sweep into this folder first")
    try:
        data = json.loads(read_text(path))
    except json.JSONDecodeError as exc:
        raise ResultsError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(data, dict):
        raise ResultsError(f"{path} must hold a JSON object, got {type(data).__name__}")
    checks = {
        "spec": (dict, "an object"), "cluster": (dict, "an object"), "world_size": (int, "a positive integer"),
        "versions": (dict, "an object"), "command": (list, "a list"), "points": (int, "an integer"),
        "resumed_with_done": (int, "an integer"),
    }
    unknown = sorted(set(data) - set(checks) - {"history"})
    if unknown:
        raise ResultsError(f"{path} is not a run.json of a2a-bench: unknown key {', '.join(unknown)}")
    for key, (kind, what) in checks.items():
        if key not in data:
            raise ResultsError(f"{path} is not a run.json of a2a-bench: it lacks {key}")
        value = data[key]
        if not isinstance(value, kind) or isinstance(value, bool) or (key == "world_size" and value < 1):
            raise ResultsError(f"{path}: {key} must be {what}, got {_short(value)}")
    spec_keys = set(file_keys())
    for where, spec in (("its spec", data["spec"]), *((f"history[{i}].spec", h.get("spec")) for i, h in
                                                      enumerate(data.get("history") or []) if isinstance(h, dict))):
        if isinstance(spec, dict) and set(spec) != spec_keys:
            differ = sorted(set(spec) ^ spec_keys)
            raise ResultsError(f"{path}: {where} does not match this version's sweep spec (keys {', '.join(differ)} differ)")
    if "id" not in data["cluster"]:
        raise ResultsError(f"{path}: cluster lacks its id")
    problem = cluster_id_problem(data["cluster"]["id"])
    if problem is not None:
        raise ResultsError(f"{path}: {problem}")
    history = _history(data.get("history", []), path)
    return RunInfo(**{**{k: v for k, v in data.items() if k != "history"}, "history": history})


def _history(entries: Any, path: Path) -> tuple[Invocation, ...]:
    if not isinstance(entries, list):
        raise ResultsError(f"{path}: history must be a list, got {_short(entries)}")
    out = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ResultsError(f"{path}: history[{i}] must be an object, got {_short(entry)}")
        unknown = sorted(set(entry) - set(_INVOCATION_CHECKS))
        if unknown:
            raise ResultsError(f"{path}: history[{i}] has unknown key {', '.join(unknown)}")
        for key, (check, what) in _INVOCATION_CHECKS.items():
            if key not in entry:
                raise ResultsError(f"{path}: history[{i}] lacks {key}")
            if not check(entry[key]):
                raise ResultsError(f"{path}: history[{i}].{key} must be {what}, got {_short(entry[key])}")
        out.append(Invocation(**entry))
    return tuple(out)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _drop_torn_tail(path: Path) -> None:
    if not path.exists():
        return
    with open(path, "rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)
