"""The knobs of a call, agreed by every rank of its group, resolved once per key and cached.

Fused kernels need identical configs on all ranks of a group. The first call of a key (group
and :class:`CallKey`: backend, call shape, explicit knobs, SM budget) runs one collective: the
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

The first call's exchange also carries each rank's call (backend, dtype, hidden size, top-k, experts,
routing, SM budget) and any problem this rank's own inputs have: ranks that call with different shapes,
or a rank whose inputs failed a check, make every rank raise the same ``ValueError``. A rank whose own
inputs fail a check at a key it has not seen, on a group that has run a call already, cannot know
whether its peers are at a first call too: :func:`agreed_comm` raises :class:`LocalProblem` without any
collective, and the caller (:mod:`fused_a2a.calls`) joins the call its peers most likely run.

The cache holds process groups weakly (:class:`~fused_a2a.groups.GroupMap`): a destroyed group's
entries go with it. Call :func:`clear` on every rank of a group or on none (a cleared rank runs the
collective again).
"""

from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch.distributed as dist

from fused_a2a import env_snapshot, log
from fused_a2a.autograd import Comm
from fused_a2a.backends import BACKENDS, get_backend
from fused_a2a.checks import check_experts_divisible
from fused_a2a.cluster import CLUSTER_ID_ENV, detect_cluster
from fused_a2a.groups import GroupMap
from fused_a2a.shape import CallShape
from fused_a2a.tuning import resolve as resolution

STAT_EVERY = 32  # warm calls of a key between two looks at the table files
GLOBAL_ENV = (resolution.TUNING_DIR_ENV, CLUSTER_ID_ENV, resolution.STRICT_ENV, resolution.BUDGET_ENV,
              resolution.ROUTING_ENV)


@dataclass(frozen=True)
class CallKey:
    """What a group's agreed resolutions are keyed by.

    Attributes:
        backend: the backend the call names (``auto`` included).
        shape: its :class:`~fused_a2a.shape.CallShape` without world size and tokens (the token count
            changes from call to call; the group gives the world size).
        explicit: the knob arguments, sorted ``(name, value)`` pairs.
        num_sms_budget: the SM budget argument (``None``: none given).
    """

    backend: str
    shape: CallShape
    explicit: tuple[tuple[str, Any], ...] = ()
    num_sms_budget: int | None = None

    def describe(self) -> str:
        """``torch bf16 hidden 7168 top-8 64 experts routing uniform``: the call as an error names it."""
        shape, budget = self.shape, self.num_sms_budget
        return (f"{self.backend} {shape.dtype} hidden {shape.hidden} top-{shape.topk} {shape.num_experts} experts "
                f"routing {shape.routing or 'default'}{'' if budget is None else f' SM budget {budget}'}")


@dataclass(frozen=True)
class Agreed:
    """What a key resolved to.

    Attributes:
        key: the call's :class:`CallKey`.
        backend: the backend that runs (``auto`` resolved to a name).
        comm: its :class:`~fused_a2a.autograd.Comm`, knobs resolved.
        lookup_tokens: the token count the table was looked up with (the group's largest at the
            key's first call).
        use_table: ``False`` when the ranks saw different tables.
        watch: the encoded environment variables and table paths whose change invalidates the entry.
        stamp: their values when the entry was resolved.
        resolved: the knobs, their sources and the table entry the comm was built from.
        choice: for ``backend="auto"``, how the backend was chosen (``None`` otherwise).
        calls: warm calls since the table files were last looked at (one per entry, mutable).
    """

    key: CallKey
    backend: str
    comm: Comm
    lookup_tokens: int
    use_table: bool
    watch: tuple
    stamp: tuple
    resolved: resolution.Resolution | None = None
    choice: resolution.BackendChoice | None = None
    calls: list = field(default_factory=lambda: [0])


class LocalProblem(ValueError):
    """This rank's call cannot run (its dtype, its expert count, its backend), found before any collective
    at a key this rank has not agreed yet, on a group that has run a call already."""


@dataclass(eq=False)
class _GroupCalls:
    """One group's agreed keys on this rank and the key of its last dispatch (``None``: none yet).

    ``agreed`` is keyed by ``(backend, shape, explicit, num_sms_budget)``: a :class:`CallKey`'s values
    in a tuple, which a warm call builds faster than a :class:`CallKey` (its entry holds the typed key).
    """

    agreed: dict[tuple, Agreed] = field(default_factory=dict)
    last: tuple | None = None


_cache: GroupMap[_GroupCalls] = GroupMap()
_stats = {"hits": 0, "agreements": 0, "refreshes": 0}
_announced: dict[CallKey, str] = {}  # key -> the last line logged for it


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
    shape: CallShape,
    num_tokens: int,
    explicit: dict[str, Any],
    num_sms_budget: int | None = None,
) -> Agreed:
    """The backend and :class:`Comm` of a call, the same on every rank of ``group``.

    Collective the first time a key is seen (every rank of ``group`` must make the call); afterwards
    local.

    Args:
        backend: a backend name, or ``"auto"``.
        group: the expert-parallel process group (``None``: the default group).
        shape: the call's dtype, hidden size, top-k, experts and routing (world size and tokens not
            set: the group and ``num_tokens`` give them); :func:`fused_a2a.shape.keyed` gives a warm call
            its shape without building one.
        num_tokens: this rank's tokens.
        explicit: the knob arguments; num_sms_budget: as in :func:`fused_a2a.tuning.resolve.resolve`.

    Raises:
        ValueError: unknown backend or knob, a knob value the backend rejects, a dtype or shape the
            backend does not take, explicit knobs or ``FUSED_A2A_*`` overrides that differ between the
            ranks, or ranks that call with different shapes (raised on every rank).
        LocalProblem: this rank's dtype, expert count or backend cannot run, at a first call on a group
            that has run a call already (raised on this rank only, before any collective).
        RuntimeError: the backend's library is not installed.
    """
    index = (backend, shape, frozen_knobs(explicit), num_sms_budget)
    calls = _cache.get(group)
    agreed = None if calls is None else calls.agreed.get(index)
    if agreed is not None:
        if shape.num_experts is not None:
            calls.last = index
        if env_snapshot.values(agreed.watch[0]) == agreed.stamp[0] and _files_unchanged(agreed):
            _stats["hits"] += 1
            return agreed
        _stats["refreshes"] += 1
        agreed = _resolve(group, agreed.key, agreed.lookup_tokens, agreed.use_table)
    else:
        key = CallKey(backend, shape, index[2], num_sms_budget)
        world_size = dist.get_world_size(group)
        problem = _local_problem(key, world_size)
        if problem is not None and calls is not None and calls.last is not None:
            raise LocalProblem(problem)
        _stats["agreements"] += 1
        lookup_tokens, use_table = _agree(group, key, num_tokens, problem)
        agreed = _resolve(group, key, lookup_tokens, use_table)
        if calls is None:
            calls = _cache.set(group, _GroupCalls())
        if shape.num_experts is not None:
            calls.last = index
    calls.agreed[index] = agreed
    _announce(group, agreed)
    return agreed


def refuse(problem: str, group: dist.ProcessGroup | None, key: CallKey) -> None:
    """Raise the same ``ValueError`` (naming this rank and ``problem``) on every rank of ``group``, whose
    other ranks are at the first call of their key. Collective: this rank's side of :func:`agreed_comm`'s
    first-call exchange, for a call that failed a check before it had a key (``key.shape`` holds its
    routing alone)."""
    _agree(group, key, 0, problem)
    raise ValueError(problem)  # a group of one rank: nothing to exchange


def join_target(group: dist.ProcessGroup | None, key: CallKey) -> tuple[CallShape, Comm] | None:
    """The dispatch this rank's peers most likely run now, for a rank whose own call failed a check.

    ``key.shape`` holds the call's dtype, hidden size, top-k and experts as far as the failed call still
    gives them (``None``: not known). Returns the shape and Comm of the group's last dispatch on this
    rank if it matches every part given, else of the latest agreed dispatch that does; ``None`` when none
    does (a shape the group has not run: its peers are at its first call) or this rank has run none. A
    call that gives none of the four parts takes the last dispatch. The target becomes the last dispatch."""
    calls = _cache.get(group)
    if calls is None or calls.last is None:
        return None
    given = key.shape
    parts = ("dtype", "hidden", "topk", "num_experts")

    def matches(agreed: Agreed) -> bool:
        have = agreed.key
        return (have.shape.num_experts is not None and have.backend == key.backend
                and (have.shape.routing, have.explicit, have.num_sms_budget)
                == (given.routing, key.explicit, key.num_sms_budget)
                and all(getattr(given, part) in (None, getattr(have.shape, part)) for part in parts))

    target = calls.last
    if any(getattr(given, part) is not None for part in parts) and not matches(calls.agreed[target]):
        target = next((index for index, agreed in reversed(calls.agreed.items()) if matches(agreed)), None)
        if target is None:
            return None
    calls.last = target
    agreed = calls.agreed[target]
    return agreed.key.shape, agreed.comm


def _local_problem(key: CallKey, world_size: int) -> str | None:
    """Why this rank's call cannot run whatever its peers do (unknown backend, a dtype the backend does
    not move, experts not divisible by the group size), or ``None``."""
    backend, dtype, num_experts = key.backend, key.shape.dtype, key.shape.num_experts
    try:
        spec = get_backend(backend) if backend != "auto" else None
        if num_experts is not None:
            check_experts_divisible(num_experts, world_size)
    except ValueError as err:
        return str(err)
    if spec is not None and dtype is not None and dtype not in spec.dtypes:
        return f"{backend} moves {', '.join(spec.dtypes)} tokens, not {dtype}"
    return None


def _announce(group, agreed: Agreed) -> None:
    """Log what ``agreed``'s key resolved to, on global rank 0, unless that very line was logged for it."""
    log.configure()
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    line = describe(group, agreed)
    if _announced.get(agreed.key) == line:
        return
    _announced[agreed.key] = line
    log.logger.info("%s", line)


def describe(group, agreed: Agreed) -> str:
    """One line: the backend an agreed key of ``group`` runs (and why, for ``auto``), its knobs with their
    sources, and the table entry they came from."""
    res = agreed.resolved
    shape = (f"{agreed.key.shape.describe()} on {dist.get_world_size(group)} ranks, "
             f"{res.routing if res else 'uniform'} routing, table looked up for {agreed.lookup_tokens} tokens")
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


def frozen_knobs(explicit: dict[str, Any]) -> tuple:
    """Knob arguments as :attr:`CallKey.explicit` holds them."""
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
    return env_snapshot.encode(_env_names(backend)), _table_paths(world_size)


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
    return env_snapshot.values(watch[0]), _file_stamp(watch)


def _table_digest(world_size: int) -> str | None:
    """SHA-1 of the first table file this rank would read (``None``: none)."""
    for path in _table_paths(world_size):
        try:
            return hashlib.sha1(path.read_bytes()).hexdigest()
        except OSError:
            continue
    return None


def _agree(group, key: CallKey, num_tokens: int, problem: str | None) -> tuple[int, bool]:
    """The group's largest token count and whether its ranks read the same table; raises the same
    ``ValueError`` on every rank when a rank has a ``problem``, when the ranks' calls (backend, dtype,
    hidden, top-k, experts, routing, SM budget) differ, or when their explicit knobs or overrides differ.
    Collective."""
    backend = key.backend
    world_size = dist.get_world_size(group)
    local = {
        "problem": problem,
        "call": replace(key, explicit=()),
        "tokens": int(num_tokens),
        "explicit": key.explicit,
        "env": tuple((name, os.environ.get(name)) for name in _env_names(backend)),
        "table": _table_digest(world_size),
    }
    views = [local]
    if world_size > 1:
        views = [None] * world_size
        dist.all_gather_object(views, local, group=group)
    problems = [f"rank {rank}: {view['problem']}" for rank, view in enumerate(views) if view["problem"] is not None]
    if problems:
        raise ValueError(f"fused_a2a: invalid dispatch on {'; '.join(problems)} (raised on every rank of the group)")
    if any(view["call"] != views[0]["call"] for view in views):
        calls = "; ".join(f"rank {rank}: {view['call'].describe()}" for rank, view in enumerate(views))
        raise ValueError(f"fused_a2a: the ranks of the group called dispatch with different arguments ({calls}); "
                         "every rank must pass the same backend, dtype, hidden size, top-k, experts, routing and SM budget")
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


def _check_shape(key: CallKey, world_size: int, tokens: tuple[int, ...]) -> None:
    """``ValueError`` (the same on every rank) for a shape the backend's kernels do not take (its dtypes
    are checked before, :func:`_local_problem`)."""
    shape = key.shape
    on_group = replace(shape.on(world_size, tokens), topk=shape.topk or 1, num_experts=shape.num_experts or world_size)
    problem = get_backend(key.backend).shape_problem(on_group, {})
    if problem is not None:
        raise ValueError(f"{key.backend}: {problem}")


def _describe(items: tuple) -> str:
    shown = [f"{name}={value}" for name, value in items if value is not None]
    return ", ".join(shown) or "none"


def _resolve(group, key: CallKey, lookup_tokens: int, use_table: bool) -> Agreed:
    backend = key.backend
    world_size = dist.get_world_size(group)
    watch = _watch(backend, world_size)
    stamp = _stamp(watch)
    shape = key.shape.on(world_size, (lookup_tokens,))
    name, choice = backend, None
    if backend == "auto":
        choice = resolution.choose_backend(shape) if use_table else resolution.BackendChoice("torch", None, ())
        name = choice.backend
    comm, resolved = resolution.tuned_comm(name, shape, dict(key.explicit), num_sms_budget=key.num_sms_budget,
                                           use_table=use_table)
    return Agreed(key, name, comm, lookup_tokens, use_table, watch, stamp, resolved, choice)
