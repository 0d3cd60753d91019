"""A sweep a user can trust and read: ``--resume`` refuses another grid or other timing settings (``--extend``
adds points) and ``run.json`` keeps every invocation; ``--tune`` writes the table in the same command; an
uninstalled backend is skipped with the install hint and a sweep that measured nothing exits 2; one rank
without asking is warned about; ``--help`` tells the truth; tables fit the terminal."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from rich.console import Console

from a2a_bench.engine.results import append_row, read_results
from a2a_bench.reports.fit import Column, TextTable, print_table
from a2a_bench.reports.report import best_per_shape, summary_table
from cli_runs import assert_one_line_error, run_child, run_cli
from fused_a2a.backends import BACKENDS
from runfiles import ok_row

ONE = ["--tokens", "16", "--topk", "2", "--experts", "8", "--warmup", "1", "--iters", "2"]


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def lone_run(tmp_path_factory) -> tuple[Path, object]:
    """A sweep of one point, outside torchrun and without --nproc (1 rank)."""
    out = tmp_path_factory.mktemp("lone") / "run"
    proc = run_child("sweep", "--out", str(out), "--hidden", "64", *ONE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_one_rank_without_asking_gets_a_warning(lone_run) -> None:
    _, proc = lone_run
    warnings = [line for line in proc.stderr.splitlines() if "warning" in line]
    assert warnings == ["a2a-bench: warning: running 1 rank (no torchrun, no --nproc): nothing crosses between ranks; "
                        "use --nproc N or torchrun for a real sweep"]


@pytest.mark.parametrize("args, fragment", [
    (["--hidden", "128"], "holds another grid (hidden 64 -> 128): pass --extend to add this grid's points to it"),
    (["--hidden", "64", "--routing", "zipf:1.2"], "holds another grid (routings uniform -> zipf:1.2)"),
    (["--hidden", "64", "--iters", "3"], "was timed with other settings (iters 2 -> 3): rows timed otherwise would not compare"),
    (["--hidden", "128", "--iters", "3", "--extend"], "was timed with other settings (iters 2 -> 3)"),
])
def test_resume_refuses_another_grid_or_timing_and_writes_nothing(lone_run, monkeypatch, capsys, args, fragment) -> None:
    out, _ = lone_run
    before = files(out)
    code, _, err = run_cli(monkeypatch, capsys, "sweep", "--out", str(out), "--resume", *ONE[:-2], *args,
                           *(["--iters", "2"] if "--iters" not in args else []))
    assert_one_line_error(code, err, f"--resume: {out} {fragment}")
    assert files(out) == before


def test_extend_needs_resume(tmp_path: Path, monkeypatch, capsys) -> None:
    code, _, err = run_cli(monkeypatch, capsys, "sweep", "--out", str(tmp_path / "run"), "--extend", "--hidden", "64", *ONE)
    assert_one_line_error(code, err, "--extend adds grid points to a run folder: it needs --resume")
    assert not (tmp_path / "run").exists()


def test_extend_adds_the_new_points_and_run_json_keeps_every_invocation(lone_run, tmp_path: Path) -> None:
    first, _ = lone_run
    out = tmp_path / "run"
    out.mkdir()
    for name in ("results.csv", "run.json"):
        (out / name).write_bytes((first / name).read_bytes())
    proc = run_child("sweep", "--out", str(out), "--resume", "--extend", "--hidden", "64,128", *ONE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_results(out / "results.csv")
    assert sorted(rows["hidden"]) == [64, 128] and rows["point_id"].is_unique
    info = json.loads((out / "run.json").read_text())
    first_info = json.loads((first / "run.json").read_text())
    assert [h["spec"]["hidden"] for h in info["history"]] == [[64], [64, 128]]
    assert info["history"][0]["command"] == first_info["command"]  # the first run's command line survives
    assert [h["extend"] for h in info["history"]] == [False, True] and [h["done"] for h in info["history"]] == [0, 1]
    assert info["resumed_with_done"] == 1 and info["points"] == 2 and info["spec"]["hidden"] == [64, 128]
    # progress counts the point done before: the new one is the second of two
    lines = proc.stderr.splitlines()
    assert "sweep on cpu-gloo-x1: up to 2 points to time (1 done before)" in lines
    assert [line.split(":")[0] for line in lines if line.startswith("[")] == ["[2/2] torch impl=all_to_all bf16 h128 n16 k2 e8 uniform"]
    assert any(line.startswith("coordinate search: timed 1 of 2 grid points in ") and "(1 more were done before)" in line
               for line in lines)


def test_sweep_tune_writes_the_table_in_the_same_command(tmp_path: Path) -> None:
    out, tables = tmp_path / "run", tmp_path / "tables"
    proc = run_child("sweep", "--out", str(out), "--hidden", "64", *ONE, "--knob", "torch.impl=all_to_all,p2p",
                     "--tune", "--tune-out", str(tables))
    assert proc.returncode == 0, proc.stderr[-3000:]
    path = tables / "cpu-gloo-x1" / "tuning.json"
    assert path.is_file() and (path.parent / "TABLE.md").is_file()
    text = " ".join(proc.stdout.split())
    assert f"wrote {path}; fused_a2a does not read {tables}: run the jobs that should use it with FUSED_A2A_TUNING_DIR={tables}" in text
    assert "what a call uses: a2a-bench show --backend torch --hidden 64 --tokens 16 --world-size 1" in text
    assert "tuning table of cpu-gloo-x1 (1 entries)" in text and "best per shape by the api round trip" in text


@pytest.mark.parametrize("args, fragment", [
    (["--tune-out", "{tmp}/t"], "--tune-out names where --tune writes: pass --tune too"),
    (["--tune", "--tune-out", "{tmp}/file"], "--tune-out {tmp}/file: is a file, not a folder"),
])
def test_tune_options_are_checked_before_any_work(tmp_path: Path, monkeypatch, capsys, args, fragment) -> None:
    (tmp_path / "file").write_text("x\n")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    code, _, err = run_cli(monkeypatch, capsys, "sweep", "--out", str(tmp_path / "run"), "--hidden", "64", *ONE, *args)
    assert_one_line_error(code, err, fragment.replace("{tmp}", str(tmp_path)))
    assert not (tmp_path / "run").exists() and not (tmp_path / "t").exists()


@pytest.mark.skipif(BACKENDS["deepep"].unavailable() is None, reason="deep_ep is installed here")
def test_an_uninstalled_backend_is_skipped_with_the_install_hint_and_nothing_measured_exits_2(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = run_child("sweep", "--quick", "--backends", "deepep", "--out", str(out))  # --quick's torch knobs do not apply
    hint = ("deepep is not installed (ModuleNotFoundError: No module named 'deep_ep'); install it with "
            "scripts/install_backends.sh (README: Installing the backends), then check a2a-bench env")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == f"a2a-bench: error: nothing could be measured: 4 points skipped: {hint}"
    rows = read_results(out / "results.csv")
    assert list(rows["status"]) == [f"skipped: {hint}"] * 4
    assert f"[1] skipped: {hint}" in proc.stdout  # the summary's cell is cut; its note holds it whole


def test_help_tells_the_truth(monkeypatch, capsys) -> None:
    code, out, _ = run_cli(monkeypatch, capsys, "sweep", "--help")
    text = " ".join(out.split())
    assert code == 0 and "<bool>" not in out
    assert "(about 11 s on 2 CPU ranks)" in text and "fp8" in text
    for default in ("Hidden sizes, comma list or start:stop:step. (default: 4096)", "(default: torch)", "(default: 20)",
                    "(default: 300.0)", "Untimed iterations per mode. (default: 5)"):
        assert default in text, default


def row(routing: str, skew: float, impl: str, median: float, **over) -> dict:
    r = ok_row(point_id=f"{routing}-{impl}", routing=routing, skew=skew, knobs=json.dumps({"impl": impl}),
               is_default=impl == "all_to_all", verified=True, **over)
    for op in ("dispatch", "combine"):
        r.update({f"{op}_api_us_median": median, f"{op}_api_us_p10": median * 0.9, f"{op}_api_us_p90": median * 1.1})
    return r


def test_a_sweep_of_two_routings_shows_what_tells_its_rows_apart_and_the_best_per_shape(tmp_path: Path) -> None:
    for r in (row("uniform", 1.0, "all_to_all", 100.0), row("uniform", 1.0, "p2p", 50.0),
              row("zipf", 1.2, "all_to_all", 100.0), row("zipf", 1.2, "p2p", 95.0)):
        append_row(tmp_path / "results.csv", r)
    results = read_results(tmp_path / "results.csv")
    summary = summary_table(results)
    assert "routing" in [summary.columns[i].name for i in summary.shown()]  # the only workload column that varies
    assert "dtype bf16" in summary.heading() and "hidden 512" in summary.heading()
    best = best_per_shape(results)
    assert [(r[1], r[8], r[9], r[11]) for r in best.rows] == [
        ("uniform", "impl=p2p", "100 (90.0–110)", "2.00x (1.64–2.44)"),
        ("zipf:1.2", "default", "200 (180–220)", "kept default: 1.05x (0.86–1.29)"),
    ]


def test_a_table_fits_the_terminal_and_says_what_it_left_out() -> None:
    table = TextTable("t", (Column("name"), Column("a", drop=1), Column("b", drop=2), Column("kind", shape=True)),
                      tuple((f"row{i}", "x" * 30, "y" * 30, "same") for i in range(3)), ("a note",))
    narrow = Console(file=io.StringIO(), width=60)
    print_table(narrow, table, full="FILE.md")
    text = narrow.file.getvalue()
    assert max(len(line) for line in text.splitlines()) <= 60
    assert "x" * 30 in text and "y" * 30 not in text  # b leaves first, a fits
    assert "left out to fit 60 columns: b (--wide shows them; FILE.md has them)" in " ".join(text.split())
    assert "t; kind same" in text and "a note" in text
    wide = Console(file=io.StringIO(), width=60)
    print_table(wide, table, wide=True)  # every column, wider than the console
    assert "y" * 30 in wide.file.getvalue() and "left out" not in wide.file.getvalue()
