"""The torch backend over NCCL: the CPU suite's checks on GPUs.

Run on a machine with 2+ GPUs, one process per GPU:
``torchrun --nproc-per-node 2 -m pytest -m gpu tests/test_gpu_torch_backend.py``.
"""

from __future__ import annotations

import os
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist

import fused_a2a
from a2a_bench.engine.workload import WorkloadSpec
from ranks import under_torchrun
from reference import Case, check_case, expected_dispatch
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
    Case(WorkloadSpec(num_tokens=4096, hidden=7168, topk=8, num_experts=64, dtype="bf16", rng_seed=11)),
    Case(WorkloadSpec(num_tokens=128, hidden=2048, topk=2, num_experts=64, dtype="bf16", drop=0.2, rng_seed=12)),
]


@pytest.mark.parametrize("impl", ["all_to_all", "p2p"])
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: f"{c.spec.dtype}-n{c.spec.num_tokens}-h{c.spec.hidden}-{c.spec.routing}-{c.edit}")
def test_torch_backend_over_nccl_matches_reference(gpu_device, case: Case, impl: str) -> None:
    def dispatch_fn(x, idx, weights, num_experts):
        return fused_a2a.dispatch(x, idx, weights, num_experts, backend="torch", impl=impl)

    check_case(case, dist.get_rank(), dist.get_world_size(), gpu_device, dispatch_fn, fused_a2a.combine)


def test_replays_of_the_routing_graph_read_each_calls_tensors(gpu_device) -> None:
    """The routing plan of a shape is a replayed CUDA graph whose kernels read the addresses of this
    call's top-k and weights: dispatches of one shape on different tensors (one top-k a non-contiguous
    view), in turn and again, each receive what the reference says for their own inputs."""
    rank, world = dist.get_rank(), dist.get_world_size()
    spec = WorkloadSpec(num_tokens=256, hidden=128, topk=4, num_experts=8 * world, dtype="bf16")
    cases = [Case(replace(spec, rng_seed=seed)) for seed in (21, 22, 23)]
    all_inputs = [[case.inputs(r, world) for r in range(world)] for case in cases]
    mine = [inputs[rank] for inputs in all_inputs]
    tensors = [(i.x.to(gpu_device), i.topk_idx.to(gpu_device), i.topk_weights.to(gpu_device)) for i in mine]
    x, idx, weights = tensors[2]
    tensors[2] = (x, idx.t().contiguous().t(), weights)  # the same values, column-major
    assert not tensors[2][1].is_contiguous()
    for turn in (0, 1, 2, 0, 2, 1):
        x, idx, weights = tensors[turn]
        recv_x, recv_idx, recv_weights, per_expert, _ = fused_a2a.dispatch(x, idx, weights, spec.num_experts,
                                                                           backend="torch")
        want_x, want_idx, want_weights, want_counts = expected_dispatch(all_inputs[turn], rank, spec.num_experts)
        assert torch.equal(recv_x.cpu(), want_x) and torch.equal(recv_idx.cpu(), want_idx), turn
        assert torch.equal(recv_weights.cpu(), want_weights) and torch.equal(per_expert, want_counts), turn
