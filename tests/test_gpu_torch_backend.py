"""The torch backend over NCCL: the CPU suite's checks on GPUs.

Run on a machine with 2+ GPUs, one process per GPU:
``torchrun --nproc-per-node 2 -m pytest -m gpu tests/test_gpu_torch_backend.py``.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

import fused_a2a
from a2a_bench.engine.workload import WorkloadSpec
from ranks import under_torchrun
from reference import Case, check_case
from test_torch_backend import CASES

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or not under_torchrun()
        or torch.cuda.device_count() < int(os.environ.get("LOCAL_WORLD_SIZE", 1)),
        reason="needs one CUDA GPU per process under torchrun (NCCL)",
    ),
]

GPU_CASES = CASES + [
    Case(WorkloadSpec(num_tokens=4096, hidden=7168, topk=8, num_experts=64, dtype="bf16", seed=11)),
    Case(WorkloadSpec(num_tokens=128, hidden=2048, topk=2, num_experts=64, dtype="bf16", drop=0.2, seed=12)),
]


@pytest.mark.parametrize("impl", ["all_to_all", "p2p"])
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: f"{c.spec.dtype}-n{c.spec.num_tokens}-h{c.spec.hidden}-{c.spec.routing}-{c.edit}")
def test_torch_backend_over_nccl_matches_reference(gpu_device, case: Case, impl: str) -> None:
    def dispatch_fn(x, idx, weights, num_experts):
        return fused_a2a.dispatch(x, idx, weights, num_experts, backend="torch", impl=impl)

    check_case(case, dist.get_rank(), dist.get_world_size(), gpu_device, dispatch_fn, fused_a2a.combine)
