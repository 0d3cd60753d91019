"""A rank dies with the process that launched it.

torchrun starts every rank in its own session, so killing the launcher's process group (Ctrl-C in
some shells, ``kill -9 -- -PGID``, a Slurm step cancelled with SIGKILL) leaves the ranks running:
they keep measuring and appending rows that a later ``--resume`` then duplicates. Two guards:

* Linux: ``prctl(PR_SET_PDEATHSIG, SIGKILL)``, so the kernel kills the rank when its parent (the
  launcher: torchrun's agent, or ``a2a-bench --nproc``) exits, whatever signal took it.
* everywhere: a daemon thread that checks once a second that the parent is still the launcher
  (a process whose parent dies is re-parented), and kills this process otherwise. It also covers
  a launcher that died before the rank could ask for the signal.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

LAUNCHER_PID_ENV = "A2A_BENCH_LAUNCHER_PID"
PR_SET_PDEATHSIG = 1
POLL_S = 1.0


def launched_by_torchrun() -> bool:
    """This process is a rank started by torchrun's agent (torchrun or ``a2a-bench --nproc``)."""
    return "TORCHELASTIC_RUN_ID" in os.environ and "LOCAL_RANK" in os.environ


def die_with_launcher() -> int:
    """Make this process die (SIGKILL) within about a second of its launcher; returns the launcher's pid.

    The launcher is ``$A2A_BENCH_LAUNCHER_PID`` (set by ``a2a-bench --nproc``), else the parent
    process. If it is already gone, this process is killed at once.
    """
    launcher = int(os.environ.get(LAUNCHER_PID_ENV) or os.getppid())
    _ask_for_parent_death_signal()
    threading.Thread(target=_watch, args=(launcher,), name="a2a-bench-lifeline", daemon=True).start()
    if os.getppid() != launcher:
        _die(launcher)
    return launcher


def _ask_for_parent_death_signal() -> None:
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):  # no prctl: the thread alone watches
        pass


def _watch(launcher: int) -> None:
    while os.getppid() == launcher:
        time.sleep(POLL_S)
    _die(launcher)


def _die(launcher: int) -> None:
    try:
        print(f"a2a-bench: rank {os.environ.get('RANK', '?')}: its launcher (pid {launcher}) is gone; exiting",
              file=sys.stderr, flush=True)
    except OSError:  # the launcher's end of a pipe may be gone too
        pass
    os.kill(os.getpid(), signal.SIGKILL)
