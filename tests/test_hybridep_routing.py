"""HybridEP's routing conversion on the CPU (torch operations): the column layout with phantom experts,
the dense map and its bad-id signal, the counts and the ascending top-k."""

from __future__ import annotations

import pytest
import torch

from fused_a2a.backends import hybridep_routing as routing
from fused_a2a.backends.hybridep_routing import ExpertColumns


@pytest.mark.parametrize("world, experts, padded", [(1, 4, 16), (2, 64, 40), (2, 8, 8), (4, 64, 20), (8, 64, 10),
                                                    (8, 256, 34), (16, 16, 2), (32, 64, 3)])
def test_columns_leave_room_for_a_phantom_and_keep_hybridep_alignment(world, experts, padded) -> None:
    columns = ExpertColumns(experts, world)
    assert columns.padded == padded and columns.padded > columns.local
    assert columns.columns % 16 == 0 or world > 16  # 16-byte rows of the custom allgather for any token count
    assert (columns.padded * world) % 4 == 0


def reference_map(idx: torch.Tensor, weights: torch.Tensor, columns: ExpertColumns):
    """Token by token: the map and probabilities the conversion must produce."""
    n = idx.size(0)
    routing_map = torch.zeros(n, columns.columns, dtype=torch.bool)
    probs = torch.zeros(n, columns.columns, dtype=torch.float32)
    for t in range(n):
        bad = False
        for k in range(idx.size(1)):
            e = int(idx[t, k])
            if 0 <= e < columns.num_experts:
                c = (e // columns.local) * columns.padded + e % columns.local
                routing_map[t, c] = True
                probs[t, c] += weights[t, k]
            elif e != -1:
                bad = True
        if bad:
            for r in range(columns.world):
                routing_map[t, r * columns.padded + columns.local] = True
    return routing_map, probs


@pytest.mark.parametrize("world, experts, topk", [(2, 8, 2), (2, 64, 8), (4, 16, 3), (1, 4, 8)])
def test_dense_routing_matches_token_by_token(world, experts, topk) -> None:
    gen = torch.Generator().manual_seed(world * 100 + experts + topk)
    n = 37
    idx = torch.randint(-1, experts, (n, topk), generator=gen)
    idx[3, 0] = experts + 5  # bad ids: above the range and below -1, in rows that also hold valid ids
    idx[9, -1] = -7
    idx[11] = idx[11, 0]  # duplicates: the weights add up
    weights = torch.rand(n, topk, generator=gen)
    columns = ExpertColumns(experts, world)
    routing_map, probs = routing.dense_routing(idx, weights, columns)
    expected_map, expected_probs = reference_map(idx, weights, columns)
    assert torch.equal(routing_map, expected_map)
    assert torch.allclose(probs, expected_probs)
    assert routing.dense_routing(idx, None, columns)[1] is None


def test_counts_read_only_the_received_rows() -> None:
    local_map = torch.tensor([[1, 0, 1], [0, 0, 1], [1, 1, 1], [1, 1, 1]], dtype=torch.bool)
    assert routing.count_rows(local_map, 2).tolist() == [1, 0, 2]
    assert routing.start_count(local_map, torch.tensor([2], dtype=torch.int32)) is None  # no kernel on the CPU


def test_ascending_topk_lists_local_experts_then_minus_one() -> None:
    columns = ExpertColumns(8, 2)  # 4 local experts, 8 columns per rank
    local_map = torch.zeros(3, columns.padded, dtype=torch.bool)
    local_map[0, [0, 2]] = True
    local_map[2, :4] = True
    local_map[1, columns.local] = True  # a phantom column is never listed
    first = columns.padded  # rank 1 of the node
    probs = torch.zeros(3, 2 * columns.padded)
    probs[:, first:first + 4] = torch.tensor([[0.1, 0.9, 0.3, 0.9], [0.5, 0.5, 0.5, 0.5], [0.1, 0.2, 0.3, 0.4]])
    ids, weights = routing.ascending_topk(local_map, probs, 3, columns, first, 2)
    assert ids.tolist() == [[0, 2], [-1, -1], [0, 1]]
    assert torch.equal(weights, torch.tensor([[0.1, 0.3], [0.0, 0.0], [0.1, 0.2]]))
    wide_ids, wide_weights = routing.ascending_topk(local_map, None, 3, columns, first, 6)
    assert wide_ids.tolist() == [[0, 2, -1, -1, -1, -1], [-1] * 6, [0, 1, 2, 3, -1, -1]]
    assert not wide_weights.any()
