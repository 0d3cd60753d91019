"""Whether an NVIDIA MPS control daemon serves this process: a cheap check that never blocks or raises.

A CUDA process becomes an MPS client when it first initialises CUDA and the MPS control daemon of its
pipe directory (``$CUDA_MPS_PIPE_DIRECTORY``, else ``/tmp/nvidia-mps``) answers. The daemon writes its
pid to ``nvidia-cuda-mps-control.pid`` in that directory and removes the file when it stops (its
control socket stays behind), so "served" here means: that file holds a pid and a process with that
pid exists. Nothing is sent to the daemon. A daemon in another pid namespace (started on the host,
its pipe directory mounted into a container) is not seen: such a job counts as time-sliced.
"""

from __future__ import annotations

import os
from pathlib import Path

PIPE_DIR_ENV = "CUDA_MPS_PIPE_DIRECTORY"
LOG_DIR_ENV = "CUDA_MPS_LOG_DIRECTORY"
DEFAULT_PIPE_DIR = "/tmp/nvidia-mps"
PID_FILE = "nvidia-cuda-mps-control.pid"


def pipe_dir() -> Path:
    """The pipe directory CUDA looks for the daemon in: ``$CUDA_MPS_PIPE_DIRECTORY``, else ``/tmp/nvidia-mps``."""
    return Path(os.environ.get(PIPE_DIR_ENV) or DEFAULT_PIPE_DIR)


def daemon_pid(pipe: str | os.PathLike | None = None) -> int | None:
    """The pid of the MPS control daemon of ``pipe`` (default :func:`pipe_dir`), ``None`` when none runs.

    Reads the daemon's pid file and asks the kernel whether that process exists (a process of another
    user counts); any problem reading either answers ``None``.
    """
    path = Path(pipe if pipe is not None else pipe_dir()) / PID_FILE
    try:
        pid = int(path.read_text(encoding="ascii").strip())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return pid if pid > 0 and process_exists(pid) else None


def process_exists(pid: int) -> bool:
    """A live process with this pid exists (another user's counts; a zombie, which has exited, does not)."""
    try:
        os.kill(pid, 0)
    except PermissionError:
        pass
    except (OSError, OverflowError):
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except FileNotFoundError:  # gone since, or no /proc at all (not Linux): then kill's answer stands
        return not Path("/proc/self").exists()
    except OSError:
        return True
    return stat[stat.rfind(")") + 2:][:1] != "Z"
