"""The run folder as rank 0 keeps it: rows, the point in flight, and what a restart must know.

``in_flight.json`` names the point being measured, its attempt and phase. A rank that dies (SIGKILL,
a crash) leaves it behind: on ``--resume`` that point is tried once more, and recorded as an error
if it was already on its second attempt, so a point that kills its process cannot stop the sweep.
An interrupt (:mod:`a2a_bench.engine.interrupt`) marks it ``interrupted``: the point is tried again
with the same attempt number, and nothing is recorded after the interrupt.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from a2a_bench.engine.results import RESULTS_FILE, RUN_FILE, ResultsError, append_row, check_header, read_results, read_run_info
from a2a_bench.engine.spec import SpecError, SweepSpec, spec_changes
from fused_a2a.files import atomic_write_text

IN_FLIGHT_FILE = "in_flight.json"
MAX_ATTEMPTS = 2


@dataclass(frozen=True)
class InFlight:
    """The point a rank was measuring when the previous process ended."""

    point_id: str
    attempt: int
    phase: str
    interrupted: bool = False


class RunFolder:
    """Rank 0's writer of ``results.csv`` and ``in_flight.json`` (thread-safe: the watchdog writes too)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.results = path / RESULTS_FILE
        self._marker = path / IN_FLIGHT_FILE
        self._lock = threading.Lock()
        self._current: InFlight | None = None
        self._recorded: set[str] = set()
        self._interrupted = False

    def check_start(self, resume: bool, cluster: str | None, spec: SweepSpec | None = None, extend: bool = False) -> None:
        """Raise unless a sweep may start writing here; reads only.

        Without ``resume``, ``results.csv`` must not exist. With it, ``results.csv`` must be this tool's
        (its header, and every row's values type-checked) and ``run.json``, if there, a valid run file
        of cluster ``cluster`` (``None``: any cluster) whose latest spec has the grid of ``spec`` (any grid
        with ``extend``) and its timing settings (``warmup``, ``iters``: always).

        Raises:
            SpecError: ``results.csv`` exists and ``resume`` is not set; ``spec`` differs from the
                folder's as above.
            ResultsError: a file is not this tool's, or of another cluster.
        """
        if not resume:
            if self.results.exists():
                raise SpecError(f"{self.results} already exists: pass --resume to continue it, or choose another --out")
            return
        check_header(self.results)
        self.rows()
        run_file = self.path / RUN_FILE
        if run_file.exists():
            info = read_run_info(run_file)
            if cluster is not None and info.cluster["id"] != cluster:
                raise ResultsError(f"{run_file} is a sweep on cluster {info.cluster['id']}, this one runs on {cluster}: "
                                   "choose another --out")
            if spec is not None:
                grid, timing = spec_changes(info.spec, spec)
                if timing:
                    raise SpecError(f"--resume: {self.path} was timed with other settings ({'; '.join(timing)}): rows "
                                    "timed otherwise would not compare; resume with the folder's, or choose another --out")
                if grid and not extend:
                    raise SpecError(f"--resume: {self.path} holds another grid ({'; '.join(grid)}): pass --extend to add "
                                    "this grid's points to it, or choose another --out")

    def rows(self) -> list[dict[str, Any]]:
        """The rows already recorded (none when ``results.csv`` is missing or holds no row).

        Raises:
            ResultsError: ``results.csv`` is not this tool's (see :func:`a2a_bench.engine.results.read_results`).
        """
        return read_results(self.results, allow_empty=True).to_dict("records")

    def in_flight(self) -> InFlight | None:
        """The point left in flight by a previous process, if any (unreadable marker: ``None``)."""
        try:
            data = json.loads(self._marker.read_text())
            return InFlight(str(data["point_id"]), int(data["attempt"]), str(data["phase"]),
                            data.get("interrupted", False) is True)
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None

    def start(self, point_id: str, attempt: int) -> None:
        with self._lock:
            if not self._interrupted:
                self._current = InFlight(point_id, attempt, "start")
                self._write_marker()

    def phase(self, name: str) -> None:
        with self._lock:
            if self._current is not None and not self._interrupted:
                self._current = InFlight(self._current.point_id, self._current.attempt, name)
                self._write_marker()

    def interrupt(self) -> None:
        """The sweep was interrupted: mark the point in flight (tried again on resume, with the same
        attempt number) and record nothing from now on. Safe from any thread."""
        with self._lock:
            self._interrupted = True
            if self._current is not None:
                self._current = InFlight(self._current.point_id, self._current.attempt, self._current.phase, True)
                self._write_marker()

    def record(self, row: dict[str, Any]) -> bool:
        """Append ``row`` unless its point already has one (from this process) or the sweep was
        interrupted; ``True`` if appended."""
        with self._lock:
            if row["point_id"] in self._recorded or self._interrupted:
                return False
            append_row(self.results, row)
            self._recorded.add(row["point_id"])
            self._current = None
            return True

    def finish(self) -> None:
        """The sweep ended: no point is in flight."""
        with self._lock:
            self._marker.unlink(missing_ok=True)

    def mark_left_interrupted(self) -> None:
        """Mark the point a stopped sweep left in flight as interrupted (the local launcher does it
        after its ranks are gone, when it was stopped by a signal)."""
        with self._lock:
            left = self.in_flight()
            if left is not None and not left.interrupted:
                self._current = InFlight(left.point_id, left.attempt, left.phase, True)
                self._write_marker()

    def _write_marker(self) -> None:
        c = self._current
        atomic_write_text(self._marker, json.dumps({"point_id": c.point_id, "attempt": c.attempt, "phase": c.phase,
                                                    "interrupted": c.interrupted}))
