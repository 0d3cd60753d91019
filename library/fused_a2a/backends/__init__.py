"""The registry of backends: each backend module declares one :class:`BackendSpec` (``SPEC``)."""

from __future__ import annotations

from typing import Any

from fused_a2a.autograd import Comm
from fused_a2a.backends import deepep, hybridep, torch_a2a, uccl
from fused_a2a.backends.base import BackendSpec, Knob, one_of

BACKENDS: dict[str, BackendSpec] = {spec.name: spec for spec in (torch_a2a.SPEC, deepep.SPEC, hybridep.SPEC, uccl.SPEC)}

__all__ = ["BACKENDS", "BackendSpec", "Knob", "get_backend", "make_comm", "one_of", "open_comm", "register"]


def register(spec: BackendSpec) -> None:
    """Add (or replace) a backend, e.g. from a plugin module (``$A2A_BENCH_BACKENDS``)."""
    BACKENDS[spec.name] = spec


def get_backend(name: str) -> BackendSpec:
    """The :class:`BackendSpec` called ``name``; ``ValueError`` for an unknown name."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")
    return BACKENDS[name]


def check_knobs(name: str, knobs: dict[str, Any]) -> None:
    """Raise ``ValueError`` (naming the backend) for an unknown knob or a value its check rejects."""
    spec = get_backend(name)
    for knob_name, value in knobs.items():
        try:
            spec.knob(knob_name).validate(value)
        except ValueError as err:
            raise ValueError(f"backend {name!r}: {err}") from None


def make_comm(name: str, knobs: dict[str, Any], combine_knobs: dict[str, Any] | None = None,
              num_ranks: int | None = None) -> Comm:
    """A :class:`Comm` for backend ``name``: ``knobs`` for dispatch, ``combine_knobs`` (default: the
    same) for combine; missing knobs take the backend default. ``num_ranks``: the group size the
    knobs are for (``None``: the default group's).

    Raises:
        ValueError: unknown backend or knob, or an invalid knob value.
        RuntimeError: the backend's library is not installed.
    """
    spec = get_backend(name)
    combine_knobs = knobs if combine_knobs is None else combine_knobs
    check_knobs(name, knobs)
    check_knobs(name, combine_knobs)
    return open_comm(spec, {**spec.defaults(), **knobs}, {**spec.defaults(), **combine_knobs}, num_ranks)


def open_comm(spec: BackendSpec, dispatch: dict[str, Any], combine: dict[str, Any], num_ranks: int | None) -> Comm:
    """The :class:`Comm` of ``spec`` for two full knob dicts whose values were checked already
    (:func:`make_comm` checks them; the knob resolution checks each value where it comes from).

    Raises:
        ValueError: a combination of knobs the backend rejects.
        RuntimeError: the backend's library is not installed.
    """
    reason = spec.unavailable()
    if reason is not None:
        raise RuntimeError(f"backend {spec.name!r} is not available: {reason}")
    return spec.make_comm(dispatch, combine, num_ranks)
