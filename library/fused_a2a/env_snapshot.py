"""Snapshots of a fixed set of environment variables, taken fast enough for every call: what notices
that a ``FUSED_A2A_*`` override or a HybridEP chunk variable changed.

``os.environ`` decodes each key and value on access (about 0.5 µs a name); where CPython keeps the
encoded dictionary (``os.environ._data``) the names are encoded once and looked up there, which is
what a warm dispatch can afford. The values read equal ``os.environ``'s (also after changes made
through it).
"""

from __future__ import annotations

import os

_DATA = getattr(os.environ, "_data", None)
_ENCODE = getattr(os.environ, "encodekey", None)
_RAW = _DATA is not None and _ENCODE is not None
_GET = _DATA.get if _RAW else os.environ.get


def encode(names: tuple[str, ...]) -> tuple:
    """``names`` as :func:`values` takes them."""
    return tuple(map(_ENCODE, names)) if _RAW else names


def values(encoded: tuple) -> tuple:
    """The values of the ``encoded`` names (``None`` for an unset one), in an encoding of their own:
    compare them with another call's, not with strings."""
    return tuple(map(_GET, encoded))
