"""The tuning table file ``tuning.json`` (schema ``a2a-bench/tuning/v1``): its only reader and writer.

A table holds, for one cluster, the best measured knobs of each (backend, world size, dtype, routing,
backend build, hidden, tokens, top-k, experts) key, and for each key the best time at each SM count
(the ``frontier``). ``routing`` and ``build`` are optional in a file (``uniform`` and unknown), and so
are ``selected_by`` (``kernel``: tables written before the mode was recorded were chosen by it) and
``vs_default`` (the chosen config against the backend's default, :class:`VsDefault`; absent in tables
written before it was recorded).
Every file is validated on read and before it is written; a problem raises :class:`TuningFileError`
with one line naming the file and the problem.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from filelock import FileLock

from fused_a2a.backends import BACKENDS
from fused_a2a.cluster import cluster_id_problem
from fused_a2a.files import atomic_write_text
from fused_a2a.shape import CallShape

SCHEMA = "a2a-bench/tuning/v1"
DTYPES = ("bf16", "fp16", "fp32", "fp8")
SELECTION_MODES = ("kernel", "api", "seed", "graph")
KEY_FIELDS = ("backend", "world_size", "dtype", "routing", "build", "hidden", "num_tokens", "topk", "num_experts")
ROUTING_RE = re.compile(r"^(uniform|zipf:\d+(\.\d+)?|hot:(0(\.\d+)?|1(\.0+)?))$")


class TuningFileError(ValueError):
    """A tuning file that cannot be read or is not a valid ``a2a-bench/tuning/v1`` table."""

    def __init__(self, source: str, problem: str) -> None:
        super().__init__(f"tuning file {source}: {problem}")
        self.source = source
        self.problem = problem


@dataclass(frozen=True)
class VsDefault:
    """The fastest measured config of a key against the backend's default config, both measured in one
    sweep, round trips (dispatch + combine) in the entry's selection mode.

    Attributes:
        ratio: the default's median over the fastest config's (> 1: the fastest config is faster).
        low, high: the ratio's interval from the two configs' spreads: the default's p10 over the
            fastest config's p90, and the default's p90 over its p10 (``low <= ratio <= high``).
        kept_default: the fastest config did not beat the default beyond the noise, so the entry holds
            the default's knobs (the rule: ``a2a_bench.reports.tune``).
        best_dispatch, best_combine: the fastest config's knobs (whether or not the entry holds them).
    """

    ratio: float
    low: float
    high: float
    kept_default: bool
    best_dispatch: dict[str, Any]
    best_combine: dict[str, Any]

    def to_json(self) -> dict:
        return {"ratio": self.ratio, "low": self.low, "high": self.high, "kept_default": self.kept_default,
                "best": {"dispatch": dict(sorted(self.best_dispatch.items())),
                         "combine": dict(sorted(self.best_combine.items()))}}


@dataclass(frozen=True)
class TuningEntry:
    """The best knobs measured for one key (:data:`KEY_FIELDS`).

    Attributes:
        backend: a name in :data:`fused_a2a.backends.BACKENDS`.
        world_size: ranks in the expert-parallel group.
        dtype: token dtype, one of :data:`DTYPES`.
        routing: the routing it was measured with: ``uniform``, ``zipf:<skew>`` or ``hot:<fraction>``.
        build: the backend library's version and build it was measured with (``None``: not recorded).
        selected_by: the timing mode the config was chosen by (``kernel``, ``api``, ``seed``, ``graph``).
        hidden: hidden size (elements per token).
        num_tokens: tokens per rank before dispatch.
        topk: experts per token.
        num_experts: total number of experts.
        dispatch: the backend's knobs for dispatch (knob name -> value).
        combine: its knobs for combine (the same knob names as ``dispatch``).
        measured: times in microseconds (``*_us``) and bandwidths in GB/s (``*_gbps``) of this choice.
        frontier: ``(num_sms, dispatch_us, combine_us)`` of the best config at each SM count.
        vs_default: the fastest config against the default (``None``: not recorded, or the sweep did
            not measure the default).
    """

    backend: str
    world_size: int
    dtype: str
    hidden: int
    num_tokens: int
    topk: int
    num_experts: int
    dispatch: dict[str, Any]
    combine: dict[str, Any]
    measured: dict[str, float]
    frontier: tuple[tuple[int, float, float], ...]
    routing: str = "uniform"
    build: str | None = None
    selected_by: str = "kernel"
    vs_default: VsDefault | None = None

    @property
    def key(self) -> tuple:
        """The values of :data:`KEY_FIELDS` (``build`` as ``""`` when unknown, so keys sort)."""
        return tuple(("" if value is None else value) for value in (getattr(self, name) for name in KEY_FIELDS))

    def to_json(self) -> dict:
        return {
            **{name: getattr(self, name) for name in KEY_FIELDS if getattr(self, name) is not None},
            "dispatch": dict(sorted(self.dispatch.items())),
            "combine": dict(sorted(self.combine.items())),
            "measured": dict(sorted(self.measured.items())),
            "frontier": [list(point) for point in self.frontier],
            "selected_by": self.selected_by,
            **({"vs_default": self.vs_default.to_json()} if self.vs_default is not None else {}),
        }


@dataclass(frozen=True)
class TuningTable:
    """One cluster's tuning table.

    Attributes:
        schema: always :data:`SCHEMA`.
        cluster: the cluster fingerprint (``fused_a2a.cluster.ClusterInfo.to_json()``; ``id`` required).
        created: when it was written, ISO 8601 UTC (``"2026-11-24T22:00:00Z"``).
        tool_version: the version of the tool that measured it.
        entries: one per key, sorted by key.
    """

    schema: str
    cluster: dict[str, Any]
    created: str
    tool_version: str
    entries: tuple[TuningEntry, ...]

    def to_json(self) -> dict:
        return {
            "schema": self.schema,
            "cluster": dict(self.cluster),
            "created": self.created,
            "tool_version": self.tool_version,
            "entries": [entry.to_json() for entry in self.entries],
        }


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_positive_int(value: Any) -> bool:
    return _is_number(value) and isinstance(value, int) and value > 0


def _of(kind: type) -> Callable[[Any], bool]:
    return lambda value: isinstance(value, kind)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _field(obj: dict, key: str, where: str, check: Callable[[Any], bool], what: str, source: str) -> Any:
    """``obj[key]`` if present and ``check`` accepts it, else :class:`TuningFileError`."""
    if key not in obj:
        raise TuningFileError(source, f"missing key {where}{key}")
    value = obj[key]
    if not check(value):
        raise TuningFileError(source, f"{where}{key} must be {what}, got {_short(value)}")
    return value


def _knobs(obj: dict, key: str, where: str, backend: str, source: str) -> dict[str, Any]:
    knobs = _field(obj, key, where, _of(dict), "an object of knobs", source)
    spec = {knob.name: knob for knob in BACKENDS[backend].knobs}
    for name, value in knobs.items():
        if name not in spec:
            problem = f"{where}{key} has unknown knob {name!r} for backend {backend!r} (knobs: {', '.join(spec)})"
            raise TuningFileError(source, problem)
        knob = spec[name]
        if isinstance(knob.default, str) and knob.choices and all(isinstance(c, str) for c in knob.choices):
            if value not in knob.choices:
                choices = ", ".join(knob.choices)
                raise TuningFileError(source, f"{where}{key}.{name} must be one of {choices}, got {_short(value)}")
        problem = knob.check(value)
        if problem is not None:
            raise TuningFileError(source, f"{where}{key}.{name}: {problem}")
    return dict(knobs)


def _frontier(obj: dict, where: str, source: str) -> tuple[tuple[int, float, float], ...]:
    points = _field(obj, "frontier", where, _of(list), "a list", source)
    for j, point in enumerate(points):
        valid = isinstance(point, list) and len(point) == 3 and _is_positive_int(point[0])
        if not (valid and _is_number(point[1]) and _is_number(point[2])):
            problem = f"{where}frontier[{j}] must be [num_sms, dispatch_us, combine_us], got {_short(point)}"
            raise TuningFileError(source, problem)
    return tuple((point[0], float(point[1]), float(point[2])) for point in points)


def _vs_default(obj: dict, where: str, backend: str, source: str) -> VsDefault | None:
    """``obj["vs_default"]`` validated (``None`` when absent)."""
    if "vs_default" not in obj:
        return None
    where = f"{where}vs_default."
    data = _field(obj, "vs_default", where[:-len("vs_default.")], _of(dict), "an object", source)
    ratios = {key: _field(data, key, where, lambda v: _is_number(v) and v > 0, "a positive number", source)
              for key in ("ratio", "low", "high")}
    if not ratios["low"] <= ratios["ratio"] <= ratios["high"]:
        raise TuningFileError(source, f"{where}low <= ratio <= high does not hold: "
                                      f"{ratios['low']:g}, {ratios['ratio']:g}, {ratios['high']:g}")
    kept = _field(data, "kept_default", where, _of(bool), "true or false", source)
    best = _field(data, "best", where, _of(dict), "an object", source)
    best_dispatch = _knobs(best, "dispatch", f"{where}best.", backend, source)
    best_combine = _knobs(best, "combine", f"{where}best.", backend, source)
    return VsDefault(float(ratios["ratio"]), float(ratios["low"]), float(ratios["high"]), kept, best_dispatch,
                     best_combine)


def _entry(obj: Any, i: int, source: str) -> TuningEntry:
    where = f"entries[{i}]."
    if not isinstance(obj, dict):
        raise TuningFileError(source, f"entries[{i}] must be an object, got {_short(obj)}")
    backend = _field(obj, "backend", where, _of(str), "a string", source)
    if backend not in BACKENDS:
        raise TuningFileError(source, f"{where}backend {backend!r} is unknown (backends: {', '.join(BACKENDS)})")
    dtype = _field(obj, "dtype", where, lambda v: v in DTYPES, f"one of {', '.join(DTYPES)}", source)
    sizes = {
        key: _field(obj, key, where, _is_positive_int, "a positive int", source)
        for key in ("world_size", "hidden", "num_tokens", "topk", "num_experts")
    }
    routing = obj.get("routing", "uniform")
    if not isinstance(routing, str) or not ROUTING_RE.match(routing):
        raise TuningFileError(source, f"{where}routing must be uniform, zipf:<skew> or hot:<fraction>, got {_short(routing)}")
    build = obj.get("build")
    if build is not None and (not isinstance(build, str) or not build):
        raise TuningFileError(source, f"{where}build must be a non-empty string, got {_short(build)}")
    selected_by = obj.get("selected_by", "kernel")
    if selected_by not in SELECTION_MODES:
        raise TuningFileError(source, f"{where}selected_by must be one of {', '.join(SELECTION_MODES)}, got {_short(selected_by)}")
    dispatch = _knobs(obj, "dispatch", where, backend, source)
    combine = _knobs(obj, "combine", where, backend, source)
    if set(dispatch) != set(combine):
        raise TuningFileError(source, f"{where}dispatch and {where}combine must name the same knobs")
    measured = _field(obj, "measured", where, _of(dict), "an object", source)
    for name, value in measured.items():
        if not _is_number(value):
            raise TuningFileError(source, f"{where}measured.{name} must be a number, got {_short(value)}")
    return TuningEntry(
        backend=backend,
        dtype=dtype,
        routing=routing,
        build=build,
        selected_by=selected_by,
        **sizes,
        dispatch=dispatch,
        combine=combine,
        measured={name: float(value) for name, value in measured.items()},
        frontier=_frontier(obj, where, source),
        vs_default=_vs_default(obj, where, backend, source),
    )


def parse_table(data: Any, source: str) -> TuningTable:
    """Validate the decoded JSON ``data`` of a tuning file and build its :class:`TuningTable`.

    Args:
        data: what ``json.load`` returned.
        source: the file name, for messages.

    Raises:
        TuningFileError: another schema, a missing key, a value of the wrong type or range, an
            unknown backend, knob or knob value, or two entries with the same key.
    """
    if not isinstance(data, dict):
        raise TuningFileError(source, f"must hold a JSON object, got {type(data).__name__}")
    _field(data, "schema", "", lambda v: v == SCHEMA, repr(SCHEMA), source)
    cluster = _field(data, "cluster", "", _of(dict), "an object", source)
    _field(cluster, "id", "cluster.", lambda v: cluster_id_problem(v) is None,
           "a name (letters, digits, '.', '_', '-')", source)
    created = _field(data, "created", "", _of(str), "a string", source)
    tool_version = _field(data, "tool_version", "", _of(str), "a string", source)
    raw_entries = _field(data, "entries", "", _of(list), "a list", source)
    entries = tuple(_entry(obj, i, source) for i, obj in enumerate(raw_entries))
    first: dict[tuple, int] = {}
    for i, entry in enumerate(entries):
        if entry.key in first:
            raise TuningFileError(source, f"entries[{i}] has the same key as entries[{first[entry.key]}]")
        first[entry.key] = i
    return TuningTable(SCHEMA, dict(cluster), created, tool_version, entries)


def read_table(path: str | os.PathLike) -> TuningTable:
    """Read and validate the tuning file at ``path``.

    Raises:
        TuningFileError: the file is missing or unreadable, is not JSON (e.g. truncated), or is not a
            valid table (see :func:`parse_table`).
    """
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TuningFileError(source, "no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise TuningFileError(source, f"cannot be read ({err})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise TuningFileError(source, f"is not valid JSON ({err.msg} at line {err.lineno} column {err.colno})") from None
    return parse_table(data, source)


def write_table(path: str | os.PathLike, table: TuningTable) -> None:
    """Validate ``table`` and write it to ``path`` atomically (a reader sees the old file or the new one).

    Raises:
        TuningFileError: ``table`` is not valid (nothing is written).
    """
    data = table.to_json()
    parse_table(data, str(path))
    atomic_write_text(Path(path), json.dumps(data, indent=2) + "\n")


def merge_entries(old: TuningTable | None, new: TuningTable) -> TuningTable:
    """``new`` with the entries of ``old`` whose key ``new`` does not have; entries sorted by key."""
    merged = {entry.key: entry for entry in (old.entries if old else ())}
    merged.update((entry.key, entry) for entry in new.entries)
    return replace(new, entries=tuple(merged[key] for key in sorted(merged)))


def update_table(path: str | os.PathLike, new: TuningTable) -> TuningTable:
    """Merge ``new`` into the table at ``path`` (created if missing) under a file lock; return the result.

    Raises:
        TuningFileError: the existing file is invalid or belongs to another cluster id (it is left as is),
            or ``new`` is invalid.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        old = read_table(path) if path.exists() else None
        if old is not None and old.cluster["id"] != new.cluster.get("id"):
            raise TuningFileError(str(path), f"is for cluster {old.cluster['id']!r}, not {new.cluster.get('id')!r}")
        merged = merge_entries(old, new)
        write_table(path, merged)
    return merged


def lookup(table: TuningTable, backend: str, shape: CallShape, build: str | None = None) -> TuningEntry | None:
    """The entry of ``table`` that applies to a call of ``backend`` with ``shape``, or ``None``.

    ``shape`` gives the world size, dtype, hidden size, tokens (its :attr:`~CallShape.num_tokens`),
    top-k, experts and routing (``None``: ``uniform``). Backend, world size and dtype match exactly.
    Routing: the entries of the call's routing, else (none measured with it) those of ``uniform``.
    Build: the entries measured with the installed ``build`` when there are any, else those of any build
    (the caller warns). Among those, entries with the call's ``topk`` (then ``num_experts``) are
    preferred when there are any. Hidden: the exact size, else the nearest (a tie goes to the larger).
    Tokens: the smallest entry with ``num_tokens >=`` the call's, else the largest.
    """
    world_size, dtype, hidden, num_tokens = shape.world_size, shape.dtype, shape.hidden, shape.num_tokens
    routing, topk, num_experts = shape.routing or "uniform", shape.topk, shape.num_experts
    candidates = [e for e in table.entries if (e.backend, e.world_size, e.dtype) == (backend, world_size, dtype)]
    candidates = [e for e in candidates if e.routing == routing] or [e for e in candidates if e.routing == "uniform"]
    candidates = [e for e in candidates if build is not None and e.build == build] or candidates
    for name, wanted in (("topk", topk), ("num_experts", num_experts)):
        exact = [e for e in candidates if wanted is not None and getattr(e, name) == wanted]
        candidates = exact or candidates
    if not candidates:
        return None
    nearest = min(candidates, key=lambda e: (abs(e.hidden - hidden), -e.hidden)).hidden
    candidates = [e for e in candidates if e.hidden == nearest]
    enough = [e for e in candidates if e.num_tokens >= num_tokens]
    if enough:
        return min(enough, key=lambda e: e.num_tokens)
    return max(candidates, key=lambda e: e.num_tokens)


def best_within_budget(entry: TuningEntry, num_sms_budget: int) -> int | None:
    """The SM count of ``entry.frontier`` with the least ``dispatch_us + combine_us`` among those
    ``<= num_sms_budget`` (a tie goes to fewer SMs); ``None`` if there is none."""
    within = [point for point in entry.frontier if point[0] <= num_sms_budget]
    if not within:
        return None
    return min(within, key=lambda point: (point[1] + point[2], point[0]))[0]
