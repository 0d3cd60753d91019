"""The DeepEP adapter: config rules (pure), and its code paths on 2 gloo ranks over a CPU fake of deep_ep.

The fake (``tests/fakes/deep_ep``) computes real results with the torch backend and enforces the real
library's contract; only the spawned ranks (and the CLI's processes) import it, so this process keeps
running without deep_ep.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

import deepep_workers
from a2a_bench.engine.results import read_results
from a2a_bench.engine.runner import skip_reason
from a2a_bench.engine.spec import Point
from a2a_bench.engine.workload import WorkloadSpec
from fused_a2a.backends import BACKENDS
from fused_a2a.backends.chunk_config import ChunkConfig, rank_problem
from fused_a2a.backends.deepep import DEFAULT_COMBINE, DEFAULT_DISPATCH, configs, invalid_knobs, make_deepep_comm
from fused_a2a.tuning.table import SCHEMA, TuningEntry, TuningTable, write_table
from ranks import spawn

FAKE_CLUSTER = "fake-deepep-x2"


@pytest.mark.parametrize(
    "config, num_ranks, problem",
    [
        (ChunkConfig(num_sms=21), 2, "num_sms must be even"),
        (ChunkConfig(num_sms=0), 2, "num_sms must be positive, got 0"),
        (ChunkConfig(nvl_send=0), 2, "nvl_send must be positive, got 0"),
        (ChunkConfig(nvl_send=256, nvl_recv=256), 2, r"nvl_send \(256\) must be smaller than nvl_recv \(256\)"),
        (ChunkConfig(nvl_send=300), 8, r"nvl_send \(300\) must be smaller than nvl_recv \(256\)"),
        (ChunkConfig(rdma_send=128, rdma_recv=128), 2, r"rdma_send \(128\) must be at most half of rdma_recv rounded up .* \(128\)"),
        (ChunkConfig(rdma_send=200, rdma_recv=128), 16, r"rdma_send \(200\) must be at most half .* \(200\)"),
        (ChunkConfig(), 3, "DeepEP's intranode kernels run on 2, 4 or 8 ranks, not 3"),
        (ChunkConfig(), 1, "run on 2, 4 or 8 ranks, not 1"),
        (ChunkConfig(), 12, "12 ranks is not a multiple of 8"),
        (ChunkConfig(), 168, "at most 160 ranks"),
    ],
)
def test_config_problems_follow_deep_eps_asserts(config: ChunkConfig, num_ranks: int, problem: str) -> None:
    found = config.problems(num_ranks)
    assert found is not None and re.search(problem, found), found


@pytest.mark.parametrize(
    "config, num_ranks",
    [
        (ChunkConfig(), 2),
        (ChunkConfig(num_sms=64, nvl_send=32, nvl_recv=512), 8),
        (ChunkConfig(rdma_send=100, rdma_recv=128), 16),  # 128 rounds up to 200: 100 is half of it
        (ChunkConfig(num_sms=24, nvl_send=36, nvl_recv=288, rdma_send=20, rdma_recv=128), 16),
    ],
)
def test_valid_configs_have_no_problem(config: ChunkConfig, num_ranks: int) -> None:
    assert config.problems(num_ranks) is None


def test_internode_combine_rules() -> None:
    config = ChunkConfig(nvl_send=40, nvl_recv=288)  # 16 ranks: 2 RDMA ranks, 288 / 2 = 144
    assert config.problems(16, combine=True) is None
    assert "nvl_recv (287) must be a multiple of the 2 RDMA ranks" in replace(config, nvl_recv=287).problems(16, combine=True)
    assert "nvl_send (150) must be at most nvl_recv / RDMA ranks (144)" in replace(config, nvl_send=150).problems(16, combine=True)
    assert replace(config, nvl_send=150).problems(16) is None  # dispatch has no such rule


def defaults(num_sms: int = 20) -> dict:
    return {**BACKENDS["deepep"].defaults(), "num_sms": num_sms}


def test_default_configs_are_deep_eps_tables() -> None:
    dispatch, combine = configs(defaults(24), defaults(24), 2)
    assert dispatch == ChunkConfig(24, 24, 256, 6, 128) and combine == ChunkConfig(24, 10, 256, 6, 128)
    assert configs(defaults(), defaults(), 8)[1] == ChunkConfig(20, 4, 256, 6, 128)
    assert set(DEFAULT_DISPATCH) == set(DEFAULT_COMBINE)
    for num_ranks in DEFAULT_DISPATCH:
        dispatch, combine = configs(defaults(), defaults(), num_ranks)
        assert dispatch.problems(num_ranks) is None and combine.problems(num_ranks, combine=True) is None
    with pytest.raises(ValueError, match="DeepEP has no default dispatch config for 40 ranks"):
        configs(defaults(), defaults(), 40)


def test_invalid_knobs_resolve_zero_per_operation() -> None:
    assert invalid_knobs({}, 2) is None
    assert invalid_knobs({"num_sms": 64, "nvl_send": 24, "nvl_recv": 512}, 8) is None
    # nvl_send 16 stays below both defaults' nvl_recv (256); 256 does not
    assert invalid_knobs({"nvl_send": 16}, 2) is None
    assert invalid_knobs({"nvl_send": 256}, 2) == "dispatch config: nvl_send (256) must be smaller than nvl_recv (256)"
    # the default nvl_send of 2-rank dispatch (24) is not below nvl_recv 16; combine's (10) is
    assert invalid_knobs({"nvl_recv": 16}, 2) == "dispatch config: nvl_send (24) must be smaller than nvl_recv (16)"
    assert invalid_knobs({"nvl_recv": 16}, 8) is None  # 8 ranks: defaults 6 and 4
    assert invalid_knobs({}, 3) == "DeepEP's intranode kernels run on 2, 4 or 8 ranks, not 3"
    assert invalid_knobs({}, 40) == "DeepEP has no default dispatch config for 40 ranks (it has 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 144, 160); give nvl_send, nvl_recv, rdma_send, rdma_recv"
    assert invalid_knobs({"nvl_send": 8, "nvl_recv": 280, "rdma_send": 8, "rdma_recv": 128}, 40) is None  # 280 / 5 RDMA ranks
    assert "multiple of the 5 RDMA ranks" in invalid_knobs({"nvl_send": 8, "nvl_recv": 256, "rdma_send": 8, "rdma_recv": 128}, 40)
    assert invalid_knobs({"num_sms": 7}, 2).startswith("num_sms must be an even int >= 2")


def test_rank_problem() -> None:
    assert [n for n in range(1, 65) if rank_problem(n) is None] == [2, 4, 8, 16, 24, 32, 40, 48, 56, 64]


def test_make_comm_rejects_different_sms_before_needing_deep_ep() -> None:
    knobs = BACKENDS["deepep"].defaults()
    with pytest.raises(ValueError, match=r"deepep: dispatch and combine must use the same num_sms .* got 20 and 24"):
        make_deepep_comm(knobs, {**knobs, "num_sms": 24}, 2)
    with pytest.raises(ValueError, match="deepep: combine config: nvl_send"):
        make_deepep_comm(knobs, {**knobs, "nvl_send": 400}, 2)


def test_knobs_and_their_checks() -> None:
    spec = BACKENDS["deepep"]
    assert [k.name for k in spec.knobs] == ["num_sms", "nvl_send", "nvl_recv", "rdma_send", "rdma_recv"]
    assert spec.defaults() == {"num_sms": 20, "nvl_send": 0, "nvl_recv": 0, "rdma_send": 0, "rdma_recv": 0}
    assert spec.knob("num_sms").check(3) and spec.knob("num_sms").check(0) and spec.knob("num_sms").check(True)
    assert spec.knob("num_sms").check(24) is None
    assert spec.knob("nvl_send").check(-1) and spec.knob("nvl_send").check(0) is None
    assert spec.knob("nvl_recv").parse("512") == 512
    for knob in spec.knobs:
        assert all(knob.check(value) is None for value in knob.choices)


def test_sweep_skips_an_invalid_point_with_the_reason(monkeypatch) -> None:
    monkeypatch.setitem(BACKENDS, "deepep", replace(BACKENDS["deepep"], unavailable=lambda: None))
    workload = WorkloadSpec(num_tokens=64, hidden=256, topk=2, num_experts=8)
    knobs = {**BACKENDS["deepep"].defaults(), "nvl_send": 300}
    point = Point("deepep", tuple(knobs.items()), workload, 2)
    assert skip_reason(point) == "dispatch config: nvl_send (300) must be smaller than nvl_recv (256)"
    assert skip_reason(replace(point, world_size=6)) == "DeepEP's intranode kernels run on 2, 4 or 8 ranks, not 6"
    assert skip_reason(replace(point, knobs=tuple(BACKENDS["deepep"].defaults().items()))) is None


@pytest.mark.skipif(BACKENDS["deepep"].unavailable() is None, reason="deep_ep is installed here")
def test_sweep_says_deepep_is_not_installed() -> None:
    point = Point("deepep", tuple(BACKENDS["deepep"].defaults().items()), WorkloadSpec(64, 256, 2, 8), 2)
    assert skip_reason(point).startswith("deepep is not installed (ModuleNotFoundError")


@pytest.mark.parametrize("world_size", [2, 4])
def test_seed_and_backend_neutral_calls_match_the_reference(world_size: int) -> None:
    spawn(deepep_workers.reference_cases, world_size, sys_path=deepep_workers.FAKES)


def test_buffer_sizing_reuse_reallocation_and_free() -> None:
    spawn(deepep_workers.buffer_lifecycle, 2, sys_path=deepep_workers.FAKES)


def test_num_sms_precedence_and_seed_combine_follows_its_handle(tmp_path: Path) -> None:
    knobs = {"num_sms": 16, "nvl_send": 8, "nvl_recv": 128, "rdma_send": 0, "rdma_recv": 0}
    entry = TuningEntry(
        backend="deepep", world_size=2, dtype="bf16", hidden=32, num_tokens=64, topk=2, num_experts=8,
        dispatch=knobs, combine=knobs, measured={"dispatch_us": 10.0, "combine_us": 10.0}, frontier=(),
    )
    rejected = {**knobs, "nvl_send": 300}  # each knob acceptable alone; together DeepEP's Config refuses them
    wide = replace(entry, hidden=64, dispatch=rejected, combine=rejected)
    write_table(tmp_path / FAKE_CLUSTER / "tuning.json",
                TuningTable(SCHEMA, {"id": FAKE_CLUSTER}, "2026-01-01T00:00:00Z", "0.1.0", (entry, wide)))
    spawn(deepep_workers.knob_precedence, 2, str(tmp_path), FAKE_CLUSTER, sys_path=deepep_workers.FAKES)


def test_exit_hook() -> None:
    spawn(deepep_workers.exit_hook, 2, sys_path=deepep_workers.FAKES)


def test_comm_and_the_fakes_contract() -> None:
    spawn(deepep_workers.comm_and_fake_contract, 2, sys_path=deepep_workers.FAKES)


def test_cli_sweep_records_skips_and_destroys_buffers_before_the_process_group(tmp_path: Path) -> None:
    events = tmp_path / "events.log"
    out = tmp_path / "run"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([*deepep_workers.FAKES, os.environ.get("PYTHONPATH", "")]),
        "FAKE_DEEP_EP_EVENTS": str(events),
        "COLUMNS": "200",
    }
    args = ["sweep", "--nproc", "2", "--out", str(out), "--backends", "deepep", "--hidden", "64", "--tokens", "32",
            "--topk", "2", "--experts", "8", "--knob", "deepep.nvl_send=8,300", "--warmup", "1", "--iters", "2"]
    proc = subprocess.run([sys.executable, "-m", "a2a_bench", *args], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]

    results = read_results(out / "results.csv").sort_values("knobs")
    assert list(results["status"]) == ["skipped: dispatch config: nvl_send (300) must be smaller than nvl_recv (256)", "ok"]
    assert list(results["verified"]) == [False, True]
    # every buffer a rank created was destroyed (the fake refuses to destroy after destroy_process_group)
    lives: dict[str, list[str]] = {}
    for line in events.read_text().splitlines():
        pid, event, buffer = line.split()
        lives.setdefault(pid, []).append(event)
    assert len(lives) == 2
    for life in lives.values():
        assert life[0] == "create" and life.count("create") == life.count("destroy") and life[-1] == "destroy"
