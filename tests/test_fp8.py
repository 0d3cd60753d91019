"""FP8 dispatch: the (x_fp8, scales) pair, its checks, and the torch backend moving it exactly."""

from __future__ import annotations

import pytest
import torch

import fused_a2a
from a2a_bench.engine.workload import WorkloadSpec
from fused_a2a.checks import check_dispatch_inputs
from fused_a2a.fp8 import dequantize_fp8, quantize_fp8
from ranks import spawn
from reference import Case, check_fp8_case

CASES = [
    Case(WorkloadSpec(num_tokens=40, hidden=256, topk=4, num_experts=16, dtype="fp8", rng_seed=1)),
    Case(WorkloadSpec(num_tokens=24, hidden=128, topk=2, num_experts=8, dtype="fp8", drop=0.3, rng_seed=2)),
    Case(WorkloadSpec(num_tokens=16, hidden=128, topk=2, num_experts=8, dtype="fp8", rng_seed=3), edit="silent0"),
]


def test_quantize_round_trip_is_close_and_shaped() -> None:
    x = torch.randn(5, 384) * 3
    x_fp8, scales = quantize_fp8(x)
    assert x_fp8.dtype == torch.float8_e4m3fn and x_fp8.shape == (5, 384)
    assert scales.dtype == torch.float32 and scales.shape == (5, 3)
    back = dequantize_fp8(x_fp8, scales)
    assert ((back - x).norm() / x.norm()).item() < 0.05


def test_quantize_needs_hidden_divisible_by_128() -> None:
    with pytest.raises(ValueError, match="divisible by 128, got 100"):
        quantize_fp8(torch.randn(2, 100))


def test_workload_rejects_fp8_with_odd_hidden() -> None:
    with pytest.raises(ValueError, match="fp8 dispatch needs a hidden size divisible by 128, got 200"):
        WorkloadSpec(num_tokens=4, hidden=200, topk=2, num_experts=8, dtype="fp8")


@pytest.mark.parametrize(
    "pair, message",
    [
        ((torch.zeros(4, 128, dtype=torch.float8_e4m3fn),), "an FP8 x must be a pair"),
        ((torch.zeros(4, 128), torch.ones(4, 1)), "x_fp8 must be a 2-D float8_e4m3fn tensor"),
        ((torch.zeros(4, 128, dtype=torch.float8_e4m3fn), torch.ones(4, 2)), r"scales must be float32 \[4, 128 / 128\]"),
        ((torch.zeros(4, 128, dtype=torch.float8_e4m3fn), torch.ones(4, 1, dtype=torch.float64)), "scales must be float32"),
    ],
)
def test_bad_fp8_pairs_get_one_message_each(pair, message) -> None:
    with pytest.raises(ValueError, match=message):
        check_dispatch_inputs(pair, torch.zeros(4, 2, dtype=torch.int64), torch.ones(4, 2), 8, 2)


def _fp8_cases(rank: int, world_size: int) -> None:
    def dispatch_fn(x, idx, weights, num_experts):
        return fused_a2a.dispatch(x, idx, weights, num_experts, backend="torch", impl="all_to_all")

    for case in CASES:
        check_fp8_case(case, rank, world_size, torch.device("cpu"), dispatch_fn, fused_a2a.combine)
    # a cached dispatch moves a pair with the layout of the first one
    pair = quantize_fp8(CASES[0].inputs(rank, world_size).x)
    inputs = CASES[0].inputs(rank, world_size)
    first = fused_a2a.dispatch(pair, inputs.topk_idx, inputs.topk_weights, 16)
    buffer = fused_a2a.TorchBuffer()
    cached = buffer.dispatch(pair, handle=first[4].raw)[0]
    assert torch.equal(cached[0].view(torch.uint8), first[0][0].view(torch.uint8)) and torch.equal(cached[1], first[0][1])


@pytest.mark.parametrize("world_size", [2, 4])
def test_torch_backend_moves_fp8_pairs_exactly(world_size: int) -> None:
    spawn(_fp8_cases, world_size)
