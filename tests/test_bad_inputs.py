"""Every wrong input of issue 12, one table: (command, input, expected exit, message fragment, files untouched).

Each case builds its files under a fresh folder, runs the CLI (in this process; the torchrun case as a
real torchrun job of 2 ranks), and checks: the exit status, one line on stderr holding the fragment
(the file it names included), and, where the table says so, that every file under the folder is
byte for byte what it was and no file was added (nothing half-written, nothing written outside
``--out``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cli_runs import run_cli
from runfiles import ok_row, run_info, tuning_json, write_run

ROOT_WRITES_ANYWHERE = os.geteuid() == 0


def read_only(folder: Path) -> None:
    folder.mkdir()
    folder.chmod(0o555)


def spec_file(text: str):
    return lambda tmp: (tmp / "spec.toml").write_text(text + "\n")


SETUPS = {
    "file": lambda tmp: (tmp / "f").write_text("not a folder\n"),
    "read-only folder": lambda tmp: read_only(tmp / "ro"),
    "a run": lambda tmp: write_run(tmp / "run"),
    "results of another tool": lambda tmp: write_run(tmp / "run", rows=[]) or (tmp / "run" / "results.csv").write_text("a,b\n1,2\n"),
    "run.json of another tool": lambda tmp: write_run(tmp / "run", info={"name": "x", "cluster": {"id": "y"}}),
    "run.json of another cluster": lambda tmp: write_run(tmp / "run", info=run_info(id="h200-x8-nv18")),
    "text in a µs column": lambda tmp: write_run(tmp / "run", rows=[ok_row(dispatch_kernel_us_median="fast")]),
    "text in hidden": lambda tmp: write_run(tmp / "run", rows=[ok_row(hidden="big")]),
    "results not UTF-8": lambda tmp: write_run(tmp / "run", rows=[]) or (tmp / "run" / "results.csv").write_bytes(b"\xff\xfe\x00x\n"),
    "results.csv unreadable": lambda tmp: write_run(tmp / "run", rows=[]) or (tmp / "run" / "results.csv").mkdir(),
    "run.json unreadable": lambda tmp: write_run(tmp / "run") or (tmp / "run" / "run.json").unlink() or (tmp / "run" / "run.json").mkdir(),
    "cluster 5": lambda tmp: write_run(tmp / "run", info={**run_info().to_json(), "cluster": 5}),
    "cluster without id": lambda tmp: write_run(tmp / "run", info={**run_info().to_json(), "cluster": {"gpu": None}}),
    "cluster id ../../etc": lambda tmp: write_run(tmp / "run", info={**run_info().to_json(), "cluster": {"id": "../../etc"}}),
    "table without dispatch_us": lambda tmp: tuning_json(tmp / "tables" / "cpu-gloo-x2", dispatch_us=None),
    "table with zero times": lambda tmp: tuning_json(tmp / "tables" / "cpu-gloo-x2", dispatch_us=0.0, combine_us=0.0),
    "tuning.json unreadable": lambda tmp: (tmp / "tables" / "cpu-gloo-x2" / "tuning.json").mkdir(parents=True),
    "seed = 1.5": spec_file("seed = 1.5"),
    "iters = true": spec_file("iters = true"),
    'iters = "ten"': spec_file('iters = "ten"'),
    'exhaustive = "yes"': spec_file('exhaustive = "yes"'),
    'point_timeout_s = "soon"': spec_file('point_timeout_s = "soon"'),
    "spec file unreadable": lambda tmp: (tmp / "spec.toml").mkdir(),
}

SHOW = ["show", "--hidden", "512", "--tokens", "64", "--world-size", "2"]
EXPORT = ["export", "--format", "env", "--backend", "torch", "--hidden", "512", "--tokens", "64", "--world-size", "2"]
SPEC_SWEEP = ["sweep", "--spec", "{tmp}/spec.toml", "--out", "{tmp}/out"]


@dataclass(frozen=True)
class Case:
    """One wrong input: the files it needs (:data:`SETUPS`), the command line (``{tmp}``: the case's
    folder), extra environment, the exit status, a fragment of the one error line, and whether every
    file must be left as it was."""

    setup: tuple[str, ...]
    argv: tuple[str, ...]
    exit: int
    fragment: str
    untouched: bool = True
    env: dict = field(default_factory=dict)
    launcher: str = "cli"
    needs_non_root: bool = False


def case(setup, argv, exit_, fragment, **kw) -> Case:
    setup = (setup,) if isinstance(setup, str) else tuple(setup)
    return Case(setup, tuple(argv), exit_, fragment, **kw)


CASES = {
    # --out that is a file, a path through a file, a read-only folder
    "sweep --out file": case("file", ["sweep", "--out", "{tmp}/f"], 2, "--out {tmp}/f: is a file, not a folder"),
    "sweep --out through a file": case("file", ["sweep", "--out", "{tmp}/f/run"], 2, "{tmp}/f is a file, not a folder"),
    "sweep --out read-only": case("read-only folder", ["sweep", "--out", "{tmp}/ro"], 2, "is not writable", needs_non_root=True),
    "sweep --nproc --out file": case("file", ["sweep", "--nproc", "2", "--out", "{tmp}/f"], 2, "is a file, not a folder"),
    "tune --out file": case(("a run", "file"), ["tune", "{tmp}/run", "--out", "{tmp}/f"], 2, "--out {tmp}/f: is a file"),
    "tune --out through a file": case(("a run", "file"), ["tune", "{tmp}/run", "--out", "{tmp}/f/t"], 2, "{tmp}/f is a file"),
    "tune --out read-only": case(("a run", "read-only folder"), ["tune", "{tmp}/run", "--out", "{tmp}/ro"], 2,
                                 "is not writable", needs_non_root=True),
    "plot --out file": case(("a run", "file"), ["plot", "{tmp}/run", "--out", "{tmp}/f"], 2, "--out {tmp}/f: is a file"),
    "plot --out through a file": case(("a run", "file"), ["plot", "{tmp}/run", "--out", "{tmp}/f/p"], 2, "{tmp}/f is a file"),
    "plot --out read-only": case(("a run", "read-only folder"), ["plot", "{tmp}/run", "--out", "{tmp}/ro"], 2,
                                 "is not writable", needs_non_root=True),
    "export --out folder": case("a run", [*EXPORT, "--cluster-dir", "{tmp}/t", "--out", "{tmp}/run"], 2,
                                "--out {tmp}/run: is a folder, not a file"),
    "export --out through a file": case("file", [*EXPORT, "--out", "{tmp}/f/x.env"], 2, "{tmp}/f is a file, not a folder"),
    "export --out read-only": case("read-only folder", [*EXPORT, "--out", "{tmp}/ro/x.env"], 2, "is not writable",
                                   needs_non_root=True),
    # spec values of the wrong type; an unreadable spec file
    "spec seed = 1.5": case("seed = 1.5", SPEC_SWEEP, 2, "seed must be an integer, got 1.5"),
    "spec iters = true": case("iters = true", SPEC_SWEEP, 2, "iters must be an integer, got true"),
    'spec iters = "ten"': case('iters = "ten"', SPEC_SWEEP, 2, 'iters must be an integer, got "ten"'),
    'spec exhaustive = "yes"': case('exhaustive = "yes"', SPEC_SWEEP, 2, 'exhaustive must be true or false, got "yes"'),
    'spec point_timeout_s = "soon"': case('point_timeout_s = "soon"', SPEC_SWEEP, 2, 'point_timeout_s must be a number of seconds, got "soon"'),
    "spec file unreadable": case("spec file unreadable", SPEC_SWEEP, 2, "cannot read spec file {tmp}/spec.toml"),
    # --sms where no backend has num_sms
    "sweep --sms with torch only": case((), ["sweep", "--sms", "8", "--out", "{tmp}/out"], 2, "--sms sets SM knobs, which none of torch has"),
    # --resume onto files that are not this tool's, or of another cluster
    "resume onto results of another tool": case("results of another tool", ["sweep", "--resume", "--out", "{tmp}/run"], 2,
                                                "{tmp}/run/results.csv has unexpected columns"),
    "resume onto a run.json of another tool": case("run.json of another tool", ["sweep", "--resume", "--out", "{tmp}/run"], 2,
                                                   "{tmp}/run/run.json is not a run.json of a2a-bench"),
    "resume onto another cluster": case("run.json of another cluster", ["sweep", "--resume", "--out", "{tmp}/run"], 2,
                                        "is a sweep on cluster h200-x8-nv18, this one runs on cpu-gloo-x1"),
    "resume onto text in a µs column": case("text in a µs column", ["sweep", "--resume", "--out", "{tmp}/run"], 2,
                                            "{tmp}/run/results.csv: line 2 has 'fast' in column dispatch_kernel_us_median, not a number"),
    "resume --nproc onto results of another tool": case("results of another tool", ["sweep", "--nproc", "2", "--resume", "--out", "{tmp}/run"], 2,
                                                        "{tmp}/run/results.csv has unexpected columns"),
    # results and run.json of tune, compare, plot
    "tune: text in a µs column": case("text in a µs column", ["tune", "{tmp}/run", "--out", "{tmp}/t"], 2,
                                      "'fast' in column dispatch_kernel_us_median, not a number"),
    "compare: text in a µs column": case("text in a µs column", ["compare", "{tmp}/run", "--hidden", "512", "--tokens", "64"], 2,
                                         "'fast' in column dispatch_kernel_us_median, not a number"),
    "plot: text in hidden": case("text in hidden", ["plot", "{tmp}/run"], 2, "'big' in column hidden, not a number"),
    "plot: results not UTF-8": case("results not UTF-8", ["plot", "{tmp}/run"], 2, "cannot read {tmp}/run/results.csv: it is not UTF-8 text"),
    "tune: results.csv unreadable": case("results.csv unreadable", ["tune", "{tmp}/run", "--out", "{tmp}/t"], 2,
                                         "cannot read {tmp}/run/results.csv: Is a directory"),
    "tune: run.json unreadable": case("run.json unreadable", ["tune", "{tmp}/run", "--out", "{tmp}/t"], 2,
                                      "cannot read {tmp}/run/run.json: Is a directory"),
    "tune: cluster 5": case("cluster 5", ["tune", "{tmp}/run", "--out", "{tmp}/t"], 2, "{tmp}/run/run.json: cluster must be an object, got 5"),
    "tune: cluster without id": case("cluster without id", ["tune", "{tmp}/run", "--out", "{tmp}/t"], 2, "{tmp}/run/run.json: cluster lacks its id"),
    "tune: cluster id ../../etc": case("cluster id ../../etc", ["tune", "{tmp}/run", "--out", "{tmp}/t/a/b"], 2,
                                       "cluster id '../../etc' is not a name"),
    # tuning tables for table and export
    "table without measured.dispatch_us": case("table without dispatch_us", ["table", "{tmp}/tables/cpu-gloo-x2"], 2,
                                               "lacks measured.dispatch_us"),
    "table with zero times": case("table with zero times", ["table", "{tmp}/tables/cpu-gloo-x2"], 2,
                                  "measured.dispatch_us must be a positive time, got 0"),
    "table: tuning.json unreadable": case("tuning.json unreadable", ["table", "{tmp}/tables/cpu-gloo-x2"], 2,
                                          "tuning file {tmp}/tables/cpu-gloo-x2/tuning.json: cannot be read"),
    "export: tuning.json unreadable": case("tuning.json unreadable", [*EXPORT, "--cluster-dir", "{tmp}/tables/cpu-gloo-x2"], 2,
                                           "tuning file {tmp}/tables/cpu-gloo-x2/tuning.json: cannot be read"),
    # a backend that is not installed
    "speedup --backends deepep without DeepEP": case((), ["speedup", "--backends", "deepep"], 2, "deepep is not installed (ModuleNotFoundError: No module named 'deep_ep'); install it with scripts/install_backends.sh"),
    # the benchmark commands validate before any rank starts
    "overhead --backends nosuch": case((), ["overhead", "--backends", "nosuch"], 2, "unknown backend 'nosuch'; choose from torch"),
    "overhead --backends deepep without DeepEP": case((), ["overhead", "--backends", "deepep"], 2, "deepep is not installed (ModuleNotFoundError: No module named 'deep_ep'); install it with scripts/install_backends.sh"),
    "overhead --hidden 0": case((), ["overhead", "--hidden", "0"], 2, "hidden: values must be positive, got [0]"),
    "overhead --iters 0": case((), ["overhead", "--iters", "0"], 2, "iters >= 1, got 5 and 0"),
    "overhead --nproc 0": case((), ["overhead", "--nproc", "0"], 2, "--nproc must be >= 1, got 0"),
    "breakdown --impl bogus": case((), ["breakdown", "--impl", "bogus"], 2, "impl must be one of all_to_all, p2p, got 'bogus'"),
    "breakdown --hidden x": case((), ["breakdown", "--hidden", "x"], 2, "--hidden: 'x' is not an integer"),
    "breakdown --dtype int8": case((), ["breakdown", "--dtype", "int8"], 2, "unknown dtype 'int8'"),
    "breakdown --tokens -1": case((), ["breakdown", "--tokens", "-1"], 2, "tokens: values must be positive, got [-1]"),
    # show validates as the library does
    "show --hidden 0": case((), ["show", "--hidden", "0", "--tokens", "64", "--world-size", "2"], 2, "--hidden must be >= 1, got 0"),
    "show --world-size 0": case((), ["show", "--hidden", "512", "--tokens", "64", "--world-size", "0"], 2, "--world-size must be >= 1, got 0"),
    "show --tokens -1": case((), ["show", "--hidden", "512", "--tokens", "-1", "--world-size", "2"], 2, "--tokens must be >= 0, got -1"),
    "show --dtype int8": case((), [*SHOW, "--dtype", "int8"], 2, "unknown dtype 'int8'"),
    "show --knob impl=bogus": case((), [*SHOW, "--knob", "impl=bogus"], 2, "impl must be one of all_to_all, p2p, got 'bogus'"),
    "show FUSED_A2A_TORCH_IMPL=bogus": case((), SHOW, 2, "environment variable FUSED_A2A_TORCH_IMPL: impl must be one of",
                                            env={"FUSED_A2A_TORCH_IMPL": "bogus"}),
    "show deepep num_sms=7": case((), ["show", "--backend", "deepep", "--hidden", "7168", "--tokens", "64", "--world-size", "2",
                                       "--knob", "num_sms=7"], 2, "num_sms must be an even int >= 2"),
    "show --experts 3 on 2 ranks": case((), [*SHOW, "--experts", "3"], 2, "num_experts (3) is not divisible by the group size (2)"),
    "show --cluster ../../etc": case((), [*SHOW, "--cluster", "../../etc"], 2, "cluster id '../../etc' is not a name"),
    "env --world-size -1": case((), ["env", "--world-size", "-1"], 2, "--world-size must be >= 1, got -1"),
    # under torchrun: rank 0 prints the error once; torchrun itself then fails with status 1 (its own report)
    "torchrun sweep --bogus": case((), ["sweep", "--bogus", "--out", "{tmp}/out"], 1, "No such option: --bogus",
                                   launcher="torchrun"),
}


def snapshot(folder: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("name", list(CASES))
def test_a_wrong_input_gets_one_line_and_its_status(name: str, tmp_path: Path, monkeypatch, capsys) -> None:
    c = CASES[name]
    if c.needs_non_root and ROOT_WRITES_ANYWHERE:
        pytest.skip("root writes into read-only folders")
    tmp = tmp_path / "case"
    tmp.mkdir()
    for setup in c.setup:
        SETUPS[setup](tmp)
    before = snapshot(tmp)
    argv = [word.format(tmp=tmp) for word in c.argv]
    fragment = c.fragment.format(tmp=tmp)
    monkeypatch.chdir(tmp)
    for key in ("FUSED_A2A_TUNING_DIR", "FUSED_A2A_CLUSTER_ID", "FUSED_A2A_TUNING_STRICT"):
        monkeypatch.delenv(key, raising=False)
    for key, value in c.env.items():
        monkeypatch.setenv(key, value)
    try:
        if c.launcher == "torchrun":
            code, err = _torchrun(argv, tmp)
            assert err.count(fragment) == 1, err  # once, from rank 0
            assert "exitcode  : 2" in err, err
        else:
            code, _, err = run_cli(monkeypatch, capsys, *argv)
            lines = err.strip().splitlines()
            assert len(lines) == 1, err
            assert lines[0].startswith("a2a-bench: error: ") and fragment in lines[0], lines[0]
        assert code == c.exit, err
    finally:
        (tmp / "ro").chmod(0o755) if (tmp / "ro").exists() else None
    if c.untouched:
        assert snapshot(tmp) == before


def _torchrun(argv: list[str], cwd: Path) -> tuple[int, str]:
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
                           "-m", "a2a_bench", *argv], cwd=cwd, capture_output=True, text=True, timeout=120)
    return proc.returncode, proc.stderr
