"""UCCL-EP (the real ``uccl.ep``, PyPI ``uccl``) against the dense reference, through the seed functions.

Run on one host with GPUs and ``uccl`` installed, 2, 4 or 8 processes:
``torchrun --nproc-per-node 2 -m pytest -m gpu tests/test_gpu_uccl.py``. With one GPU per process the
group is NCCL's; processes that share GPUs (fewer GPUs than processes) get a gloo group instead (NCCL
refuses two ranks on one GPU; UCCL-EP uses the group only for its handshake and moves the tokens itself
through CUDA IPC). Intranode only: UCCL-EP's internode path needs RDMA NICs.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import fused_a2a
from a2a_bench.workload import WorkloadSpec
from fused_a2a.backends.uccl import free_uccl_buffer
from fused_a2a.backends.uccl_buffer import UCCL_EP
from ranks import under_torchrun
from reference import Case, check_case

FAKES = Path(__file__).parent / "fakes"
REAL_UCCL_EP = UCCL_EP.available and not Path(UCCL_EP.module.__file__).resolve().is_relative_to(FAKES.resolve())

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or not under_torchrun() or not REAL_UCCL_EP,
        reason="needs CUDA GPUs under torchrun and UCCL-EP (pip install uccl) installed",
    ),
]

CASES = [
    Case(WorkloadSpec(num_tokens=tokens, hidden=hidden, topk=topk, num_experts=64, dtype="bf16", seed=seed))
    for seed, (hidden, tokens, topk) in enumerate(
        (h, n, k) for h in (2048, 7168) for n in (128, 4096) for k in (2, 8)
    )
] + [Case(WorkloadSpec(num_tokens=4096, hidden=7168, topk=8, num_experts=64, dtype="bf16", drop=0.2, seed=20))]

# the seed functions' flags for each call path
CALLS = {"seed": {}, "seed-async": {"async_finish": True, "allocate_on_comm_stream": True}}


@pytest.fixture(scope="module")
def uccl_group():
    local_rank, local_world = int(os.environ["LOCAL_RANK"]), int(os.environ["LOCAL_WORLD_SIZE"])
    device = torch.device("cuda", local_rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    if torch.cuda.device_count() >= local_world:
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    yield device
    free_uccl_buffer()  # before destroy_process_group: its destroy is collective
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.parametrize("call", CALLS)
@pytest.mark.parametrize(
    "case", CASES, ids=lambda c: f"h{c.spec.hidden}-n{c.spec.num_tokens}-k{c.spec.topk}-drop{c.spec.drop}"
)
def test_uccl_seed_functions_match_reference(uccl_group, case: Case, call: str) -> None:
    group = dist.group.WORLD
    flags = CALLS[call]

    def dispatch_fn(x, idx, weights, num_experts):
        return fused_a2a.uccl_fused_dispatch(x, idx, weights, num_experts, group, **flags)

    def combine_fn(y, handle):
        return fused_a2a.uccl_fused_combine(y, group, handle, **flags)[0]

    check_case(case, dist.get_rank(), dist.get_world_size(), uccl_group, dispatch_fn, combine_fn)
