"""Which :class:`~fused_a2a.autograd.Comm` made a handle, so its combine runs with the same configs.

The Comm rides on the handle itself (an attribute of its first tensor, or of the handle object), so
it lives and dies with the handle and costs no look-up table.
"""

from __future__ import annotations

from typing import Any

from fused_a2a.autograd import Comm

_ATTRIBUTE = "_fused_a2a_comm"


def _anchor(handle: Any) -> Any:
    """The object that lives as long as ``handle``: its first tensor for a tuple, else the handle."""
    return handle[0] if isinstance(handle, tuple) and handle else handle


def remember(handle: Any, comm: Comm) -> None:
    """Note that ``comm`` made ``handle`` (an object that takes no attribute is left alone)."""
    try:
        object.__setattr__(_anchor(handle), _ATTRIBUTE, comm)
    except (AttributeError, TypeError):
        pass


def comm_of(handle: Any) -> Comm | None:
    """The Comm that made ``handle``, ``None`` for a handle this process did not make through the seed API."""
    return getattr(_anchor(handle), _ATTRIBUTE, None)
