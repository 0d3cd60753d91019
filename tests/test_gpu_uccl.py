"""UCCL-EP (the real ``uccl.ep``, PyPI ``uccl``) against the dense reference, through the seed functions.

Run on one host with GPUs and ``uccl`` installed, 2, 4 or 8 processes:
``torchrun --nproc-per-node 2 -m pytest -m gpu tests/test_gpu_uccl.py``. With one GPU per process the
group is NCCL's; processes that share GPUs (fewer GPUs than processes) get a gloo group instead (NCCL
refuses two ranks on one GPU; UCCL-EP uses the group only for its handshake and moves the tokens itself
through CUDA IPC). Intranode only: UCCL-EP's internode path needs RDMA NICs.
"""

from __future__ import annotations

import pytest
import torch.distributed as dist

import fused_a2a
from fused_a2a.backends.uccl_buffer import UCCL_EP
from gpu import BACKEND_CASES as CASES
from gpu import gpu_ready, real
from reference import Case, check_case

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not gpu_ready() or not real(UCCL_EP),
        reason="needs CUDA GPUs under torchrun and UCCL-EP (pip install uccl) installed",
    ),
]

# the seed functions' flags for each call path
CALLS = {"seed": {}, "seed-async": {"async_finish": True, "allocate_on_comm_stream": True}}



@pytest.mark.parametrize("call", CALLS)
@pytest.mark.parametrize(
    "case", CASES, ids=lambda c: f"h{c.spec.hidden}-n{c.spec.num_tokens}-k{c.spec.topk}-drop{c.spec.drop}"
)
def test_uccl_seed_functions_match_reference(gpu_device, case: Case, call: str) -> None:
    group = dist.group.WORLD
    flags = CALLS[call]

    def dispatch_fn(x, idx, weights, num_experts):
        return fused_a2a.uccl_fused_dispatch(x, idx, weights, num_experts, group, **flags)

    def combine_fn(y, handle):
        return fused_a2a.uccl_fused_combine(y, group, handle, **flags)[0]

    check_case(case, dist.get_rank(), dist.get_world_size(), gpu_device, dispatch_fn, combine_fn)
