"""What every backend declares: its knobs (with their checks) and how to build its :class:`Comm`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from fused_a2a.autograd import Comm


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
        make_comm: ``(dispatch knobs, combine knobs, group size or None) -> Comm``; ``ValueError``
            for an invalid value.
        dtypes: the token dtypes it moves (a sweep skips the others).
        unavailable: ``() -> None`` if installed, else the reason it is not.
        invalid: ``(knobs, world_size) -> None`` if the combination can run, else why not
            (a sweep records the point as ``skipped: <reason>``).
    """

    name: str
    knobs: tuple[Knob, ...]
    make_comm: Callable[[dict[str, Any], dict[str, Any], int | None], Comm]
    unavailable: Callable[[], str | None] = field(default=lambda: None)
    invalid: Callable[[dict[str, Any], int], str | None] = field(default=lambda knobs, world_size: None)
    dtypes: tuple[str, ...] = ("bf16", "fp16", "fp32")

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
