"""End to end on 2 CPU ranks: sweep → results.csv/run.json → tune → table → the library loads it."""

from __future__ import annotations

import json
import os
import re
import subprocess
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import torch

import fused_a2a
from a2a_bench.engine.results import COLUMNS, read_results
from fused_a2a import tuning
from fused_a2a.tuning.table import read_table, write_table
from cli_runs import run_child
from ranks import spawn

GRID = ["--hidden", "256,512", "--tokens", "64", "--topk", "2", "--experts", "8", "--knob",
        "torch.impl=all_to_all,p2p", "--warmup", "1", "--iters", "3"]


def a2a_bench(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """The CLI as in a Slurm log: output in pipes, no ``COLUMNS`` (tables must still come out whole)."""
    return run_child(*args, env={"COLUMNS": None, **(env or {})})


@pytest.fixture(scope="module")
def sweep_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """A 2-rank sweep through the local launcher, tuned in the same command (``--tune``)."""
    out = tmp_path_factory.mktemp("sweep") / "run"
    proc = a2a_bench("sweep", "--nproc", "2", "--out", str(out), *GRID, "--tune", "--tune-out", str(out.parent / "tables"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_sweep_tune_through_the_launcher_writes_the_table_and_says_how_to_use_it(sweep_run) -> None:
    run, proc = sweep_run
    path = run.parent / "tables" / "cpu-gloo-x2" / "tuning.json"
    assert {e.selected_by for e in read_table(path).entries} == {"api"} and len(read_table(path).entries) == 2
    text = " ".join(proc.stdout.split())
    assert f"wrote {path}; fused_a2a does not read {path.parent.parent}" in text
    assert "what a call uses: a2a-bench show --backend torch --hidden 256 --tokens 64 --world-size 2" in text
    assert "warning" not in proc.stderr  # --nproc 2 asked for the ranks


@pytest.fixture(scope="module")
def run_dir(sweep_run) -> Path:
    return sweep_run[0]


def test_a_log_gets_one_line_per_point_full_width_tables_and_rank_0s_teardown(sweep_run) -> None:
    run, proc = sweep_run
    results = read_results(run / "results.csv")
    lines = [line for line in proc.stderr.splitlines() if line.startswith("[")]
    assert len(lines) == len(results) == 4
    for i, (line, row) in enumerate(zip(lines, results.itertuples()), start=1):
        knobs = " ".join(f"{k}={v}" for k, v in json.loads(row.knobs).items())
        assert line == (f"[{i}/4] torch {knobs} bf16 h{row.hidden} n64 k2 e8 uniform: ok, "
                        f"dispatch {row.dispatch_kernel_us_median:.1f} µs, combine {row.combine_kernel_us_median:.1f} µs")
    assert "━" not in proc.stderr  # no progress bar drawn into the log
    # the summary tables are whole (a log has no width): no cell cut, no column left out
    assert "…" not in proc.stdout and "left out to fit" not in proc.stdout
    assert "impl=p2p" in proc.stdout and "xbw / peak (d / c)" in proc.stdout and "best per shape" in proc.stdout
    assert proc.stderr.count("a2a-bench: buffers freed; destroying the process group") == 1
    assert proc.stderr.count("a2a-bench: process group destroyed") == 1


def test_sweep_writes_one_verified_row_per_point(run_dir: Path) -> None:
    results = read_results(run_dir / "results.csv")
    assert list(results.columns) == COLUMNS
    assert len(results) == 4 and results["point_id"].is_unique
    assert set(results["status"]) == {"ok"} and results["verified"].all()
    assert set(results["world_size"]) == {2} and set(results["cluster"]) == {"cpu-gloo-x2"}
    assert set(results["hidden"]) == {256, 512}
    assert sorted(results["knobs"].map(lambda k: json.loads(k)["impl"])) == ["all_to_all", "all_to_all", "p2p", "p2p"]
    for op in ("dispatch", "combine"):
        for mode in ("kernel", "api"):
            med = results[f"{op}_{mode}_us_median"]
            assert (med > 0).all()
            assert (results[f"{op}_{mode}_us_min"] <= med).all() and (med <= results[f"{op}_{mode}_us_max"]).all()
        assert (results[f"{op}_algbw_gbps"] >= results[f"{op}_xbw_gbps"]).all()
    assert (results["recv_tokens"] > 0).all() and results["inputs_hash"].str.len().eq(16).all()
    # the same inputs for the two knob values of one shape
    assert results.groupby("hidden")["inputs_hash"].nunique().eq(1).all()


def test_run_json_records_spec_cluster_versions_and_command(run_dir: Path) -> None:
    info = json.loads((run_dir / "run.json").read_text())
    assert info["cluster"]["id"] == "cpu-gloo-x2" and info["world_size"] == 2
    assert info["spec"]["hidden"] == [256, 512] and info["spec"]["knobs"] == {"torch": {"impl": ["all_to_all", "p2p"]}}
    assert info["versions"]["torch"] == torch.__version__
    assert "--hidden" in info["command"]


def test_tune_table_and_library_lookup(run_dir: Path, tmp_path: Path) -> None:
    tables = tmp_path / "tables"
    proc = a2a_bench("tune", str(run_dir), "--out", str(tables))
    assert proc.returncode == 0, proc.stderr
    table = read_table(tables / "cpu-gloo-x2" / "tuning.json")
    assert table.cluster["id"] == "cpu-gloo-x2"
    assert sorted(e.hidden for e in table.entries) == [256, 512]
    results = read_results(run_dir / "results.csv")
    for entry in table.entries:  # chosen by the api round trip; the default kept unless beaten beyond the noise
        rows = results[results["hidden"] == entry.hidden]
        default = rows[rows["is_default"]].iloc[0]
        fastest_d = rows.loc[rows["dispatch_api_us_median"].idxmin()]
        fastest_c = rows.loc[rows["combine_api_us_median"].idxmin()]
        vs = entry.vs_default
        assert entry.selected_by == "api" and entry.frontier == ()
        assert (vs.best_dispatch, vs.best_combine) == (json.loads(fastest_d.knobs), json.loads(fastest_c.knobs))
        low = (default.dispatch_api_us_p10 + default.combine_api_us_p10) / (fastest_d.dispatch_api_us_p90 + fastest_c.combine_api_us_p90)
        assert vs.low == pytest.approx(min(low, vs.ratio), abs=1e-4) and vs.kept_default == (not low > 1.0)
        chosen = (default, default) if vs.kept_default else (fastest_d, fastest_c)
        assert entry.dispatch == json.loads(chosen[0].knobs) and entry.combine == json.loads(chosen[1].knobs)
        assert entry.measured["dispatch_us"] == chosen[0].dispatch_api_us_median
        assert entry.measured["combine_us"] == chosen[1].combine_api_us_median
        assert entry.measured["default_dispatch_us"] == default.dispatch_api_us_median

    proc = a2a_bench("table", str(tables / "cpu-gloo-x2"))
    assert proc.returncode == 0, proc.stderr
    markdown = (tables / "cpu-gloo-x2" / "TABLE.md").read_text()
    assert "# Tuning table: cpu-gloo-x2" in markdown and markdown.count("\n| torch |") == 2

    proc = a2a_bench("show", "--hidden", "512", "--tokens", "64", "--world-size", "2",
                     env={"FUSED_A2A_TUNING_DIR": str(tables)})
    assert proc.returncode == 0 and "table" in proc.stdout and "tuning.json" in proc.stdout

    spawn(_library_uses_table, 2, str(tables), {e.hidden: e for e in table.entries})


def _library_uses_table(rank: int, world_size: int, tables: str, entries: dict) -> None:
    os.environ["FUSED_A2A_TUNING_DIR"] = tables
    tuning.clear()
    x = torch.randn(64, 512, dtype=torch.bfloat16)
    idx = torch.randint(0, 8, (64, 2))
    weights = torch.rand(64, 2)
    handle = fused_a2a.dispatch(x, idx, weights, 8)[4]
    assert handle.comm.dispatch_config.impl == entries[512].dispatch["impl"]
    assert handle.comm.combine_config.impl == entries[512].combine["impl"]
    fallback = fused_a2a.dispatch(x.float(), idx, weights, 8)[4]  # no fp32 entry: the backend default
    assert fallback.comm.dispatch_config.impl == "all_to_all"
    explicit = fused_a2a.dispatch(x, idx, weights, 8, impl="p2p")[4]
    assert explicit.comm.dispatch_config.impl == "p2p" and explicit.comm.combine_config.impl == "p2p"


def test_resume_adds_only_missing_points(run_dir: Path, tmp_path: Path) -> None:
    full = read_results(run_dir / "results.csv")
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "run.json").write_text((run_dir / "run.json").read_text())
    lines = (run_dir / "results.csv").read_text().splitlines(keepends=True)
    # two complete rows survive, the third was torn by a kill mid-write
    (partial / "results.csv").write_text("".join(lines[:3]) + lines[3][:25])
    proc = a2a_bench("sweep", "--nproc", "2", "--out", str(partial), "--resume", *GRID)
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = read_results(partial / "results.csv")
    assert sorted(resumed["point_id"]) == sorted(full["point_id"])
    assert resumed["point_id"].is_unique
    kept = pd.read_csv(partial / "results.csv").iloc[:2]
    assert list(kept["point_id"]) == list(full["point_id"].iloc[:2])
    info = json.loads((partial / "run.json").read_text())
    assert info["resumed_with_done"] == 2
    # the progress counts the points done before
    numbers = [line.split(" ")[0] for line in proc.stderr.splitlines() if line.startswith("[")]
    assert numbers == ["[3/4]", "[4/4]"]


def test_speedup_compares_tuned_with_default_or_says_same_config(run_dir: Path, tmp_path: Path) -> None:
    tables = tmp_path / "tables"
    assert a2a_bench("tune", str(run_dir), "--out", str(tables)).returncode == 0
    table = read_table(tables / "cpu-gloo-x2" / "tuning.json")
    entry = next(e for e in table.entries if e.hidden == 512)
    table = replace(table, entries=(replace(entry, dispatch={"impl": "p2p"}, combine={"impl": "p2p"}),))
    write_table(tables / "cpu-gloo-x2" / "tuning.json", table)  # bf16 tuned = p2p; no fp32 entry: default
    proc = a2a_bench("speedup", "--nproc", "2", "--hidden", "512", "--tokens", "64", "--topk", "2", "--experts", "8",
                     "--dtype", "bf16,fp32", "--warmup", "1", "--iters", "2", "--blocks", "4",
                     env={"FUSED_A2A_TUNING_DIR": str(tables)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {line.split("│")[3].strip(): [cell.strip() for cell in line.split("│")[1:-1]]
            for line in proc.stdout.splitlines() if " h512 n64 k2 e8 " in line}
    tuned = rows["bf16 h512 n64 k2 e8 uniform"]
    assert tuned[1] == "api" and tuned[3] == "impl=p2p | impl=p2p" and tuned[4] == "table"
    assert re.fullmatch(r"(no measurable difference|\d+\.\d\dx) \(\d+\.\d\d–\d+\.\d\d\)", tuned[7]), tuned[7]
    default = rows["fp32 h512 n64 k2 e8 uniform"]
    assert default[3] == "impl=all_to_all | impl=all_to_all" and default[4] == "default"
    assert default[6] == "= tuned" and default[7] == "same config"
