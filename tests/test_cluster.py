"""The cluster fingerprint: ids, the ``nvidia-smi topo -m`` parser, and detection with and without CUDA,
ranks that share a GPU (under MPS or time-sliced) included."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fused_a2a import mps
from fused_a2a.cluster import ClusterInfo, cluster_id, detect_cluster, parse_topo_link

TOPO_NV18 = (
    "\tGPU0\tGPU1\tNIC0\tNIC1\tCPU Affinity\tNUMA Affinity\tGPU NUMA ID\n"
    "GPU0\t X \tNV18\tPXB\tSYS\t0-47,96-143\t0\t\tN/A\n"
    "GPU1\tNV18\t X \tSYS\tPXB\t48-95,144-191\t1\t\tN/A\n"
    "NIC0\tPXB\tSYS\t X \tSYS\t\t\t\t\n"
    "NIC1\tSYS\tPXB\tSYS\t X \t\t\t\t\n"
    "\n"
    "Legend:\n"
    "\n"
    "  X    = Self\n"
    "  SYS  = Connection traversing PCIe as well as the SMP interconnect between NUMA nodes (e.g., QPI/UPI)\n"
    "  NODE = Connection traversing PCIe as well as the interconnect between PCIe Host Bridges within a NUMA node\n"
    "  PHB  = Connection traversing PCIe as well as a PCIe Host Bridge (typically the CPU)\n"
    "  PXB  = Connection traversing multiple PCIe bridges (without traversing the PCIe Host Bridge)\n"
    "  PIX  = Connection traversing at most a single PCIe bridge\n"
    "  NV#  = Connection traversing a bonded set of # NVLinks\n"
    "\n"
    "NIC Legend:\n"
    "\n"
    "  NIC0: mlx5_0\n"
    "  NIC1: mlx5_1\n"
)


def pcie_topo(link: str) -> str:
    return (
        "\x1b[4m\tGPU0\tGPU1\tCPU Affinity\tNUMA Affinity\tGPU NUMA ID\x1b[0m\n"
        f"GPU0\t X \t{link}\t16-31\t1\t\tN/A\n"
        f"GPU1\t{link}\t X \t0-15\t0\t\tN/A\n"
        "\nLegend:\n\n  X    = Self\n  NV#  = Connection traversing a bonded set of # NVLinks\n"
    )


@pytest.mark.parametrize(
    "gpu, per_node, nodes, link, expected",
    [
        ("NVIDIA H200", 2, 1, "NV18", "h200-x2-nv18"),
        ("NVIDIA H100 80GB HBM3", 8, 1, "NV18", "h100-x8-nv18"),
        ("NVIDIA A100-SXM4-80GB", 8, 2, "NV12", "a100-x8-n2-nv12"),
        ("NVIDIA L4", 2, 1, "PCIe", "l4-x2-pcie"),
        ("NVIDIA H200", 1, 1, None, "h200-x1"),
        (None, 4, 1, None, "cpu-gloo-x4"),
        (None, 2, 3, None, "cpu-gloo-x6"),
    ],
)
def test_cluster_id(gpu, per_node, nodes, link, expected) -> None:
    assert cluster_id(gpu, per_node, nodes, link) == expected


@pytest.mark.parametrize(
    "gpu, per_node, link, per_gpu, sharing, expected",
    [
        ("NVIDIA H200", 1, None, 2, "mps", "h200-x1-mps2"),
        ("NVIDIA H200", 1, None, 2, "timeslice", "h200-x1-ts2"),
        ("NVIDIA H100 80GB HBM3", 2, "NV18", 4, "mps", "h100-x2-nv18-mps4"),
        ("NVIDIA H200", 1, None, 1, None, "h200-x1"),
    ],
)
def test_cluster_id_says_how_ranks_share_a_gpu(gpu, per_node, link, per_gpu, sharing, expected) -> None:
    assert cluster_id(gpu, per_node, 1, link, per_gpu, sharing) == expected


def test_topo_nvlink() -> None:
    assert parse_topo_link(TOPO_NV18) == "NV18"


@pytest.mark.parametrize("link", ["PIX", "PXB", "PHB", "NODE", "SYS"])
def test_topo_pcie_paths(link) -> None:
    assert parse_topo_link(pcie_topo(link)) == "PCIe"


@pytest.mark.parametrize(
    "text",
    [
        "\tGPU0\tCPU Affinity\tNUMA Affinity\nGPU0\t X \t0-15\t0\n",
        "",
        "No devices were found\n",
        pcie_topo("XYZ"),
    ],
)
def test_topo_without_a_known_gpu_pair(text) -> None:
    assert parse_topo_link(text) is None


@pytest.fixture
def fresh(monkeypatch):
    for name in ("FUSED_A2A_CLUSTER_ID", "LOCAL_WORLD_SIZE", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    detect_cluster.cache_clear()
    yield monkeypatch
    detect_cluster.cache_clear()


def no_cuda(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def fake_cuda(monkeypatch, name: str, count: int, topo: str | None) -> None:
    def run(cmd, **kwargs):
        if topo is None:
            raise FileNotFoundError("nvidia-smi")
        return subprocess.CompletedProcess(cmd, 0, stdout=topo, stderr="")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: name)
    monkeypatch.setattr(subprocess, "run", run)


def test_detect_on_cpu(fresh) -> None:
    no_cuda(fresh)
    assert detect_cluster() == ClusterInfo("cpu-gloo-x1", None, 1, 1, None, None)
    assert detect_cluster(4) == ClusterInfo("cpu-gloo-x4", None, 4, 1, None, None)


def test_detect_on_cpu_with_torchrun_env(fresh) -> None:
    no_cuda(fresh)
    fresh.setenv("LOCAL_WORLD_SIZE", "2")
    fresh.setenv("WORLD_SIZE", "4")
    assert detect_cluster() == ClusterInfo("cpu-gloo-x4", None, 2, 2, None, None)


def test_detect_on_gpus(fresh) -> None:
    fake_cuda(fresh, "NVIDIA H200", 2, TOPO_NV18)
    info = detect_cluster(2)
    assert info == ClusterInfo("h200-x2-nv18", "NVIDIA H200", 2, 1, "NV18", None)
    assert info.to_json() == {
        "id": "h200-x2-nv18",
        "gpu": "NVIDIA H200",
        "gpus_per_node": 2,
        "nodes": 1,
        "intranode_link": "NV18",
        "internode": None,
        "ranks_per_gpu": 1,
        "gpu_sharing": None,
    }


def test_detect_multinode_without_nvidia_smi(fresh) -> None:
    fake_cuda(fresh, "NVIDIA H100 80GB HBM3", 8, None)
    assert detect_cluster(16) == ClusterInfo("h100-x8-n2", "NVIDIA H100 80GB HBM3", 8, 2, None, None)


def test_broken_driver_counts_as_cpu(fresh) -> None:
    def broken() -> int:
        raise RuntimeError("CUDA driver initialization failed")

    fresh.setattr(torch.cuda, "is_available", lambda: True)
    fresh.setattr(torch.cuda, "device_count", broken)
    assert detect_cluster(2).id == "cpu-gloo-x2"


def test_env_overrides_the_id_only(fresh) -> None:
    fake_cuda(fresh, "NVIDIA H200", 2, TOPO_NV18)
    fresh.setenv("FUSED_A2A_CLUSTER_ID", "lab-box")
    assert detect_cluster(2) == ClusterInfo("lab-box", "NVIDIA H200", 2, 1, "NV18", None)


def test_detection_is_cached(fresh) -> None:
    no_cuda(fresh)
    first = detect_cluster(3)
    fresh.setenv("LOCAL_WORLD_SIZE", "1")
    assert detect_cluster(3) is first


@pytest.fixture
def daemon(tmp_path, fresh):
    """A live process whose pid is in an MPS pipe folder's pid file, as the control daemon leaves it;
    ``$CUDA_MPS_PIPE_DIRECTORY`` names that folder."""
    pipe = tmp_path / "pipe"
    pipe.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    (pipe / mps.PID_FILE).write_text(f"{proc.pid}\n")
    fresh.setenv(mps.PIPE_DIR_ENV, str(pipe))
    yield proc
    proc.kill()
    proc.wait()


def test_ranks_sharing_a_gpu_without_mps_time_slice_it(fresh, tmp_path) -> None:
    fake_cuda(fresh, "NVIDIA H100 80GB HBM3", 1, None)
    fresh.setenv("LOCAL_WORLD_SIZE", "2")
    fresh.setenv(mps.PIPE_DIR_ENV, str(tmp_path))  # no daemon there
    assert detect_cluster(2) == ClusterInfo("h100-x1-ts2", "NVIDIA H100 80GB HBM3", 1, 1, None, None, 2, "timeslice")


def test_ranks_sharing_a_gpu_under_a_running_mps_daemon(daemon, fresh) -> None:
    fake_cuda(fresh, "NVIDIA H200", 1, None)
    fresh.setenv("LOCAL_WORLD_SIZE", "2")
    assert detect_cluster(2) == ClusterInfo("h200-x1-mps2", "NVIDIA H200", 1, 1, None, None, 2, "mps")
    assert detect_cluster(2).to_json()["gpu_sharing"] == "mps"


def test_a_gpu_per_rank_is_not_sharing_even_with_a_daemon(daemon, fresh) -> None:
    fake_cuda(fresh, "NVIDIA H200", 2, TOPO_NV18)
    fresh.setenv("LOCAL_WORLD_SIZE", "2")
    assert detect_cluster(2) == ClusterInfo("h200-x2-nv18", "NVIDIA H200", 2, 1, "NV18", None)


def test_three_ranks_on_two_gpus_put_two_on_one(daemon, fresh) -> None:
    fake_cuda(fresh, "NVIDIA H200", 2, TOPO_NV18)
    fresh.setenv("LOCAL_WORLD_SIZE", "3")
    assert detect_cluster(3).id == "h200-x2-nv18-mps2"


def test_a_stale_pid_file_is_no_daemon(fresh, tmp_path) -> None:
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / mps.PID_FILE).write_text(gone.stdout)
    fresh.setenv(mps.PIPE_DIR_ENV, str(tmp_path))
    assert mps.daemon_pid() is None
    for junk in ("", "not a pid", "-5", "0", "\xff\xfe"):
        (tmp_path / mps.PID_FILE).write_text(junk, encoding="latin-1")
        assert mps.daemon_pid() is None
    (tmp_path / mps.PID_FILE).unlink()
    (tmp_path / mps.PID_FILE).mkdir()  # unreadable as a file
    assert mps.daemon_pid() is None
    assert mps.daemon_pid(tmp_path / "missing") is None


def test_the_default_pipe_folder_is_cudas(fresh) -> None:
    fresh.delenv(mps.PIPE_DIR_ENV, raising=False)
    assert mps.pipe_dir() == Path("/tmp/nvidia-mps")
    fresh.setenv(mps.PIPE_DIR_ENV, "")
    assert mps.pipe_dir() == Path("/tmp/nvidia-mps")


def test_a_zombie_daemon_is_gone(fresh, tmp_path) -> None:
    if not Path("/proc/self/stat").exists():
        pytest.skip("reads process states from /proc")
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 30
    while Path(f"/proc/{child.pid}/stat").read_text().split(")")[1].split()[0] != "Z":  # exited, not waited for
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert not mps.process_exists(child.pid)
    child.wait()
    assert mps.process_exists(os.getpid())
