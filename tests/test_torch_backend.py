"""The torch backend against the dense reference, on 2 and 4 real gloo ranks."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import fused_a2a
from a2a_bench.engine.workload import WorkloadSpec
from ranks import spawn
from reference import Case, check_case

CASES = [
    Case(WorkloadSpec(num_tokens=48, hidden=32, topk=4, num_experts=16, dtype="fp32", rng_seed=1)),
    Case(WorkloadSpec(num_tokens=40, hidden=64, topk=2, num_experts=8, dtype="bf16", rng_seed=2)),
    Case(WorkloadSpec(num_tokens=32, hidden=16, topk=3, num_experts=8, dtype="fp16", drop=0.3, rng_seed=3)),
    Case(WorkloadSpec(num_tokens=36, hidden=24, topk=4, num_experts=16, dtype="bf16", routing="zipf", skew=1.5, rng_seed=4)),
    Case(WorkloadSpec(num_tokens=36, hidden=24, topk=2, num_experts=8, dtype="fp32", routing="hot", skew=0.9, rng_seed=5)),
    Case(WorkloadSpec(num_tokens=20, hidden=8, topk=2, num_experts=8, dtype="fp32", rng_seed=6), edit="silent0"),
    Case(WorkloadSpec(num_tokens=20, hidden=8, topk=2, num_experts=8, dtype="bf16", rng_seed=7), edit="empty0"),
    Case(WorkloadSpec(num_tokens=20, hidden=8, topk=2, num_experts=8, dtype="fp32", rng_seed=8), edit="deaf_last"),
]


def _neutral(impl: str):
    def dispatch_fn(x, idx, weights, num_experts):
        return fused_a2a.dispatch(x, idx, weights, num_experts, backend="torch", impl=impl)

    return dispatch_fn, fused_a2a.combine


def _run_cases(rank: int, world_size: int, impl: str) -> None:
    dispatch_fn, combine_fn = _neutral(impl)
    for case in CASES:
        check_case(case, rank, world_size, torch.device("cpu"), dispatch_fn, combine_fn)


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("impl", ["all_to_all", "p2p"])
def test_dispatch_combine_and_gradients_match_reference(world_size: int, impl: str) -> None:
    spawn(_run_cases, world_size, impl)


def _cached_dispatch_and_flags(rank: int, world_size: int) -> None:
    case = CASES[0]
    inputs = case.inputs(rank, world_size)
    buffer = fused_a2a.TorchBuffer()
    layout = buffer.get_dispatch_layout(inputs.topk_idx, case.spec.num_experts, async_finish=True)
    num_tokens_per_rank, _, num_tokens_per_expert, is_token_in_rank, _ = layout
    recv_x, _, _, _, handle, event = buffer.dispatch(
        inputs.x,
        topk_idx=inputs.topk_idx,
        topk_weights=inputs.topk_weights,
        num_tokens_per_rank=num_tokens_per_rank,
        is_token_in_rank=is_token_in_rank,
        num_tokens_per_expert=num_tokens_per_expert,
        async_finish=True,
        allocate_on_comm_stream=True,
    )
    assert event is None
    other = inputs.x * 3 + 1
    cached_x, cached_idx, cached_w, cached_counts, cached_handle, _ = buffer.dispatch(other, handle=handle)
    assert cached_idx is None and cached_w is None and cached_counts is None and cached_handle is None
    expected = buffer.dispatch(
        other,
        topk_idx=inputs.topk_idx,
        topk_weights=inputs.topk_weights,
        num_tokens_per_rank=num_tokens_per_rank,
        is_token_in_rank=is_token_in_rank,
        num_tokens_per_expert=num_tokens_per_expert,
    )[0]
    assert torch.equal(cached_x, expected)
    combined, combined_w, _ = buffer.combine(recv_x, handle, topk_weights=torch.ones(recv_x.size(0), 4))
    copies = is_token_in_rank.sum(dim=1, keepdim=True)
    assert torch.allclose(combined, inputs.x * copies)
    assert torch.equal(combined_w, copies.float().expand(-1, 4))
    with pytest.raises(ValueError, match="combine input has"):
        buffer.combine(recv_x[1:], handle)

    x = inputs.x.clone().requires_grad_(True)
    result = fused_a2a.dispatch(
        x, inputs.topk_idx, inputs.topk_weights, case.spec.num_experts, async_finish=True, allocate_on_comm_stream=True
    )
    out = fused_a2a.combine(result[0], result[4], async_finish=True)
    assert torch.allclose(out, inputs.x * copies)


def test_cached_dispatch_async_flags_and_combine_checks() -> None:
    spawn(_cached_dispatch_and_flags, 2)


def _bad_divisibility(rank: int, world_size: int) -> None:
    x = torch.zeros(4, 8)
    idx = torch.zeros(4, 2, dtype=torch.int64)
    with pytest.raises(ValueError, match="not divisible by the group size"):
        fused_a2a.dispatch(x, idx, torch.ones(4, 2), 9)
    with pytest.raises(ValueError, match=r"topk_idx values must lie in \[-1, 8\)"):
        fused_a2a.dispatch(x, idx + 8, torch.ones(4, 2), 8)
    dist.barrier()


def test_bad_inputs_through_the_process_group() -> None:
    spawn(_bad_divisibility, 2)


def _count_applies(function, counts: dict) -> None:
    apply = function.apply

    def counted(*args):
        counts[function.__name__] = counts.get(function.__name__, 0) + 1
        return apply(*args)

    function.apply = counted


def _graph_only_when_needed(rank: int, world_size: int) -> None:
    from fused_a2a.autograd import BufferCombine, BufferDispatch

    applied: dict[str, int] = {}
    _count_applies(BufferDispatch, applied)
    _count_applies(BufferCombine, applied)
    inputs = CASES[0].inputs(rank, world_size)
    x, idx, weights = inputs.x, inputs.topk_idx, inputs.topk_weights
    trained_x, trained_weights = x.clone().requires_grad_(True), weights.clone().requires_grad_(True)
    trained = fused_a2a.dispatch(trained_x, idx, trained_weights, 16)
    assert type(trained[0].grad_fn).__name__ == "BufferDispatchBackward"
    trained_out = fused_a2a.combine(trained[0], trained[4])
    assert type(trained_out.grad_fn).__name__ == "BufferCombineBackward"
    assert applied == {"BufferDispatch": 1, "BufferCombine": 1}
    for frozen, context in ((x, torch.enable_grad()), (trained_x, torch.no_grad())):
        with context:
            out = fused_a2a.dispatch(frozen, idx, weights if frozen is x else trained_weights, 16)
            combined = fused_a2a.combine(out[0], out[4])
        assert out[0].grad_fn is None and combined.grad_fn is None and not combined.requires_grad
        for mine, theirs in zip(out[:4], trained[:4]):
            torch.testing.assert_close(mine, theirs.detach(), rtol=0, atol=0)
        torch.testing.assert_close(combined, trained_out.detach(), rtol=0, atol=0)
    assert applied == {"BufferDispatch": 1, "BufferCombine": 1}  # no graph node built without grad


def test_without_grad_the_same_outputs_and_no_graph_node() -> None:
    """Tokens that need no grad (or grad mode off) skip the autograd Functions and return the same
    tensors as the recorded path."""
    spawn(_graph_only_when_needed, 2)
