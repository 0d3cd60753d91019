"""Sweeps that survive raising, hanging and dying points; interrupts; rejected table entries (kills of the
whole job: test_launcher.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

import fused_a2a
from a2a_bench.engine.results import read_results
from fused_a2a import tuning
from fused_a2a.tuning.resolve import TuningWarning
from ranks import spawn

TESTS = Path(__file__).parent
FAULT_ENV = {"PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
             "A2A_BENCH_BACKENDS": "faulty_backend", "COLUMNS": "200"}
SMALL = ["--hidden", "128", "--tokens", "32", "--topk", "2", "--experts", "8", "--warmup", "1", "--iters", "2"]


def sweep_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "a2a_bench", "sweep", *args]


def test_raising_hanging_dying_and_invalid_points_each_get_their_status(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = subprocess.run(
        sweep_cmd("--nproc", "2", "--max-restarts", "4", "--backends", "faulty", "--point-timeout", "5",
                  "--knob", "faulty.fault=none,raise,hang_rank1,kill_rank1,invalid", "--out", str(out), *SMALL),
        env={**os.environ, **FAULT_ENV}, capture_output=True, text=True, timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = read_results(out / "results.csv")
    status = {json.loads(k)["fault"]: s for k, s in zip(results["knobs"], results["status"])}
    assert status == {
        "none": "ok",
        "raise": "error: RuntimeError: injected failure",
        "hang_rank1": "timeout: compile exceeded 5 s",
        "kill_rank1": "error: a rank died during compile in 2 attempts",
        "invalid": "skipped: injected invalid combination",
    }
    assert results["point_id"].is_unique
    assert not (out / "in_flight.json").exists()


def test_ctrl_c_frees_buffers_before_destroying_the_process_group(tmp_path: Path) -> None:
    out = tmp_path / "run"
    job = subprocess.Popen(
        sweep_cmd("--backends", "faulty", "--knob", "faulty.fault=hang", "--out", str(out), *SMALL),
        env={**os.environ, **FAULT_ENV}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    marker = out / "in_flight.json"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (marker.exists() and '"compile"' in marker.read_text()):
        time.sleep(0.05)
    time.sleep(0.5)
    job.send_signal(signal.SIGINT)
    _, err = job.communicate(timeout=60)
    assert job.returncode == 130, err
    lines = [line[line.index("a2a-bench:"):] for line in err.splitlines() if "a2a-bench:" in line]
    teardown = [line for line in lines if "buffers freed" in line or "process group destroyed" in line]
    assert teardown == ["a2a-bench: buffers freed; destroying the process group", "a2a-bench: process group destroyed"]


def test_a_table_entry_the_backend_rejects_falls_back_to_defaults(tmp_path: Path) -> None:
    cluster = tmp_path / "cpu-gloo-x1"
    cluster.mkdir()
    entry = {"backend": "faulty", "world_size": 1, "dtype": "fp32", "hidden": 16, "num_tokens": 8, "topk": 2,
             "num_experts": 4, "dispatch": {"fault": "invalid"}, "combine": {"fault": "invalid"},
             "measured": {"dispatch_us": 1.0, "combine_us": 1.0}, "frontier": []}
    (cluster / "tuning.json").write_text(json.dumps({
        "schema": "a2a-bench/tuning/v1", "cluster": {"id": "cpu-gloo-x1"}, "created": "2026-11-24T00:00:00Z",
        "tool_version": "0.1.0", "entries": [entry]}))
    spawn(_rejected_entry_worker, 1, str(tmp_path))


def _rejected_entry_worker(rank: int, world_size: int, tables: str) -> None:
    import faulty_backend  # noqa: F401  registers the backend in this process

    os.environ["FUSED_A2A_TUNING_DIR"] = tables
    tuning.clear()
    x, idx, weights = torch.randn(8, 16), torch.randint(0, 4, (8, 2)), torch.rand(8, 2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        handle = fused_a2a.dispatch(x, idx, weights, 4, backend="faulty")[4]
    assert [str(w.message) for w in caught if issubclass(w.category, TuningWarning)] != []
    assert "rejects fault=invalid" in str(caught[-1].message)
    assert isinstance(handle.raw, fused_a2a.TorchHandle)
    with pytest.raises(ValueError, match="rejects fault=invalid"):
        fused_a2a.dispatch(x, idx, weights, 4, backend="faulty", fault="invalid")
