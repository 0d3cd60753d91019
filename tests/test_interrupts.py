"""An interrupt is not a failure: a real SIGINT (Ctrl-C) to a real 2-rank sweep, launched by
``a2a-bench sweep --nproc 2`` and by torchrun, ends it with one line naming what was kept and the command
that continues; the point in flight is marked and, interrupted twice, is still measured by the resume."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from a2a_bench.engine.results import read_results
from test_launcher import alive, children, data_rows, held_env, wait_for

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from /proc")

# the second point: rank 1 waits in dispatch while the hold file exists, rank 0 waits for it
# inside the token exchange (a collective: its main thread is in C++ when the interrupt arrives)
GRID = ["--backends", "faulty", "--knob", "faulty.fault=none,hold_rank1", "--hidden", "64", "--tokens", "16",
        "--topk", "2", "--experts", "8", "--warmup", "1", "--iters", "2"]
LAUNCHERS = {
    "a2a-bench --nproc": [sys.executable, "-m", "a2a_bench", "sweep", "--nproc", "2"],
    "torchrun": [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
                 "-m", "a2a_bench", "sweep"],
}
RUNNERS = {"a2a-bench": [sys.executable, "-m", "a2a_bench"], "torchrun": [sys.executable, "-m", "torch.distributed.run"]}


def runnable(command: str) -> list[str]:
    """A command line as printed for a user (``a2a-bench ...``, ``torchrun ...``), as this interpreter runs it."""
    words = shlex.split(command)
    return [*RUNNERS[words[0]], *words[1:]]


def ctrl_c_in_the_held_point(command: list[str], out: Path, env: dict) -> tuple[int, str, list[int]]:
    """Start ``command`` in its own session, wait until its ranks are in the held point (the first point
    of the grid recorded, the second compiling), send SIGINT to
    the launcher's process group (the terminal's Ctrl-C), wait for the end; ``(status, stderr, rank pids)``."""
    marker = out / "in_flight.json"

    def held() -> bool:
        try:
            state = json.loads(marker.read_text())
        except (OSError, ValueError):
            return False
        return state["phase"] == "compile" and not state.get("interrupted") and data_rows(out / "results.csv") == 1

    job = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                           start_new_session=True, env=env)
    ranks: list[int] = []
    try:
        wait_for(held, 120, "the ranks to wait in the held point")
        ranks = children(job.pid)
        assert len(ranks) == 2
        os.killpg(job.pid, signal.SIGINT)
        _, err = job.communicate(timeout=90)
        wait_for(lambda: not any(alive(r) for r in ranks), 10, f"ranks {ranks} to end")
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
        for rank in ranks:
            if alive(rank):
                os.kill(rank, signal.SIGKILL)
    return job.returncode, err, ranks


@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_ctrl_c_twice_on_one_point_then_resume_measures_it(launcher: str, tmp_path: Path) -> None:
    out, hold = tmp_path / "run", tmp_path / "hold"
    hold.touch()
    env = held_env(hold)
    command = [*LAUNCHERS[launcher], "--out", str(out), *GRID]
    for _ in range(2):  # Ctrl-C twice on the same point
        code, err, _ = ctrl_c_in_the_held_point(command, out, env)
        reports = [line for line in err.splitlines() if line.startswith("a2a-bench: interrupted: ")]
        assert len(reports) == 1, err[-3000:]  # rank 0 (or the launcher) alone
        kept, resume = reports[0].removeprefix("a2a-bench: interrupted: ").split("; the point in flight is measured again by: ")
        assert kept == f"1 point kept in {out / 'results.csv'}"
        if launcher == "torchrun":
            assert code != 0  # torchrun's own status for a job it stopped
            assert resume == shlex.join(["torchrun", "--standalone", "--nproc-per-node", "2", "-m", "a2a_bench", "sweep",
                                         *GRID, "--out", str(out), "--resume"])
        else:
            assert code == 130 and "Traceback" not in err, err[-3000:]
            ours = [line for line in err.splitlines() if line.startswith("a2a-bench:")]
            assert ours == ["a2a-bench: buffers freed; destroying the process group",
                            "a2a-bench: process group destroyed", reports[0]]
            assert "death signal" not in err and "closing signal" not in err
            assert resume == shlex.join(["a2a-bench", "sweep", "--nproc", "2", *GRID, "--out", str(out), "--resume"])
        state = json.loads((out / "in_flight.json").read_text())
        assert state["attempt"] == 1 and state["interrupted"] is True and state["phase"] == "compile"
        assert len(read_results(out / "results.csv")) == 1  # nothing recorded for the interrupted point
        command = runnable(resume)
    hold.unlink()
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = read_results(out / "results.csv")
    assert len(results) == 2 and results["point_id"].is_unique and set(results["status"]) == {"ok"}
    assert not (out / "in_flight.json").exists()
    history = json.loads((out / "run.json").read_text())["history"]
    assert [entry["done"] for entry in history] == [0, 1, 1]  # three invocations, each recorded
    assert history[0]["command"][-len(GRID):] == GRID and "--resume" not in history[0]["command"]

