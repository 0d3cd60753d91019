"""An interrupt is not a failure: Ctrl-C ends a sweep with one line, and its point in flight is tried
again on ``--resume`` without counting as an attempt.

Who sees the interrupt: Ctrl-C reaches torchrun's agent (``torchrun`` or ``a2a-bench --nproc``), which
passes SIGINT on to every rank; a rank stopped because another rank died gets SIGTERM instead. So on a
rank, SIGINT is an interrupt and SIGTERM is not (under ``--nproc``, the launcher also treats a SIGTERM
sent to it as an interrupt). Rank 0 notices SIGINT the moment it arrives, through a wake-up file
descriptor read by a thread, even while its main thread waits in a collective or a kernel, and marks
the run folder: ``in_flight.json`` says ``interrupted`` and no row is recorded any more.
"""

from __future__ import annotations

import os
import shlex
import signal
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator


class Interrupted(KeyboardInterrupt):
    """A sweep stopped by an interrupt; ``report`` is the line to print (``None``: another process
    of the job prints it)."""

    def __init__(self, report: str | None) -> None:
        super().__init__(report or "interrupted")
        self.report = report


@contextmanager
def on_sigint(callback: Callable[[], None]) -> Iterator[None]:
    """Call ``callback`` from a thread as soon as SIGINT arrives, while the body runs (main thread only).

    Python runs signal handlers only between bytecodes of the main thread, which may be blocked in a
    collective; the interpreter's C-level handler also writes the signal's number to the wake-up file
    descriptor, which this thread reads at once. The signal's own handler (``KeyboardInterrupt``) runs
    as usual.
    """
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    previous = signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)

    def watch() -> None:
        while True:
            try:
                data = os.read(read_end, 64)
            except OSError:
                return
            if not data:
                return
            if signal.SIGINT in data:
                callback()

    thread = threading.Thread(target=watch, name="a2a-bench-interrupt", daemon=True)
    thread.start()
    try:
        yield
    finally:
        signal.set_wakeup_fd(previous)
        os.close(write_end)
        thread.join(timeout=1.0)
        os.close(read_end)


def resume_argv(argv: list[str], out: Path) -> list[str]:
    """``argv`` (a sweep's command line, from ``a2a-bench`` on) with ``--out out`` and ``--resume``."""
    kept, skip = [], False
    for word in argv:
        if skip:
            skip = False
        elif word == "--out":
            skip = True
        elif not word.startswith("--out=") and word != "--resume":
            kept.append(word)
    return [*kept, "--out", str(out), "--resume"]


def torchrun_resume(argv: list[str], out: Path, world_size: int, local_world_size: int) -> str:
    """The command that continues a sweep run under torchrun with ``argv`` (``a2a-bench sweep ...``)."""
    args = shlex.join(resume_argv(argv, out)[1:])
    if world_size == local_world_size:
        return f"torchrun --standalone --nproc-per-node {local_world_size} -m a2a_bench {args}"
    return f"the same torchrun launch on every node, running: -m a2a_bench {args}"


def report(out: Path, kept: int, command: str) -> str:
    """The line an interrupted sweep ends with."""
    results = out / "results.csv"
    return (f"interrupted: {kept} point{'s' if kept != 1 else ''} kept in {results}; the point in flight is measured "
            f"again by: {command}")
