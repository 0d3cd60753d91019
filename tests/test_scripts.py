"""The launch scripts: --dry-run prints the commands; bad arguments get one line and status 2."""

from __future__ import annotations

import os
import subprocess
import sys
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


BACKENDS_SCRIPT = str(SCRIPTS / "install_backends.sh")
# `python` names this interpreter (the script runs the `python` of the active environment)
PYTHON_ENV = {**os.environ, "PYTHON": "python", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


def test_install_backends_dry_run_builds_deepep_for_the_gpus_and_installs_uccl(tmp_path: Path) -> None:
    proc = run(BACKENDS_SCRIPT, "--dry-run", "--arch", "9.0", "--cuda", "12.8", "--cuda-home", "/usr/local/cuda",
               "--workdir", str(tmp_path), "--jobs", "16", env=PYTHON_ENV)
    assert proc.returncode == 0, proc.stderr
    deepep = tmp_path / "DeepEP"
    assert proc.stdout.splitlines() == [
        "python -m pip install nvidia-nvshmem-cu12 ",
        f"mkdir -p {tmp_path} ",
        f"git clone https://github.com/deepseek-ai/DeepEP.git {deepep} ",
        f"git -C {deepep} fetch origin hybrid-ep ",
        f"git -C {deepep} checkout FETCH_HEAD ",
        f"env TORCH_CUDA_ARCH_LIST=9.0 CUDA_HOME=/usr/local/cuda MAX_JOBS=16 python -m pip install --no-build-isolation -v {deepep} ",
        "python -m pip install uccl==0.1.1 intervaltree sortedcontainers nvidia-cuda-runtime-cu12 ",
        "# In the environment of the jobs that use these backends:",
        'export LD_LIBRARY_PATH=$(python -c "import nvidia.cuda_runtime as m, os; '
        'print(os.path.join(list(m.__path__)[0], \\"lib\\"))"):$LD_LIBRARY_PATH   # UCCL-EP loads libcudart.so.12 from there',
        "export CUDA_HOME=/usr/local/cuda   # HybridEP compiles its kernels at first use",
        f"export LD_PRELOAD=/lib/{os.uname().machine}-linux-gnu/libstdc++.so.6   "
        "# only if HybridEPBuffer() segfaults in its constructor",
        "env CUDA_HOME=/usr/local/cuda python -m a2a_bench env ",
    ]
    assert not deepep.exists()  # a dry run runs nothing


def test_install_backends_on_cuda_13_adds_cccl_and_uses_a_given_checkout(tmp_path: Path) -> None:
    (tmp_path / "setup.py").write_text("")
    proc = run(BACKENDS_SCRIPT, "--dry-run", "--arch", "9.0;10.0", "--cuda", "13.0", "--cuda-home", "/opt/cuda",
               "--deepep", str(tmp_path), "--no-uccl", "--jobs", "8", env=PYTHON_ENV)
    assert proc.returncode == 0, proc.stderr
    build = next(line for line in proc.stdout.splitlines() if "--no-build-isolation" in line)
    target = os.uname().machine.replace("aarch64", "sbsa")
    assert build.split() == ["env", "TORCH_CUDA_ARCH_LIST=9.0\\;10.0", "CUDA_HOME=/opt/cuda", "MAX_JOBS=8",
                             f"CPATH=/opt/cuda/targets/{target}-linux/include/cccl", "python", "-m", "pip", "install",
                             "--no-build-isolation", "-v", str(tmp_path)]
    assert "nvidia-nvshmem-cu13" in proc.stdout and "git " not in proc.stdout and "uccl" not in proc.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--frobnicate"], "unknown option --frobnicate"),
        (["--cuda", "11.8", "--arch", "9.0"], "--cuda must be a CUDA version >= 12 such as 12.8, got '11.8'"),
        (["--cuda", "12.8", "--arch", "sm90"], "--arch must be a list such as 9.0 or '9.0;10.0', got 'sm90'"),
        (["--cuda", "12.8", "--arch", "9.0", "--jobs", "0"], "--jobs must be a positive integer, got '0'"),
        (["--cuda", "12.8", "--arch", "9.0", "--deepep", "/nonexistent"], "--deepep /nonexistent: not a DeepEP checkout"),
        (["--cuda", "12.8", "--arch"], "--arch needs a list such as 9.0"),
    ],
)
def test_install_backends_rejects_bad_arguments(args, message) -> None:
    proc = run(BACKENDS_SCRIPT, "--dry-run", *args, env=PYTHON_ENV)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"install_backends.sh: error: {message}" or message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stdout == ""


def test_install_backends_needs_a_cuda_torch_or_a_gpu() -> None:
    proc = run(BACKENDS_SCRIPT, "--dry-run", env={**os.environ, "PYTHON": sys.executable, "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip() in (
        "install_backends.sh: error: this torch has no CUDA (torch.version.cuda is None): install a CUDA build of torch, or pass --cuda",
        "install_backends.sh: error: nvidia-smi reports no GPU: pass --arch (9.0 for H100/H200, 10.0 for B200)",
    )


def test_gpu_checks_parses_and_refuses_an_unknown_stage(tmp_path: Path) -> None:
    assert run("-n", str(SCRIPTS / "gpu_checks.sh")).returncode == 0
    proc = run(str(SCRIPTS / "gpu_checks.sh"), str(tmp_path / "out"), "bogus")
    assert proc.returncode == 2
    assert proc.stderr.strip() == "unknown stage bogus (tests1, tests2, compat, property, bench, sweep, mps)"


def test_the_mps_table_spec_is_the_issues_grid_and_stays_lean() -> None:
    from a2a_bench.engine.search import groups, search_size
    from a2a_bench.engine.spec import SweepSpec, expand, knob_grid, load_spec_file, merge, validate
    from fused_a2a.backends import get_backend

    spec = merge(SweepSpec(), load_spec_file(SCRIPTS / "mps_table.toml"))
    validate(spec, 2)
    assert spec.backends == ("deepep", "hybridep", "uccl") and spec.dtypes == ("bf16",)
    assert spec.hidden == (2048, 4096, 7168) and spec.tokens == (128, 512, 2048, 4096, 8192)
    assert spec.routings == ("uniform", "zipf:1.2") and (spec.topk, spec.experts) == ((8,), (64,))
    assert (spec.warmup, spec.iters, spec.exhaustive) == (5, 20, False)  # the DESIGN's timing rule, default search
    for backend in spec.backends:  # each backend's default SM count is measured, within 8-64
        grid = knob_grid(spec, backend)
        sms = grid[get_backend(backend).sms_knobs[0]]
        assert min(sms) == 8 and max(sms) <= 64 and get_backend(backend).defaults()[get_backend(backend).sms_knobs[0]] in sms
    all_groups = groups(expand(spec, 2))
    assert len(all_groups) == 90
    bound = sum(search_size(g, get_backend(g[0].backend).sms_knobs[0]) for g in all_groups)
    assert bound == 870  # README, "A table measured on one GPU": the cost estimate counts these
