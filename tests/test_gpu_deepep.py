"""DeepEP (the real ``deep_ep``) against the dense reference: the seed functions and ``backend="deepep"``.

Run on a machine with 2, 4 or 8 GPUs and DeepEP built for its torch and CUDA, one process per GPU:
``torchrun --nproc-per-node 2 -m pytest -m gpu tests/test_gpu_deepep.py``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import fused_a2a
from a2a_bench.workload import WorkloadSpec
from fused_a2a.backends.deepep import DEEP_EP
from ranks import under_torchrun
from reference import Case, check_case

FAKES = Path(__file__).parent / "fakes"
REAL_DEEP_EP = DEEP_EP.available and not Path(DEEP_EP.module.__file__).resolve().is_relative_to(FAKES.resolve())

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or not under_torchrun() or not REAL_DEEP_EP,
        reason="needs CUDA GPUs under torchrun and DeepEP (deep_ep) installed",
    ),
]

CASES = [
    Case(WorkloadSpec(num_tokens=tokens, hidden=hidden, topk=topk, num_experts=64, dtype="bf16", seed=seed))
    for seed, (hidden, tokens, topk) in enumerate(
        (h, n, k) for h in (2048, 7168) for n in (128, 4096) for k in (2, 8)
    )
] + [Case(WorkloadSpec(num_tokens=4096, hidden=7168, topk=8, num_experts=64, dtype="bf16", drop=0.2, seed=20))]

# how each call path dispatches; the combine is the one that goes with it
CALLS = {
    "seed": None,
    "deepep-default": {},
    "deepep-24sms": {"num_sms": 24, "nvl_send": 16, "nvl_recv": 256},
}


@pytest.fixture(scope="module")
def nccl_group():
    local_rank = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
    yield torch.device("cuda", local_rank)
    fused_a2a.free_buffer()  # before destroy_process_group: DeepEP hangs otherwise
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.parametrize("call", CALLS)
@pytest.mark.parametrize(
    "case", CASES, ids=lambda c: f"h{c.spec.hidden}-n{c.spec.num_tokens}-k{c.spec.topk}-drop{c.spec.drop}"
)
def test_deepep_matches_reference(nccl_group, case: Case, call: str) -> None:
    group = dist.group.WORLD
    knobs = CALLS[call]
    if knobs is None:
        def dispatch_fn(x, idx, weights, num_experts):
            return fused_a2a.fused_dispatch(x, idx, weights, num_experts, group)

        def combine_fn(y, handle):
            return fused_a2a.fused_combine(y, group, handle)[0]
    else:
        def dispatch_fn(x, idx, weights, num_experts):
            return fused_a2a.dispatch(x, idx, weights, num_experts, group, backend="deepep", **knobs)

        combine_fn = fused_a2a.combine
    check_case(case, dist.get_rank(), dist.get_world_size(), nccl_group, dispatch_fn, combine_fn)
