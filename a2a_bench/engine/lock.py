"""The run-folder lock: one sweep writes a run folder at a time.

The lock is an exclusive ``flock`` on ``RUN_DIR/sweep.lock``; the file holds who took it (pid, host,
time, command) so that a second sweep can name the holder. The kernel drops the ``flock`` when its
holder dies, however it dies (SIGKILL included), so a lock whose holder is gone is simply taken over;
the stale holder's name is reported once (not when the holder was an earlier attempt of the same
torchrun job: a restarted rank 0 takes its own lock back quietly).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from a2a_bench.engine.spec import SpecError

LOCK_FILE = "sweep.lock"


class RunFolderBusy(SpecError):
    """Another live sweep holds the run folder (the CLI exits with status 2)."""


@dataclass(frozen=True)
class Holder:
    """Who holds (or held) a run folder's lock.

    Attributes:
        pid: the holder's process id.
        host: the host it runs on.
        since: when it took the lock, ISO 8601 UTC.
        command: its command line.
        job: the torchrun job it belongs to (``$TORCHELASTIC_RUN_ID``; empty outside torchrun).
    """

    pid: int
    host: str
    since: str
    command: str
    job: str = ""

    @classmethod
    def this_process(cls, command: list[str]) -> "Holder":
        return cls(os.getpid(), socket.gethostname(), datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                   " ".join(command), os.environ.get("TORCHELASTIC_RUN_ID", ""))

    @classmethod
    def parse(cls, text: str) -> "Holder | None":
        """The holder written in a lock file, ``None`` for an empty or unreadable one."""
        try:
            data = json.loads(text)
            return cls(int(data["pid"]), str(data["host"]), str(data["since"]), str(data["command"]),
                       str(data.get("job", "")))
        except (ValueError, KeyError, TypeError):
            return None

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}, since {self.since}"


class RunLock:
    """The lock of one run folder (``RUN_DIR/sweep.lock``).

    :meth:`acquire` takes it or raises :class:`RunFolderBusy`; :meth:`release` drops it and removes
    the file. A process that dies holding it leaves the file, whose next taker reports it as stale.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self._fd: int | None = None

    def holder(self) -> Holder | None:
        """Who the lock file names (a live holder or a stale one), ``None`` without a readable file."""
        try:
            return Holder.parse(self.path.read_text())
        except OSError:
            return None

    def acquire(self, command: list[str]) -> Holder | None:
        """Take the lock for this process (creating the folder); return the stale holder it replaces
        (``None`` when there was none, or it was an earlier attempt of this torchrun job).

        Raises:
            RunFolderBusy: a live process holds it (the message names it).
        """
        self.folder.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                holder = self.holder()
                who = f"another sweep ({holder.describe()})" if holder else "another sweep"
                raise RunFolderBusy(f"run folder {self.folder} is in use by {who}; wait for it to end or choose another --out") from None
            if self._same_file(fd):
                break
            os.close(fd)  # the holder removed the file between our open and flock: lock the new one
        self._fd = fd
        stale = self.holder()
        mine = Holder.this_process(command)
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(asdict(mine)) + "\n").encode(), 0)
        os.fsync(fd)
        if stale is None or stale.pid == mine.pid or (stale.job and stale.job == mine.job):
            return None
        return stale

    def held_by_parent(self) -> bool:
        """The lock is held by this process's parent on this host (the local launcher of this rank)."""
        holder = self.holder()
        return holder is not None and holder.pid == os.getppid() and holder.host == socket.gethostname()

    def release(self) -> None:
        """Remove the lock file and drop the lock (a no-op when not held)."""
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None

    def _same_file(self, fd: int) -> bool:
        try:
            return os.fstat(fd).st_ino == os.stat(self.path).st_ino
        except FileNotFoundError:
            return False
