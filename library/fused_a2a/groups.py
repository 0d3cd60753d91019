"""Per-process-group state that goes with its group: nothing here keeps a process group alive.

A process group that a module-level cache holds strongly outlives ``destroy_process_group`` (with its
communicator and, for gloo, its worker threads) until the interpreter tears the cache down, where
gloo's threads can abort the process. :class:`GroupMap` holds its groups by weak reference and drops
an entry when its group is freed; its values must not hold the group strongly either (hold a
:class:`GroupRef`).

A job that never calls ``destroy_process_group`` exits with gloo's worker threads alive; one that
releases a finished collective's tensors just as the interpreter starts finalising needs the GIL then,
and the interpreter ends that thread, which aborts the process ("terminate called without an active
exception"; plain ``torch.distributed`` does it too). Importing this module registers
:func:`settle_gloo_at_exit`, which gives those threads a moment before finalisation.
"""

from __future__ import annotations

import atexit
import time
import weakref
from typing import Generic, TypeVar

import torch.distributed as dist

GLOO_SETTLE_S = 0.1  # how long the exit hook lets gloo's worker threads finish (they need microseconds)

V = TypeVar("V")


def group_or_world(group: dist.ProcessGroup | None) -> dist.ProcessGroup:
    """``group``, or the default group for ``None``."""
    return dist.group.WORLD if group is None else group


class GroupMap(Generic[V]):
    """A mapping from process groups to values, holding each group by weak reference.

    ``None`` stands for the default group at the time of the call (after ``destroy_process_group`` and
    a new ``init_process_group``, a new default group: a new entry). An entry goes when its group is
    garbage-collected.
    """

    def __init__(self) -> None:
        self._entries: dict[int, tuple[weakref.ref, V]] = {}

    def get(self, group: dist.ProcessGroup | None) -> V | None:
        """The value of ``group`` (``None``: the default group), or ``None``."""
        if group is None:
            group = dist.group.WORLD
        entry = self._entries.get(id(group))
        if entry is not None and entry[0]() is group:
            return entry[1]
        return None

    def set(self, group: dist.ProcessGroup | None, value: V) -> V:
        """Store ``value`` for ``group`` (``None``: the default group); returns ``value``."""
        group = group_or_world(group)
        key = id(group)
        entries = self._entries

        def forget(ref: weakref.ref, key: int = key) -> None:
            entry = entries.get(key)
            if entry is not None and entry[0] is ref:
                del entries[key]

        entries[key] = (weakref.ref(group, forget), value)
        return value

    def clear(self) -> None:
        """Forget every entry."""
        self._entries.clear()

    def groups(self) -> list[dist.ProcessGroup]:
        """The groups that have an entry (every one alive: an entry goes with its group)."""
        return [group for group in (ref() for ref, _ in list(self._entries.values())) if group is not None]


class GroupRef:
    """A weak reference to a process group, for objects that a :class:`GroupMap` holds.

    Calling it returns the group (``None`` for the default group, as given); once the group was
    garbage-collected, ``RuntimeError``.
    """

    __slots__ = ("_ref",)

    def __init__(self, group: dist.ProcessGroup | None) -> None:
        self._ref = None if group is None else weakref.ref(group)

    def __call__(self) -> dist.ProcessGroup | None:
        if self._ref is None:
            return None
        group = self._ref()
        if group is None:
            raise RuntimeError("fused_a2a: the process group of this object was destroyed")
        return group

    def refers_to(self, group: dist.ProcessGroup | None) -> bool:
        """Whether this reference names ``group`` (``None`` names only ``None``)."""
        return group is None if self._ref is None else self._ref() is group


def settle_gloo_at_exit() -> None:
    """At interpreter exit, while a gloo process group is still initialised (the job did not call
    ``destroy_process_group``), release the GIL for :data:`GLOO_SETTLE_S` so that gloo's worker threads
    finish releasing their last collective before the interpreter finalises. Never raises."""
    try:
        if not (dist.is_available() and dist.is_initialized()) or "gloo" not in str(dist.get_backend()):
            return
    except Exception:  # noqa: BLE001 - at exit nothing may fail; a torch without these calls has nothing to settle
        return
    time.sleep(GLOO_SETTLE_S)


atexit.register(settle_gloo_at_exit)
