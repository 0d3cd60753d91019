"""The speedup benchmark: the ratio's bootstrap interval decides between a ratio and "no measurable
difference"; the default round trip forces every knob to its default; --from-table runs each entry of the
cluster's table through fused_a2a and the seed functions with the table found at run time."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from a2a_bench.bench.speedup import Ratio, default_variables, parse_paths, ratio_interval, variables, verdict
from a2a_bench.engine.spec import SpecError
from cli_runs import assert_one_line_error, run_child, run_cli
from fused_a2a import tuning
from fused_a2a.tuning.resolve import resolve
from fused_a2a.shape import CallShape
from mps_fakes import fake_mps  # noqa: F401 (a fixture)


def test_identical_configs_read_same_config() -> None:
    assert verdict(None) == "same config"


def test_an_interval_that_holds_one_reads_no_measurable_difference() -> None:
    tuned = [100.0, 104.0, 97.0, 101.0, 99.0, 103.0, 98.0, 102.0]
    default = [101.0, 98.0, 103.0, 99.0, 102.0, 97.0, 104.0, 100.0]  # the same times, another order
    ratio = ratio_interval(tuned, default)
    assert ratio.low < 1.0 < ratio.high
    assert verdict(ratio).startswith("no measurable difference (")


def test_a_clear_gap_reads_as_the_ratio_with_its_interval() -> None:
    tuned = [50.0, 52.0, 49.0, 51.0, 50.5, 49.5, 51.5, 50.0]
    default = [100.0, 104.0, 97.0, 101.0, 99.0, 103.0, 98.0, 102.0]
    ratio = ratio_interval(tuned, default)
    assert 1.9 < ratio.low <= ratio.value <= ratio.high < 2.1
    assert verdict(ratio) == f"{ratio.value:.2f}x ({ratio.low:.2f}–{ratio.high:.2f})"
    assert ratio_interval(tuned, default) == ratio  # seeded: every rank computes the same


def test_the_interval_needs_pairs_of_blocks() -> None:
    with pytest.raises(ValueError, match="two pairs"):
        ratio_interval([1.0], [1.0])
    assert Ratio(1.0, 0.9, 1.1).includes_one and not Ratio(1.5, 1.2, 1.8).includes_one


FAKES = str(Path(__file__).parent / "fakes")
VERDICT = re.compile(r"^(same config|no measurable difference \(\d+\.\d\d–\d+\.\d\d\)|\d+\.\d\dx \(\d+\.\d\d–\d+\.\d\d\))$")


def test_the_default_round_trip_forces_every_knob_to_its_default(monkeypatch) -> None:
    monkeypatch.setenv("FUSED_A2A_DEEPEP_NUM_SMS", "48")  # a job's own override: back after the default blocks
    forced = default_variables("deepep")
    assert forced == {"FUSED_A2A_DEEPEP_NUM_SMS": "20", "FUSED_A2A_DEEPEP_NVL_SEND": "0", "FUSED_A2A_DEEPEP_NVL_RECV": "0",
                      "FUSED_A2A_DEEPEP_RDMA_SEND": "0", "FUSED_A2A_DEEPEP_RDMA_RECV": "0"}
    tuning.clear()
    with variables(forced):
        res = resolve("deepep", CallShape("bf16", 7168, world_size=2, tokens=(4096,)), {})
    assert set(res.sources.values()) == {"environment"} and res.dispatch == res.combine == {
        "num_sms": 20, "nvl_send": 0, "nvl_recv": 0, "rdma_send": 0, "rdma_recv": 0}
    assert os.environ["FUSED_A2A_DEEPEP_NUM_SMS"] == "48" and "FUSED_A2A_DEEPEP_NVL_SEND" not in os.environ
    assert default_variables("hybridep")["FUSED_A2A_HYBRIDEP_FUSED"] == "False"
    tuning.clear()


def test_bad_paths_are_one_line_and_exit_2(monkeypatch, capsys) -> None:
    assert parse_paths("seed,api,seed") == ("seed", "api")
    for text in ("", "kernel", "api,graph"):
        with pytest.raises(SpecError, match="--path takes a comma list of api, seed"):
            parse_paths(text)
    code, _, err = run_cli(monkeypatch, capsys, "speedup", "--path", "kernel")
    assert_one_line_error(code, err, "--path takes a comma list of api, seed, got 'kernel'")


def test_from_table_runs_every_entry_through_fused_a2a_and_the_seed_functions(fake_mps, tmp_path: Path) -> None:
    env = {**fake_mps.env, "PYTHONPATH": os.pathsep.join([FAKES, fake_mps.env["PYTHONPATH"]])}
    grid = ["--backends", "deepep", "--sms", "8,20", "--hidden", "64", "--tokens", "16", "--topk", "2", "--experts", "4",
            "--routing", "uniform,zipf:1.2", "--warmup", "1", "--iters", "2"]
    swept = run_child("sweep", "--nproc", "2", "--out", str(tmp_path / "run"), *grid, env=env)
    assert swept.returncode == 0, swept.stderr[-3000:]
    tuned = run_child("tune", str(tmp_path / "run"), "--out", str(tmp_path / "tables"))
    assert tuned.returncode == 0, tuned.stderr
    entries = json.loads((tmp_path / "tables" / "h200-x1-mps2" / "tuning.json").read_text())["entries"]
    assert {e["routing"] for e in entries} == {"uniform", "zipf:1.2"}

    proc = run_child("speedup", "--nproc", "2", "--from-table", "--path", "api,seed", "--warmup", "1", "--iters", "2",
                     "--blocks", "2", env={**env, "FUSED_A2A_TUNING_DIR": str(tmp_path / "tables")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [[cell.strip() for cell in line.strip("│ ").split("│")] for line in proc.stdout.splitlines()
            if line.startswith("│ deepep")]
    assert sorted((r[1], r[2]) for r in rows) == sorted(
        (path, f"bf16 h64 n16 k2 e4 {routing}") for path in ("api", "seed") for routing in ("uniform", "zipf:1.2"))
    for backend, path, shape, knobs, source, tuned_us, default_us, verdict in rows:
        assert source == "table", rows  # the ranks (2 on the one GPU, under MPS) found the h200-x1-mps2 table
        assert VERDICT.match(verdict), verdict
        assert (default_us == "= tuned") == (verdict == "same config")
    started = fake_mps.daemons()
    assert len(started) == 2 and fake_mps.daemons("quit") == started  # the sweep's and the speedup's


def test_from_table_without_a_table_or_an_entry_left_is_a_user_error(monkeypatch, tmp_path: Path) -> None:
    from a2a_bench.bench.speedup import table_cases

    monkeypatch.setenv("FUSED_A2A_TUNING_DIR", str(tmp_path))
    monkeypatch.setenv("FUSED_A2A_CLUSTER_ID", "lab-x2")
    tuning.clear()
    with pytest.raises(SpecError, match="^--from-table: no tuning table of cluster lab-x2 \\(a2a-bench tune writes one\\)$"):
        table_cases(2)
    (tmp_path / "lab-x2").mkdir()
    (tmp_path / "lab-x2" / "tuning.json").write_text(json.dumps({
        "schema": "a2a-bench/tuning/v1", "cluster": {"id": "lab-x2"}, "created": "2026-12-04T00:00:00Z",
        "tool_version": "0.1.0", "entries": [
            {"backend": "torch", "world_size": 2, "dtype": dtype, "hidden": 64, "num_tokens": 16, "topk": 2,
             "num_experts": 4, "routing": routing, "dispatch": {"impl": "p2p"}, "combine": {"impl": "p2p"},
             "measured": {}, "frontier": []}
            for dtype, routing in (("bf16", "uniform"), ("bf16", "zipf:1.2"), ("fp8", "uniform"))]}))
    tuning.clear()
    cases = table_cases(2)
    assert [(b, w.dtype, w.routing, w.skew) for b, w in cases] == [("torch", "bf16", "uniform", 1.0),
                                                                    ("torch", "bf16", "zipf", 1.2)]  # no fp8
    assert [w.routing for _, w in table_cases(2, routings=("zipf:1.2",))] == ["zipf"]
    for filters in ({"hidden": (128,)}, {"backends": ("deepep",)}, {"tokens": (32,)}):
        with pytest.raises(SpecError, match="has no entry for 2 ranks that the filters leave"):
            table_cases(2, **filters)
    with pytest.raises(SpecError, match="has no entry for 4 ranks"):
        table_cases(4)
    tuning.clear()
