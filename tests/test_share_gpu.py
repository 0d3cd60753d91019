"""Ranks that share a GPU (``--share-gpu mps|timeslice``): the MPS control daemon a run starts, uses,
stops (also when its launcher is interrupted or killed), refuses without, and the cluster id, run
description and result columns that record it; the library's table lookup in a job that shares GPUs.

The CPU has no GPU and no MPS: the a2a-bench processes pretend one GPU and find a fake
``nvidia-cuda-mps-control`` (:mod:`mps_fakes`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import fused_a2a.cluster
from a2a_bench.engine import sharing
from a2a_bench.engine.mps_guard import OWNER_LOCK, RECORD
from a2a_bench.engine.results import read_results
from cli_runs import assert_one_line_error, run_child, run_cli
from fused_a2a import mps
from mps_fakes import FAKE_CONTROL, FakeMps, alive, fake_mps  # noqa: F401 (a fixture)
from test_launcher import HOLD_GRID, children, data_rows, wait_for

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from /proc")

GRID = ["--backends", "torch", "--hidden", "64", "--tokens", "16", "--topk", "2", "--experts", "4", "--warmup", "1",
        "--iters", "2"]


def sweep(fake: FakeMps, out: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return run_child("sweep", "--nproc", "2", "--out", str(out), *GRID, *args, env={**fake.env, **(env or {})})


def test_a_sweep_whose_ranks_share_a_gpu_runs_under_a_daemon_it_starts_and_stops(fake_mps, tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = sweep(fake_mps, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (start_pipe, started), = [(c[1], int(c[2])) for c in fake_mps.calls() if c[0] == "start"]
    assert fake_mps.daemons("quit") == [started] and not alive(started)
    assert "a2a-bench: 2 ranks share 1 GPU (2 per GPU): under MPS, with a control daemon started for this run " \
           f"(pid {started}, pipe folder {start_pipe}; stopped at its end)" in proc.stderr
    assert start_pipe.startswith(str(fake_mps.tmp)) and fake_mps.leftovers() == []
    cluster = json.loads((out / "run.json").read_text())["cluster"]
    assert cluster["id"] == "h200-x1-mps2" and (cluster["ranks_per_gpu"], cluster["gpu_sharing"]) == (2, "mps")
    rows = read_results(out / "results.csv")
    assert list(rows["cluster"]) == ["h200-x1-mps2"] and list(rows["gpu_sharing"]) == ["mps"]
    assert list(rows["ranks_per_gpu"]) == [2] and list(rows["comparable"]) == [True]
    # the table it tunes is this sharing's own: never served to a cluster of two GPUs
    tables = tmp_path / "tables"
    tuned = run_child("tune", str(out), "--out", str(tables))
    assert tuned.returncode == 0, tuned.stderr
    table = json.loads((tables / "h200-x1-mps2" / "tuning.json").read_text())
    assert table["cluster"]["gpu_sharing"] == "mps" and table["cluster"]["ranks_per_gpu"] == 2


def test_a_benchmark_runs_under_mps_too_with_the_folders_the_user_names(fake_mps, tmp_path: Path) -> None:
    pipe, logs = tmp_path / "my-pipe", tmp_path / "my-log"
    proc = run_child("breakdown", "--nproc", "2", "--hidden", "64", "--tokens", "16", "--topk", "2", "--experts", "4",
                     "--warmup", "1", "--iters", "2",
                     env={**fake_mps.env, mps.PIPE_DIR_ENV: str(pipe), mps.LOG_DIR_ENV: str(logs)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "bf16 h64 n16 k2 e4" in proc.stdout
    (start,), (stop,) = ([c for c in fake_mps.calls() if c[0] == verb] for verb in ("start", "quit"))
    assert start[1] == stop[1] == str(pipe) and start[2] == stop[2] and not alive(int(start[2]))
    assert pipe.is_dir() and logs.is_dir() and fake_mps.leftovers() == []  # the user's folders stay


def test_a_running_daemon_is_used_and_left_running(fake_mps, tmp_path: Path) -> None:
    pipe = tmp_path / "user-pipe"
    daemon = fake_mps.start_daemon(pipe)
    proc = sweep(fake_mps, tmp_path / "run", env=fake_mps.env_for(pipe))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"under MPS, with the control daemon already running (pid {daemon}, pipe folder {pipe}; left running)" \
           in proc.stderr
    assert fake_mps.calls() == [["start", str(pipe), str(daemon)]]  # not started again, never told to quit
    assert alive(daemon) and mps.daemon_pid(pipe) == daemon
    assert json.loads((tmp_path / "run" / "run.json").read_text())["cluster"]["id"] == "h200-x1-mps2"


@pytest.mark.parametrize("fault, message", [
    ("start", "which needs MPS, but {control} -d exited with status 1: Failed to start the MPS control daemon "
              "(injected)"),
    ("missing", "which needs MPS, but nvidia-cuda-mps-control (it comes with the NVIDIA driver) is not on PATH"),
])
def test_mps_that_cannot_start_is_one_line_and_exit_2_before_any_rank(fake_mps, tmp_path: Path, fault, message) -> None:
    out = tmp_path / "run"
    env = {"FAKE_MPS_FAIL": "start"} if fault == "start" else {"PATH": os.environ["PATH"]}
    proc = sweep(fake_mps, out, env=env)
    control = FAKE_CONTROL / sharing.CONTROL
    assert_one_line_error(proc.returncode, proc.stderr, "2 ranks share 1 GPU (2 per GPU), " + message.format(control=control))
    assert not (out / "results.csv").exists() and not (out / "run.json").exists()
    assert fake_mps.leftovers() == [] and fake_mps.daemons() == []


def test_a_daemon_that_never_comes_up_is_an_error_and_nothing_is_left(fake_mps, monkeypatch) -> None:
    for name, value in fake_mps.env.items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        elif name != "A2A_BENCH_BACKENDS":
            monkeypatch.setenv(name, value)
    monkeypatch.setenv("FAKE_MPS_FAIL", "silent")
    monkeypatch.setattr(sharing.tempfile, "tempdir", None)  # read $TMPDIR again
    monkeypatch.setattr(sharing, "START_TIMEOUT_S", 0.3)
    with pytest.raises(sharing.MpsError, match="no MPS control daemon runs 0.3 s after .* -d \\(no live pid in "):
        with sharing.launcher_sharing(2, None, gpus=1):
            raise AssertionError("the body must not run")
    assert [c[0] for c in fake_mps.calls()] == ["silent"] and fake_mps.leftovers() == []


def test_time_sliced_rows_are_marked_and_tune_refuses_them(fake_mps, tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = sweep(fake_mps, out, "--share-gpu", "timeslice")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert fake_mps.calls() == []
    assert "2 ranks share 1 GPU (2 per GPU), time-sliced (--share-gpu timeslice): every timing is marked not " \
           "comparable" in proc.stderr
    assert "warning: 2 ranks time-sliced each GPU (--share-gpu timeslice): every time of this run is time-sliced: " \
           "not comparable (results column comparable=False); tune refuses it" in proc.stderr
    rows = read_results(out / "results.csv")
    assert list(rows["cluster"]) == ["h200-x1-ts2"] and list(rows["comparable"]) == [False]
    assert list(rows["gpu_sharing"]) == ["timeslice"]
    tuned = run_child("tune", str(out), "--out", str(tmp_path / "tables"))
    assert_one_line_error(tuned.returncode, tuned.stderr, "1 of 1 rows were timed with ranks time-slicing a GPU "
                                                          "(--share-gpu timeslice): their times are not comparable")
    assert not (tmp_path / "tables").exists()


def test_plain_torchrun_needs_a_daemon_started_before_it(fake_mps, tmp_path: Path) -> None:
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
                "-m", "a2a_bench", "sweep", *GRID]
    env = {k: v for k, v in {**os.environ, **fake_mps.env}.items() if v is not None}
    proc = subprocess.run([*torchrun, "--out", str(tmp_path / "refused")], capture_output=True, text=True,
                          timeout=300, env={**env, mps.PIPE_DIR_ENV: str(tmp_path / "none")})
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("a2a-bench: error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "2 ranks share 1 GPU (2 per GPU) and no MPS control daemon serves them" in errors[0]
    assert "nvidia-cuda-mps-control -d" in errors[0] and "a2a-bench --nproc 2" in errors[0]
    assert fake_mps.calls() == [] and not (tmp_path / "refused" / "results.csv").exists()

    pipe = tmp_path / "pipe"
    daemon = fake_mps.start_daemon(pipe)
    proc = subprocess.run([*torchrun, "--out", str(tmp_path / "run")], capture_output=True, text=True, timeout=300,
                          env={**env, **fake_mps.env_for(pipe)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"2 ranks share 1 GPU (2 per GPU): under MPS (control daemon pid {daemon}, pipe folder {pipe})" in proc.stderr
    assert alive(daemon) and len(fake_mps.calls()) == 1
    assert read_results(tmp_path / "run" / "results.csv")["cluster"].tolist() == ["h200-x1-mps2"]


def held_sweep(fake: FakeMps, tmp_path: Path) -> tuple[subprocess.Popen, list[int], int]:
    """A sweep launched with ``--nproc 2`` whose ranks wait in a held point: (launcher, ranks, daemon)."""
    out, hold = tmp_path / "run", tmp_path / "hold"
    hold.touch()
    env = {k: v for k, v in {**os.environ, **fake.env}.items() if v is not None}
    env.update(A2A_BENCH_BACKENDS="pretend_one_gpu,faulty_backend", FAULTY_HOLD_FILE=str(hold))
    log = (tmp_path / "launcher.log").open("w")
    job = subprocess.Popen([sys.executable, "-m", "a2a_bench", "sweep", "--nproc", "2", "--out", str(out), *HOLD_GRID],
                           stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    in_flight = out / "in_flight.json"
    wait_for(lambda: data_rows(out / "results.csv") == 1 and in_flight.exists() and '"compile"' in in_flight.read_text(),
             120, "the ranks to wait in the held point")
    ranks = [pid for pid in children(job.pid) if "a2a_bench" in Path(f"/proc/{pid}/cmdline").read_text()
             and "mps_guard" not in Path(f"/proc/{pid}/cmdline").read_text()]
    (daemon,) = fake.daemons()
    assert alive(daemon) and len(ranks) == 2
    return job, ranks, daemon


def guard_of(launcher: int) -> int:
    (guard,) = [pid for pid in children(launcher) if "a2a_bench.engine.mps_guard" in Path(f"/proc/{pid}/cmdline").read_text()]
    return guard


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=lambda s: signal.Signals(s).name)
def test_the_daemon_a_launcher_started_stops_when_the_launcher_is_stopped_or_killed(fake_mps, tmp_path: Path, sig) -> None:
    job, ranks, daemon = held_sweep(fake_mps, tmp_path)
    try:
        os.killpg(job.pid, sig)  # the launcher's process group (Ctrl-C in a shell): not the ranks', not the guard's
        job.wait(timeout=60)
        wait_for(lambda: not alive(daemon), 20, f"daemon {daemon} to stop")
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    assert fake_mps.daemons("quit") == [daemon]
    wait_for(lambda: not any(alive(r) for r in ranks), 10, "the ranks to die with their launcher")
    wait_for(lambda: fake_mps.leftovers() == [], 10, "the guard to remove the run's folder")


def test_a_daemon_left_by_a_launcher_and_guard_both_killed_is_stopped_by_the_next_run(fake_mps, tmp_path: Path) -> None:
    job, ranks, daemon = held_sweep(fake_mps, tmp_path)
    guard = guard_of(job.pid)
    os.kill(guard, signal.SIGKILL)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    wait_for(lambda: not alive(guard) and not any(alive(r) for r in ranks), 10, "launcher, guard and ranks to die")
    assert alive(daemon) and len(fake_mps.leftovers()) == 1  # nobody left to stop it
    proc = sweep(fake_mps, tmp_path / "next")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"a2a-bench: stopped the MPS control daemon (pid {daemon}, pipe folder " in proc.stderr
    assert f"left behind by a2a-bench pid {job.pid}" in proc.stderr
    assert not alive(daemon) and fake_mps.daemons("quit")[0] == daemon
    assert len(fake_mps.daemons()) == 2 and fake_mps.leftovers() == []  # the next run's own daemon came and went


def test_a_folder_whose_owner_lives_is_not_reaped(fake_mps, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TMPDIR", str(fake_mps.tmp))
    monkeypatch.setattr(sharing.tempfile, "tempdir", None)
    run_dir, lock = sharing._new_run_dir()
    (run_dir / RECORD).write_text(json.dumps({"control": "/bin/false", "pipe_dir": "p", "log_dir": "l"}))
    lock.close()  # handed to another live process below
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a'); "
                               "fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB); print('held', flush=True); "
                               "time.sleep(60)", str(run_dir / OWNER_LOCK)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert sharing.reap_abandoned() == [] and run_dir.exists()
    finally:
        holder.kill()
        holder.wait()
    assert [r["pipe_dir"] for r in sharing.reap_abandoned()] == ["p"] and not run_dir.exists()


@pytest.mark.parametrize("command", ["sweep", "speedup", "overhead", "breakdown"])
def test_a_bad_share_gpu_value_is_one_line_and_exit_2(monkeypatch, capsys, tmp_path: Path, command) -> None:
    extra = ["--out", str(tmp_path / "run")] if command == "sweep" else []
    code, _, err = run_cli(monkeypatch, capsys, command, "--share-gpu", "spatial", *extra)
    assert_one_line_error(code, err, "--share-gpu must be mps or timeslice, got 'spatial'")
    assert not (tmp_path / "run").exists()


def test_env_says_whether_mps_can_run_and_whether_a_daemon_serves(fake_mps, monkeypatch, capsys, tmp_path: Path) -> None:
    monkeypatch.setenv(mps.PIPE_DIR_ENV, str(tmp_path / "pipe"))
    monkeypatch.setenv("PATH", os.environ["PATH"].replace(str(FAKE_CONTROL) + os.pathsep, ""))
    code, out, _ = run_cli(monkeypatch, capsys, "env")
    assert code == 0 and "MPS: not available (nvidia-cuda-mps-control is not on PATH)" in out
    monkeypatch.setenv("PATH", fake_mps.env["PATH"])
    code, out, _ = run_cli(monkeypatch, capsys, "env")
    assert code == 0 and f"MPS: available ({FAKE_CONTROL / sharing.CONTROL}), no control daemon running for pipe " \
                         f"folder {tmp_path / 'pipe'}" in out
    daemon = fake_mps.start_daemon(tmp_path / "pipe")
    code, out, _ = run_cli(monkeypatch, capsys, "env", "--json")
    assert code == 0 and json.loads(out)["mps"] == {"control": str(FAKE_CONTROL / sharing.CONTROL),
                                                    "pipe_dir": str(tmp_path / "pipe"), "daemon_pid": daemon}


def test_plan_and_the_ranks_check(monkeypatch, tmp_path: Path) -> None:
    assert sharing.plan(2, 2, None) is None and sharing.plan(2, 0, "mps") is None
    assert sharing.plan(3, 2, None) == sharing.Sharing(3, 2, "mps") and sharing.Sharing(3, 2, "mps").ranks_per_gpu == 2
    assert sharing.plan(2, 1, "timeslice").describe() == "2 ranks share 1 GPU (2 per GPU)"
    monkeypatch.setattr(fused_a2a.cluster, "_cuda_device", lambda: ("NVIDIA H200", 1))
    monkeypatch.setenv(mps.PIPE_DIR_ENV, str(tmp_path))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert sharing.check_rank("mps") is None  # one rank per GPU: nothing to share
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(sharing.MpsError, match="no MPS control daemon serves them"):
        sharing.check_rank(None)
    assert sharing.check_rank("timeslice", rank=1) == sharing.Sharing(2, 1, "timeslice")


def test_timeslice_is_refused_where_a_daemon_serves_the_ranks(fake_mps, monkeypatch, tmp_path: Path) -> None:
    pipe = tmp_path / "pipe"
    daemon = fake_mps.start_daemon(pipe)
    monkeypatch.setattr(fused_a2a.cluster, "_cuda_device", lambda: ("NVIDIA H200", 1))
    monkeypatch.setenv(mps.PIPE_DIR_ENV, str(pipe))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(sharing.MpsError, match=f"^--share-gpu timeslice, but the MPS control daemon pid {daemon} "
                                               f"\\(pipe folder {pipe}\\) serves these ranks, so they would run under MPS"):
        sharing.check_rank("timeslice")
    assert sharing.check_rank("mps", rank=1) == sharing.Sharing(2, 1, "mps")


def test_the_library_finds_a_shared_gpu_table_only_in_a_job_that_shares_the_gpu_alike(monkeypatch, tmp_path: Path) -> None:
    from fused_a2a.shape import CallShape
    from fused_a2a import tuning
    from fused_a2a.tuning.resolve import resolve

    tables = tmp_path / "tables" / "h200-x1-mps2"
    tables.mkdir(parents=True)
    (tables / "tuning.json").write_text(json.dumps({
        "schema": "a2a-bench/tuning/v1", "cluster": {"id": "h200-x1-mps2", "ranks_per_gpu": 2, "gpu_sharing": "mps"},
        "created": "2026-12-04T00:00:00Z", "tool_version": "0.1.0",
        "entries": [{"backend": "torch", "world_size": 2, "dtype": "bf16", "hidden": 7168, "num_tokens": 4096, "topk": 8,
                     "num_experts": 64, "dispatch": {"impl": "p2p"}, "combine": {"impl": "p2p"},
                     "measured": {"dispatch_us": 1.0, "combine_us": 1.0}, "frontier": []}]}))
    monkeypatch.setenv("FUSED_A2A_TUNING_DIR", str(tmp_path / "tables"))
    monkeypatch.delenv("FUSED_A2A_CLUSTER_ID", raising=False)
    pipe = tmp_path / "pipe"
    pipe.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        def source(gpus: int, local_ranks: int, daemon: bool) -> str:
            monkeypatch.setattr(fused_a2a.cluster, "_cuda_device", lambda: ("NVIDIA H200", gpus))
            monkeypatch.setattr(fused_a2a.cluster, "_nvidia_smi_link", lambda: "NV18" if gpus > 1 else None)
            monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_ranks))
            monkeypatch.setenv(mps.PIPE_DIR_ENV, str(pipe if daemon else tmp_path / "no-daemon"))
            (pipe / mps.PID_FILE).write_text(str(sleeper.pid))
            tuning.clear()
            return resolve("torch", CallShape("bf16", 7168, topk=8, num_experts=64, world_size=2, tokens=(4096,)), {}).sources["impl"]

        assert source(gpus=1, local_ranks=2, daemon=True) == "table"  # 2 ranks on one H200 under MPS: its table
        assert source(gpus=1, local_ranks=2, daemon=False) == "default"  # time-sliced: h200-x1-ts2, no table
        assert source(gpus=2, local_ranks=2, daemon=True) == "default"  # two GPUs: h200-x2-nv18, never the MPS table
    finally:
        sleeper.kill()
        sleeper.wait()
        tuning.clear()
