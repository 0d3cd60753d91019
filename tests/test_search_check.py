"""``a2a-bench search-check``: what the default search timed against an exhaustive run of the same knob
grid, and whether its choice is within 3% of the exhaustive best; runs whose grids or kinds do not fit
are refused with one line."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from a2a_bench.engine.results import RunInfo, append_row, write_run_info
from a2a_bench.engine.runner import RunContext, base_row
from a2a_bench.engine.spec import SweepSpec, expand
from a2a_bench.reports.search_check import check_search, summary
from cli_runs import assert_one_line_error, run_child, run_cli

FAKES = str(Path(__file__).parent / "fakes")
SPEC = SweepSpec(backends=("deepep",), hidden=(64,), tokens=(16, 32), topk=(2,), experts=(4,), sms=(8, 16, 24, 32),
                 knobs={"deepep": {"nvl_send": (0, 8, 16)}}, warmup=1, iters=2)


def cost(knobs: dict, tokens: int) -> tuple[float, float]:
    """Dispatch and combine µs of a made-up machine: best at 24 SMs and nvl_send 8 (by 2 µs)."""
    sms = knobs["num_sms"]
    base = (1000.0 / sms if sms <= 24 else 1000.0 / 24 + 5.0) * tokens / 16 + (2.0 if knobs["nvl_send"] != 8 else 0.0)
    return base, base


def write_run(folder: Path, spec: SweepSpec, timed: set | None = None, cluster: str = "cpu-gloo-x2", skew=lambda p: 1.0) -> None:
    """A run folder of ``spec`` on 2 ranks as the sweep writes it: a row per point of ``timed`` (every
    point when ``None``), times from :func:`cost` (times ``skew(point)``)."""
    folder.mkdir(parents=True)
    ctx = RunContext(device=None, cluster=cluster, link_peak_gbps=1.0, warmup=spec.warmup, iters=spec.iters)
    points = expand(spec, 2)
    for point in points:
        if timed is not None and point.point_id not in timed:
            continue
        row = {**base_row(point, ctx), "status": "ok", "verified": True, "inputs_hash": "h"}
        d, c = (t * skew(point) for t in cost(point.knob_dict, point.workload.num_tokens))
        for op, us in (("dispatch", d), ("combine", c)):
            for stat in ("median", "p10", "p90", "min", "max"):
                row[f"{op}_kernel_us_{stat}"] = us
        append_row(folder / "results.csv", row)
    write_run_info(folder / "run.json", RunInfo(spec=spec.to_json(), cluster={"id": cluster}, world_size=2,
                                                versions={}, command=["a2a-bench", "sweep"], points=len(points),
                                                resumed_with_done=0))


def searched(spec: SweepSpec) -> set:
    """The points the default search times on :func:`cost` (run here, as the sweep runs it)."""
    from a2a_bench.engine.search import coordinate_search, groups
    from fused_a2a.backends import get_backend

    timed = set()

    def time(point) -> float:
        timed.add(point.point_id)
        return sum(cost(point.knob_dict, point.workload.num_tokens))

    for group in groups(expand(spec, 2)):
        coordinate_search(group, get_backend("deepep").defaults(), time, "num_sms")
    return timed


def test_the_search_is_judged_by_its_choice_in_the_exhaustive_run(tmp_path: Path) -> None:
    write_run(tmp_path / "default", SPEC, timed=searched(SPEC), skew=lambda p: 0.5)  # another run's level: ignored
    write_run(tmp_path / "full", SweepSpec(**{**SPEC.__dict__, "exhaustive": True}))
    checks = check_search(tmp_path / "default", tmp_path / "full")
    assert [c.group[5] for c in checks] == [16, 32] and all(c.grid == 12 and c.exhaustive_timed == 12 for c in checks)
    assert all(c.timed < c.grid for c in checks)
    for c in checks:
        assert c.best == {**c.best, "num_sms": 24, "nvl_send": 8} and c.searched == ("num_sms", "nvl_send")
        assert c.ratio == pytest.approx(c.chosen_us / c.best_us) and c.within(0.03) == (c.ratio <= 1.03)
    line = summary(checks, 0.03)
    timed = sum(c.timed for c in checks)
    assert line.startswith(f"default search timed {timed} of 24 grid points ({timed / 24:.1%}) in 2 groups")


def test_a_choice_4_percent_off_is_not_within_3(tmp_path: Path) -> None:
    spec = SweepSpec(**{**SPEC.__dict__, "tokens": (16,)})
    full = SweepSpec(**{**spec.__dict__, "exhaustive": True})
    best = next(p for p in expand(spec, 2) if p.knob_dict["num_sms"] == 24 and p.knob_dict["nvl_send"] == 8)
    chosen = next(p for p in expand(spec, 2) if p.knob_dict["num_sms"] == 32 and p.knob_dict["nvl_send"] == 0)
    write_run(tmp_path / "default", spec, timed={chosen.point_id})
    # in the exhaustive run the chosen config takes 4% longer than the best
    write_run(tmp_path / "full", full, skew=lambda p: (cost(best.knob_dict, 16)[0] * 1.04 / cost(p.knob_dict, 16)[0])
              if p.point_id == chosen.point_id else 1.0)
    (check,) = check_search(tmp_path / "default", tmp_path / "full")
    assert check.ratio == pytest.approx(1.04) and check.within(0.03) is False and check.within(0.05) is True
    assert "within 3% of the exhaustive best in 0 of 1 judged groups (worst: +4.0%)" in summary([check], 0.03)


def test_an_unfinished_exhaustive_group_is_not_judged(tmp_path: Path, monkeypatch, capsys) -> None:
    spec = SweepSpec(**{**SPEC.__dict__, "tokens": (16,)})
    full = SweepSpec(**{**spec.__dict__, "exhaustive": True})
    write_run(tmp_path / "default", spec, timed=searched(spec))
    write_run(tmp_path / "full", full, timed={p.point_id for p in expand(full, 2)[:5]})
    (check,) = check_search(tmp_path / "default", tmp_path / "full")
    assert check.exhaustive_timed == 5 and check.within(0.03) is None
    monkeypatch.setenv("COLUMNS", "250")
    code, out, _ = run_cli(monkeypatch, capsys, "search-check", str(tmp_path / "default"), str(tmp_path / "full"))
    assert code == 0 and "n/a (exhaustive timed 5 of 12)" in out and "in 0 of 0 judged groups" in out


def bad_pairs(tmp_path: Path):
    full = SweepSpec(**{**SPEC.__dict__, "exhaustive": True})
    write_run(tmp_path / "default", SPEC)
    write_run(tmp_path / "full", full)
    write_run(tmp_path / "other-grid", SweepSpec(**{**full.__dict__, "knobs": {"deepep": {"nvl_send": (0, 4)}}}))
    write_run(tmp_path / "other-cluster", full, cluster="cpu-gloo-x4")
    write_run(tmp_path / "other-shape", SweepSpec(**{**full.__dict__, "hidden": (128,)}))
    return {
        "swapped": ((tmp_path / "full", tmp_path / "default"), "is an --exhaustive run: pass a default-search run first"),
        "two defaults": ((tmp_path / "default", tmp_path / "default"), "is not an --exhaustive run: pass one second"),
        "grids": ((tmp_path / "default", tmp_path / "other-grid"),
                  "the runs search different knob grids for deepep: nvl_send [0, 8, 16] in"),
        "clusters": ((tmp_path / "default", tmp_path / "other-cluster"), "different clusters (cpu-gloo-x2 and cpu-gloo-x4)"),
        "no common shape": ((tmp_path / "default", tmp_path / "other-shape"), "nothing to compare"),
        "missing": ((tmp_path / "default", tmp_path / "nowhere"), "no run.json in"),
    }


def test_runs_that_do_not_fit_are_refused_with_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    for name, ((first, second), fragment) in bad_pairs(tmp_path).items():
        code, _, err = run_cli(monkeypatch, capsys, "search-check", str(first), str(second))
        assert_one_line_error(code, err, fragment)
    code, _, err = run_cli(monkeypatch, capsys, "search-check", str(tmp_path / "default"), str(tmp_path / "full"),
                           "--within", "0")
    assert_one_line_error(code, err, "--within must be a positive percentage, got 0")


def test_on_run_folders_of_real_sweeps(tmp_path: Path) -> None:
    grid = ["--backends", "deepep", "--sms", "8,16,24", "--knob", "deepep.nvl_send=0,8", "--hidden", "64",
            "--tokens", "16", "--topk", "2", "--experts", "4", "--warmup", "1", "--iters", "2"]
    env = {"PYTHONPATH": os.pathsep.join(filter(None, (FAKES, os.environ.get("PYTHONPATH"))))}
    for name, extra in (("default", []), ("full", ["--exhaustive"])):
        proc = run_child("sweep", "--nproc", "2", "--out", str(tmp_path / name), *grid, *extra, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_child("search-check", str(tmp_path / "default"), str(tmp_path / "full"))
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "default" / "run.json").read_text())["points"] == 6
    (row,) = [line for line in proc.stdout.splitlines() if line.startswith("│ deepep")]
    cells = [cell.strip() for cell in row.strip("│").split("│")]
    assert cells[1] == "bf16 h64 n16 k2 e4 uniform w2" and cells[2].endswith("/ 6") and int(cells[2].split()[0]) < 6
    assert cells[3].startswith("num_sms=") and float(cells[7]) >= 1.0 and cells[8] in ("yes", "no")
    assert "grid points" in proc.stdout.splitlines()[-1]
