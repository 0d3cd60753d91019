"""The backends the backend-neutral entry can drive, and how each turns knobs into a :class:`Comm`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from fused_a2a.autograd import Comm
from fused_a2a.backends import torch_a2a


@dataclass(frozen=True)
class Knob:
    """One tunable setting of a backend.

    Attributes:
        name: keyword name, as passed to :func:`fused_a2a.dispatch`.
        default: the backend's own default.
        choices: the values a sweep tries by default.
        help: one line for users.
    """

    name: str
    default: Any
    choices: tuple
    help: str


@dataclass(frozen=True)
class BackendSpec:
    """What is specific to one backend: its knobs, whether it is installed, how to build its Comm.

    Attributes:
        name: the name users pass as ``backend=``.
        knobs: its tunable settings.
        make_comm: ``(knobs dict) -> Comm``; raises ``ValueError`` for an invalid combination.
        unavailable: ``() -> None`` if installed, else the reason it is not.
    """

    name: str
    knobs: tuple[Knob, ...]
    make_comm: Callable[[dict[str, Any]], Comm]
    unavailable: Callable[[], str | None] = field(default=lambda: None)

    def defaults(self) -> dict[str, Any]:
        return {knob.name: knob.default for knob in self.knobs}


def _torch_comm(knobs: dict[str, Any]) -> Comm:
    config = torch_a2a.TorchConfig(**knobs)
    return Comm(name="torch", get_buffer=torch_a2a.get_torch_buffer, dispatch_config=config, combine_config=config)


TORCH = BackendSpec(
    name="torch",
    knobs=(
        Knob(
            "impl",
            "all_to_all",
            torch_a2a.IMPLS,
            "all_to_all: one all_to_all_single per tensor; p2p: batched isend/irecv per peer",
        ),
    ),
    make_comm=_torch_comm,
)

BACKENDS: dict[str, BackendSpec] = {spec.name: spec for spec in (TORCH,)}


def get_backend(name: str) -> BackendSpec:
    """The :class:`BackendSpec` called ``name``; ``ValueError`` for an unknown name."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")
    return BACKENDS[name]


def make_comm(name: str, knobs: dict[str, Any]) -> Comm:
    """A :class:`Comm` for backend ``name`` with ``knobs`` (missing ones take the backend default).

    Raises:
        ValueError: unknown backend or knob, or an invalid knob value.
        RuntimeError: the backend's library is not installed.
    """
    spec = get_backend(name)
    unknown = sorted(set(knobs) - {knob.name for knob in spec.knobs})
    if unknown:
        raise ValueError(f"backend {name!r} has no knob {', '.join(unknown)}; its knobs: {', '.join(k.name for k in spec.knobs)}")
    reason = spec.unavailable()
    if reason is not None:
        raise RuntimeError(f"backend {name!r} is not available: {reason}")
    return spec.make_comm({**spec.defaults(), **knobs})
