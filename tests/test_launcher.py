"""Ranks die with their launcher (proved by pid), one sweep per run folder, stale locks taken over."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from a2a_bench.launch.lifeline import LAUNCHER_PID_ENV
from a2a_bench.engine.lock import LOCK_FILE, RunFolderBusy, RunLock
from a2a_bench.engine.results import read_results

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from /proc")

TESTS = Path(__file__).parent
# the second point of the first shape waits while a file exists: the ranks are busy when the launcher dies
HOLD_GRID = ["--backends", "faulty", "--knob", "faulty.fault=none,hold", "--hidden", "64,128", "--tokens", "16",
             "--topk", "2", "--experts", "8", "--warmup", "1", "--iters", "2"]
HOLD_POINTS = 4  # 2 shapes x 2 faults
LAUNCHERS = {
    "a2a-bench --nproc": [sys.executable, "-m", "a2a_bench", "sweep", "--nproc", "2"],
    "torchrun": [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
                 "-m", "a2a_bench", "sweep"],
}


def held_env(hold: Path) -> dict[str, str]:
    """The environment of a sweep of :data:`HOLD_GRID` whose held point waits while ``hold`` exists."""
    return {**os.environ, "A2A_BENCH_BACKENDS": "faulty_backend", "FAULTY_HOLD_FILE": str(hold),
            "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}


def stat_fields(pid: int) -> list[str] | None:
    """Fields of ``/proc/<pid>/stat`` after the command name (state first), ``None`` if there is no such process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = stat_fields(int(entry.name))
            if fields is not None and int(fields[1]) == pid:
                found.append(int(entry.name))
    return sorted(found)


def alive(pid: int) -> bool:
    fields = stat_fields(pid)
    return fields is not None and fields[0] != "Z"  # a zombie has exited


def data_rows(results: Path) -> int:
    return max(0, results.read_text().count("\n") - 1) if results.exists() else 0


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_sigkill_of_the_launchers_process_group_kills_its_ranks(launcher: str, tmp_path: Path) -> None:
    out, hold = tmp_path / "run", tmp_path / "hold"
    hold.touch()
    env = held_env(hold)
    log = (tmp_path / "log").open("w")
    job = subprocess.Popen([*LAUNCHERS[launcher], "--out", str(out), *HOLD_GRID], stdout=log, stderr=subprocess.STDOUT,
                           start_new_session=True, env=env)
    ranks: list[int] = []
    try:
        in_flight = out / "in_flight.json"
        wait_for(lambda: data_rows(out / "results.csv") == 1 and in_flight.exists() and '"compile"' in in_flight.read_text(),
                 120, "the ranks to wait in the held point")
        ranks = children(job.pid)
        assert len(ranks) == 2 and all("a2a_bench" in Path(f"/proc/{r}/cmdline").read_text() for r in ranks)
        assert all(stat_fields(r)[3] != stat_fields(job.pid)[3] for r in ranks)  # each rank has its own session
        os.killpg(job.pid, signal.SIGKILL)  # the launcher's process group: not the ranks' sessions
        job.wait()
        wait_for(lambda: not any(alive(r) for r in ranks), 5, f"ranks {ranks} to die with their launcher")
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
        for rank in ranks:  # a failed check leaves no process of ours behind
            if alive(rank):
                os.kill(rank, signal.SIGKILL)
    hold.unlink()  # were a rank still alive, it would now go on and append rows
    rows = (out / "results.csv").read_text()
    time.sleep(1.0)
    assert (out / "results.csv").read_text() == rows and data_rows(out / "results.csv") == 1
    if launcher != "a2a-bench --nproc":
        return
    # the dead sweep's lock is stale: the resume takes it over and measures every point once
    assert json.loads((out / LOCK_FILE).read_text())["pid"] == job.pid
    proc = subprocess.run([*LAUNCHERS[launcher], "--out", str(out), "--resume", *HOLD_GRID], capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"taking over run folder {out} from a sweep that is gone (pid {job.pid}" in proc.stderr
    resumed = read_results(out / "results.csv")
    assert len(resumed) == HOLD_POINTS and resumed["point_id"].is_unique and set(resumed["status"]) == {"ok"}
    assert not (out / LOCK_FILE).exists()


def test_a_second_sweep_into_a_running_sweeps_folder_exits_2_naming_the_holder(tmp_path: Path) -> None:
    out, hold = tmp_path / "run", tmp_path / "hold"
    hold.touch()  # the first sweep waits in its second point until the second sweep has tried
    env = held_env(hold)
    first = subprocess.Popen([*LAUNCHERS["a2a-bench --nproc"], "--out", str(out), *HOLD_GRID], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True, env=env)
    try:
        wait_for(lambda: (out / LOCK_FILE).exists() and (out / LOCK_FILE).read_text(), 60, "the first sweep's lock")
        second = subprocess.run([*LAUNCHERS["a2a-bench --nproc"], "--out", str(out), "--resume", *HOLD_GRID],
                                capture_output=True, text=True, timeout=120, env=env)
        assert first.poll() is None
        hold.unlink()
        _, err = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert second.returncode == 2, second.stderr
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1, second.stderr
    assert lines[0].startswith(f"a2a-bench: error: run folder {out} is in use by another sweep (pid {first.pid} on ")
    assert first.returncode == 0, err[-4000:]
    results = read_results(out / "results.csv")
    assert len(results) == HOLD_POINTS and results["point_id"].is_unique  # the second sweep wrote nothing
    assert not (out / LOCK_FILE).exists()


def test_a_lock_whose_holder_is_gone_is_taken_over_and_a_live_one_is_not(tmp_path: Path) -> None:
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": dead_pid, "host": "h", "since": "t", "command": "c"}))
    lock = RunLock(tmp_path)
    stale = lock.acquire(["a2a-bench", "sweep"])
    assert stale is not None and stale.pid == dead_pid
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / LOCK_FILE).exists()

    # a restarted rank 0 of the same torchrun job takes the lock back without a word
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": dead_pid, "host": "h", "since": "t", "command": "c", "job": "j1"}))
    os.environ["TORCHELASTIC_RUN_ID"] = "j1"
    try:
        lock = RunLock(tmp_path)
        assert lock.acquire(["a2a-bench", "sweep"]) is None
        lock.release()
    finally:
        del os.environ["TORCHELASTIC_RUN_ID"]

    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from a2a_bench.engine.lock import RunLock; "
         "RunLock(sys.argv[1]).acquire(['holder']); print('held', flush=True); time.sleep(60)", str(tmp_path)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunFolderBusy, match=f"in use by another sweep \\(pid {holder.pid} on "):
            RunLock(tmp_path).acquire(["a2a-bench", "sweep"])
    finally:
        holder.kill()
        holder.wait()
    RunLock(tmp_path).acquire(["a2a-bench", "sweep"])  # its holder was killed: stale, taken over


def test_a_rank_whose_launcher_is_already_gone_kills_itself() -> None:
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    launcher = int(gone.stdout)  # a launcher that died before the rank asked for its parent-death signal
    proc = subprocess.run(
        [sys.executable, "-c", "import time; from a2a_bench.launch.lifeline import die_with_launcher; die_with_launcher(); "
         "time.sleep(30)"], env={**os.environ, LAUNCHER_PID_ENV: str(launcher), "RANK": "1"},
        capture_output=True, text=True, timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert f"a2a-bench: rank 1: its launcher (pid {launcher}) is gone; exiting" in proc.stderr
