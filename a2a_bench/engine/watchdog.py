"""A per-point watchdog: a point that overruns its budget is recorded, then the process exits.

A hung collective or kernel cannot be cancelled from Python, so the only way on is a new process:
the watchdog calls ``on_expire`` (rank 0 records the point as ``timeout``) and exits with
:data:`TIMEOUT_EXIT`; torchrun's ``--max-restarts`` starts the ranks again and ``--resume`` skips the
recorded point.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Callable

TIMEOUT_EXIT = 3


class Watchdog:
    """Watches one point at a time from a daemon thread.

    Args:
        on_expire: called with ``(label, phase)`` from the watchdog thread when a point overruns,
            before the process exits.
        grace_s: extra seconds before this process acts (give rank 0 time to record the point
            before the other ranks exit and torchrun tears the job down).
    """

    def __init__(self, on_expire: Callable[[str, str], None], grace_s: float = 0.0) -> None:
        self._on_expire = on_expire
        self._grace_s = grace_s
        self._cond = threading.Condition()
        self._deadline: float | None = None
        self._label = ""
        self._phase = ""
        threading.Thread(target=self._watch, name="a2a-bench-watchdog", daemon=True).start()

    def arm(self, label: str, budget_s: float) -> None:
        """Start watching ``label``: it must end (:meth:`disarm`) within ``budget_s`` seconds."""
        with self._cond:
            self._label, self._phase = label, "start"
            self._deadline = time.monotonic() + budget_s + self._grace_s
            self._cond.notify()

    def phase(self, name: str) -> None:
        """Record what the point is doing now (reported if it overruns)."""
        with self._cond:
            self._phase = name

    def disarm(self) -> None:
        """The point ended in time."""
        with self._cond:
            self._deadline = None
            self._cond.notify()

    def _watch(self) -> None:
        with self._cond:
            while True:
                if self._deadline is None:
                    self._cond.wait()
                    continue
                remaining = self._deadline - time.monotonic()
                if remaining > 0:
                    self._cond.wait(remaining)
                    continue
                label, phase = self._label, self._phase
                break
        try:
            self._on_expire(label, phase)
        finally:
            print(f"a2a-bench: point {label} overran its budget during {phase}; exiting", file=sys.stderr, flush=True)
            os._exit(TIMEOUT_EXIT)
