"""DeepEP (the real ``deep_ep``) against the dense reference: the seed functions and ``backend="deepep"``.

Run on a machine with 2, 4 or 8 GPUs and DeepEP built for its torch and CUDA, one process per GPU:
``torchrun --nproc-per-node 2 -m pytest -m gpu tests/test_gpu_deepep.py``.
"""

from __future__ import annotations

import pytest
import torch.distributed as dist

import fused_a2a
from a2a_bench.engine.workload import WorkloadSpec
from fused_a2a.backends.deepep import DEEP_EP
from gpu import BACKEND_CASES as CASES
from gpu import gpu_ready, real
from reference import Case, check_case, check_fp8_case

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not gpu_ready() or not real(DEEP_EP),
        reason="needs CUDA GPUs under torchrun and DeepEP (deep_ep) installed",
    ),
]

# how each call path dispatches; the combine is the one that goes with it
CALLS = {
    "seed": None,
    "deepep-default": {},
    "deepep-24sms": {"num_sms": 24, "nvl_send": 16, "nvl_recv": 256},
}



@pytest.mark.parametrize("call", CALLS)
@pytest.mark.parametrize(
    "case", CASES, ids=lambda c: f"h{c.spec.hidden}-n{c.spec.num_tokens}-k{c.spec.topk}-drop{c.spec.drop}"
)
def test_deepep_matches_reference(gpu_device, case: Case, call: str) -> None:
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
    check_case(case, dist.get_rank(), dist.get_world_size(), gpu_device, dispatch_fn, combine_fn)


FP8_CASES = [Case(WorkloadSpec(num_tokens=n, hidden=7168, topk=8, num_experts=64, dtype="fp8", drop=d, rng_seed=30 + i))
             for i, (n, d) in enumerate(((128, 0.0), (4096, 0.0), (4096, 0.2)))]


@pytest.mark.parametrize("case", FP8_CASES, ids=lambda c: f"fp8-n{c.spec.num_tokens}-drop{c.spec.drop}")
def test_deepep_fp8_dispatch_matches_reference(gpu_device, case: Case) -> None:
    def dispatch_fn(x, idx, weights, num_experts):
        return fused_a2a.dispatch(x, idx, weights, num_experts, backend="deepep", num_sms=24)

    check_fp8_case(case, dist.get_rank(), dist.get_world_size(), gpu_device, dispatch_fn, fused_a2a.combine)
