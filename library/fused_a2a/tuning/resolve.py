"""Where a backend's knobs come from: explicit argument > environment > tuning table > backend default.

Tables are looked for in ``$FUSED_A2A_TUNING_DIR/<cluster-id>/tuning.json``, then in the tables that ship
with the package (``tuning_results/<cluster-id>/tuning.json``). A table that cannot be used, an entry
measured with another build of the backend library, or an environment override that does not convert
is ignored (or used, for another build) with one warning: a training job never stops because of a
tuning file or an environment variable. Strict mode (``FUSED_A2A_TUNING_STRICT=1``) raises instead.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fused_a2a.autograd import Comm
from fused_a2a.backends import BACKENDS, BackendSpec, Knob, check_knobs, get_backend, open_comm
from fused_a2a.cluster import detect_cluster
from fused_a2a.shape import CallShape
from fused_a2a.tuning.table import (
    ROUTING_RE,
    TuningEntry,
    TuningFileError,
    TuningTable,
    best_within_budget,
    lookup,
    read_table,
)

TUNING_DIR_ENV = "FUSED_A2A_TUNING_DIR"
STRICT_ENV = "FUSED_A2A_TUNING_STRICT"
TABLE_NAME = "tuning.json"
BUDGET_ENV = "FUSED_A2A_NUM_SMS_BUDGET"
ROUTING_ENV = "FUSED_A2A_ROUTING"
SMS_KNOB = "num_sms"

logger = logging.getLogger("fused_a2a")
_logged: set[tuple] = set()


class TuningWarning(UserWarning):
    """A tuning table was found but ignored (filter this category to silence it)."""


@dataclass(frozen=True)
class Resolution:
    """The knobs a call runs with and where each came from.

    Attributes:
        backend: the backend name.
        dispatch: every knob of the backend for dispatch (name -> value).
        combine: every knob of the backend for combine.
        sources: knob name -> ``"argument"``, ``"environment"``, ``"table"``, ``"table (uniform
            routing)"`` (the call's routing has no entry), ``"table (SM budget)"``, ``"budget"`` or
            ``"default"``.
        table_path: the tuning file that was consulted, ``None`` if none was found.
        entry: the table entry that applied, ``None`` if none did.
        routing: the routing the call declared.
        build: the installed backend library's version and build (``None``: unknown).
    """

    backend: str
    dispatch: dict[str, Any]
    combine: dict[str, Any]
    sources: dict[str, str]
    table_path: str | None
    entry: TuningEntry | None
    routing: str = "uniform"
    build: str | None = None


def packaged_dir() -> Path:
    """The tables that ship with fused_a2a: inside the installed package (a wheel), else the source
    checkout's top-level ``tuning_results/`` (an editable install)."""
    inside = Path(__file__).resolve().parents[1] / "tuning_results"
    return inside if inside.is_dir() else Path(__file__).resolve().parents[3] / "tuning_results"


def tuning_dirs() -> list[Path]:
    """The folders searched for ``<cluster-id>/tuning.json``, first match wins:
    ``$FUSED_A2A_TUNING_DIR`` (a cluster's own tables), then :func:`packaged_dir`."""
    override = os.environ.get(TUNING_DIR_ENV)
    return [Path(override), packaged_dir()] if override else [packaged_dir()]


def strict_mode() -> bool:
    """``$FUSED_A2A_TUNING_STRICT == "1"``: unusable tables and overrides raise instead of warning."""
    return os.environ.get(STRICT_ENV) == "1"


def declared_routing(routing: str | None = None) -> str:
    """The routing a call declares: ``routing``, else ``$FUSED_A2A_ROUTING``, else ``uniform``.

    Raises:
        ValueError: a ``routing`` argument that is not ``uniform``, ``zipf:<skew>`` or ``hot:<fraction>``.
    An invalid ``$FUSED_A2A_ROUTING`` is ignored with a :class:`TuningWarning` (strict mode: ``ValueError``).
    """
    if routing is not None:
        if not ROUTING_RE.match(routing):
            raise ValueError(f"routing must be uniform, zipf:<skew> or hot:<fraction>, got {routing!r}")
        return routing
    text = os.environ.get(ROUTING_ENV)
    if text is None:
        return "uniform"
    if ROUTING_RE.match(text):
        return text
    _bad_environment(f"{ROUTING_ENV} must be uniform, zipf:<skew> or hot:<fraction>, got {text!r}")
    return "uniform"


def _bad_environment(problem: str) -> None:
    """An environment override that cannot be used: ``ValueError`` in strict mode, else one warning."""
    if strict_mode():
        raise ValueError(f"environment variable {problem}")
    key = ("environment", problem)
    if key not in _logged:
        _logged.add(key)
        warnings.warn(f"fused_a2a: ignoring environment variable {problem}", TuningWarning, stacklevel=4)


def load_cluster_table(cluster: str, strict: bool | None = None) -> tuple[TuningTable | None, Path | None]:
    """The first usable tuning table of ``cluster`` in :func:`tuning_dirs`, and its path.

    A file that cannot be read, fails validation, or names another cluster id is skipped with one
    :class:`TuningWarning`. Results are cached per file version (a rewritten file is read again;
    :func:`fused_a2a.tuning.clear` forgets them).

    Args:
        cluster: the cluster id (``fused_a2a.cluster.detect_cluster().id``).
        strict: raise instead of skipping (default: ``$FUSED_A2A_TUNING_STRICT == "1"``).

    Returns:
        ``(table, path)``, or ``(None, None)`` when there is no usable file.

    Raises:
        TuningFileError: in strict mode, for a file that would be skipped.
    """
    if strict is None:
        strict = strict_mode()
    dirs = tuple(tuning_dirs())
    return _load(cluster, dirs, strict, tuple(_file_stamp(folder / cluster / TABLE_NAME) for folder in dirs))


def _file_stamp(path: Path) -> tuple | None:
    """What changes when a file is rewritten (``None`` for a missing one): part of :func:`_load`'s cache key."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_mtime_ns, info.st_size, info.st_ino


@functools.lru_cache(maxsize=None)
def _load(cluster: str, dirs: tuple[Path, ...], strict: bool, stamps: tuple) -> tuple[TuningTable | None, Path | None]:
    for folder in dirs:
        path = folder / cluster / TABLE_NAME
        if not path.exists():
            continue
        try:
            table = read_table(path)
            if table.cluster["id"] != cluster:
                raise TuningFileError(str(path), f"is for cluster {table.cluster['id']!r}, not {cluster!r}")
        except TuningFileError as err:
            if strict:
                raise
            warnings.warn(f"{err}; ignored", TuningWarning, stacklevel=3)
            continue
        return table, path
    return None, None


def clear_tables() -> None:
    """Forget the loaded tables and which resolutions were logged (:func:`fused_a2a.tuning.clear` clears
    every cache of the tuning layer at once)."""
    _load.cache_clear()
    _logged.clear()


def env_var(backend: str, knob: str) -> str:
    """The environment variable that overrides ``knob`` of ``backend`` (``FUSED_A2A_TORCH_IMPL``);
    its value is read as the knob's type (:meth:`~fused_a2a.backends.Knob.parse`)."""
    return re.sub(r"[^A-Z0-9]", "_", f"FUSED_A2A_{backend}_{knob}".upper())


_MISSING = object()


def _parse_env(knob: Knob, name: str) -> Any:
    """The knob's value from ``$name``, or ``_MISSING`` when it does not convert or is rejected
    (one warning; ``ValueError`` in strict mode)."""
    try:
        return knob.validate(knob.parse(os.environ[name]))
    except ValueError as err:
        _bad_environment(f"{name}: {err}")
        return _MISSING


def env_or_default(backend: str, knob: str) -> Any:
    """``knob`` of ``backend`` from its ``FUSED_A2A_*`` variable where set and valid (else one warning),
    else the backend's default: for settings a caller fixes before any shape is known."""
    spec = BACKENDS[backend].knob(knob)
    name = env_var(backend, knob)
    if name in os.environ:
        value = _parse_env(spec, name)
        if value is not _MISSING:
            return value
    return spec.default


def resolve(
    backend: str,
    shape: CallShape,
    explicit: dict[str, Any],
    cluster: str | None = None,
    use_table: bool = True,
    num_sms_budget: int | None = None,
) -> Resolution:
    """The knobs of ``backend`` for a call of this shape, each from the first source that sets it.

    Args:
        backend: a backend name.
        shape: the call: its world size, dtype, hidden size, top-k, experts (as the table's keys), its
            tokens (the table is looked up with the largest: the group's,
            :mod:`fused_a2a.tuning.agreement`) and its routing (``None``: ``$FUSED_A2A_ROUTING``, else
            ``uniform``; entries of that routing are preferred, else ``uniform`` ones).
        explicit: knobs the caller passed (used for both dispatch and combine).
        cluster: the cluster id (default: :func:`fused_a2a.cluster.detect_cluster` ``(world_size).id``).
        use_table: ``False`` skips the tuning table (after the backend rejected its entry).
        num_sms_budget: most SMs the call may use (default: ``$FUSED_A2A_NUM_SMS_BUDGET``, else no
            limit). For a backend with a ``num_sms`` knob not set by argument or environment: the
            table's SM count if within the budget, else the best frontier point within it, else the
            default if within it, else the budget itself (source ``"budget"``).

    Returns:
        a :class:`Resolution`; logged at DEBUG on the ``fused_a2a`` logger once per distinct choice.
        An entry measured with another build of the backend library than the installed one is used
        with one :class:`TuningWarning`.

    Raises:
        ValueError: unknown backend or knob name, an explicit value the knob rejects, or (strict
            mode only) an environment override that does not convert.
        TuningFileError: in strict mode, an unusable tuning file or an entry of another build.
    """
    spec = get_backend(backend)
    check_knobs(backend, explicit)
    routing = declared_routing(shape.routing)
    cluster = cluster or detect_cluster(shape.world_size).id
    build = spec.version()
    table, path = load_cluster_table(cluster) if use_table else (None, None)
    entry = None
    if table is not None:
        entry = lookup(table, backend, shape.with_routing(routing), build)
    if entry is not None and entry.build is not None and build is not None and entry.build != build:
        _other_build(path, entry, build)
    table_source = "table" if entry is None or entry.routing == routing else f"table ({entry.routing} routing)"
    dispatch, combine, sources = {}, {}, {}
    for knob in spec.knobs:
        name = env_var(backend, knob.name)
        from_env = _parse_env(knob, name) if name in os.environ and knob.name not in explicit else _MISSING
        if knob.name in explicit:
            sources[knob.name] = "argument"
            dispatch[knob.name] = combine[knob.name] = explicit[knob.name]
        elif from_env is not _MISSING:
            sources[knob.name] = "environment"
            dispatch[knob.name] = combine[knob.name] = from_env
        elif entry is not None and knob.name in entry.dispatch:
            sources[knob.name] = table_source
            dispatch[knob.name], combine[knob.name] = entry.dispatch[knob.name], entry.combine[knob.name]
        else:
            sources[knob.name] = "default"
            dispatch[knob.name] = combine[knob.name] = knob.default
    budget = num_sms_budget if num_sms_budget is not None else _budget_from_env()
    if budget is not None and SMS_KNOB in sources and sources[SMS_KNOB] not in ("argument", "environment"):
        sms, sources[SMS_KNOB] = _within_budget(dispatch[SMS_KNOB], sources[SMS_KNOB], entry, budget, spec.knob(SMS_KNOB))
        dispatch[SMS_KNOB] = combine[SMS_KNOB] = sms
    resolution = Resolution(backend, dispatch, combine, sources, str(path) if path else None, entry, routing, build)
    _log_once(resolution, shape)
    return resolution


def _other_build(path: Path | None, entry: TuningEntry, build: str) -> None:
    """An entry measured with another build: one warning per (file, entry), ``TuningFileError`` in strict mode."""
    problem = (f"entry ({entry.backend}, hidden {entry.hidden}, {entry.num_tokens} tokens) was measured with "
               f"{entry.backend} {entry.build}, the installed build is {build}")
    if strict_mode():
        raise TuningFileError(str(path), problem)
    key = ("build", str(path), entry.key)
    if key not in _logged:
        _logged.add(key)
        warnings.warn(f"tuning file {path}: {problem}; using it", TuningWarning, stacklevel=4)


def tuned_comm(
    backend: str,
    shape: CallShape,
    explicit: dict[str, Any],
    num_sms_budget: int | None = None,
    use_table: bool = True,
) -> tuple[Comm, Resolution]:
    """The backend's :class:`~fused_a2a.autograd.Comm` with its knobs resolved (:func:`resolve`), and
    the :class:`Resolution` it was built from.

    Each knob value is checked once, where it comes from: an argument by :func:`resolve`, an
    environment override when it is read, a value of the table or the SM budget here. A table entry
    the installed backend rejects (a value the knob rejects, or the backend's ``make_comm`` raises) is
    dropped with one :class:`TuningWarning` and the knobs are resolved again without the table; a
    rejection of knobs that did not come from the table is raised.
    """
    spec = get_backend(backend)
    resolution = resolve(backend, shape, explicit, use_table=use_table, num_sms_budget=num_sms_budget)
    try:
        return _open(spec, resolution, shape.world_size), resolution
    except (ValueError, RuntimeError) as exc:
        if not any(source.startswith("table") for source in resolution.sources.values()):
            raise
        warnings.warn(f"fused_a2a: {backend} rejected the knobs of tuning table {resolution.table_path} ({exc}); "
                      "using the defaults", TuningWarning, stacklevel=3)
    resolution = resolve(backend, shape, explicit, use_table=False, num_sms_budget=num_sms_budget)
    return _open(spec, resolution, shape.world_size), resolution


_CHECKED_SOURCES = ("argument", "environment", "default")  # values checked before a Comm is opened (or trusted)


def _open(spec: BackendSpec, resolution: Resolution, world_size: int) -> Comm:
    """The Comm of ``resolution``'s knobs, after checking the values that came from the table or the budget."""
    for name, source in resolution.sources.items():
        if source not in _CHECKED_SOURCES:
            check_knobs(spec.name, {name: resolution.dispatch[name]})
            check_knobs(spec.name, {name: resolution.combine[name]})
    return open_comm(spec, resolution.dispatch, resolution.combine, world_size)


def _budget_from_env() -> int | None:
    """``$FUSED_A2A_NUM_SMS_BUDGET`` as a positive int; ``None`` when unset or unusable (one warning,
    ``ValueError`` in strict mode)."""
    text = os.environ.get(BUDGET_ENV)
    if not text:
        return None
    if not text.strip().isdigit() or int(text) <= 0:
        _bad_environment(f"{BUDGET_ENV} must be a positive integer, got {text!r}")
        return None
    return int(text)


def _within_budget(sms: int, source: str, entry: TuningEntry | None, budget: int, knob: Knob) -> tuple[int, str]:
    """The SM count to use under ``budget`` and its source (see :func:`resolve`); the budget itself
    comes down to the largest count the knob accepts (DeepEP: even)."""
    if sms <= budget:
        return sms, source
    frontier = best_within_budget(entry, budget) if entry is not None else None
    if frontier is not None:
        return frontier, "table (SM budget)"
    if knob.default <= budget:
        return knob.default, "default"
    fitting = next((n for n in range(budget, 0, -1) if knob.check(n) is None), None)
    if fitting is None:
        raise ValueError(f"{BUDGET_ENV}: no {knob.name} value within a budget of {budget}")
    return fitting, "budget"


STEP_MODES = ("api", "kernel")  # what `auto` compares backends on, in order of preference


def entry_cost(entry: TuningEntry, mode: str) -> float | None:
    """An entry's dispatch + combine median in timing ``mode`` (µs), ``None`` where it was not recorded.

    A table written before every mode was recorded holds only its selection mode's times (as
    ``dispatch_us``/``combine_us``): those count for ``entry.selected_by``.
    """
    m = entry.measured
    if f"dispatch_{mode}_us" in m and f"combine_{mode}_us" in m:
        return m[f"dispatch_{mode}_us"] + m[f"combine_{mode}_us"]
    if entry.selected_by == mode and "dispatch_us" in m and "combine_us" in m:
        return m["dispatch_us"] + m["combine_us"]
    return None


@dataclass(frozen=True)
class BackendChoice:
    """What ``backend="auto"`` picked for a call.

    Attributes:
        backend: the backend that runs.
        mode: the timing mode the backends were compared on (``None``: no table entry to compare).
        costs: ``(backend, dispatch + combine µs)`` of every installed backend compared, fastest first.
    """

    backend: str
    mode: str | None
    costs: tuple[tuple[str, float], ...]


def choose_backend(shape: CallShape, cluster: str | None = None) -> BackendChoice:
    """The installed backend that this cluster's tuning table measured fastest for a call of ``shape``
    (as in :func:`resolve`), on the cost of a training step's call: the ``api`` round trip (dispatch +
    combine medians).

    Each backend's entry is the one :func:`~fused_a2a.tuning.table.lookup` picks for the call. The
    backends are compared in the first mode of :data:`STEP_MODES` that every one of their entries
    recorded (``api``; ``kernel`` when an older table holds kernel times only), so that no backend is
    ranked by cached kernels against another's full calls. ``torch`` when no installed backend has a
    timed entry, or there is no usable table.
    """
    table, _ = load_cluster_table(cluster or detect_cluster(shape.world_size).id)
    shape = shape.with_routing(declared_routing(shape.routing))
    entries = {}
    for name, spec in BACKENDS.items():
        if table is not None and spec.unavailable() is None:
            entry = lookup(table, name, shape, spec.version())
            if entry is not None:
                entries[name] = entry
    for mode in STEP_MODES:
        costs = {name: entry_cost(entry, mode) for name, entry in entries.items()}
        if costs and None not in costs.values():
            ranked = tuple(sorted(((name, cost) for name, cost in costs.items()), key=lambda t: (t[1], t[0])))
            return BackendChoice(ranked[0][0], mode, ranked)
    return BackendChoice("torch", None, ())


def best_backend(shape: CallShape, cluster: str | None = None) -> str:
    """The name :func:`choose_backend` picks (arguments as there)."""
    return choose_backend(shape, cluster).backend


def _log_once(resolution: Resolution, shape: CallShape) -> None:
    """Log ``resolution`` at DEBUG unless one with the same backend, shape, entry and sources was logged
    (the calls of a job are logged at INFO once per key, on rank 0, by :mod:`fused_a2a.tuning.agreement`).

    The call's token count is left out of the key (it changes every step in dropless MoE); the
    entry it selects is in it.
    """
    entry_key = resolution.entry.key if resolution.entry else None
    facts = (shape.world_size, shape.dtype, shape.hidden, shape.topk, shape.num_experts)
    key = (resolution.backend, facts, entry_key, tuple(sorted(resolution.sources.items())))
    if key in _logged:
        return
    _logged.add(key)
    logger.debug(
        "fused_a2a %s (world_size=%d dtype=%s hidden=%d topk=%s num_experts=%s): dispatch %s, combine %s; "
        "sources %s; table %s; entry %s",
        resolution.backend, *facts, resolution.dispatch,
        resolution.combine, resolution.sources, resolution.table_path or "none", entry_key,
    )
