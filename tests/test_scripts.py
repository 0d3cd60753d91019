"""The launch scripts: --dry-run prints the commands; bad arguments get one line and status 2."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).parent.parent / "scripts"


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", *args], capture_output=True, text=True, timeout=60, env=env)


def test_multinode_dry_run_prints_a_c10d_torchrun_with_resume() -> None:
    proc = run(str(SCRIPTS / "sweep_multinode.sh"), "--dry-run", "--nnodes", "2", "--master", "node1",
               "--nproc-per-node", "8", "--", "--out", "runs/x", "--backends", "torch")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [
        "torchrun", "--nnodes", "2", "--nproc-per-node", "8", "--rdzv-backend", "c10d", "--rdzv-endpoint",
        "node1:29500", "--rdzv-id", "a2a-bench", "--max-restarts", "3", "-m", "a2a_bench", "sweep", "--resume",
        "--out", "runs/x", "--backends", "torch",
    ]


def test_sbatch_dry_run_prints_srun_and_torchrun(tmp_path: Path) -> None:
    proc = run(str(SCRIPTS / "sweep.sbatch"), "--dry-run", "--out", "runs/y")
    assert proc.returncode == 0, proc.stderr
    srun, torchrun = proc.stdout.strip().splitlines()
    assert srun.startswith("srun --nodes 2 --ntasks-per-node 1 bash ") and "sweep_multinode.sh" in srun
    assert torchrun.startswith("torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d")
    assert torchrun.rstrip().endswith("sweep --resume --out runs/y")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--nnodes", "x", "--master", "a"], "--nnodes must be a positive integer, got 'x'"),
        (["--nnodes", "2"], "--master HOST[:PORT] is required"),
        (["--nnodes", "2", "--master", "a", "--nproc-per-node", "0"], "--nproc-per-node must be a positive integer"),
        (["--nnodes", "2", "--master", "a", "--max-restarts", "-1"], "--max-restarts must be a non-negative integer"),
        (["--frobnicate"], "unknown option --frobnicate"),
    ],
)
def test_multinode_rejects_bad_arguments(args, message) -> None:
    proc = run(str(SCRIPTS / "sweep_multinode.sh"), "--dry-run", *args)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"sweep_multinode.sh: error: {message}" or message in proc.stderr.strip()
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stdout == ""
