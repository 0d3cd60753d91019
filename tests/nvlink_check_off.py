"""Test-only: DeepEP's check that every pair of ranks' GPUs is linked by NVLink (its hybrid-ep branch's
``Buffer`` asserts it) skipped where ranks share a GPU, which no pair of ranks on one GPU can pass.

Used by the GPU tests' group fixture (:func:`gpu.gpu_group`) and, loaded as an a2a-bench plugin with
``A2A_BENCH_BACKENDS=nvlink_check_off`` (tests/ on ``PYTHONPATH``; a2a-bench imports it in every
rank), by ``scripts/gpu_checks.sh``'s sweeps on one GPU. Where every rank has a GPU of its own the
check runs as DeepEP wrote it.
"""

from __future__ import annotations

import os


def ranks_share_gpus() -> bool:
    """This node runs more ranks than it has GPUs."""
    import torch

    return torch.cuda.device_count() < int(os.environ.get("LOCAL_WORLD_SIZE", 1))


def skip_nvlink_pair_check() -> None:
    """Make ``deep_ep.buffer.check_nvlink_connections`` a no-op while ranks share GPUs (nothing to do
    without deep_ep, or with a build that has no such check)."""
    try:
        import deep_ep.buffer
    except Exception:
        return
    check = getattr(deep_ep.buffer, "check_nvlink_connections", None)
    if check is None or getattr(check, "skips_shared_gpus", False):
        return

    def check_unless_shared(*args, **kwargs):
        return None if ranks_share_gpus() else check(*args, **kwargs)

    check_unless_shared.skips_shared_gpus = True
    deep_ep.buffer.check_nvlink_connections = check_unless_shared


if "LOCAL_RANK" in os.environ:  # a rank (the launcher of a2a-bench --nproc runs no kernel)
    skip_nvlink_pair_check()
