"""Issue-13 behaviour on the CPU: graph mode's status on gloo, the backend build and the routing in rows,
tables, lookups, show and export, and the imbalance figures against a routing counted by hand."""

from __future__ import annotations

import json
import warnings
from dataclasses import replace
from pathlib import Path

import pytest

from a2a_bench.engine.measure import imbalance
from a2a_bench.engine.results import read_results
from cli_runs import run_child
from fused_a2a.backends import BACKENDS
from fused_a2a import tuning
from fused_a2a.tuning.resolve import TuningWarning, resolve
from fused_a2a.tuning.table import SCHEMA, TuningEntry, TuningTable, lookup, read_table, write_table
from fused_a2a.shape import CallShape

GRID = ["--backends", "torch", "--hidden", "256", "--tokens", "64", "--topk", "2", "--experts", "8",
        "--routing", "uniform,zipf:1.5", "--warmup", "1", "--iters", "2"]


@pytest.fixture(scope="module")
def swept(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("modes") / "run"
    proc = run_child("sweep", "--nproc", "2", "--out", str(out), *GRID)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_rows_carry_the_build_the_graph_status_and_the_imbalance(swept: Path) -> None:
    rows = read_results(swept / "results.csv")
    assert set(rows["status"]) == {"ok"} and len(rows) == 2
    assert set(rows["graph_status"]) == {"not capturable (CPU: CUDA graphs need a GPU)"}
    assert rows["dispatch_graph_us_median"].isna().all() and rows["dispatch_seed_us_median"].isna().all()
    assert rows["dispatch_kernel_us_median"].notna().all() and rows["dispatch_api_us_median"].notna().all()
    assert set(rows["build"]) == {BACKENDS["torch"].version()} and (rows["compile_s"] >= 0).all()
    by_routing = rows.set_index("routing")
    assert by_routing.loc["zipf", "imbalance_expert"] > by_routing.loc["uniform", "imbalance_expert"]
    assert (rows["recv_tokens_max"] >= rows["recv_tokens"]).all()


def test_tune_keys_entries_by_routing_and_build_and_show_and_export_pick_them(swept: Path, tmp_path: Path) -> None:
    tables = tmp_path / "tables"
    proc = run_child("tune", str(swept), "--out", str(tables), "--by", "api")
    assert proc.returncode == 0, proc.stderr
    cluster_dir = next(tables.iterdir())
    table = read_table(cluster_dir / "tuning.json")
    assert sorted(e.routing for e in table.entries) == ["uniform", "zipf:1.5"]
    assert {e.build for e in table.entries} == {BACKENDS["torch"].version()} and {e.selected_by for e in table.entries} == {"api"}
    assert all("dispatch_kernel_us" in e.measured and "dispatch_api_us" in e.measured for e in table.entries)
    env = {"FUSED_A2A_TUNING_DIR": str(tables), "FUSED_A2A_CLUSTER_ID": cluster_dir.name}
    shown = run_child("show", "--backend", "torch", "--hidden", "256", "--tokens", "64", "--world-size", "2",
                      "--routing", "hot:0.5", env=env)
    assert shown.returncode == 0, shown.stderr
    assert "table (uniform routing)" in shown.stdout  # no hot entry: the uniform one, and show says so
    skewed = run_child("show", "--backend", "torch", "--hidden", "256", "--tokens", "64", "--world-size", "2",
                       "--routing", "zipf:1.5", env=env)
    assert "zipf:1.5 routing, hidden 256" in skewed.stdout and "table (uniform routing)" not in skewed.stdout
    exported = run_child("export", "--format", "env", "--backend", "torch", "--hidden", "256", "--tokens", "64",
                         "--world-size", "2", "--routing", "zipf:1.5", "--cluster-dir", str(cluster_dir))
    assert exported.returncode == 0 and "zipf:1.5 routing, build " in exported.stdout
    listed = run_child("table", str(cluster_dir))
    assert listed.returncode == 0 and "zipf:1.5" in listed.stdout and BACKENDS["torch"].version() in listed.stdout
    bad = run_child("tune", str(swept), "--out", str(tables), "--by", "fast")
    assert bad.returncode == 2 and "--by must be one of kernel, api, seed, graph" in bad.stderr


def entry(**changes) -> TuningEntry:
    base = TuningEntry(backend="torch", world_size=2, dtype="bf16", hidden=256, num_tokens=64, topk=2, num_experts=8,
                       dispatch={"impl": "p2p"}, combine={"impl": "p2p"}, measured={"dispatch_us": 1.0, "combine_us": 1.0},
                       frontier=())
    return replace(base, **changes)


def test_lookup_prefers_the_routing_then_uniform_and_the_installed_build() -> None:
    table = TuningTable(SCHEMA, {"id": "c"}, "t", "0.1.0", (
        entry(build="old"), entry(build="new", dispatch={"impl": "all_to_all"}, combine={"impl": "all_to_all"}),
        entry(routing="zipf:1.2", build="new"),
    ))
    assert lookup(table, "torch", CallShape("bf16", 256, routing="uniform", world_size=2, tokens=(64,)), build="new").build == "new"
    assert lookup(table, "torch", CallShape("bf16", 256, routing="zipf:1.2", world_size=2, tokens=(64,)), build="new").routing == "zipf:1.2"
    assert lookup(table, "torch", CallShape("bf16", 256, routing="hot:0.5", world_size=2, tokens=(64,)), build="new").routing == "uniform"
    assert lookup(table, "torch", CallShape("bf16", 256, routing="uniform", world_size=2, tokens=(64,)), build="other").build in ("old", "new")


def test_an_entry_of_another_build_is_used_with_one_warning_and_refused_when_strict(tmp_path: Path, monkeypatch) -> None:
    write_table(tmp_path / "c" / "tuning.json", TuningTable(SCHEMA, {"id": "c"}, "t", "0.1.0", (entry(build="0.0.1-other"),)))
    monkeypatch.setenv("FUSED_A2A_TUNING_DIR", str(tmp_path))
    monkeypatch.delenv("FUSED_A2A_TUNING_STRICT", raising=False)
    tuning.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = resolve("torch", CallShape("bf16", 256, topk=2, num_experts=8, world_size=2, tokens=(64,)), {}, cluster="c")
        resolve("torch", CallShape("bf16", 512, topk=2, num_experts=8, world_size=2, tokens=(64,)), {}, cluster="c")
    assert first.sources == {"impl": "table"} and first.build == BACKENDS["torch"].version()
    other = [str(w.message) for w in caught if w.category is TuningWarning]
    assert len(other) == 1 and "measured with torch 0.0.1-other, the installed build is" in other[0]
    monkeypatch.setenv("FUSED_A2A_TUNING_STRICT", "1")
    tuning.clear()
    with pytest.raises(ValueError, match="measured with torch 0.0.1-other"):
        resolve("torch", CallShape("bf16", 256, topk=2, num_experts=8, world_size=2, tokens=(64,)), {}, cluster="c")
    tuning.clear()


def test_imbalance_of_a_routing_counted_by_hand() -> None:
    # 2 ranks, 4 experts: rank 0 receives 3 tokens, rank 1 receives 1; experts got 2, 1, 1, 0 (token, expert) pairs
    figures = imbalance([3, 1], [2, 1, 1, 0]).as_columns()
    assert figures == {"recv_tokens_max": 3.0, "recv_tokens": 2.0, "expert_tokens_max": 2.0, "expert_tokens_mean": 1.0,
                       "imbalance_rank": 1.5, "imbalance_expert": 2.0}
    assert json.dumps(figures)  # plain numbers for the CSV
