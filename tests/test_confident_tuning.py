"""Confident choices: ``tune`` keeps the backend's default unless a config beats it beyond the noise
(their p10–p90 round trips do not overlap), records the ratio and its interval in the entry (a
compatible extension of ``a2a-bench/tuning/v1``, validated on read), ranks by the api round trip by
default; ``table`` and ``show`` print the mode that chose an entry and the comparison."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from a2a_bench.engine.results import append_row, read_results
from a2a_bench.reports.report import entry_verdict
from a2a_bench.reports.tune import build_table, select_entry, tunable
from cli_runs import run_cli
from fused_a2a import tuning
from fused_a2a.tuning.table import SCHEMA, TuningEntry, TuningFileError, TuningTable, VsDefault, read_table, write_table
from runfiles import ok_row

CLUSTER = {"id": "cpu-gloo-x2"}


def timed(impl: str, dispatch: tuple[float, float, float], combine: tuple[float, float, float], **over) -> dict:
    """A verified ``ok`` row of the torch backend whose api times are (median, p10, p90) per operation."""
    row = ok_row(point_id=f"p-{impl}", knobs=json.dumps({"impl": impl}), is_default=impl == "all_to_all", verified=True,
                 build="2.13.0", **over)
    for op, (median, p10, p90) in (("dispatch", dispatch), ("combine", combine)):
        row.update({f"{op}_api_us_median": median, f"{op}_api_us_p10": p10, f"{op}_api_us_p90": p90,
                    f"{op}_kernel_us_median": median / 2})
    return row


def results(tmp_path: Path, *rows: dict):
    for row in rows:
        append_row(tmp_path / "results.csv", row)
    return read_results(tmp_path / "results.csv")


def test_a_config_within_the_noise_keeps_the_default(tmp_path: Path) -> None:
    # p2p's median round trip is 1.5x faster, but its p90 (180 + 180) is above the default's p10 (140 + 140)
    rows = results(tmp_path, timed("all_to_all", (150.0, 140.0, 400.0), (150.0, 140.0, 400.0)),
                   timed("p2p", (100.0, 60.0, 180.0), (100.0, 60.0, 180.0)))
    entry = select_entry(tunable(rows, "api"))
    assert entry.selected_by == "api"
    assert entry.dispatch == entry.combine == {"impl": "all_to_all"}  # the default, kept
    assert entry.measured["dispatch_us"] == entry.measured["default_dispatch_us"] == 150.0
    assert entry.vs_default == VsDefault(ratio=1.5, low=round(280 / 360, 4), high=round(800 / 120, 4), kept_default=True,
                                         best_dispatch={"impl": "p2p"}, best_combine={"impl": "p2p"})
    assert entry_verdict(entry) == "kept default: 1.50x (0.78–6.67)"


def test_a_config_beyond_the_noise_replaces_the_default(tmp_path: Path) -> None:
    rows = results(tmp_path, timed("all_to_all", (300.0, 280.0, 330.0), (300.0, 280.0, 330.0)),
                   timed("p2p", (100.0, 90.0, 120.0), (110.0, 100.0, 130.0)))
    entry = select_entry(tunable(rows, "api"))
    assert entry.dispatch == entry.combine == {"impl": "p2p"}
    assert (entry.measured["dispatch_us"], entry.measured["combine_us"]) == (100.0, 110.0)
    vs = entry.vs_default
    assert not vs.kept_default and vs.ratio == round(600 / 210, 4) and vs.low == round(560 / 250, 4) > 1.0
    assert entry_verdict(entry) == "2.86x (2.24–3.47)"


def test_without_the_default_measured_the_fastest_config_is_taken_and_says_so(tmp_path: Path) -> None:
    rows = results(tmp_path, timed("p2p", (100.0, 90.0, 120.0), (110.0, 100.0, 130.0)))
    entry = build_table(rows, CLUSTER).entries[0]  # tune's default mode: api
    assert entry.selected_by == "api" and entry.dispatch == {"impl": "p2p"} and entry.vs_default is None
    assert entry_verdict(entry) == "default not measured"


def entry(**changes) -> TuningEntry:
    base = TuningEntry(backend="torch", world_size=2, dtype="bf16", hidden=512, num_tokens=64, topk=2, num_experts=8,
                       dispatch={"impl": "p2p"}, combine={"impl": "p2p"}, selected_by="api", frontier=(),
                       measured={"dispatch_us": 10.0, "combine_us": 12.0, "dispatch_algbw_gbps": 1.0, "combine_algbw_gbps": 1.0},
                       vs_default=VsDefault(1.62, 1.31, 1.98, False, {"impl": "p2p"}, {"impl": "p2p"}))
    return replace(base, **changes)


def test_vs_default_round_trips_and_an_older_entry_without_it_still_loads(tmp_path: Path) -> None:
    path = tmp_path / "tuning.json"
    table = TuningTable(SCHEMA, CLUSTER, "t", "0.1.0", (entry(), entry(hidden=1024, vs_default=None, selected_by="kernel")))
    write_table(path, table)
    assert read_table(path) == table
    data = json.loads(path.read_text())
    assert data["entries"][0]["vs_default"] == {"ratio": 1.62, "low": 1.31, "high": 1.98, "kept_default": False,
                                                "best": {"dispatch": {"impl": "p2p"}, "combine": {"impl": "p2p"}}}
    del data["entries"][1]["selected_by"]  # a table written before modes were recorded: kernel, as before
    path.write_text(json.dumps(data))
    assert read_table(path).entries[1].selected_by == "kernel" and read_table(path).entries[1].vs_default is None


@pytest.mark.parametrize("change, message", [
    ({"ratio": "fast"}, r"entries\[0\].vs_default.ratio must be a positive number, got 'fast'"),
    ({"low": 0}, r"entries\[0\].vs_default.low must be a positive number, got 0"),
    ({"low": 2.0}, r"entries\[0\].vs_default.low <= ratio <= high does not hold: 2, 1.62, 1.98"),
    ({"kept_default": "no"}, r"entries\[0\].vs_default.kept_default must be true or false, got 'no'"),
    ({"best": {"dispatch": {"impl": "ring"}, "combine": {"impl": "p2p"}}},
     r"entries\[0\].vs_default.best.dispatch.impl must be one of all_to_all, p2p, got 'ring'"),
    ({"best": None}, r"entries\[0\].vs_default.best must be an object, got None"),
])
def test_a_bad_vs_default_gets_one_clear_line(tmp_path: Path, change: dict, message: str) -> None:
    data = TuningTable(SCHEMA, CLUSTER, "t", "0.1.0", (entry(),)).to_json()
    data["entries"][0]["vs_default"].update(change)
    (tmp_path / "tuning.json").write_text(json.dumps(data))
    with pytest.raises(TuningFileError, match=message):
        read_table(tmp_path / "tuning.json")


@pytest.fixture
def tables(tmp_path: Path, monkeypatch) -> Path:
    """A table of this machine's 2-rank cluster: an api entry and an older kernel entry."""
    write_table(tmp_path / "cpu-gloo-x2" / "tuning.json", TuningTable(SCHEMA, CLUSTER, "t", "0.1.0", (
        entry(), entry(hidden=1024, selected_by="kernel", vs_default=None))))
    monkeypatch.setenv("FUSED_A2A_TUNING_DIR", str(tmp_path))
    monkeypatch.delenv("FUSED_A2A_CLUSTER_ID", raising=False)
    tuning.clear()
    yield tmp_path
    tuning.clear()


def test_show_says_which_mode_chose_the_entry_and_how_it_compared(tables: Path, monkeypatch, capsys) -> None:
    code, out, err = run_cli(monkeypatch, capsys, "show", "--hidden", "512", "--tokens", "64", "--world-size", "2")
    assert code == 0, err
    assert "chosen by api mode; vs the default: 1.62x (1.31–1.98)" in " ".join(out.split())
    code, out, err = run_cli(monkeypatch, capsys, "show", "--hidden", "1024", "--tokens", "64", "--world-size", "2")
    assert code == 0, err
    assert ("chosen by kernel mode (the buffer's cached calls, not the full call a training step makes: a table tuned "
            "before a2a-bench tune ranked by api, or with --by kernel); vs the default: default not measured") in " ".join(out.split())


def test_table_prints_the_mode_and_the_comparison_of_each_entry(tables: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("COLUMNS", "250")
    code, out, err = run_cli(monkeypatch, capsys, "table", str(tables / "cpu-gloo-x2"))
    assert code == 0, err
    rows = [line for line in out.splitlines() if line.startswith("│ torch")]
    assert len(rows) == 2
    assert "│ api " in rows[0] and "1.62x (1.31–1.98)" in rows[0]
    assert "│ kernel " in rows[1] and "default not measured" in rows[1]
    assert "An entry chosen by kernel mode ranks the buffer's cached calls" in out
    assert "a config replaces the backend's default only when their dispatch + combine p10-p90 ranges do not overlap" in out
    markdown = (tables / "cpu-gloo-x2" / "TABLE.md").read_text()
    assert "1.62x (1.31–1.98)" in markdown and "| kernel |" in markdown
    monkeypatch.setenv("COLUMNS", "100")  # a narrow terminal: the columns that fit, and what was left out
    code, out, err = run_cli(monkeypatch, capsys, "table", str(tables / "cpu-gloo-x2"))
    assert code == 0 and max(len(line) for line in out.splitlines()) <= 100, out
    assert "1.62x (1.31–1.98)" in out and "left out to fit 100 columns: " in out and "--wide shows them" in out
    code, out, err = run_cli(monkeypatch, capsys, "table", str(tables / "cpu-gloo-x2"), "--wide")
    assert code == 0 and "left out" not in out and "knee SMs (within 5%)" in out


def test_show_on_a_machine_without_a_table_says_so_in_words(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("FUSED_A2A_TUNING_DIR", str(tmp_path))
    tuning.clear()
    code, out, err = run_cli(monkeypatch, capsys, "show", "--hidden", "512", "--tokens", "64", "--world-size", "4")
    assert code == 0, err
    assert ("no tuning table for cluster cpu-gloo-x4 (looked in " + str(tmp_path)) in " ".join(out.split())
    assert "the backend's defaults apply; a2a-bench sweep --tune makes one" in " ".join(out.split())
    tuning.clear()

