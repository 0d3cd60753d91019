"""The torch backend's routing plan: its torch operations against a token-by-token reference, the
capacity every rank agrees on, and the routing riding with the counts on real gloo ranks."""

from __future__ import annotations

import pytest
import torch

import fused_a2a
import fused_a2a.backends.torch_a2a as torch_a2a
from fused_a2a.backends.torch_routing import Capacity, receive_with_torch, send_with_torch, read_counts
from fused_a2a.shared_errors import POISON_ID
from ranks import spawn
from routing_plans import expected, routing_inputs, simulate

PLANS = [  # (tokens per rank, top-k, experts, capacity)
    ([6], 2, 4, 8),
    ([5, 7, 0], 3, 6, 8),
    ([9, 4, 6, 3], 4, 8, 4),  # rank 0 holds more tokens than the capacity
    ([3, 3], 1, 4, 0),
    ([10, 2], 8, 16, 16),
]


@pytest.mark.parametrize("tokens,topk,experts,capacity", PLANS)
def test_the_plan_holds_what_the_reference_says(tokens, topk, experts, capacity) -> None:
    inputs = routing_inputs(tokens, topk, experts, seed=len(tokens) * 10 + topk, device=torch.device("cpu"))
    assert simulate(send_with_torch, receive_with_torch, inputs, experts, capacity) == expected(inputs, experts, capacity)


def test_capacity_is_the_recent_peak_rounded_up_to_a_power_of_two() -> None:
    capacity = Capacity(window=3)
    assert capacity.rows == 0
    assert capacity.observe(900) and capacity.rows == 1024
    assert not capacity.observe(50) and capacity.rows == 1024
    assert not capacity.observe(1024)
    assert not capacity.observe(3) and not capacity.observe(3)
    assert capacity.observe(3) and capacity.rows == 4  # the peak left the window of three dispatches
    assert not capacity.observe(0) and capacity.rows == 4
    assert not Capacity().observe(0)

def test_read_counts_names_the_ranks_with_ids_out_of_range() -> None:
    world, num_experts = 2, 4
    row = lambda rows, low, high, n: [rows, 1, 1, low, high, n]  # noqa: E731
    host = torch.tensor(row(1, 0, 3, 5) + row(2, -2, 1, 7) + row(3, 0, 1, 5) + row(4, 0, 1, 5))
    with pytest.raises(ValueError, match=r"found range \[-2, 1\] \(rank 1\)$"):  # the offending ranks' range
        read_counts(host, world, num_experts)
    poisoned = torch.tensor(row(1, 0, 3, 5) + row(2, POISON_ID, POISON_ID, 1) + row(3, 0, 1, 5) + row(4, 0, 1, 5))
    with pytest.raises(ValueError, match=r"^the dispatch inputs of rank 1 failed a check \(that rank's error says which\)$"):
        read_counts(poisoned, world, num_experts)
    counts = read_counts(torch.tensor(row(1, 0, 3, 5) + row(2, -1, 1, 7) + row(3, 0, 1, 5) + row(4, 0, 1, 5)),
                         world, num_experts)
    assert counts.send == (3, 4) and counts.recv == (1, 2) and counts.per_local_expert == (2, 2)
    assert counts.max_tokens == 7


def _routing_rides_with_the_counts(rank: int, world_size: int) -> None:
    calls = []
    rows = torch_a2a.routing_rows
    torch_a2a.routing_rows = lambda *args: calls.append(rank) or rows(*args)
    tokens = [50, 900][rank]
    inputs = routing_inputs([tokens], 4, 16, seed=rank, device=torch.device("cpu"))[0]
    x = torch.randn(tokens, 8)
    results = [fused_a2a.dispatch(x, *inputs, 16, backend="torch") for _ in range(3)]
    assert len(calls) == 1  # only the first dispatch, before the capacity was known, exchanged rows again
    for later in results[1:]:
        for mine, first in zip(later[:4], results[0][:4]):
            assert torch.equal(mine, first)
    buffer = torch_a2a.get_torch_buffer(None)
    assert buffer.capacity.rows == 1024
    more = routing_inputs([2000], 4, 16, seed=9, device=torch.device("cpu"))[0] if rank == 1 else inputs
    fused_a2a.dispatch(torch.randn(more[0].size(0), 8), *more, 16, backend="torch")
    assert len(calls) == 2 and buffer.capacity.rows == 2048  # a rank outgrew it: exchanged again, every rank
    torch_a2a.routing_rows = rows


def test_after_the_first_dispatch_the_routing_rides_with_the_counts() -> None:
    spawn(_routing_rides_with_the_counts, 2)


def _kernels_that_fail(rank: int, world_size: int) -> None:
    import warnings

    import fused_a2a.backends.torch_routing_kernels as kernels

    def broken(*args, **kwargs):
        raise RuntimeError("PassManager::run failed\nmore lines")

    kernels.usable = lambda topk_idx: not kernels._failure  # as on a GPU with Triton
    kernels.plan_send = kernels.plan_receive = broken
    inputs = routing_inputs([30], 4, 16, seed=rank, device=torch.device("cpu"))[0]
    x = torch.randn(30, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = [fused_a2a.dispatch(x, *inputs, 16, backend="torch") for _ in range(2)]
    messages = [str(w.message) for w in caught if "routing kernels" in str(w.message)]
    assert messages == ["fused_a2a: the torch backend's Triton routing kernels failed (PassManager::run failed); "
                        "using torch operations instead"]
    for mine, first in zip(results[1][:4], results[0][:4]):
        assert torch.equal(mine, first)
    combined = fused_a2a.combine(results[0][0], results[0][4])
    copies = results[0][4].raw.is_token_in_rank.sum(dim=1, keepdim=True)
    assert torch.allclose(combined, x * copies)


def test_kernels_that_fail_give_way_to_torch_operations_with_one_warning() -> None:
    spawn(_kernels_that_fail, 2)
