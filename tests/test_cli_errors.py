"""Every bad option or file: one clear line on stderr, exit status 2, nothing written."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from a2a_bench.cli import main
from cli_runs import assert_one_line_error, run_cli


SWEEP_CASES = [
    (["--backends", "nccl"], "unknown backend 'nccl'"),
    (["--bogus"], "No such option: --bogus"),
    (["--iters", "many"], "Invalid value for '--iters'"),
    (["--hidden", ""], "--hidden: empty list"),
    (["--hidden", ",,"], "--hidden: empty list"),
    (["--sms", "64:8:8"], "range '64:8:8' is reversed"),
    (["--sms", "8:64:0"], "range step must be positive"),
    (["--sms", "8:64"], "a range is start:stop:step"),
    (["--tokens", "1k"], "'1k' is not an integer"),
    (["--hidden", "-8"], "hidden: values must be positive"),
    (["--experts", "15", "--nproc", "2"], "experts (15) is not divisible by the number of ranks (2)"),
    (["--topk", "32", "--experts", "16"], "topk (32) is larger than the number of experts (16)"),
    (["--dtype", "int8"], "unknown dtype 'int8'"),
    (["--routing", "pareto"], "unknown routing 'pareto'"),
    (["--routing", "zipf:steep"], "the skew must be a number"),
    (["--knob", "torch.chunks=2"], "backend 'torch' has no knob chunks"),
    (["--knob", "torch.impl=ring"], "impl must be one of all_to_all, p2p"),
    (["--knob", "impl=p2p"], "--knob takes backend.knob=v1,v2"),
    (["--knob", "nccl.impl=p2p"], "unknown backend 'nccl'"),
    (["--iters", "0"], "warmup must be >= 0 and iters >= 1"),
    (["--point-timeout", "0"], "point timeout must be positive"),
    (["--nproc", "0"], "--nproc must be >= 1"),
]


@pytest.mark.parametrize("args, pattern", SWEEP_CASES, ids=[" ".join(a) for a, _ in SWEEP_CASES])
def test_sweep_rejects_bad_options(monkeypatch, capsys, tmp_path: Path, args, pattern) -> None:
    out = tmp_path / "run"
    code, _, err = run_cli(monkeypatch, capsys, "sweep", "--out", str(out), *args)
    assert_one_line_error(code, err, pattern)
    assert not out.exists()


@pytest.mark.parametrize(
    "text, pattern",
    [
        ("hidden = [1024,\n", "does not parse"),
        ("widgets = 3\n", "unknown key widgets"),
        ("hidden = [0]\n", "hidden: values must be positive"),
        ('backends = ["torch"]\n[knobs]\ntorch = 3\n', "knobs must be a table of tables"),
        ('[knobs.torch]\nimpl = ["ring"]\n', "impl must be one of"),
    ],
)
def test_sweep_rejects_bad_spec_files(monkeypatch, capsys, tmp_path: Path, text: str, pattern: str) -> None:
    spec = tmp_path / "spec.toml"
    spec.write_text(text)
    out = tmp_path / "run"
    code, _, err = run_cli(monkeypatch, capsys, "sweep", "--spec", str(spec), "--out", str(out))
    assert_one_line_error(code, err, pattern)
    assert not out.exists()


def test_sweep_rejects_missing_spec_file(monkeypatch, capsys, tmp_path: Path) -> None:
    code, _, err = run_cli(monkeypatch, capsys, "sweep", "--spec", str(tmp_path / "none.toml"), "--out", str(tmp_path / "r"))
    assert_one_line_error(code, err, "cannot read spec file")


def test_sweep_refuses_to_overwrite_results_without_resume(monkeypatch, capsys, tmp_path: Path) -> None:
    (tmp_path / "results.csv").write_text("point_id\n")
    code, _, err = run_cli(monkeypatch, capsys, "sweep", "--quick", "--out", str(tmp_path))
    assert_one_line_error(code, err, "already exists: pass --resume")
    assert (tmp_path / "results.csv").read_text() == "point_id\n"


def test_tune_rejects_a_folder_without_results(monkeypatch, capsys, tmp_path: Path) -> None:
    code, _, err = run_cli(monkeypatch, capsys, "tune", str(tmp_path), "--out", str(tmp_path / "tables"))
    assert_one_line_error(code, err, "no results.csv in")
    assert not (tmp_path / "tables").exists()


def test_tune_rejects_results_of_another_format(monkeypatch, capsys, tmp_path: Path) -> None:
    (tmp_path / "results.csv").write_text("a,b\n1,2\n")
    code, _, err = run_cli(monkeypatch, capsys, "tune", str(tmp_path), "--out", str(tmp_path / "tables"))
    assert_one_line_error(code, err, "unexpected columns")


@pytest.mark.parametrize(
    "content, pattern",
    [
        (json.dumps({"schema": "a2a-bench/tuning/v0", "cluster": {"id": "x"}, "entries": []}), "schema"),
        ('{"schema": "a2a-bench/tuning/v1", ', "JSON"),
    ],
)
def test_table_rejects_bad_tuning_files(monkeypatch, capsys, tmp_path: Path, content: str, pattern: str) -> None:
    (tmp_path / "tuning.json").write_text(content)
    code, _, err = run_cli(monkeypatch, capsys, "table", str(tmp_path))
    assert_one_line_error(code, err, pattern)
    assert not (tmp_path / "TABLE.md").exists()


@pytest.mark.parametrize(
    "args, pattern",
    [
        (["--backend", "nccl"], "unknown backend 'nccl'"),
        (["--knob", "impl"], "--knob takes name=value"),
        (["--knob", "chunks=2"], "has no knob chunks"),
        (["--hidden", "x"], "Invalid value for '--hidden'"),
    ],
)
def test_show_rejects_bad_options(monkeypatch, capsys, args, pattern) -> None:
    code, _, err = run_cli(monkeypatch, capsys, "show", "--hidden", "1024", "--tokens", "128", "--world-size", "2", *args)
    assert_one_line_error(code, err, pattern)


@pytest.mark.parametrize(
    "args, pattern",
    [
        (["--backends", "nccl"], "unknown backend 'nccl'"),
        (["--hidden", "0"], "hidden: values must be positive"),
        (["--experts", "7", "--nproc", "2"], "experts (7) is not divisible by the number of ranks (2)"),
        (["--nproc", "0"], "--nproc must be >= 1"),
    ],
)
def test_speedup_rejects_bad_options(monkeypatch, capsys, args, pattern) -> None:
    code, _, err = run_cli(monkeypatch, capsys, "speedup", *args)
    assert_one_line_error(code, err, pattern)


def test_sweep_rejects_fp8_with_hidden_not_divisible_by_128(monkeypatch, capsys, tmp_path: Path) -> None:
    code, _, err = run_cli(monkeypatch, capsys, "sweep", "--dtype", "fp8", "--hidden", "1000", "--out", str(tmp_path / "r"))
    assert_one_line_error(code, err, "fp8 dispatch needs hidden sizes divisible by 128")


def test_version_and_a_bare_command(monkeypatch, capsys) -> None:
    from a2a_bench import __version__

    monkeypatch.setattr(sys, "argv", ["a2a-bench", "--version"])
    with pytest.raises(SystemExit) as exc:
        main()
    captured = capsys.readouterr()
    assert exc.value.code == 0 and captured.out == f"a2a-bench {__version__}\n"

    monkeypatch.setattr(sys, "argv", ["a2a-bench"])
    with pytest.raises(SystemExit) as exc:
        main()
    captured = capsys.readouterr()
    assert exc.value.code == 0 and "error" not in captured.err
    assert "Usage" in captured.out and "sweep" in captured.out
