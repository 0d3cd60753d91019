"""Ranks that share a GPU: how they share it (``--share-gpu mps|timeslice``), and the MPS control
daemon a launcher starts for them and stops.

With more ranks than GPUs on a node, ranks share GPUs:

* ``mps`` (the default): an NVIDIA MPS control daemon serves the ranks, so their kernels run side by
  side and the timings are real measurements of a virtual cluster whose "link" is the GPU's own memory
  (the cluster id says so: ``h200-x1-mps2``).
* ``timeslice``: the GPU runs one rank's kernels at a time (about 7 ms a call whatever the knobs):
  every row is marked not comparable and ``tune`` refuses the run (``h200-x1-ts2``).

CUDA connects a process to the daemon when the process first initialises CUDA, so the daemon must run
before the ranks start. Under ``--nproc`` the launcher (which runs no kernel) starts one before it
spawns the ranks when none serves them: with ``$CUDA_MPS_PIPE_DIRECTORY`` / ``$CUDA_MPS_LOG_DIRECTORY``
when set, else in folders of its own; it stops only a daemon it started (``echo quit |
nvidia-cuda-mps-control``), also on Ctrl-C, SIGTERM or an exception, and a guard process stops it when
the launcher is killed (:mod:`a2a_bench.engine.mps_guard`). Under a plain ``torchrun`` the ranks are
already running: they use a daemon that serves them, or refuse, naming the command that starts one.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from a2a_bench.launch.lifeline import LAUNCHER_PID_ENV
from a2a_bench.engine.mps_guard import OWNER_LOCK, forget, send_quit, stop_if_abandoned, write_record
from a2a_bench.engine.spec import SpecError
from fused_a2a import mps
from fused_a2a.cluster import visible_gpus

SHARE_MODES = ("mps", "timeslice")
CONTROL = "nvidia-cuda-mps-control"
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0
NOT_COMPARABLE = "time-sliced: not comparable"


class MpsError(SpecError):
    """MPS cannot serve ranks that share a GPU (the CLI exits with status 2, before any GPU work)."""


@dataclass(frozen=True)
class Sharing:
    """How the ranks of one node share its GPUs.

    Attributes:
        ranks: ranks on the node.
        gpus: GPUs the node's ranks see.
        mode: ``"mps"`` or ``"timeslice"``.
    """

    ranks: int
    gpus: int
    mode: str

    @property
    def ranks_per_gpu(self) -> int:
        """The most ranks on one GPU (ranks are placed round-robin)."""
        return -(-self.ranks // self.gpus)

    def describe(self) -> str:
        """``"2 ranks share 1 GPU (2 per GPU)"``."""
        return (f"{self.ranks} ranks share {self.gpus} GPU{'s' if self.gpus > 1 else ''} "
                f"({self.ranks_per_gpu} per GPU)")


def parse_share_gpu(value: str | None) -> str | None:
    """``--share-gpu``'s value (``None``: not given); ``SpecError`` for anything but mps or timeslice."""
    if value is not None and value not in SHARE_MODES:
        raise SpecError(f"--share-gpu must be mps or timeslice, got {value!r}")
    return value


def plan(ranks: int, gpus: int, requested: str | None) -> Sharing | None:
    """How ``ranks`` ranks of a node share its ``gpus`` GPUs: ``None`` when they do not (one GPU or
    more per rank, or no GPU); else ``requested`` (default ``mps``)."""
    if gpus < 1 or ranks <= gpus:
        return None
    return Sharing(ranks, gpus, requested or "mps")


def mps_status() -> dict:
    """What ``a2a-bench env`` shows about MPS: the control program's path (``None``: not on PATH), the
    pipe folder this process would use and the pid of the daemon serving it (``None``: none)."""
    pipe = mps.pipe_dir()
    return {"control": shutil.which(CONTROL), "pipe_dir": str(pipe), "daemon_pid": mps.daemon_pid(pipe)}


def start_command(ranks: int) -> str:
    """The commands that start a daemon for ranks launched by a plain ``torchrun``."""
    return (f"export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log; "
            f"mkdir -p $CUDA_MPS_PIPE_DIRECTORY $CUDA_MPS_LOG_DIRECTORY; {CONTROL} -d; "
            f"torchrun --nproc-per-node {ranks} ...; echo quit | {CONTROL}")


def check_rank(requested: str | None, rank: int = 0) -> Sharing | None:
    """In a rank: how this node's ranks (``$LOCAL_WORLD_SIZE``) share its GPUs, checked before any
    GPU work; rank 0 of a job not started by ``a2a-bench --nproc`` says how on stderr.

    Raises:
        MpsError: MPS is asked for (or the default) and no daemon serves this process; or
            ``timeslice`` is asked for and a daemon serves it (the ranks would run under MPS).
    """
    ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    sharing = plan(ranks, visible_gpus(), requested)
    if sharing is None:
        return None
    pipe = mps.pipe_dir()
    daemon = mps.daemon_pid(pipe)
    if sharing.mode == "mps" and daemon is None:
        raise MpsError(f"{sharing.describe()} and no MPS control daemon serves them (pipe folder {pipe}): start one "
                       f"before torchrun ({start_command(ranks)}), or launch with a2a-bench --nproc {ranks}, "
                       "which starts and stops one, or pass --share-gpu timeslice (timings then not comparable)")
    if sharing.mode == "timeslice" and daemon is not None:
        raise MpsError(f"--share-gpu timeslice, but the MPS control daemon pid {daemon} (pipe folder {pipe}) serves "
                       f"these ranks, so they would run under MPS: use --share-gpu mps, or stop it "
                       f"(echo quit | {CONTROL})")
    if rank == 0 and LAUNCHER_PID_ENV not in os.environ:
        print(f"a2a-bench: {_how(sharing, daemon, pipe)}", file=sys.stderr, flush=True)
    return sharing


def _how(sharing: Sharing, daemon: int | None, pipe: Path) -> str:
    if sharing.mode == "mps":
        return f"{sharing.describe()}: under MPS (control daemon pid {daemon}, pipe folder {pipe})"
    return (f"{sharing.describe()}, time-sliced (--share-gpu timeslice): every timing is marked not comparable "
            "and tune refuses the run")


@contextlib.contextmanager
def launcher_sharing(ranks: int, requested: str | None, gpus: int | None = None) -> Iterator[Sharing | None]:
    """For the body (``a2a-bench --nproc RANKS`` launching its ranks): when the ranks will share GPUs,
    say so on stderr and, for MPS, make a daemon serve them: the one already serving this process's
    pipe folder, else one started here (:class:`OwnedDaemon`), stopped when the body ends however it
    ends. Yields the :class:`Sharing`, ``None`` when the ranks do not share GPUs.

    Args:
        ranks: local ranks to launch.
        requested: ``--share-gpu`` (``None``: MPS when sharing).
        gpus: the GPUs the ranks will see (default: :func:`fused_a2a.cluster.visible_gpus`).

    Raises:
        MpsError: MPS is needed and cannot start (no control program, the daemon fails to start).
    """
    sharing = plan(ranks, visible_gpus() if gpus is None else gpus, requested)
    if sharing is None:
        yield None
        return
    if sharing.mode == "timeslice":
        print(f"a2a-bench: {_how(sharing, None, mps.pipe_dir())}", file=sys.stderr, flush=True)
        yield sharing
        return
    reap_abandoned()
    pipe = mps.pipe_dir()
    running = mps.daemon_pid(pipe)
    if running is not None:
        print(f"a2a-bench: {sharing.describe()}: under MPS, with the control daemon already running "
              f"(pid {running}, pipe folder {pipe}; left running)", file=sys.stderr, flush=True)
        yield sharing
        return
    daemon = OwnedDaemon.start(sharing.describe())
    try:
        print(f"a2a-bench: {sharing.describe()}: under MPS, with a control daemon started for this run "
              f"(pid {daemon.pid}, pipe folder {daemon.pipe_dir}; stopped at its end)", file=sys.stderr, flush=True)
        with daemon.environment():
            yield sharing
    finally:
        daemon.stop()


def _daemons_root() -> Path:
    """Where launchers keep the folders of the daemons they start (one per run)."""
    return Path(tempfile.gettempdir()) / f"a2a-bench-mps-{os.getuid()}"


def reap_abandoned() -> list[dict]:
    """Stop the daemons that a2a-bench launchers started and left behind (the launcher and its guard
    both killed): their folders' owner locks are free. Says so on stderr; returns their records."""
    root = _daemons_root()
    stopped = []
    for run_dir in sorted(root.glob("run-*")) if root.is_dir() else ():
        record = stop_if_abandoned(run_dir, wait=False)
        if record is not None:
            print(f"a2a-bench: stopped the MPS control daemon (pid {record.get('daemon')}, pipe folder "
                  f"{record['pipe_dir']}) left behind by a2a-bench pid {record.get('owner')}", file=sys.stderr, flush=True)
            stopped.append(record)
    return stopped


class OwnedDaemon:
    """An MPS control daemon this process started, and stops.

    Its folder (under ``$TMPDIR/a2a-bench-mps-<uid>/``) holds the record and the owner lock of
    :mod:`a2a_bench.engine.mps_guard`, and the pipe and log folders when the environment names none.
    """

    def __init__(self, run_dir: Path, lock, control: str, pipe_dir: Path, log_dir: Path, pid: int, guard) -> None:
        self.run_dir, self._lock, self.control = run_dir, lock, control
        self.pipe_dir, self.log_dir, self.pid, self._guard = pipe_dir, log_dir, pid, guard

    @classmethod
    def start(cls, why: str) -> "OwnedDaemon":
        """Start ``nvidia-cuda-mps-control -d`` with ``$CUDA_MPS_PIPE_DIRECTORY`` and
        ``$CUDA_MPS_LOG_DIRECTORY`` (folders of this run where unset) and wait until it runs; start
        its guard. ``why`` opens the error messages (``"2 ranks share 1 GPU (2 per GPU)"``).

        Raises:
            MpsError: the control program is not on PATH, exits with an error, or no daemon runs
                within :data:`START_TIMEOUT_S`; nothing is left behind.
        """
        control = shutil.which(CONTROL)
        if control is None:
            raise MpsError(f"{why}, which needs MPS, but {CONTROL} (it comes with the NVIDIA driver) is not on PATH: "
                           "add it, or pass --share-gpu timeslice (timings then not comparable)")
        run_dir, lock = _new_run_dir()
        pipe_dir = Path(os.environ.get(mps.PIPE_DIR_ENV) or run_dir / "pipe")
        log_dir = Path(os.environ.get(mps.LOG_DIR_ENV) or run_dir / "log")
        pid = None
        try:
            for folder in (pipe_dir, log_dir):
                folder.mkdir(parents=True, exist_ok=True)
            pid = _run_daemon(why, control, pipe_dir, log_dir, run_dir / "start.out")
            write_record(run_dir, control, pipe_dir, log_dir, pid)
            guard = subprocess.Popen([sys.executable, "-m", "a2a_bench.engine.mps_guard", str(run_dir)],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        except BaseException:
            if pid is not None:
                send_quit({"control": control, "pipe_dir": str(pipe_dir), "log_dir": str(log_dir)})
            forget(run_dir)
            lock.close()
            raise
        return cls(run_dir, lock, control, pipe_dir, log_dir, pid, guard)

    @contextlib.contextmanager
    def environment(self) -> Iterator[None]:
        """``$CUDA_MPS_PIPE_DIRECTORY`` and ``$CUDA_MPS_LOG_DIRECTORY`` set to this daemon's for the body
        (the ranks inherit them), as they were afterwards."""
        before = {name: os.environ.get(name) for name in (mps.PIPE_DIR_ENV, mps.LOG_DIR_ENV)}
        os.environ[mps.PIPE_DIR_ENV], os.environ[mps.LOG_DIR_ENV] = str(self.pipe_dir), str(self.log_dir)
        try:
            yield
        finally:
            for name, value in before.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value

    def stop(self) -> None:
        """Tell the daemon to quit and wait (at most :data:`STOP_TIMEOUT_S`, then SIGTERM) until it is
        gone; remove the run's folder, release the owner lock (the guard then exits) and reap the guard."""
        send_quit({"control": self.control, "pipe_dir": str(self.pipe_dir), "log_dir": str(self.log_dir)})
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while mps.daemon_pid(self.pipe_dir) == self.pid and time.monotonic() < deadline:
            time.sleep(0.05)
        if mps.daemon_pid(self.pipe_dir) == self.pid:
            with contextlib.suppress(OSError):
                os.kill(self.pid, signal.SIGTERM)
        forget(self.run_dir)
        self._lock.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._guard.wait(timeout=STOP_TIMEOUT_S)


def _new_run_dir():
    """A new folder for one daemon, with its owner lock taken (made under a dot name, then renamed, so
    :func:`reap_abandoned` never sees it unlocked): ``(folder, open lock file)``."""
    root = _daemons_root()
    root.mkdir(mode=0o700, exist_ok=True)
    fresh = Path(tempfile.mkdtemp(prefix=".new-", dir=root))
    lock = open(fresh / OWNER_LOCK, "a")
    fcntl.flock(lock, fcntl.LOCK_EX)
    run_dir = root / f"run-{os.getpid()}-{fresh.name[len('.new-'):]}"
    fresh.rename(run_dir)
    return run_dir, lock


def _run_daemon(why: str, control: str, pipe_dir: Path, log_dir: Path, output: Path) -> int:
    """Run ``CONTROL -d`` for these folders (its output to the file ``output``: a daemon may keep the
    descriptors it was started with); the pid of the daemon once it runs.

    Raises:
        MpsError: the control program fails or no daemon runs within :data:`START_TIMEOUT_S`.
    """
    env = {**os.environ, mps.PIPE_DIR_ENV: str(pipe_dir), mps.LOG_DIR_ENV: str(log_dir)}
    try:
        with open(output, "w") as out:
            code = subprocess.run([control, "-d"], env=env, stdin=subprocess.DEVNULL, stdout=out,
                                  stderr=subprocess.STDOUT, timeout=START_TIMEOUT_S).returncode
    except (OSError, subprocess.SubprocessError) as exc:
        raise MpsError(f"{why}, which needs MPS, but {control} -d failed: {exc}") from None
    if code != 0:
        said = output.read_text(errors="replace").strip().splitlines()
        raise MpsError(f"{why}, which needs MPS, but {control} -d exited with status {code}"
                       + (f": {said[0][:200]}" if said else "") + f" (pipe folder {pipe_dir})")
    deadline = time.monotonic() + START_TIMEOUT_S
    while (pid := mps.daemon_pid(pipe_dir)) is None:
        if time.monotonic() > deadline:
            raise MpsError(f"{why}, which needs MPS, but no MPS control daemon runs {START_TIMEOUT_S:g} s after "
                           f"{control} -d (no live pid in {pipe_dir / mps.PID_FILE})")
        time.sleep(0.05)
    return pid
