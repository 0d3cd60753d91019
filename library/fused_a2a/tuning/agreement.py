"""The knobs of a call, agreed by every rank of its group, resolved once per key and cached.

Fused kernels need identical configs on all ranks of a group. The first call of a key (group,
backend, dtype, hidden, top-k, experts, routing, explicit knobs, SM budget) runs one collective: the
ranks exchange their token counts, explicit knobs, environment overrides and a digest of the tuning
table they would read. Explicit knobs or overrides that differ between ranks raise the same
``ValueError`` on every rank (instead of a hang); tables that differ are ignored on every rank with one
warning; the table is looked up with the group's largest token count, never one rank's alone. The
result is cached: a warm call costs a dictionary look-up and a check of the ``FUSED_A2A_*``
variables; every :data:`STAT_EVERY`-th warm call of a key also looks at the table files' ``stat`` (ranks call
in step, so they look at the same call). When those change, every rank that sees the change resolves
again, locally, with the token count the group agreed on (no collective: ranks that see different
changes are not re-agreed).

Each key's choice (backend, knobs, their sources, the table entry) is logged at INFO on the
``fused_a2a`` logger once, on global rank 0 (again only if a refresh changes it); ``FUSED_A2A_LOG=info``
shows it without configuring logging (:mod:`fused_a2a.log`).

Call :func:`clear` on every rank of a group or on none (a cleared rank runs the collective again).
"""

from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch.distributed as dist

from fused_a2a import environment, log
from fused_a2a.autograd import Comm
from fused_a2a.backends import BACKENDS, Shape, get_backend
from fused_a2a.checks import check_experts_divisible
from fused_a2a.cluster import CLUSTER_ID_ENV, detect_cluster
from fused_a2a.tuning import resolve as resolution

STAT_EVERY = 32  # warm calls of a key between two looks at the table files
GLOBAL_ENV = (resolution.TUNING_DIR_ENV, CLUSTER_ID_ENV, resolution.STRICT_ENV, resolution.BUDGET_ENV,
              resolution.ROUTING_ENV)


@dataclass(frozen=True)
class Agreed:
    """What a key resolved to.

    Attributes:
        backend: the backend that runs (``auto`` resolved to a name).
        comm: its :class:`~fused_a2a.autograd.Comm`, knobs resolved.
        lookup_tokens: the token count the table was looked up with (the group's largest at the
            key's first call).
        use_table: ``False`` when the ranks saw different tables.
        routing: the routing the call declared (``None``: ``$FUSED_A2A_ROUTING`` or ``uniform``).
        watch: the encoded environment variables and table paths whose change invalidates the entry.
        stamp: their values when the entry was resolved.
        resolved: the knobs, their sources and the table entry the comm was built from.
        choice: for ``backend="auto"``, how the backend was chosen (``None`` otherwise).
        calls: warm calls since the table files were last looked at (one per entry, mutable).
    """

    backend: str
    comm: Comm
    lookup_tokens: int
    use_table: bool
    routing: str | None
    watch: tuple
    stamp: tuple
    resolved: resolution.Resolution | None = None
    choice: resolution.BackendChoice | None = None
    calls: list = field(default_factory=lambda: [0])


_cache: dict[tuple, Agreed] = {}
_stats = {"hits": 0, "agreements": 0, "refreshes": 0}
_announced: dict[tuple, str] = {}  # key -> the last line logged for it


def cache_stats() -> dict[str, int]:
    """Counters since the last :func:`clear`: ``hits`` (warm calls), ``agreements`` (collective
    first calls), ``refreshes`` (local re-resolutions after a change)."""
    return dict(_stats)


def clear() -> None:
    """Forget every agreed resolution (do it on every rank of a group, or on none)."""
    _cache.clear()
    _announced.clear()
    for name in _stats:
        _stats[name] = 0


def agreed_comm(
    backend: str,
    group: dist.ProcessGroup | None,
    dtype: str,
    hidden: int,
    num_tokens: int,
    topk: int | None,
    num_experts: int | None,
    explicit: dict[str, Any],
    num_sms_budget: int | None = None,
    routing: str | None = None,
) -> Agreed:
    """The backend and :class:`Comm` of a call, the same on every rank of ``group``.

    Collective the first time a key is seen (every rank of ``group`` must make the call); afterwards
    local. Arguments as in :func:`fused_a2a.tuning.resolve.resolve`; ``backend`` may be ``"auto"``.

    Raises:
        ValueError: unknown backend or knob, a knob value the backend rejects, or explicit knobs or
            ``FUSED_A2A_*`` overrides that differ between the ranks (raised on every rank).
        RuntimeError: the backend's library is not installed.
    """
    key = (group, backend, dtype, hidden, topk, num_experts, routing, _frozen(explicit), num_sms_budget)
    agreed = _cache.get(key)
    if agreed is not None:
        if environment.values(agreed.watch[0]) == agreed.stamp[0] and _files_unchanged(agreed):
            _stats["hits"] += 1
            return agreed
        _stats["refreshes"] += 1
        agreed = _resolve(key, agreed.lookup_tokens, agreed.use_table)
    else:
        if backend != "auto":
            get_backend(backend)
        if num_experts is not None:
            check_experts_divisible(num_experts, dist.get_world_size(group))
        _stats["agreements"] += 1
        lookup_tokens, use_table = _agree(key, group, num_tokens, explicit)
        agreed = _resolve(key, lookup_tokens, use_table)
    _cache[key] = agreed
    _announce(key, agreed)
    return agreed


def _announce(key: tuple, agreed: Agreed) -> None:
    """Log what ``key`` resolved to, on global rank 0, unless that very line was logged for it."""
    log.configure()
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    line = describe(key, agreed)
    if _announced.get(key) == line:
        return
    _announced[key] = line
    log.logger.info("%s", line)


def describe(key: tuple, agreed: Agreed) -> str:
    """One line: the backend a key runs (and why, for ``auto``), its knobs with their sources, and
    the table entry they came from."""
    group, backend, dtype, hidden, topk, num_experts, *_ = key
    res = agreed.resolved
    shape = (f"{dtype} hidden {hidden}" + (f" top-{topk}" if topk else "") + (f" {num_experts} experts" if num_experts else "")
             + f" on {dist.get_world_size(group)} ranks, {res.routing if res else 'uniform'} routing, "
             f"table looked up for {agreed.lookup_tokens} tokens")
    name = agreed.backend
    if agreed.choice is not None:
        c = agreed.choice
        why = (f"fastest {c.mode} round trip in the table: " + ", ".join(f"{b} {us:.1f} µs" for b, us in c.costs)
               if c.mode else "no table entry of an installed backend: torch")
        name = f"auto -> {agreed.backend} ({why})"
    if res is None:
        return f"fused_a2a {name} for {shape}"
    knobs = "; ".join(f"{k}={_pair(res.dispatch[k], res.combine[k])} ({res.sources[k]})" for k in res.dispatch)
    if res.entry is not None:
        e = res.entry
        entry = (f"table entry {res.table_path}: {e.backend} hidden {e.hidden}, {e.num_tokens} tokens, top-{e.topk}, "
                 f"{e.num_experts} experts, {e.routing} routing, chosen by {e.selected_by} mode")
    else:
        entry = f"no table entry ({res.table_path or 'no tuning table for this cluster'})"
    if not agreed.use_table:
        entry = "no table (the ranks read different tables)"
    return f"fused_a2a {name} for {shape}: {knobs or 'no knobs'}; {entry}"


def _pair(dispatch: Any, combine: Any) -> str:
    return str(dispatch) if dispatch == combine else f"{dispatch}/{combine} (dispatch/combine)"


def _files_unchanged(agreed: Agreed) -> bool:
    """Counts a warm call of ``agreed``; at every :data:`STAT_EVERY`-th, whether its table files
    still have the ``stat`` they had when it was resolved (``True`` at the other calls)."""
    calls = agreed.calls
    calls[0] += 1
    if calls[0] < STAT_EVERY:
        return True
    calls[0] = 0
    return _file_stamp(agreed.watch) == agreed.stamp[1]


def _frozen(explicit: dict[str, Any]) -> tuple:
    return tuple(sorted(explicit.items())) if explicit else ()


def _env_names(backend: str) -> tuple[str, ...]:
    """The ``FUSED_A2A_*`` variables a resolution of ``backend`` reads."""
    names = [resolution.env_var(spec.name, knob.name) for spec in BACKENDS.values()
             if backend in ("auto", spec.name) for knob in spec.knobs]
    return (*names, *GLOBAL_ENV)


def _table_paths(world_size: int) -> tuple[Path, ...]:
    cluster = detect_cluster(world_size).id
    return tuple(folder / cluster / resolution.TABLE_NAME for folder in resolution.tuning_dirs())


def _watch(backend: str, world_size: int) -> tuple:
    return environment.encode(_env_names(backend)), _table_paths(world_size)


def _file_stamp(watch: tuple) -> tuple:
    """The ``stat`` of the watched table files (``None`` for a missing one)."""
    files = []
    for path in watch[1]:
        try:
            info = os.stat(path)
            files.append((info.st_mtime_ns, info.st_size, info.st_ino))
        except OSError:
            files.append(None)
    return tuple(files)


def _stamp(watch: tuple) -> tuple:
    return environment.values(watch[0]), _file_stamp(watch)


def _table_digest(world_size: int) -> str | None:
    """SHA-1 of the first table file this rank would read (``None``: none)."""
    for path in _table_paths(world_size):
        try:
            return hashlib.sha1(path.read_bytes()).hexdigest()
        except OSError:
            continue
    return None


def _agree(key: tuple, group, num_tokens: int, explicit: dict[str, Any]) -> tuple[int, bool]:
    """The group's largest token count and whether its ranks read the same table; raises the same
    ``ValueError`` on every rank when their explicit knobs or overrides differ. Collective."""
    backend = key[1]
    world_size = dist.get_world_size(group)
    local = {
        "tokens": int(num_tokens),
        "explicit": _frozen(explicit),
        "env": tuple((name, os.environ.get(name)) for name in _env_names(backend)),
        "table": _table_digest(world_size),
    }
    views = [local]
    if world_size > 1:
        views = [None] * world_size
        dist.all_gather_object(views, local, group=group)
    for part, what in (("explicit", "knob arguments"), ("env", "FUSED_A2A_* environment overrides")):
        if any(view[part] != views[0][part] for view in views):
            differing = "; ".join(f"rank {rank}: {_describe(view[part])}" for rank, view in enumerate(views))
            raise ValueError(f"fused_a2a {backend}: the ranks of the group have different {what} ({differing}); "
                             "fused kernels need the same knobs on every rank")
    if backend != "auto":
        _check_shape(key, world_size, tuple(view["tokens"] for view in views))
    same_table = all(view["table"] == views[0]["table"] for view in views)
    if not same_table:
        warnings.warn(f"fused_a2a {backend}: the ranks of the group read different tuning tables; "
                      "using no table on any rank", resolution.TuningWarning, stacklevel=4)
    return max(view["tokens"] for view in views), same_table


def _check_shape(key: tuple, world_size: int, tokens: tuple[int, ...]) -> None:
    """``ValueError`` (the same on every rank) for a dtype or shape the backend's kernels do not take."""
    _, backend, dtype, hidden, topk, num_experts, *_ = key
    spec = get_backend(backend)
    if dtype not in spec.dtypes:
        raise ValueError(f"{backend} moves {', '.join(spec.dtypes)} tokens, not {dtype}")
    problem = spec.shape_problem(Shape(world_size, tokens, hidden, topk or 1, num_experts or world_size, dtype), {})
    if problem is not None:
        raise ValueError(f"{backend}: {problem}")


def _describe(items: tuple) -> str:
    shown = [f"{name}={value}" for name, value in items if value is not None]
    return ", ".join(shown) or "none"


def _resolve(key: tuple, lookup_tokens: int, use_table: bool) -> Agreed:
    group, backend, dtype, hidden, topk, num_experts, routing, explicit, budget = key
    world_size = dist.get_world_size(group)
    watch = _watch(backend, world_size)
    stamp = _stamp(watch)
    shape = dict(world_size=world_size, dtype=dtype, hidden=hidden, num_tokens=lookup_tokens, topk=topk,
                 num_experts=num_experts)
    name, choice = backend, None
    if backend == "auto":
        choice = (resolution.choose_backend(**shape, routing=routing) if use_table
                  else resolution.BackendChoice("torch", None, ()))
        name = choice.backend
    comm, resolved = resolution.tuned_comm(name, **shape, explicit=dict(explicit),
                                           num_sms_budget=budget, routing=routing, use_table=use_table)
    return Agreed(name, comm, lookup_tokens, use_table, routing, watch, stamp, resolved, choice)
