"""The torch backend's Triton routing kernels write what its torch operations write (one GPU, ranks
simulated in one process: ``pytest -m gpu tests/test_gpu_torch_routing.py``)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import fused_a2a.backends.torch_routing_kernels as kernels
from fused_a2a.backends.torch_routing import PlanViews, receive_with_torch, send_with_torch
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


def _decoys(views: PlanViews, shape) -> PlanViews:
    """``views`` with its token, ids and weights regions swapped for those of a buffer of garbage (the
    staging region, which a graph's copy to the host reads where it was captured, stays)."""
    garbage = PlanViews.of(torch.full_like(views.staging.new_empty(shape.out_bytes // 8), -7), shape)
    return replace(views, token=garbage.token, ids=garbage.ids, weights=garbage.weights)


def _addresses(*addresses: torch.Tensor | int) -> torch.Tensor:
    return torch.tensor([a if isinstance(a, int) else a.data_ptr() for a in addresses], dtype=torch.int64).pin_memory()


def _buffer(views: PlanViews, shape) -> int:
    """The address of the buffer ``views`` are views of (its staging region is never empty)."""
    return views.staging.data_ptr() - shape.regions["staging"][0]


@pytest.mark.parametrize("tokens,topk,experts,capacity", PLANS[:6], ids=lambda v: str(v).replace(" ", ""))
def test_kernels_read_their_inputs_and_output_through_the_addresses(tokens, topk, experts, capacity) -> None:
    """With ``inputs`` (what a replayed graph uses), the kernels read top-k, weights and the output
    buffer at the addresses given there, not at the tensors passed (decoys of garbage here), and write
    the same plan."""
    device = torch.device("cuda", torch.cuda.current_device())
    inputs = routing_inputs(tokens, topk, experts, seed=len(tokens) * 100 + topk, device=device)
    kept = []

    def send(topk_idx, topk_weights, shape, views):
        if not kernels.usable(topk_idx):
            return send_with_torch(topk_idx, topk_weights, shape, views)
        addresses = _addresses(topk_idx, topk_weights, _buffer(views, shape))
        kept.append(addresses)
        return kernels.plan_send(torch.full_like(topk_idx, 3), torch.zeros_like(topk_weights), shape,
                                 _decoys(views, shape), inputs=addresses)

    def receive(received, shape, views):
        addresses = _addresses(received, received, _buffer(views, shape))
        kept.append(addresses)
        kernels.plan_receive(received, shape, _decoys(views, shape), inputs=addresses)

    through_addresses = simulate(send, receive, inputs, experts, capacity)
    torch.cuda.synchronize()
    assert through_addresses == simulate(send_with_torch, receive_with_torch, inputs, experts, capacity)
