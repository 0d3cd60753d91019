"""What every backend declares: its knobs (with their checks), whether it is installed, how to open
a session (a :class:`~fused_a2a.autograd.Comm`), its limits, its teardown and its library build.

A backend module builds one :class:`BackendSpec` and imports nothing above this layer (not
``fused_a2a.api``, ``fused_a2a.tuning``, the seed functions or another backend): the registry in
:mod:`fused_a2a.backends` lists the specs, knob resolution and the public functions sit above.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import torch.distributed as dist

from fused_a2a.autograd import Comm, get_hidden_bytes
from fused_a2a.backends.direct import BufferSlot, DirectCallsFn, SeedPathFn, StagesFn, buffer_calls
from fused_a2a.backends.frameworks import ForeignNames
from fused_a2a.groups import GroupRef, group_or_world
from fused_a2a.shape import CallShape


def buffer_getter(backend: str, num_ranks: int, current: Callable[[], Any],
                  fit: Callable[[dist.ProcessGroup, int], Any]) -> Callable[[dist.ProcessGroup | None, Any], Any]:
    """A :attr:`Comm.get_buffer` over a process-wide buffer.

    ``fit(group, hidden_bytes)`` returns the process-wide buffer, (re)created to fit rows of
    ``hidden_bytes`` (:func:`~fused_a2a.autograd.get_hidden_bytes` of the getter's tokens); the getter calls it
    for a new group or row size, and again once ``current()`` no longer returns the buffer it fitted
    (freed or replaced). A warm call asks nothing more.

    Raises:
        ValueError: the group's size is not ``num_ranks`` (what the configs were resolved for).
    """
    # the group as the caller named it (None: the default group), row bytes, the buffer fitted: both held
    # weakly, so that a cached Comm keeps neither a destroyed group nor a freed buffer (which holds its group)
    last = [GroupRef(None), 0, lambda: None]

    def get_buffer(group: dist.ProcessGroup | None, tokens) -> Any:
        hidden_bytes = get_hidden_bytes(tokens)
        buffer = last[2]()
        if buffer is not None and last[1] == hidden_bytes and buffer is current() and last[0].refers_to(group):
            return buffer
        world = group_or_world(group)
        if world.size() != num_ranks:
            raise ValueError(f"{backend}: these configs were resolved for {num_ranks} ranks, but the group has {world.size()}")
        buffer = fit(world, hidden_bytes)
        last[:] = GroupRef(group), hidden_bytes, weakref.ref(buffer)
        return buffer

    return get_buffer


@dataclass(frozen=True)
class Knob:
    """One tunable setting of a backend.

    Attributes:
        name: keyword name, as passed to :func:`fused_a2a.dispatch`.
        default: the backend's own default.
        choices: the values a sweep tries by default.
        help: one line for users.
        check: ``value -> None`` if the value is acceptable alone, else why not (a user error).
    """

    name: str
    default: Any
    choices: tuple
    help: str
    check: Callable[[Any], str | None] = field(default=lambda value: None)

    def parse(self, text: str) -> Any:
        """Convert a command-line word to this knob's type (that of its default).

        Raises:
            ValueError: the word does not convert (the message names the knob).
        """
        kind = type(self.default)
        if kind is bool:
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"knob {self.name} takes true or false, got {text!r}")
            return text.lower() in ("true", "1")
        try:
            return kind(text)
        except ValueError:
            raise ValueError(f"knob {self.name} takes {kind.__name__} values, got {text!r}") from None

    def validate(self, value: Any) -> Any:
        """``value`` if it is of this knob's type and passes :attr:`check`; ``ValueError`` otherwise."""
        kind = type(self.default)
        if isinstance(value, bool) != (kind is bool) or not isinstance(value, kind):
            raise ValueError(f"knob {self.name} takes {kind.__name__} values, got {value!r}")
        problem = self.check(value)
        if problem is not None:
            raise ValueError(problem)
        return value


def _no_problem(*args: Any) -> str | None:
    return None


def _nothing() -> None:
    return None


@dataclass(frozen=True)
class BackendSpec:
    """What is specific to one backend.

    Attributes:
        name: the name users pass as ``backend=``.
        knobs: its tunable settings.
        make_comm: ``(dispatch knobs, combine knobs, group size or None) -> Comm`` (a session);
            ``ValueError`` for an invalid value, ``RuntimeError`` when the library is missing.
        unavailable: ``() -> None`` if installed, else the reason it is not.
        invalid: ``(knobs, world_size) -> None`` if the combination can run, else why not
            (a sweep records the point as ``skipped: <reason>``). Pure: needs no library.
        shape_problem: ``(CallShape, knobs) -> None`` if the backend's kernels take a dispatch of this
            shape, else the rule it breaks (a sweep skips the point; a library call raises
            ``ValueError``). Pure.
        teardown: ``() -> None``, frees the backend's process-wide buffers (collective where the
            library's destroy is; call before ``destroy_process_group``).
        version: ``() -> str | None``, the backend library's version and build (``None``: not installed).
        dtypes: the token dtypes it moves (a sweep skips the others).
        keeps_topk_slots: ``recv_topk_idx[r, j]`` comes from slot ``j`` of the source token's
            ``topk_idx`` (DeepEP's layout). ``False``: the backend receives a dense per-expert map
            and lists each row's local experts in ascending order, then ``-1`` (HybridEP).
        sms_knobs: the knobs that count SMs (a sweep's ``--sms`` sets them all to one value; an SM
            budget bounds them; the first is the SM count a tuning table's frontier is keyed by).
        install_hint: how to install the backend's library (said with :attr:`unavailable`'s reason).
        reference: the correctness reference every other backend is verified against (plain
            ``torch.distributed``: runs wherever torch does). One backend is.
        buffer_slot: where the backend keeps its process-wide buffer (``a2a-bench overhead`` puts a
            replay of it there); ``None``: it keeps none.
        direct_calls: the buffer calls of one round trip, made directly (:data:`~fused_a2a.backends.direct.DirectCallsFn`;
            default: DeepEP's buffer interface).
        seed_path: the seed functions' own path, where it runs other kernels than ``fused_a2a.dispatch``
            (:data:`~fused_a2a.backends.direct.SeedPathFn`; a sweep's ``seed`` mode times it). ``None``:
            the seed functions make the calls the api makes.
        stages: the stages of a fresh dispatch, each callable alone (:data:`~fused_a2a.backends.direct.StagesFn`,
            ``a2a-bench breakdown``); ``None``: not broken down.
        names: the names other tools give the knobs (:class:`~fused_a2a.backends.frameworks.ForeignNames`).
    """

    name: str
    knobs: tuple[Knob, ...]
    make_comm: Callable[[dict[str, Any], dict[str, Any], int | None], Comm]
    unavailable: Callable[[], str | None] = _nothing
    invalid: Callable[[dict[str, Any], int], str | None] = _no_problem
    shape_problem: Callable[[CallShape, dict[str, Any]], str | None] = _no_problem
    teardown: Callable[[], None] = _nothing
    version: Callable[[], str | None] = _nothing
    dtypes: tuple[str, ...] = ("bf16", "fp16", "fp32")
    keeps_topk_slots: bool = True
    sms_knobs: tuple[str, ...] = ()
    install_hint: str = ""
    reference: bool = False
    buffer_slot: BufferSlot | None = None
    direct_calls: DirectCallsFn = buffer_calls
    seed_path: SeedPathFn | None = None
    stages: StagesFn | None = None
    names: ForeignNames = ForeignNames()

    def knob(self, name: str) -> Knob:
        """The knob called ``name``; ``ValueError`` naming the backend's knobs otherwise."""
        for knob in self.knobs:
            if knob.name == name:
                return knob
        raise ValueError(f"backend {self.name!r} has no knob {name}; its knobs: {', '.join(k.name for k in self.knobs)}")

    def defaults(self) -> dict[str, Any]:
        return {knob.name: knob.default for knob in self.knobs}

    def num_sms(self, knobs: dict[str, Any]) -> int | None:
        """The SM count of a knob set (its first SM knob, the default when not set), ``None`` without SM knobs."""
        return knobs.get(self.sms_knobs[0], self.knob(self.sms_knobs[0]).default) if self.sms_knobs else None


def one_of(name: str, values: tuple) -> Callable[[Any], str | None]:
    """A :attr:`Knob.check` accepting only ``values``."""
    return lambda value: None if value in values else f"{name} must be one of {', '.join(map(str, values))}, got {value!r}"
