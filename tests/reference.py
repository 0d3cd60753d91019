"""An independent, dense reference for dispatch/combine, and the checks every backend must pass.

The reference sees every rank's inputs (each rank regenerates them from the seed) and computes what
rank ``r`` must receive and what each rank must get back, without any communication.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch

from a2a_bench.engine.workload import Inputs, WorkloadSpec, make_inputs


@dataclass(frozen=True)
class Case:
    """A workload plus a routing edit that makes a corner case.

    ``edit`` is one of: ``none``; ``silent0`` (rank 0 routes every token nowhere: it sends nothing);
    ``empty0`` (rank 0 has no tokens); ``deaf_last`` (no token of any rank goes to the last rank).
    """

    spec: WorkloadSpec
    edit: str = "none"

    def inputs(self, rank: int, world_size: int) -> Inputs:
        spec = self.spec
        if self.edit == "empty0" and rank == 0:
            spec = replace(spec, num_tokens=0)
        inputs = make_inputs(spec, rank)
        idx, weights = inputs.topk_idx, inputs.topk_weights
        if self.edit == "silent0" and rank == 0:
            idx = torch.full_like(idx, -1)
            weights = torch.zeros_like(weights)
        if self.edit == "deaf_last":
            num_local = spec.num_experts // world_size
            on_last = idx >= (world_size - 1) * num_local
            idx = torch.where(on_last, idx % num_local, idx)
            # remapping can repeat an expert within a token; keep the first copy only
            for k in range(1, idx.size(1)):
                repeated = (idx[:, k : k + 1] == idx[:, :k]).any(dim=1) & (idx[:, k] >= 0)
                idx[repeated, k] = -1
                weights[repeated, k] = 0.0
        return Inputs(inputs.x, idx, weights)


# the fused backends' CPU-fake cases: bf16 only (DeepEP's and UCCL-EP's combine are bf16-only),
# every hidden size gives 16-byte rows, and the corner cases of :class:`Case`
BF16_CASES = [
    Case(WorkloadSpec(num_tokens=48, hidden=32, topk=4, num_experts=16, dtype="bf16", rng_seed=1)),
    Case(WorkloadSpec(num_tokens=40, hidden=64, topk=2, num_experts=8, dtype="bf16", rng_seed=2)),
    Case(WorkloadSpec(num_tokens=32, hidden=16, topk=3, num_experts=8, dtype="bf16", drop=0.3, rng_seed=3)),
    Case(WorkloadSpec(num_tokens=36, hidden=24, topk=4, num_experts=16, dtype="bf16", routing="zipf", skew=1.5, rng_seed=4)),
    Case(WorkloadSpec(num_tokens=36, hidden=24, topk=2, num_experts=8, dtype="bf16", routing="hot", skew=0.9, rng_seed=5)),
    Case(WorkloadSpec(num_tokens=20, hidden=8, topk=2, num_experts=8, dtype="bf16", rng_seed=6), edit="silent0"),
    Case(WorkloadSpec(num_tokens=20, hidden=8, topk=2, num_experts=8, dtype="bf16", rng_seed=7), edit="empty0"),
    Case(WorkloadSpec(num_tokens=20, hidden=8, topk=2, num_experts=8, dtype="bf16", rng_seed=8), edit="deaf_last"),
]


def local_mask(topk_idx: torch.Tensor, rank: int, num_local: int) -> torch.Tensor:
    """``[N, K]`` bool: which top-k slots name an expert held by ``rank``."""
    return (topk_idx >= 0) & (topk_idx // num_local == rank)


def expected_dispatch(all_inputs: list[Inputs], rank: int, num_experts: int):
    """What ``rank`` must receive: ``(recv_x, recv_topk_idx, recv_topk_weights, tokens_per_expert)``."""
    world_size = len(all_inputs)
    num_local = num_experts // world_size
    xs, idxs, weights = [], [], []
    for src in all_inputs:
        mine = local_mask(src.topk_idx, rank, num_local)
        chosen = mine.any(dim=1)
        xs.append(src.x[chosen])
        idxs.append(torch.where(mine, src.topk_idx - rank * num_local, -1)[chosen])
        weights.append(torch.where(mine, src.topk_weights, 0.0)[chosen])
    recv_idx = torch.cat(idxs)
    counts = torch.stack([(recv_idx == e).sum() for e in range(num_local)]) if num_local else torch.zeros(0)
    return torch.cat(xs), recv_idx, torch.cat(weights), counts.to(torch.int64)


def expert_op(recv_x: torch.Tensor, recv_idx: torch.Tensor, recv_weights: torch.Tensor, rank: int) -> torch.Tensor:
    """A differentiable stand-in for the experts of ``rank``: ``x * (rank + 1) * (1 + sum of local weights)``."""
    scale = 1.0 + (recv_weights * (recv_idx >= 0)).sum(dim=1, keepdim=True)
    return (recv_x.float() * scale * (rank + 1)).to(recv_x.dtype)


def dense_output(inputs: Inputs, world_size: int, num_experts: int, x: torch.Tensor, weights: torch.Tensor):
    """What combine(expert_op(dispatch(...))) returns for this rank's tokens, computed densely.

    ``x`` and ``weights`` stand for ``inputs.x`` and ``inputs.topk_weights`` (pass float64 leaves to
    get reference gradients).
    """
    num_local = num_experts // world_size
    out = torch.zeros_like(x)
    for rank in range(world_size):
        mine = local_mask(inputs.topk_idx, rank, num_local)
        scale = (1.0 + (weights * mine).sum(dim=1, keepdim=True)) * (rank + 1)
        out = out + x * scale * mine.any(dim=1, keepdim=True)
    return out


def grad_seed(inputs: Inputs, rank: int) -> torch.Tensor:
    """The upstream gradient ``g`` of ``loss = sum(out * g)`` on ``rank``."""
    gen = torch.Generator().manual_seed(7919 + rank)
    return torch.randn(inputs.x.shape, generator=gen, dtype=torch.float64)


TOLERANCE = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """Relative-norm comparison: ``|a - e| / |e|`` within the tolerance of ``dtype``."""
    actual, expected = actual.double().cpu(), expected.double().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    denom = expected.norm().clamp_min(1e-12)
    err = ((actual - expected).norm() / denom).item()
    assert err <= TOLERANCE[dtype], f"{what}: relative error {err:.2e} > {TOLERANCE[dtype]:.0e}"


DispatchFn = Callable[..., tuple]
CombineFn = Callable[..., torch.Tensor]


def check_case(case: Case, rank: int, world_size: int, device: torch.device, dispatch_fn, combine_fn,
               keeps_topk_slots: bool = True) -> None:
    """Run dispatch -> expert_op -> combine -> backward on this rank and compare with the reference.

    ``dispatch_fn(x, topk_idx, topk_weights, num_experts)`` returns the 5-tuple of ``fused_dispatch``;
    ``combine_fn(y, handle)`` returns ``[N, H]``. ``keeps_topk_slots=False``: the received ids and
    weights are expected in ascending order per row (HybridEP's layout).
    """
    spec = case.spec
    all_inputs = [case.inputs(r, world_size) for r in range(world_size)]
    mine = all_inputs[rank]
    x = mine.x.detach().clone().to(device).requires_grad_(True)
    weights = mine.topk_weights.detach().clone().to(device).requires_grad_(True)
    recv_x, recv_idx, recv_weights, tokens_per_expert, handle = dispatch_fn(
        x, mine.topk_idx.to(device), weights, spec.num_experts
    )

    exp_x, exp_idx, exp_weights, exp_counts = expected_dispatch(all_inputs, rank, spec.num_experts)
    if not keeps_topk_slots:
        from a2a_bench.engine.verify import ascending_slots  # imports fused_a2a: only once the rank chose its fakes

        exp_idx, exp_weights = ascending_slots(exp_idx, exp_weights)
    assert torch.equal(recv_x.detach().cpu(), exp_x), f"{case}: recv_x differs on rank {rank}"
    assert torch.equal(recv_idx.cpu(), exp_idx), f"{case}: recv_topk_idx differs on rank {rank}"
    assert torch.equal(recv_weights.detach().cpu(), exp_weights), f"{case}: recv_topk_weights differ on rank {rank}"
    assert torch.equal(tokens_per_expert.cpu(), exp_counts), f"{case}: tokens_per_expert differ on rank {rank}"

    y = expert_op(recv_x, recv_idx, recv_weights, rank)
    out = combine_fn(y, handle)
    assert out.dtype == spec.torch_dtype and out.shape == mine.x.shape

    ref_x = mine.x.double().requires_grad_(True)
    ref_w = mine.topk_weights.double().requires_grad_(True)
    ref_out = dense_output(mine, world_size, spec.num_experts, ref_x, ref_w)
    assert_close(out.detach(), ref_out.detach(), spec.torch_dtype, f"{case}: combine on rank {rank}")

    g = grad_seed(mine, rank)
    (out.float() * g.to(device, torch.float32)).sum().backward()
    (ref_out * g).sum().backward()
    assert_close(x.grad, ref_x.grad, spec.torch_dtype, f"{case}: grad x on rank {rank}")
    assert_close(weights.grad, ref_w.grad, spec.torch_dtype, f"{case}: grad topk_weights on rank {rank}")


def check_fp8_case(case: Case, rank: int, world_size: int, device: torch.device, dispatch_fn, combine_fn) -> None:
    """FP8 dispatch (forward only): received pairs bit-exact, then bf16 combine of the dequantised rows.

    ``dispatch_fn((x_fp8, scales), topk_idx, topk_weights, num_experts)`` returns the 5-tuple with
    ``recv_x`` a pair; ``combine_fn(y, handle)`` returns ``[N, H]`` bf16.
    """
    from fused_a2a.fp8 import dequantize_fp8, quantize_fp8

    spec = case.spec
    all_inputs = [case.inputs(r, world_size) for r in range(world_size)]
    pairs = [quantize_fp8(i.x) for i in all_inputs]
    mine = all_inputs[rank]
    x_fp8, scales = pairs[rank]
    recv, recv_idx, recv_weights, _, handle = dispatch_fn(
        (x_fp8.to(device), scales.to(device)), mine.topk_idx.to(device), mine.topk_weights.to(device), spec.num_experts
    )
    as_bytes = [Inputs(p[0].view(torch.uint8), i.topk_idx, i.topk_weights) for p, i in zip(pairs, all_inputs)]
    as_scales = [Inputs(p[1], i.topk_idx, i.topk_weights) for p, i in zip(pairs, all_inputs)]
    exp_bytes, exp_idx, exp_weights, _ = expected_dispatch(as_bytes, rank, spec.num_experts)
    exp_scales = expected_dispatch(as_scales, rank, spec.num_experts)[0]
    assert recv[0].dtype == torch.float8_e4m3fn and torch.equal(recv[0].cpu().view(torch.uint8), exp_bytes)
    assert torch.equal(recv[1].cpu(), exp_scales)
    assert torch.equal(recv_idx.cpu(), exp_idx) and torch.equal(recv_weights.cpu(), exp_weights)

    rows = dequantize_fp8(*recv).to(torch.bfloat16)
    out = combine_fn(expert_op(rows, recv_idx, recv_weights, rank), handle)
    dense = dequantize_fp8(x_fp8, scales).double()
    expected = dense_output(mine, world_size, spec.num_experts, dense, mine.topk_weights.double())
    assert_close(out, expected, torch.bfloat16, f"{case}: fp8 combine on rank {rank}")
