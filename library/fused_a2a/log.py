"""What the library says about its choices, and ``$FUSED_A2A_LOG``.

fused_a2a logs on the standard ``fused_a2a`` logger: a job that configures logging (e.g.
``logging.basicConfig(level=logging.INFO)``) sees its lines. Without that, ``FUSED_A2A_LOG=info``
(``debug``, ``info``, ``warning``, ``error``; ``off`` or empty: nothing added) gives the logger a
handler of its own on stderr at that level. An unknown value is ignored with one warning: a job never
stops because of it.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

LOG_ENV = "FUSED_A2A_LOG"
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}

logger = logging.getLogger("fused_a2a")
_state: dict = {"value": None, "handler": None, "warned": set()}


class LogWarning(UserWarning):
    """``$FUSED_A2A_LOG`` holds a value that is not a level (filter this category to silence it)."""


def configure() -> None:
    """Apply ``$FUSED_A2A_LOG`` to the ``fused_a2a`` logger if it changed since the last call.

    A level adds one handler on stderr (``fused_a2a: <message>``) and sets the logger's level; ``off``,
    an empty or unset variable removes that handler again. Anything else: one :class:`LogWarning` per
    distinct value, and the logger is left as it is.
    """
    value = os.environ.get(LOG_ENV, "").strip().lower()
    if value == _state["value"]:
        return
    if value and value != "off" and value not in LEVELS:
        if value not in _state["warned"]:
            _state["warned"].add(value)
            warnings.warn(f"fused_a2a: ignoring {LOG_ENV}={os.environ.get(LOG_ENV)!r}: use one of "
                          f"{', '.join(LEVELS)} or off", LogWarning, stacklevel=3)
        return
    _state["value"] = value
    if _state["handler"] is not None:
        logger.removeHandler(_state["handler"])
        _state["handler"] = None
        logger.setLevel(logging.NOTSET)
    if value in LEVELS:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("fused_a2a: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(LEVELS[value])
        _state["handler"] = handler
