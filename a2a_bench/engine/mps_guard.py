"""The record of an MPS control daemon an a2a-bench launcher started, and the guard that stops it when
that launcher is gone, however it went (SIGKILL included).

A launcher that starts a daemon keeps, in a folder of its own (``RUN_DIR``), ``daemon.json`` (what to
stop) and ``owner.lock``, on which it holds an ``flock`` for as long as the daemon is its. The kernel
drops that lock when the launcher exits, so whoever takes it next knows the owner is gone: the guard
(``python -m a2a_bench.engine.mps_guard RUN_DIR``, started by the launcher in a session of its own so
that a kill of the launcher's process group spares it) waits for the lock, and a later run that finds
a folder whose lock it can take stops what is left there. Standard library only: the guard starts in
milliseconds and holds little memory for the length of a run.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

RECORD = "daemon.json"
OWNER_LOCK = "owner.lock"
QUIT_TIMEOUT_S = 30.0


def write_record(run_dir: Path, control: str, pipe_dir: Path, log_dir: Path, daemon: int) -> None:
    """Write ``RUN_DIR/daemon.json``: the control program, the daemon's pipe and log folders, its pid
    and this process's (the owner's)."""
    data = {"control": control, "pipe_dir": str(pipe_dir), "log_dir": str(log_dir), "daemon": daemon,
            "owner": os.getpid()}
    tmp = run_dir / (RECORD + ".tmp")
    tmp.write_text(json.dumps(data) + "\n", encoding="utf-8")
    tmp.replace(run_dir / RECORD)


def read_record(run_dir: Path) -> dict | None:
    """``RUN_DIR/daemon.json``, or ``None`` when it is missing or unreadable."""
    try:
        data = json.loads((run_dir / RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and {"control", "pipe_dir", "log_dir"} <= data.keys() else None


def send_quit(record: dict) -> bool:
    """Ask the daemon of ``record`` to quit (``echo quit | nvidia-cuda-mps-control`` with its pipe and
    log folders); whether the control program accepted it. Never raises."""
    env = {**os.environ, "CUDA_MPS_PIPE_DIRECTORY": record["pipe_dir"], "CUDA_MPS_LOG_DIRECTORY": record["log_dir"]}
    try:
        done = subprocess.run([record["control"]], input="quit\n", text=True, env=env, capture_output=True,
                              timeout=QUIT_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


def forget(run_dir: Path) -> None:
    """Remove ``RUN_DIR`` (with the pipe and log folders made in it when the environment named none;
    folders the environment named are left)."""
    shutil.rmtree(run_dir, ignore_errors=True)


def stop_if_abandoned(run_dir: Path, wait: bool) -> dict | None:
    """Take ``RUN_DIR``'s owner lock (``wait``: block until its owner is gone; else give up at once
    when it is held); holding it, ask the recorded daemon to quit and remove the folder. Returns the
    record of the daemon told to quit, ``None`` when there was none or the owner still holds the lock."""
    try:
        lock = open(run_dir / OWNER_LOCK, "a")
    except OSError:
        return None
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return None
        record = read_record(run_dir)
        if record is not None:
            send_quit(record)
        if record is not None or not wait:
            forget(run_dir)
        return record


def main(argv: list[str]) -> int:
    """``python -m a2a_bench.engine.mps_guard RUN_DIR``: wait until the launcher that owns ``RUN_DIR``
    is gone, then stop its daemon if it is still recorded (a launcher that stopped it removed the record)."""
    if len(argv) != 2:
        print("usage: python -m a2a_bench.engine.mps_guard RUN_DIR", file=sys.stderr)
        return 2
    stop_if_abandoned(Path(argv[1]), wait=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
