"""The benchmark commands ``overhead`` and ``breakdown`` run end to end on 2 CPU ranks (gloo), with the
fake DeepEP for ``overhead``'s DeepEP rows: one row per backend, path and grad mode, every figure a
number, ``added`` = ``through fused_a2a`` - ``buffer directly`` per batch (so never above the first),
and with grad the bare-autograd figures."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from cli_runs import run_child

FAKES = str(Path(__file__).parent / "fakes")
FIGURE = r"(-?\d+\.\d) \((-?\d+\.\d)–(-?\d+\.\d)\)"  # median (p10–p90); a difference may be negative


def a2a_bench(*args: str, fakes: bool = False) -> subprocess.CompletedProcess:
    """The CLI as a child process; ``fakes``: with the CPU fakes of the fused libraries importable."""
    path = os.pathsep.join(filter(None, (FAKES, os.environ.get("PYTHONPATH"))))
    return run_child(*args, env={"PYTHONPATH": path} if fakes else None)


def figures(line: str) -> list[tuple[float, float, float]]:
    return [tuple(map(float, match)) for match in re.findall(FIGURE, line)]


def test_overhead_prints_each_path_with_and_without_grad() -> None:
    proc = a2a_bench("overhead", "--nproc", "2", "--backends", "torch,deepep", "--hidden", "64", "--tokens", "16",
                     "--topk", "2", "--experts", "4", "--iters", "3", fakes=True)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    rows = {}
    for line in proc.stdout.splitlines():
        cells = [cell.strip() for cell in line.strip("│ ").split("│")]
        if len(cells) == 8 and cells[0] in ("torch", "deepep"):
            rows[tuple(cells[:3])] = figures(line)
    assert set(rows) == {("torch", "api", "yes"), ("torch", "api", "no"), ("deepep", "api", "yes"),
                         ("deepep", "api", "no"), ("deepep", "seed", "yes"), ("deepep", "seed", "no")}
    for (backend, path, grad), row in rows.items():
        assert len(row) == (5 if grad == "yes" else 3), (backend, path, grad, row)  # bare autograd: with grad only
        assert all(low <= median <= high for median, low, high in row)
        wrapped, direct, added = row[:3]
        assert direct[0] > 0 and added[0] < wrapped[0]
        if grad == "yes":
            bare, beyond = row[3:]
            assert bare[0] > 0 and beyond[0] < wrapped[0]


def test_breakdown_prints_each_stage_and_the_ratio() -> None:
    proc = a2a_bench("breakdown", "--nproc", "2", "--hidden", "64", "--tokens", "16", "--topk", "2", "--experts", "4",
                     "--dtype", "fp32", "--warmup", "1", "--iters", "3")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    row = next(line for line in proc.stdout.splitlines() if "fp32 h64 n16 k2 e4" in line)
    assert len(figures(row)) == 6  # plan, sync, tokens, routing again, api dispatch, kernel dispatch
    assert re.search(r"│ +– │", row)  # no copy: on the CPU the plan runs eagerly into a buffer of its own
    api, kernel = figures(row)[4][0], figures(row)[5][0]
    printed = float(re.search(r"(\d+\.\d\d)x", row).group(1))
    assert abs(printed - api / kernel) < 0.02, row  # the ratio of the medians (printed to 0.1 µs)


def test_paths_prints_each_path_side_by_side_with_its_ratios() -> None:
    proc = a2a_bench("paths", "--nproc", "2", "--backends", "torch,hybridep", "--hidden", "64", "--tokens", "16",
                     "--topk", "2", "--experts", "8", "--warmup", "1", "--iters", "3", fakes=True)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    rows = {}
    for line in proc.stdout.splitlines():
        cells = [cell.strip() for cell in line.strip("│ ").split("│")]
        if len(cells) == 10 and cells[0] in ("torch", "hybridep"):
            rows[(cells[0], cells[2])] = cells
    assert set(rows) == {(b, op) for b in ("torch", "hybridep") for op in ("dispatch", "combine")}
    for (backend, op), cells in rows.items():
        raw, api = (figures(cell)[0][0] for cell in cells[3:5])
        assert abs(float(cells[5].rstrip("x")) - api / raw) < 0.02, cells  # api/raw: the ratio of the medians
        assert (cells[6] != "–") == (op == "dispatch")  # the cached kernel: a dispatch only
        has_seed = backend == "hybridep"  # the torch backend has no seed functions
        assert (cells[7] != "–") == has_seed and (cells[8] != "–") == has_seed and (cells[9] != "–") == has_seed
    bad = a2a_bench("paths", "--nproc", "2", "--backends", "nope")
    assert bad.returncode == 2 and "nope" in bad.stderr
