"""``a2a-bench plot``, ``compare`` and ``export``: files, numbers, and one clear line for every bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from rich.console import Console

from cli_runs import assert_one_line_error, run_cli
from a2a_bench.reports.compare import compare_rows, compare_table, shape_rows
from a2a_bench.reports.fit import rich_table
from a2a_bench.reports.export import env_lines, find_entry, render, sglang_config
from a2a_bench.reports.plot import _time_figure, plot_run, sms_series, time_series, tokens_series
from a2a_bench.engine.results import COLUMNS, ResultsError, append_row, read_results
from fused_a2a import tuning
from fused_a2a.tuning.table import SCHEMA, TuningEntry, TuningTable, write_table

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CLUSTER = {"id": "test-export-x2", "gpu": None, "gpus_per_node": 2, "nodes": 1, "intranode_link": None, "internode": None}
DEEPEP_DEFAULT = {"num_sms": 20, "nvl_send": 0, "nvl_recv": 0, "rdma_send": 0, "rdma_recv": 0}


def row(backend: str, knobs: dict, disp_us: float, comb_us: float, hidden: int = 4096, num_tokens: int = 1024,
        status: str = "ok", is_default: bool = False, **over) -> dict:
    """A results row; GB/s follow from the times (1 MB of received rows, half of it crossed)."""
    r = {
        "point_id": f"{backend}-{json.dumps(knobs, sort_keys=True)}-{hidden}-{num_tokens}", "status": status,
        "verified": status == "ok", "backend": backend, "knobs": json.dumps(knobs, sort_keys=True),
        "is_default": is_default, "num_sms": knobs.get("num_sms", ""), "world_size": 2, "cluster": CLUSTER["id"],
        "gpu_sharing": "none", "ranks_per_gpu": 1, "comparable": True, "dtype": "bf16", "hidden": hidden, "num_tokens": num_tokens, "topk": 8, "num_experts": 64,
        "routing": "uniform", "skew": 1.0, "seed": 0, "inputs_hash": "abc", "recv_tokens": num_tokens,
        "link_peak_gbps": 40.0, "warmup": 1, "iters": 3, "timestamp": "2026-11-24T22:00:00Z",
    }
    if status == "ok":
        for op, us in (("dispatch", disp_us), ("combine", comb_us)):
            for mode, scale in (("kernel", 1.0), ("api", 1.5)):
                for stat in ("median", "p10", "p90", "min", "max"):
                    r[f"{op}_{mode}_us_{stat}"] = us * scale
            r[f"{op}_algbw_gbps"] = 1e6 / (us * 1e3)
            r[f"{op}_xbw_gbps"] = 0.5e6 / (us * 1e3)
            r[f"{op}_xbw_frac_peak"] = r[f"{op}_xbw_gbps"] / 40.0
    r.update(over)
    assert set(r) <= set(COLUMNS)
    return r


ROWS = [
    row("deepep", {**DEEPEP_DEFAULT}, 400.0, 500.0, is_default=True),
    row("deepep", {**DEEPEP_DEFAULT, "num_sms": 16, "nvl_send": 8}, 250.0, 260.0),
    row("deepep", {**DEEPEP_DEFAULT, "num_sms": 16, "nvl_send": 16}, 200.0, 300.0),
    row("deepep", {**DEEPEP_DEFAULT, "num_sms": 32, "nvl_send": 8}, 100.0, 120.0),
    row("deepep", {**DEEPEP_DEFAULT, "num_sms": 48}, 0.0, 0.0, status="skipped: num_sms too large"),
    row("torch", {"impl": "all_to_all"}, 1000.0, 1200.0, is_default=True),
    row("torch", {"impl": "p2p"}, 800.0, 1000.0),
    row("torch", {"impl": "p2p"}, 200.0, 250.0, hidden=2048, num_tokens=256),
    row("torch", {"impl": "p2p"}, 400.0, 500.0, hidden=2048, num_tokens=512),
    row("torch", {"impl": "all_to_all"}, 500.0, 400.0, hidden=2048, num_tokens=512),
]


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A run folder whose results.csv holds :data:`ROWS`, written by the real writer."""
    folder = tmp_path / "run"
    folder.mkdir()
    for r in ROWS:
        append_row(folder / "results.csv", r)
    return folder


@pytest.fixture
def results(run_dir: Path) -> pd.DataFrame:
    return read_results(run_dir / "results.csv")


# ---------------------------------------------------------------- plot


def test_plot_writes_one_valid_png_per_group(results, tmp_path: Path) -> None:
    out = tmp_path / "plots"
    paths = plot_run(results, out)
    assert [p.name for p in paths] == [
        "deepep_w2_bf16_h4096_t1024_k8_e64_uniform.png",
        "torch_w2_bf16_k8_e64_uniform_tokens.png",
    ]
    for path in paths:
        assert path.parent == out
        assert path.read_bytes()[:8] == PNG_MAGIC
        assert path.stat().st_size > 10_000


def test_plot_series_take_the_best_config_at_each_point(results) -> None:
    deepep = results[(results["backend"] == "deepep") & (results["status"] == "ok")]
    sms = sms_series(deepep)
    assert list(sms.index) == [16, 20, 32]
    assert sms.loc[16, "dispatch_algbw_gbps"] == pytest.approx(1e3 / 200.0)   # the nvl_send=16 config
    assert sms.loc[16, "combine_algbw_gbps"] == pytest.approx(1e3 / 260.0)    # the nvl_send=8 config
    assert sms.loc[32, "combine_xbw_gbps"] == pytest.approx(0.5e3 / 120.0)
    torch = results[results["backend"] == "torch"]
    tokens = tokens_series(torch)
    assert list(tokens.index) == [(2048, 256), (2048, 512), (4096, 1024)]
    assert tokens.loc[(2048, 512), "dispatch_algbw_gbps"] == pytest.approx(1e3 / 400.0)  # p2p
    assert tokens.loc[(2048, 512), "combine_algbw_gbps"] == pytest.approx(1e3 / 400.0)   # all_to_all


def test_plot_names_routings_with_their_skew(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    folder.mkdir()
    append_row(folder / "results.csv", row("deepep", {**DEEPEP_DEFAULT, "num_sms": 24}, 100.0, 100.0,
                                           routing="zipf", skew=1.2, link_peak_gbps=0.0))
    paths = plot_run(read_results(folder / "results.csv"), tmp_path / "p")
    assert [p.name for p in paths] == ["deepep_w2_bf16_h4096_t1024_k8_e64_zipf1.2.png"]


def test_plot_cli_prints_the_paths(monkeypatch, capsys, run_dir: Path) -> None:
    code, out, err = run_cli(monkeypatch, capsys, "plot", str(run_dir))
    assert code == 0, err
    printed = out.split()
    assert len(printed) == 2
    assert all(Path(p).parent == run_dir / "plots" and Path(p).read_bytes()[:8] == PNG_MAGIC for p in printed)


def test_plot_rejects_a_folder_without_results(monkeypatch, capsys, tmp_path: Path) -> None:
    code, _, err = run_cli(monkeypatch, capsys, "plot", str(tmp_path))
    assert_one_line_error(code, err, "no results.csv in")
    assert not (tmp_path / "plots").exists()


def test_plot_rejects_results_without_ok_rows(monkeypatch, capsys, tmp_path: Path) -> None:
    append_row(tmp_path / "results.csv", row("torch", {"impl": "p2p"}, 0.0, 0.0, status="error: boom"))
    code, _, err = run_cli(monkeypatch, capsys, "plot", str(tmp_path))
    assert_one_line_error(code, err, "no 'ok' rows to plot")
    assert not (tmp_path / "plots").exists()


def test_plot_time_puts_every_backend_of_a_shape_in_one_figure_with_its_knee(results, tmp_path: Path) -> None:
    paths = plot_run(results, tmp_path / "plots", metric="time")
    assert [p.name for p in paths] == ["w2_bf16_h4096_t1024_k8_e64_uniform_time.png"]  # the torch-only shapes: none
    assert paths[0].read_bytes()[:8] == PNG_MAGIC and paths[0].stat().st_size > 10_000
    deepep = results[(results["backend"] == "deepep") & (results["status"] == "ok")]
    times = time_series(deepep)
    assert list(times.index) == [16, 20, 32]
    assert times.loc[16, "dispatch_kernel_us_median"] == 200.0 and times.loc[16, "combine_kernel_us_median"] == 260.0
    shape = results[(results["hidden"] == 4096) & (results["status"] == "ok")]
    figure = _time_figure({"world_size": 2, "dtype": "bf16", "hidden": 4096, "num_tokens": 1024, "topk": 8,
                           "num_experts": 64, "routing": "uniform", "skew": 1.0}, shape)
    dispatch, combine = figure.axes
    labels = [line.get_label() for line in dispatch.get_lines() if not line.get_label().startswith("_")]
    # 32 SMs: 220 µs; 16 SMs: 460 µs, not within 5% of it; the default (20 SMs, 900 µs) marked apart
    assert labels == ["deepep", "deepep knee: 32 SMs", "deepep default", "torch (no SM knob)"]
    assert [line.get_label() for line in combine.get_lines() if not line.get_label().startswith("_")] == labels
    assert figure.texts[0].get_text().startswith("test-export-x2: hidden 4096, 1024 tokens/rank")


def test_plot_time_cli_and_its_bad_inputs(monkeypatch, capsys, run_dir: Path, tmp_path: Path) -> None:
    code, out, err = run_cli(monkeypatch, capsys, "plot", str(run_dir), "--metric", "time")
    assert code == 0, err
    assert [Path(p).name for p in out.split()] == ["w2_bf16_h4096_t1024_k8_e64_uniform_time.png"]
    code, _, err = run_cli(monkeypatch, capsys, "plot", str(run_dir), "--metric", "speed", "--out", str(tmp_path / "x"))
    assert_one_line_error(code, err, "--metric must be one of gbps, time, got 'speed'")
    torch_only = tmp_path / "torch"
    torch_only.mkdir()
    append_row(torch_only / "results.csv", row("torch", {"impl": "p2p"}, 10.0, 10.0))
    code, _, err = run_cli(monkeypatch, capsys, "plot", str(torch_only), "--metric", "time")
    assert_one_line_error(code, err, "no 'ok' rows with an SM count (num_sms) to plot time against")
    assert not (tmp_path / "x").exists() and not (torch_only / "plots").exists()


# ---------------------------------------------------------------- compare


def test_compare_rows_pick_the_best_verified_config(results) -> None:
    deepep, torch = compare_rows(shape_rows(results, 4096, 1024))  # by api, as a training step pays
    assert deepep.backend == "deepep" and deepep.knobs["num_sms"] == 32
    assert (deepep.dispatch_us, deepep.combine_us) == (100.0, 120.0)
    assert (deepep.dispatch_api_us, deepep.combine_api_us) == (150.0, 180.0)
    assert (deepep.default_dispatch_us, deepep.default_combine_us) == (600.0, 750.0)  # the default's api times
    assert deepep.speedup_vs_torch == pytest.approx(2700.0 / 330.0)
    assert torch.knobs == {"impl": "p2p"} and torch.speedup_vs_torch == pytest.approx(1.0)
    assert (torch.default_dispatch_us, torch.default_combine_us) == (1500.0, 1800.0)
    kernel = compare_rows(shape_rows(results, 4096, 1024), by="kernel")[0]
    assert (kernel.default_dispatch_us, kernel.default_combine_us) == (400.0, 500.0)


def test_compare_ranks_by_the_api_round_trip_unless_told_otherwise(tmp_path: Path) -> None:
    # num_sms=32 has the faster cached kernels, num_sms=16 the faster full call
    append_row(tmp_path / "results.csv", row("deepep", {**DEEPEP_DEFAULT, "num_sms": 16}, 300.0, 300.0,
                                             dispatch_api_us_median=400.0, combine_api_us_median=400.0))
    append_row(tmp_path / "results.csv", row("deepep", {**DEEPEP_DEFAULT, "num_sms": 32}, 100.0, 100.0,
                                             dispatch_api_us_median=900.0, combine_api_us_median=900.0))
    rows = read_results(tmp_path / "results.csv")
    assert compare_rows(rows)[0].knobs["num_sms"] == 16
    assert compare_rows(rows, by="kernel")[0].knobs["num_sms"] == 32
    with pytest.raises(ResultsError, match="--by must be one of kernel, api, seed, graph, got 'fast'"):
        compare_rows(rows, by="fast")


def test_compare_table_renders_the_numbers(results) -> None:
    table = compare_table(results, 4096, 1024, dtype="bf16", topk=8, num_experts=64)
    assert "each backend's best config by the api round trip" in table.title
    console = Console(record=True, width=250)
    console.print(rich_table(table, table.shown()))
    text = console.export_text()
    assert "best knobs (by api)" in text and "default api µs (d / c)" in text
    deepep = next(line for line in text.splitlines() if line.startswith("│ deepep"))
    for cell in ("num_sms=32", "nvl_send=8", "100.0 / 120.0", "150.0 / 180.0", "10.0 / 8.3", "600.0 / 750.0", "8.18x"):
        assert cell in deepep, deepep
    torch = next(line for line in text.splitlines() if line.startswith("│ torch"))
    for cell in ("impl=p2p", "800.0 / 1000.0", "1500.0 / 1800.0", "1.00x"):
        assert cell in torch, torch


def test_compare_without_torch_says_n_a_and_shows_unmeasured_backends(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    folder.mkdir()
    append_row(folder / "results.csv", row("deepep", {**DEEPEP_DEFAULT}, 100.0, 100.0, is_default=True))
    append_row(folder / "results.csv", row("torch", {"impl": "p2p"}, 0.0, 0.0, status="error: verification failed"))
    rows = compare_rows(shape_rows(read_results(folder / "results.csv"), 4096, 1024))
    assert rows[0].speedup_vs_torch is None
    assert rows[1].status == "error: verification failed" and rows[1].dispatch_us is None


def test_compare_cli_prints_the_table(monkeypatch, capsys, run_dir: Path) -> None:
    code, out, err = run_cli(monkeypatch, capsys, "compare", str(run_dir), "--hidden", "4096", "--tokens", "1024")
    assert code == 0, err
    assert "│ deepep" in out and "│ torch" in out and "8.18x" in out


@pytest.mark.parametrize(
    "args, pattern",
    [
        (["--hidden", "7168", "--tokens", "1024"], "no rows for hidden 7168, 1024 tokens, uniform; shapes in the results: hidden 2048, 256 tokens"),
        (["--hidden", "4096", "--tokens", "1024", "--dtype", "fp16"], "no rows for hidden 4096, 1024 tokens, uniform, dtype fp16"),
        (["--hidden", "4096", "--tokens", "1024", "--routing", "zipf:1.2"], "no rows for hidden 4096, 1024 tokens, zipf:1.2"),
        (["--hidden", "4096", "--tokens", "1024", "--routing", "pareto"], "unknown routing 'pareto'"),
    ],
)
def test_compare_rejects_a_shape_not_in_the_results(monkeypatch, capsys, run_dir: Path, args, pattern) -> None:
    code, out, err = run_cli(monkeypatch, capsys, "compare", str(run_dir), *args)
    assert_one_line_error(code, err, pattern)
    assert out == ""


def test_compare_rejects_an_ambiguous_shape(results) -> None:
    other = results.assign(topk=4, point_id=results["point_id"] + "-k4")
    with pytest.raises(ResultsError, match="several shapes match: .*top-4.*top-8.*pick one"):
        shape_rows(pd.concat([results, other]), 4096, 1024)


def test_compare_rejects_a_folder_without_results(monkeypatch, capsys, tmp_path: Path) -> None:
    code, _, err = run_cli(monkeypatch, capsys, "compare", str(tmp_path), "--hidden", "1", "--tokens", "1")
    assert_one_line_error(code, err, "no results.csv in")


# ---------------------------------------------------------------- export


def entry(backend: str, dispatch: dict, combine: dict | None = None, world_size: int = 2, hidden: int = 4096) -> TuningEntry:
    return TuningEntry(
        backend=backend, world_size=world_size, dtype="bf16", hidden=hidden, num_tokens=1024, topk=8, num_experts=64,
        dispatch=dispatch, combine=dispatch if combine is None else combine,
        measured={"dispatch_us": 100.0, "combine_us": 120.0}, frontier=(),
    )


DEEPEP_ENTRY = entry("deepep", {"num_sms": 24, "nvl_send": 16, "nvl_recv": 0, "rdma_send": 0, "rdma_recv": 0},
                     {"num_sms": 24, "nvl_send": 8, "nvl_recv": 512, "rdma_send": 0, "rdma_recv": 0})


def write_cluster(folder: Path, *entries: TuningEntry) -> Path:
    write_table(folder / "tuning.json", TuningTable(SCHEMA, dict(CLUSTER), "2026-11-24T22:00:00Z", "0.1.0", entries))
    return folder


def test_sglang_config_uses_config_kwargs_and_resolves_zeros_for_the_rank_count() -> None:
    assert sglang_config(DEEPEP_ENTRY, 2) == {
        "normal_dispatch": {"num_sms": 24, "num_max_nvl_chunked_send_tokens": 16, "num_max_nvl_chunked_recv_tokens": 256,
                            "num_max_rdma_chunked_send_tokens": 6, "num_max_rdma_chunked_recv_tokens": 128},
        "normal_combine": {"num_sms": 24, "num_max_nvl_chunked_send_tokens": 8, "num_max_nvl_chunked_recv_tokens": 512,
                           "num_max_rdma_chunked_send_tokens": 6, "num_max_rdma_chunked_recv_tokens": 128},
    }
    zeros = entry("deepep", {**DEEPEP_DEFAULT, "num_sms": 32}, world_size=16)
    config = sglang_config(zeros, 16)
    assert config["normal_dispatch"]["num_max_nvl_chunked_send_tokens"] == 36  # DeepEP's 16-rank dispatch default
    assert config["normal_combine"]["num_max_nvl_chunked_send_tokens"] == 4    # ... and combine default
    assert config["normal_dispatch"]["num_sms"] == config["normal_combine"]["num_sms"] == 32


def test_sglang_config_fills_missing_knobs_with_defaults() -> None:
    config = sglang_config(entry("deepep", {"num_sms": 64}), 8)
    assert config["normal_dispatch"] == {"num_sms": 64, "num_max_nvl_chunked_send_tokens": 6,
                                         "num_max_nvl_chunked_recv_tokens": 256, "num_max_rdma_chunked_send_tokens": 6,
                                         "num_max_rdma_chunked_recv_tokens": 128}


def test_sglang_config_rejects_other_backends_and_invalid_knobs() -> None:
    with pytest.raises(ValueError, match="this entry is for 'torch'"):
        sglang_config(entry("torch", {"impl": "p2p"}), 2)
    with pytest.raises(ValueError, match="nvl_send .* must be smaller than nvl_recv"):
        sglang_config(entry("deepep", {**DEEPEP_DEFAULT, "nvl_send": 512, "nvl_recv": 256}), 2)


def test_env_lines_per_backend() -> None:
    assert env_lines(DEEPEP_ENTRY) == [
        "export FUSED_A2A_DEEPEP_NUM_SMS=24",
        "export DEEP_EP_SM_NUMS=24",
        "# nvl_recv: dispatch 0, combine 512; one variable sets both, so it is left to the tuning table",
        "# nvl_send: dispatch 16, combine 8; one variable sets both, so it is left to the tuning table",
        "export FUSED_A2A_DEEPEP_RDMA_RECV=0",
        "export FUSED_A2A_DEEPEP_RDMA_SEND=0",
    ]
    hybrid = {"num_sms_dispatch_api": 32, "num_sms_combine_api": 24, "tokens_per_chunk_dispatch": 128,
              "tokens_per_chunk_combine": 0}
    lines = env_lines(entry("hybridep", hybrid, {**hybrid, "num_sms_combine_api": 16, "tokens_per_chunk_dispatch": 64}))
    assert lines == [
        "export FUSED_A2A_HYBRIDEP_NUM_SMS_COMBINE_API=16",
        "export FUSED_A2A_HYBRIDEP_NUM_SMS_DISPATCH_API=32",
        "export FUSED_A2A_HYBRIDEP_TOKENS_PER_CHUNK_COMBINE=0",
        "export FUSED_A2A_HYBRIDEP_TOKENS_PER_CHUNK_DISPATCH=128",
        "export NUM_OF_TOKENS_PER_CHUNK_DISPATCH_API=128",
    ]
    assert env_lines(entry("uccl", {"num_sms": 32})) == ["export FUSED_A2A_UCCL_NUM_SMS=32", "export UCCL_EP_SM_NUMS=32"]
    assert env_lines(entry("torch", {"impl": "p2p"})) == ["export FUSED_A2A_TORCH_IMPL=p2p"]


def test_find_entry_uses_the_library_lookup_and_lists_what_there_is() -> None:
    table = TuningTable(SCHEMA, dict(CLUSTER), "", "0.1.0", (DEEPEP_ENTRY, entry("deepep", {"num_sms": 20}, hidden=7168)))
    assert find_entry(table, "deepep", 2, "bf16", 5000, 100) is DEEPEP_ENTRY   # nearest hidden, tokens >= call's
    with pytest.raises(ResultsError, match="no entry for deepep on 4 ranks in bf16; it has: deepep on 2 ranks in bf16"):
        find_entry(table, "deepep", 4, "bf16", 4096, 1024)


def test_export_sglang_cli_writes_the_json_atomically(monkeypatch, capsys, tmp_path: Path) -> None:
    folder = write_cluster(tmp_path / "cluster", DEEPEP_ENTRY)
    target = tmp_path / "deepep_config.json"
    code, out, err = run_cli(monkeypatch, capsys, "export", "--format", "sglang", "--backend", "deepep", "--hidden", "4096",
                             "--tokens", "1024", "--world-size", "2", "--cluster-dir", str(folder), "--out", str(target))
    assert code == 0, err
    assert json.loads(target.read_text()) == sglang_config(DEEPEP_ENTRY, 2)
    assert f"wrote {target}" in out and "hidden 4096" in out
    assert {p.name for p in tmp_path.iterdir()} == {"cluster", "deepep_config.json"}  # no temporary file left


def test_export_cli_prints_to_stdout(monkeypatch, capsys, tmp_path: Path) -> None:
    folder = write_cluster(tmp_path / "cluster", DEEPEP_ENTRY, entry("torch", {"impl": "p2p"}))
    common = ["--hidden", "4096", "--tokens", "1024", "--world-size", "2", "--cluster-dir", str(folder)]
    code, out, err = run_cli(monkeypatch, capsys, "export", "--format", "sglang", "--backend", "deepep", *common)
    assert code == 0, err
    assert json.loads(out) == sglang_config(DEEPEP_ENTRY, 2)
    code, out, err = run_cli(monkeypatch, capsys, "export", "--format", "env", "--backend", "torch", *common)
    assert code == 0, err
    assert out == render("env", entry("torch", {"impl": "p2p"}))
    assert out.splitlines()[1:] == ["export FUSED_A2A_TORCH_IMPL=p2p"]


def test_export_cli_finds_this_machines_table(monkeypatch, capsys, tmp_path: Path) -> None:
    monkeypatch.setenv("FUSED_A2A_TUNING_DIR", str(tmp_path))
    monkeypatch.setenv("FUSED_A2A_CLUSTER_ID", CLUSTER["id"])
    tuning.clear()
    try:
        args = ["export", "--format", "env", "--backend", "deepep", "--hidden", "4096", "--tokens", "1024", "--world-size", "2"]
        code, _, err = run_cli(monkeypatch, capsys, *args)
        assert_one_line_error(code, err, f"no tuning table for cluster {CLUSTER['id']} in {tmp_path}")
        write_cluster(tmp_path / CLUSTER["id"], DEEPEP_ENTRY)
        tuning.clear()
        code, out, err = run_cli(monkeypatch, capsys, *args)
        assert code == 0, err
        assert "export DEEP_EP_SM_NUMS=24" in out.splitlines()
    finally:
        tuning.clear()


@pytest.mark.parametrize(
    "args, pattern",
    [
        (["--format", "yaml", "--backend", "deepep"], "unknown --format 'yaml'; choose from sglang, env"),
        (["--format", "sglang", "--backend", "torch"], "use --backend deepep, not 'torch'"),
        (["--format", "env", "--backend", "nccl"], "unknown backend 'nccl'"),
        (["--format", "sglang", "--backend", "deepep", "--world-size", "4"],
         "has no entry for deepep on 4 ranks in bf16; it has: deepep on 2 ranks in bf16"),
        (["--format", "sglang", "--backend", "deepep", "--dtype", "fp16"], "has no entry for deepep on 2 ranks in fp16"),
    ],
)
def test_export_rejects_bad_requests(monkeypatch, capsys, tmp_path: Path, args, pattern) -> None:
    folder = write_cluster(tmp_path / "cluster", DEEPEP_ENTRY)
    target = tmp_path / "out.json"
    code, out, err = run_cli(monkeypatch, capsys, "export", "--hidden", "4096", "--tokens", "1024", "--world-size", "2",
                             "--cluster-dir", str(folder), "--out", str(target), *args)
    assert_one_line_error(code, err, pattern)
    assert out == "" and not target.exists()


def test_export_rejects_a_cluster_dir_without_tuning_json(monkeypatch, capsys, tmp_path: Path) -> None:
    target = tmp_path / "out.json"
    code, out, err = run_cli(monkeypatch, capsys, "export", "--format", "sglang", "--backend", "deepep", "--hidden", "4096",
                             "--tokens", "1024", "--world-size", "2", "--cluster-dir", str(tmp_path), "--out", str(target))
    assert_one_line_error(code, err, f"tuning file {tmp_path / 'tuning.json'}: no such file")
    assert out == "" and not target.exists()
