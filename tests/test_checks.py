"""Each malformed dispatch/combine argument gets its own clear ValueError (no process group needed)."""

from __future__ import annotations

import pytest
import torch

from fused_a2a.checks import check_combine_input, check_dispatch_inputs, check_topk_range

N, H, K, E = 6, 8, 2, 8


def good():
    return torch.zeros(N, H, dtype=torch.bfloat16), torch.zeros(N, K, dtype=torch.int64), torch.ones(N, K)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: (a[0][0], *a[1:]), r"x must be a 2-D tensor \[num_tokens, hidden\], got shape \(8,\)"),
        (lambda a: (a[0].to(torch.int32), *a[1:]), "x must be bfloat16, float16 or float32, got torch.int32"),
        (lambda a: (a[0], a[1][:, 0], a[2]), r"topk_idx must be a 2-D tensor"),
        (lambda a: (a[0], a[1].to(torch.int32), a[2]), "topk_idx must be int64, got torch.int32"),
        (lambda a: (a[0][:-1], a[1], a[2]), "x has 5 tokens but topk_idx has 6"),
        (lambda a: (a[0], a[1], a[2][:, 0]), "topk_weights must be a 2-D tensor"),
        (lambda a: (a[0], a[1], a[2].to(torch.bfloat16)), "topk_weights must be float32, got torch.bfloat16"),
        (lambda a: (a[0], a[1], a[2][:-1]), r"topk_weights shape \(5, 2\) does not match topk_idx shape \(6, 2\)"),
    ],
)
def test_each_bad_tensor_gets_its_own_message(change, message) -> None:
    x, idx, weights = change(good())
    with pytest.raises(ValueError, match=message):
        check_dispatch_inputs(x, idx, weights, E, 2)


def test_experts_not_divisible_by_group() -> None:
    with pytest.raises(ValueError, match=r"num_experts \(9\) is not divisible by the group size \(2\)"):
        check_dispatch_inputs(*good(), 9, 2)


@pytest.mark.parametrize("num_experts", [0, -4, 8.0])
def test_num_experts_must_be_positive_int(num_experts) -> None:
    with pytest.raises(ValueError, match="num_experts must be a positive int"):
        check_dispatch_inputs(*good(), num_experts, 2)


@pytest.mark.parametrize("bad", [-2, E])
def test_topk_idx_out_of_range(bad: int) -> None:
    idx = torch.zeros(N, K, dtype=torch.int64)
    idx[3, 1] = bad
    with pytest.raises(ValueError, match=r"topk_idx values must lie in \[-1, 8\)"):
        check_topk_range(idx, E)


def test_valid_inputs_pass() -> None:
    x, idx, weights = good()
    idx[0, 0] = -1
    idx[1, 1] = E - 1
    check_dispatch_inputs(x, idx, weights, E, 2)
    check_topk_range(idx, E)
    check_topk_range(torch.empty(0, K, dtype=torch.int64), E)


@pytest.mark.parametrize(
    "y, message",
    [
        (torch.zeros(5, H), "combine input has 5 rows but its handle received 4 tokens"),
        (torch.zeros(4), "combine input must be a 2-D tensor"),
        (torch.zeros(4, H, dtype=torch.int64), "combine input must be bfloat16, float16 or float32"),
    ],
)
def test_combine_input_must_match_handle(y, message) -> None:
    with pytest.raises(ValueError, match=message):
        check_combine_input(y, 4)
