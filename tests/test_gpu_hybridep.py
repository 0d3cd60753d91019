"""HybridEP (the real ``deep_ep.HybridEPBuffer``) against the dense reference: the ``hybridep`` backend
(plain dispatch/combine) and the seed's permute path (``hybrid_ep_dispatch``/``hybrid_ep_combine``),
forward and gradients; its limits as ValueErrors before it runs.

Run with DeepEP's hybrid-ep branch built, under torchrun (processes may share one GPU; the group is then
gloo and the tokens move through CUDA IPC): ``torchrun --nproc-per-node 2 -m pytest -m gpu
tests/test_gpu_hybridep.py``. Some images need ``LD_PRELOAD=/lib/x86_64-linux-gnu/libstdc++.so.6``.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import fused_a2a
from a2a_bench.engine.workload import WorkloadSpec
from fused_a2a.backends.hybridep import HYBRID_EP, HAVE_HYBRIDEP
from fused_a2a.backends.hybridep_routing import topk_to_routing_map
from gpu import gpu_ready, real
from reference import Case, assert_close, check_case, grad_seed

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not gpu_ready() or not (HAVE_HYBRIDEP and real(HYBRID_EP)),
                       reason="needs CUDA GPUs under torchrun and DeepEP's HybridEP (deep_ep.HybridEPBuffer)"),
]

# hidden {2048, 7168} x tokens {128, 4096} x top-k {2, 8} x experts {16, 64}, and -1 entries; for each
# buffer (hidden, experts) the larger token count first, so HybridEP's kernels are compiled once per buffer
CASES = [
    Case(WorkloadSpec(num_tokens=n, hidden=h, topk=k, num_experts=e, dtype="bf16", drop=0.1 if k == 8 else 0.0,
                      rng_seed=40 + i))
    for i, (h, n, k, e) in enumerate((h, n, k, e) for h in (2048, 7168) for e in (16, 64) for n in (4096, 128) for k in (2, 8))
]


def case_id(case: Case) -> str:
    s = case.spec
    return f"h{s.hidden}-n{s.num_tokens}-k{s.topk}-e{s.num_experts}-drop{s.drop}"


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_backend_neutral_path_matches_reference(gpu_device, case: Case) -> None:
    def dispatch_fn(x, idx, weights, num_experts):
        return fused_a2a.dispatch(x, idx, weights, num_experts, backend="hybridep")

    check_case(case, dist.get_rank(), dist.get_world_size(), gpu_device, dispatch_fn, fused_a2a.combine,
               keeps_topk_slots=False)


@pytest.mark.parametrize("case", CASES[::3], ids=case_id)
def test_seed_permute_path_matches_reference(gpu_device, case: Case) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    spec = case.spec
    all_inputs = [case.inputs(r, world) for r in range(world)]
    mine = all_inputs[rank]
    local = spec.num_experts // world
    x = mine.x.to(gpu_device).requires_grad_(True)
    weights = mine.topk_weights.to(gpu_device).requires_grad_(True)
    routing_map, probs = topk_to_routing_map(mine.topk_idx.to(gpu_device), weights, spec.num_experts)
    rows, row_probs, _, tokens_per_expert, handle = fused_a2a.hybrid_ep_dispatch(x, routing_map, probs, None, local)
    counts = torch.as_tensor(tokens_per_expert).to(torch.int64).cpu()
    expected = []
    for k in range(local):
        expert = rank * local + k
        for src in all_inputs:
            expected.append(src.x[(src.topk_idx == expert).any(1)])
    assert torch.equal(rows.detach().cpu(), torch.cat(expected)), "permuted rows differ"
    expert_of_row = torch.repeat_interleave(torch.arange(local), counts).to(gpu_device)
    y = (rows.float() * (expert_of_row + 1).unsqueeze(1) * (1 + row_probs).unsqueeze(1)).to(torch.bfloat16)
    out = fused_a2a.hybrid_ep_combine(y, handle, counts.sum(), None)
    ref_x, ref_w = mine.x.double().requires_grad_(True), mine.topk_weights.double().requires_grad_(True)
    ref = torch.zeros_like(ref_x)
    for k in range(spec.topk):
        valid = (mine.topk_idx[:, k] >= 0).unsqueeze(1)
        e = mine.topk_idx[:, k].clamp_min(0)
        ref = ref + valid * ref_x * ((e % local) + 1).unsqueeze(1) * (1 + ref_w[:, k]).unsqueeze(1)
    assert_close(out.detach(), ref.detach(), torch.bfloat16, "permute-path combine")
    g = grad_seed(mine, rank)
    (out.float() * g.to(gpu_device, torch.float32)).sum().backward()
    (ref * g).sum().backward()
    assert_close(x.grad, ref_x.grad, torch.bfloat16, "permute-path grad x")
    assert_close(weights.grad, ref_w.grad, torch.bfloat16, "permute-path grad weights")


def test_knob_change_keeps_each_handle_on_its_buffer(gpu_device) -> None:
    case = CASES[0]
    mine = case.inputs(dist.get_rank(), dist.get_world_size())
    x = mine.x.to(gpu_device).requires_grad_(True)
    idx, weights = mine.topk_idx.to(gpu_device), mine.topk_weights.to(gpu_device)
    first = fused_a2a.dispatch(x, idx, weights, case.spec.num_experts, backend="hybridep", num_sms_dispatch_api=16)
    second = fused_a2a.dispatch(x.detach(), idx, weights, case.spec.num_experts, backend="hybridep", num_sms_dispatch_api=32)
    assert first[4].raw.buffer is not second[4].raw.buffer
    out = fused_a2a.combine(first[0], first[4])
    out.float().sum().backward()  # the combine and both backwards run on the first buffer
    assert x.grad is not None and torch.isfinite(x.grad).all()
    fused_a2a.teardown.free_all_buffers()


def test_limits_are_value_errors(gpu_device) -> None:
    spec = WorkloadSpec(num_tokens=7, hidden=2048, topk=2, num_experts=16, rng_seed=5)
    mine = Case(spec).inputs(dist.get_rank(), dist.get_world_size())
    with pytest.raises(ValueError, match="divisible by 4"):
        fused_a2a.dispatch(mine.x.to(gpu_device), mine.topk_idx.to(gpu_device), mine.topk_weights.to(gpu_device), 16,
                           backend="hybridep")


def test_a_bad_id_on_one_rank_raises_the_same_error_on_every_rank(gpu_device) -> None:
    case = CASES[1]  # h2048 n4096 k8 e16
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = case.inputs(rank, world)
    idx = mine.topk_idx.to(gpu_device)
    if rank == 0:
        idx[3, 0] = case.spec.num_experts + 1
    with pytest.raises(ValueError, match=r"topk_idx values must lie in \[-1, 16\); 1 token\(s\) of the group") as error:
        fused_a2a.dispatch(mine.x.to(gpu_device), idx, mine.topk_weights.to(gpu_device), case.spec.num_experts,
                           backend="hybridep")
    messages = [None] * world
    dist.all_gather_object(messages, str(error.value))
    assert len(set(messages)) == 1, messages

    def dispatch_fn(x, idx, weights, num_experts):  # the group goes on: the next dispatch is fine
        return fused_a2a.dispatch(x, idx, weights, num_experts, backend="hybridep")

    check_case(case, rank, world, gpu_device, dispatch_fn, fused_a2a.combine, keeps_topk_slots=False)


def test_the_process_group_allgather_gives_the_same_results(gpu_device) -> None:
    case = CASES[7]  # h2048 n128 k8 e64

    def dispatch_fn(x, idx, weights, num_experts):
        return fused_a2a.dispatch(x, idx, weights, num_experts, backend="hybridep", enable_custom_allgather=False)

    check_case(case, dist.get_rank(), dist.get_world_size(), gpu_device, dispatch_fn, fused_a2a.combine,
               keeps_topk_slots=False)
    fused_a2a.teardown.free_all_buffers()
