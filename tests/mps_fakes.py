"""The fake MPS control program's environment for CPU tests (``tests/fakes/mps``): a2a-bench processes
that load ``tests/pretend_one_gpu.py`` (their GPU count and name say one H200; their ranks still run on
the CPU) and find the fake ``nvidia-cuda-mps-control`` first on ``PATH`` (it starts and stops a real
process as its daemon and logs every call to ``$FAKE_MPS_LOG``)."""

from __future__ import annotations

import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from a2a_bench.engine import sharing
from fused_a2a import mps

TESTS = Path(__file__).parent
FAKE_CONTROL = TESTS / "fakes" / "mps"


@dataclass
class FakeMps:
    """The environment of a2a-bench processes that see one GPU and the fake control program."""

    env: dict
    log: Path
    tmp: Path

    def calls(self) -> list[list[str]]:
        """The fake control program's calls so far: ``[verb, pipe folder, pid]`` each."""
        return [line.split() for line in self.log.read_text().splitlines()] if self.log.exists() else []

    def daemons(self, verb: str = "start") -> list[int]:
        return [int(call[2]) for call in self.calls() if call[0] == verb and call[2] != "none"]

    def start_daemon(self, pipe: Path) -> int:
        """Start a daemon for ``pipe`` as a user would, before a2a-bench runs; its pid."""
        subprocess.run([str(FAKE_CONTROL / sharing.CONTROL), "-d"], check=True,
                       env={**os.environ, **self.env_for(pipe)})
        return mps.daemon_pid(pipe)

    def env_for(self, pipe: Path) -> dict:
        return {**{k: v for k, v in self.env.items() if v is not None}, mps.PIPE_DIR_ENV: str(pipe),
                mps.LOG_DIR_ENV: str(pipe.parent / "log")}

    def leftovers(self) -> list[Path]:
        """Folders a2a-bench launchers left for their daemons."""
        root = self.tmp / f"a2a-bench-mps-{os.getuid()}"
        return sorted(root.iterdir()) if root.exists() else []


def alive(pid: int) -> bool:
    """A live process (not a zombie) has this pid."""
    return mps.process_exists(pid)


@pytest.fixture
def fake_mps(tmp_path: Path):
    """The :class:`FakeMps` of a test; daemons it started that are still alive are killed afterwards."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    fake = FakeMps(env={
        "PATH": f"{FAKE_CONTROL}{os.pathsep}{os.environ['PATH']}", "FAKE_MPS_LOG": str(tmp_path / "mps.log"),
        "TMPDIR": str(tmp), "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")])),
        "A2A_BENCH_BACKENDS": "pretend_one_gpu", mps.PIPE_DIR_ENV: None, mps.LOG_DIR_ENV: None,
    }, log=tmp_path / "mps.log", tmp=tmp)
    yield fake
    for pid in fake.daemons():  # a failed check leaves no daemon of ours behind
        if alive(pid):
            os.kill(pid, signal.SIGKILL)
