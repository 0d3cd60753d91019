"""Extra backends from modules named in ``$A2A_BENCH_BACKENDS`` (each registers into ``BACKENDS``)."""

from __future__ import annotations

import importlib
import os

from a2a_bench.engine.spec import SpecError

PLUGINS_ENV = "A2A_BENCH_BACKENDS"


def load_backend_plugins() -> list[str]:
    """Import each module of the comma list ``$A2A_BENCH_BACKENDS``; ``SpecError`` if one fails."""
    names = [n.strip() for n in os.environ.get(PLUGINS_ENV, "").split(",") if n.strip()]
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as exc:
            raise SpecError(f"{PLUGINS_ENV}: cannot import {name}: {type(exc).__name__}: {exc}") from None
    return names
