"""The backends the backend-neutral entry can drive, and how each turns knobs into a :class:`Comm`."""

from __future__ import annotations

from typing import Any

from fused_a2a.autograd import Comm
from fused_a2a.backends import deepep, torch_a2a, uccl
from fused_a2a.backends.base import BackendSpec, Knob, one_of


def _torch_comm(dispatch: dict[str, Any], combine: dict[str, Any], num_ranks: int | None = None) -> Comm:
    return Comm(
        name="torch",
        get_buffer=torch_a2a.get_torch_buffer,
        dispatch_config=torch_a2a.TorchConfig(**dispatch),
        combine_config=torch_a2a.TorchConfig(**combine),
    )


TORCH = BackendSpec(
    name="torch",
    knobs=(
        Knob(
            "impl",
            "all_to_all",
            torch_a2a.IMPLS,
            "all_to_all: one all_to_all_single per tensor; p2p: batched isend/irecv per peer",
            check=one_of("impl", torch_a2a.IMPLS),
        ),
    ),
    make_comm=_torch_comm,
    dtypes=("bf16", "fp16", "fp32", "fp8"),
)

DEEPEP = BackendSpec(
    name="deepep",
    knobs=deepep.KNOBS,
    make_comm=deepep.make_deepep_comm,
    unavailable=deepep.unavailable,
    invalid=deepep.invalid_knobs,
    dtypes=("bf16", "fp8"),
)

BACKENDS: dict[str, BackendSpec] = {spec.name: spec for spec in (TORCH, DEEPEP, uccl.uccl_backend_spec())}


def get_backend(name: str) -> BackendSpec:
    """The :class:`BackendSpec` called ``name``; ``ValueError`` for an unknown name."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")
    return BACKENDS[name]


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
    for knob_name, value in [*knobs.items(), *combine_knobs.items()]:
        problem = spec.knob(knob_name).check(value)
        if problem is not None:
            raise ValueError(f"backend {name!r}: {problem}")
    reason = spec.unavailable()
    if reason is not None:
        raise RuntimeError(f"backend {name!r} is not available: {reason}")
    return spec.make_comm({**spec.defaults(), **knobs}, {**spec.defaults(), **combine_knobs}, num_ranks)
