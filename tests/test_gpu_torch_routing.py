"""The torch backend's Triton routing kernels write what its torch operations write (one GPU, ranks
simulated in one process: ``pytest -m gpu tests/test_gpu_torch_routing.py``)."""

from __future__ import annotations

import pytest
import torch

import fused_a2a.backends.torch_routing_kernels as kernels
from fused_a2a.backends.torch_routing import receive_with_torch, send_with_torch
from routing_plans import expected, routing_inputs, simulate

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or kernels.triton is None, reason="needs a CUDA GPU and Triton"),
]

PLANS = [  # (tokens per rank, top-k, experts, capacity)
    ([4096], 8, 64, 4096),
    ([128], 8, 64, 128),
    ([1], 1, 4, 1),
    ([300, 17], 2, 16, 512),
    ([500, 120, 0], 6, 48, 256),
    ([700, 64, 64, 64], 8, 64, 256),  # rank 0 holds more tokens than the capacity
    ([257] * 8, 8, 256, 512),
    ([64] * 16, 4, 32, 64),
    ([33, 40], 3, 8, 0),
]


@pytest.mark.parametrize("tokens,topk,experts,capacity", PLANS, ids=lambda v: str(v).replace(" ", ""))
def test_kernels_write_what_the_torch_operations_write(tokens, topk, experts, capacity) -> None:
    device = torch.device("cuda", torch.cuda.current_device())
    inputs = routing_inputs(tokens, topk, experts, seed=len(tokens) * 100 + topk, device=device)
    def send(topk_idx, topk_weights, shape, views):  # as plan_routing chooses: no kernels for a rank without tokens
        return (kernels.plan_send if kernels.usable(topk_idx) else send_with_torch)(topk_idx, topk_weights, shape, views)

    with_kernels = simulate(send, kernels.plan_receive, inputs, experts, capacity)
    with_torch = simulate(send_with_torch, receive_with_torch, inputs, experts, capacity)
    assert with_kernels == with_torch
    if sum(tokens) <= 2000:
        assert with_torch == expected(inputs, experts, capacity)
