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
        check: ``value -> None`` if the value is acceptable alone, else why not (a user error).
    """

    name: str
    default: Any
    choices: tuple
    help: str
    check: Callable[[Any], str | None] = field(default=lambda value: None)

    def parse(self, text: str) -> Any:
        """Convert a command-line word to this knob's type (that of its default)."""
        kind = type(self.default)
        if kind is bool:
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"knob {self.name} takes true or false, got {text!r}")
            return text.lower() in ("true", "1")
        try:
            return kind(text)
        except ValueError:
            raise ValueError(f"knob {self.name} takes {kind.__name__} values, got {text!r}") from None


@dataclass(frozen=True)
class BackendSpec:
    """What is specific to one backend: its knobs, whether it is installed, how to build its Comm.

    Attributes:
        name: the name users pass as ``backend=``.
        knobs: its tunable settings.
        make_comm: ``(dispatch knobs, combine knobs) -> Comm``; ``ValueError`` for an invalid value.
        unavailable: ``() -> None`` if installed, else the reason it is not.
        invalid: ``(knobs, world_size) -> None`` if the combination can run, else why not
            (a sweep records the point as ``skipped: <reason>``).
    """

    name: str
    knobs: tuple[Knob, ...]
    make_comm: Callable[[dict[str, Any], dict[str, Any]], Comm]
    unavailable: Callable[[], str | None] = field(default=lambda: None)
    invalid: Callable[[dict[str, Any], int], str | None] = field(default=lambda knobs, world_size: None)

    def knob(self, name: str) -> Knob:
        """The knob called ``name``; ``ValueError`` naming the backend's knobs otherwise."""
        for knob in self.knobs:
            if knob.name == name:
                return knob
        raise ValueError(f"backend {self.name!r} has no knob {name}; its knobs: {', '.join(k.name for k in self.knobs)}")

    def defaults(self) -> dict[str, Any]:
        return {knob.name: knob.default for knob in self.knobs}


def one_of(name: str, values: tuple) -> Callable[[Any], str | None]:
    """A :attr:`Knob.check` accepting only ``values``."""
    return lambda value: None if value in values else f"{name} must be one of {', '.join(map(str, values))}, got {value!r}"


def _torch_comm(dispatch: dict[str, Any], combine: dict[str, Any]) -> Comm:
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
)

BACKENDS: dict[str, BackendSpec] = {spec.name: spec for spec in (TORCH,)}


def get_backend(name: str) -> BackendSpec:
    """The :class:`BackendSpec` called ``name``; ``ValueError`` for an unknown name."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")
    return BACKENDS[name]


def make_comm(name: str, knobs: dict[str, Any], combine_knobs: dict[str, Any] | None = None) -> Comm:
    """A :class:`Comm` for backend ``name``: ``knobs`` for dispatch, ``combine_knobs`` (default: the
    same) for combine; missing knobs take the backend default.

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
    return spec.make_comm({**spec.defaults(), **knobs}, {**spec.defaults(), **combine_knobs})
