"""Rank functions of ``tests/test_hybridep_backend.py``: fused_a2a's ``hybridep`` backend and HybridEP seed
functions on the CPU fake of ``deep_ep.HybridEPBuffer``.

Like ``deepep_workers``, this module imports nothing that imports fused_a2a: the ranks import fused_a2a
after ``tests/fakes`` is first on their ``sys.path``, so fused_a2a finds the fake.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from a2a_bench.engine.workload import WorkloadSpec
from reference import Case, assert_close, check_case, grad_seed

FAKES = (str(Path(__file__).parent / "fakes"),)
CPU = torch.device("cpu")

# HybridEP's limits: bf16, hidden % 16, the same tokens on every rank, tokens x ranks per node % 4,
# local experts x ranks per node % 4
CASES = [
    Case(WorkloadSpec(num_tokens=48, hidden=32, topk=4, num_experts=16, dtype="bf16", rng_seed=1)),
    Case(WorkloadSpec(num_tokens=40, hidden=64, topk=2, num_experts=8, dtype="bf16", rng_seed=2)),
    Case(WorkloadSpec(num_tokens=32, hidden=16, topk=3, num_experts=8, dtype="bf16", drop=0.3, rng_seed=3)),
    Case(WorkloadSpec(num_tokens=36, hidden=32, topk=4, num_experts=16, dtype="bf16", routing="zipf", skew=1.5, rng_seed=4)),
    Case(WorkloadSpec(num_tokens=36, hidden=32, topk=2, num_experts=8, dtype="bf16", routing="hot", skew=0.9, rng_seed=5)),
    Case(WorkloadSpec(num_tokens=20, hidden=16, topk=2, num_experts=8, dtype="bf16", rng_seed=6), edit="silent0"),
    Case(WorkloadSpec(num_tokens=20, hidden=16, topk=2, num_experts=8, dtype="bf16", rng_seed=8), edit="deaf_last"),
]


def _fused_a2a():
    import deep_ep
    import fused_a2a

    assert fused_a2a.HAVE_HYBRIDEP and deep_ep.__file__.startswith(FAKES[0]), "fused_a2a did not find the fake HybridEP"
    return fused_a2a


def neutral_path(rank: int, world_size: int) -> None:
    """``dispatch(backend="hybridep")`` matches the dense reference (received ids in ascending order)."""
    fused_a2a = _fused_a2a()

    def dispatch_fn(x, idx, weights, num_experts):
        return fused_a2a.dispatch(x, idx, weights, num_experts, backend="hybridep")

    def tuned_fn(x, idx, weights, num_experts):
        return fused_a2a.dispatch(x, idx, weights, num_experts, backend="hybridep", num_sms_dispatch_api=16,
                                  num_sms_combine_api=8, tokens_per_chunk_dispatch=32)

    for case in CASES:
        check_case(case, rank, world_size, CPU, dispatch_fn, fused_a2a.combine, keeps_topk_slots=False)
        check_case(case, rank, world_size, CPU, tuned_fn, fused_a2a.combine, keeps_topk_slots=False)
    fused_a2a.teardown.free_all_buffers()


def _permute_reference(all_inputs, rank: int, num_experts: int):
    """Expert-major rows of ``rank`` (within an expert: source rank, then token), their probs and counts."""
    world = len(all_inputs)
    local = num_experts // world
    rows, probs, counts = [], [], []
    for k in range(local):
        expert = rank * local + k
        picked = [(i.x[(i.topk_idx == expert).any(1)], (i.topk_weights * (i.topk_idx == expert)).sum(1)[(i.topk_idx == expert).any(1)])
                  for i in all_inputs]
        rows += [p[0] for p in picked]
        probs += [p[1] for p in picked]
        counts.append(sum(p[0].size(0) for p in picked))
    return torch.cat(rows), torch.cat(probs), torch.tensor(counts)


def seed_permute_path(rank: int, world_size: int) -> None:
    """``hybrid_ep_dispatch``/``hybrid_ep_combine`` (expert-major rows) against a dense reference, forward
    and gradients, with the seed's positional arguments and Megatron's keywords."""
    fused_a2a = _fused_a2a()
    from fused_a2a.backends.hybridep_routing import topk_to_routing_map

    case = CASES[0]
    spec = case.spec
    all_inputs = [case.inputs(r, world_size) for r in range(world_size)]
    mine = all_inputs[rank]
    local = spec.num_experts // world_size
    x = mine.x.clone().requires_grad_(True)
    weights = mine.topk_weights.clone().requires_grad_(True)

    def routing():
        return topk_to_routing_map(mine.topk_idx, weights, spec.num_experts)

    calls = [
        lambda: fused_a2a.hybrid_ep_dispatch(x, *routing(), None, local),
        lambda: fused_a2a.hybrid_ep_dispatch(x, *routing(), group=None, num_local_experts=local, num_sms_dispatch_api=16,
                                             num_sms_combine_api=16, num_blocks_permute=32, num_sms_preprocessing_api=64,
                                             fused=False),
    ]
    exp_rows, exp_probs, exp_counts = _permute_reference(all_inputs, rank, spec.num_experts)
    for dispatch in calls:
        x.grad = weights.grad = None
        rows, out_probs, _, tokens_per_expert, handle = dispatch()
        assert torch.equal(rows.detach(), exp_rows) and torch.equal(out_probs.detach(), exp_probs)
        assert torch.equal(torch.as_tensor(tokens_per_expert).long(), exp_counts)
        expert_of_row = torch.repeat_interleave(torch.arange(local), exp_counts)
        y = (rows.float() * (expert_of_row + 1).unsqueeze(1) * (1 + out_probs).unsqueeze(1)).to(rows.dtype)
        out = fused_a2a.hybrid_ep_combine(y, handle, torch.as_tensor(tokens_per_expert).sum(), None)
        ref_x, ref_w = mine.x.double().requires_grad_(True), mine.topk_weights.double().requires_grad_(True)
        ref = torch.zeros_like(ref_x)
        for k in range(spec.topk):
            valid = mine.topk_idx[:, k] >= 0
            e = mine.topk_idx[:, k].clamp_min(0)
            ref = ref + valid.unsqueeze(1) * ref_x * ((e % local) + 1).unsqueeze(1) * (1 + ref_w[:, k]).unsqueeze(1)
        assert_close(out.detach(), ref.detach(), torch.bfloat16, f"permute combine on rank {rank}")
        g = grad_seed(mine, rank)
        (out.float() * g.float()).sum().backward()
        (ref * g).sum().backward()
        assert_close(x.grad, ref_x.grad, torch.bfloat16, "permute grad x")
        assert_close(weights.grad, ref_w.grad, torch.bfloat16, "permute grad weights")
    fused_a2a.teardown.free_all_buffers()


def handle_keeps_its_buffer(rank: int, world_size: int) -> None:
    """A knob change between forward and backward makes a new buffer for new calls; the first dispatch's
    combine and backward still run on the buffer that made its handle."""
    fused_a2a = _fused_a2a()
    from deep_ep import hybrid_ep_buffer as fake

    case = CASES[1]
    mine = case.inputs(rank, world_size)
    x = mine.x.clone().requires_grad_(True)
    first = fused_a2a.dispatch(x, mine.topk_idx, mine.topk_weights, case.spec.num_experts, backend="hybridep",
                               num_sms_dispatch_api=16)
    made_first = first[4].raw.buffer
    second = fused_a2a.dispatch(mine.x, mine.topk_idx, mine.topk_weights, case.spec.num_experts, backend="hybridep",
                                num_sms_dispatch_api=32)
    made_second = second[4].raw.buffer
    assert made_first is not made_second and made_first in fake.LIVE and made_second in fake.LIVE
    assert made_first.config["num_sms_dispatch_api"] == 16 and made_second.config["num_sms_dispatch_api"] == 32
    before = list(made_first.calls), list(made_second.calls)
    out = fused_a2a.combine(first[0], first[4])
    out.float().sum().backward()
    # the combine, then its backward (a cached dispatch), then the dispatch's backward (a combine)
    assert made_first.calls[len(before[0]):] == ["combine", "dispatch", "combine"], made_first.calls
    assert made_second.calls == before[1]
    assert x.grad is not None and x.grad.shape == x.shape
    fused_a2a.teardown.free_all_buffers()


def limits(rank: int, world_size: int) -> None:
    """A call HybridEP cannot take raises ValueError naming the rule, before HybridEP sees it."""
    fused_a2a = _fused_a2a()
    from deep_ep import hybrid_ep_buffer as fake

    def inputs(num_tokens: int):
        spec = WorkloadSpec(num_tokens=num_tokens, hidden=32, topk=2, num_experts=8, rng_seed=9)
        return Case(spec).inputs(rank, world_size)

    seven = inputs(7)
    with pytest.raises(ValueError, match=r"tokens per rank x ranks per NVLink domain divisible by 4 .*7 x 2 = 14"):
        fused_a2a.dispatch(seven.x, seven.topk_idx, seven.topk_weights, 8, backend="hybridep")
    assert all(not b.calls for b in fake.LIVE), [b.calls for b in fake.LIVE]
    uneven = inputs(8 if rank == 0 else 16)
    with pytest.raises(ValueError, match="the same number of tokens on every rank .*got 8, 16"):
        fused_a2a.dispatch(uneven.x, uneven.topk_idx, uneven.topk_weights, 8, backend="hybridep", num_sms_combine_api=16)
    empty = inputs(0)
    with pytest.raises(ValueError, match="at least 1 token on every rank"):
        fused_a2a.dispatch(empty.x, empty.topk_idx, empty.topk_weights, 8, backend="hybridep", num_sms_combine_api=8)
    fp16 = inputs(8)
    with pytest.raises(ValueError, match="hybridep moves bf16 tokens, not fp16"):
        fused_a2a.dispatch(fp16.x.half(), fp16.topk_idx, fp16.topk_weights, 8, backend="hybridep")
    fused_a2a.teardown.free_all_buffers()


def bad_id_on_one_rank(rank: int, world_size: int) -> None:
    """An id outside [-1, E) on rank 0 only: every rank raises the same ValueError at that dispatch (the
    phantom-expert signal, read at HybridEP's own synchronisation; no collective of ours), and the next
    dispatch of the group runs. The uncached dispatch runs HybridEP's runtime steps, not its Python dispatch."""
    fused_a2a = _fused_a2a()
    from deep_ep import hybrid_ep_buffer as fake

    case = CASES[0]
    mine = case.inputs(rank, world_size)
    idx = mine.topk_idx.clone()
    if rank == 0:
        idx[5, 1] = case.spec.num_experts + 2
        idx[7, 0] = -3
    with pytest.raises(ValueError, match=r"hybridep: topk_idx values must lie in \[-1, 16\); 2 token\(s\) of the group") as error:
        fused_a2a.dispatch(mine.x, idx, mine.topk_weights, case.spec.num_experts, backend="hybridep")
    messages = [None] * world_size
    torch.distributed.all_gather_object(messages, str(error.value))
    assert len(set(messages)) == 1, messages
    (buffer,) = [b for b in fake.LIVE]
    assert buffer.calls == ["runtime.metadata_preprocessing", "runtime.dispatch"], buffer.calls
    check_case(case, rank, world_size, CPU,
               lambda x, i, w, e: fused_a2a.dispatch(x, i, w, e, backend="hybridep"), fused_a2a.combine,
               keeps_topk_slots=False)
    fused_a2a.teardown.free_all_buffers()
