"""What this machine offers (``a2a-bench env``): backends (version, or why not and how to install them),
GPUs, links, MPS, cluster id."""

from __future__ import annotations

import torch

from a2a_bench.engine.sharing import mps_status
from a2a_bench.engine.versions import backend_versions
from fused_a2a.backends import BACKENDS
from fused_a2a.cluster import detect_cluster


def backend_status() -> list[tuple[str, bool, str]]:
    """``(backend, available, version and build, or why not and how to get it)`` for every registered backend."""
    rows = []
    for name, spec in BACKENDS.items():
        reason = spec.unavailable()
        if reason is None:
            rows.append((name, True, spec.version() or "available"))
        else:
            rows.append((name, False, f"{reason}; {spec.install_hint}" if spec.install_hint else reason))
    return rows


def gpus() -> list[str]:
    """Names of the visible CUDA devices (empty without CUDA)."""
    if not torch.cuda.is_available():
        return []
    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]


def describe(world_size: int | None) -> dict:
    """Everything ``a2a-bench env`` prints, as plain data."""
    return {
        "cluster": detect_cluster(world_size).to_json(),
        "gpus": gpus(),
        "versions": backend_versions(),
        "backends": [{"backend": b, "available": ok, "detail": d} for b, ok, d in backend_status()],
        "mps": mps_status(),
    }


def mps_line(status: dict) -> str:
    """One line on MPS (:func:`a2a_bench.engine.sharing.mps_status`): whether it can run here and
    whether a daemon serves this process."""
    if status["daemon_pid"] is not None:
        return f"MPS: control daemon running (pid {status['daemon_pid']}, pipe folder {status['pipe_dir']})"
    if status["control"] is None:
        return ("MPS: not available (nvidia-cuda-mps-control is not on PATH): ranks that share a GPU can only "
                "time-slice it (--share-gpu timeslice)")
    return (f"MPS: available ({status['control']}), no control daemon running for pipe folder {status['pipe_dir']} "
            "(a2a-bench --nproc starts one when ranks share a GPU)")
