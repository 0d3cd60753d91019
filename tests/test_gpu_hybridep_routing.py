"""HybridEP's routing kernels (Triton) write what the torch operations write (one GPU, one process):
``torchrun --nproc-per-node 1 -m pytest -m gpu tests/test_gpu_hybridep_routing.py``."""

from __future__ import annotations

import pytest
import torch

from fused_a2a.backends import hybridep_routing as routing
from fused_a2a.backends.hybridep_routing import ExpertColumns

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or routing.triton is None, reason="needs a CUDA GPU and Triton"),
]

SHAPES = [(2, 64, 8, 4096), (2, 64, 8, 1), (8, 256, 8, 4096), (2, 8, 3, 333), (4, 16, 1, 100), (1, 4, 8, 64),
          (16, 64, 6, 257)]


@pytest.mark.parametrize("world, experts, topk, tokens", SHAPES)
def test_kernels_write_what_torch_operations_write(world, experts, topk, tokens) -> None:
    gen = torch.Generator().manual_seed(tokens + experts)
    idx = torch.randint(-1, experts, (tokens, topk), generator=gen)
    idx[torch.rand(tokens, topk, generator=gen) < 0.01] = experts + 3
    idx[torch.rand(tokens, topk, generator=gen) < 0.01] = -5
    weights = torch.rand(tokens, topk, generator=gen)
    columns = ExpertColumns(experts, world)
    idx_gpu, weights_gpu = idx.cuda(), weights.cuda()
    expected_map, expected_probs = routing.dense_routing_torch(idx_gpu, weights_gpu, columns)
    for _ in range(2):  # the first launch compiles, the second goes through the compiled kernel's launcher
        routing_map, probs = routing.dense_routing(idx_gpu, weights_gpu, columns)
        assert torch.equal(routing_map, expected_map)
        assert torch.allclose(probs, expected_probs, rtol=0, atol=1e-6)
        assert torch.equal(routing.dense_routing(idx_gpu, None, columns)[0], expected_map)

    # receiver side: a local map with garbage past the received rows, a pinned row count
    capacity, rows = tokens * world, max(1, (tokens * world) // 2)
    local_map = torch.rand(capacity, columns.padded, generator=gen) < 0.3
    local_map_gpu = local_map.cuda()
    num_rows = torch.tensor([rows], dtype=torch.int32).pin_memory()
    for _ in range(2):
        counts = routing.start_count(local_map_gpu, num_rows)
        torch.cuda.synchronize()
        assert counts is not None and counts.tolist() == routing.count_rows(local_map, rows).tolist()
    first = (world - 1) * columns.padded if world > 1 else 0
    recv_probs = torch.rand(rows, max(world, 1) * columns.padded, generator=gen).cuda()
    want_ids, want_weights = routing.ascending_topk_torch(local_map_gpu[:rows, :columns.local],
                                                          recv_probs[:, first:first + columns.local], topk)
    for _ in range(2):
        ids, got_weights = routing.ascending_topk(local_map_gpu, recv_probs, rows, columns, first, topk)
        assert torch.equal(ids, want_ids) and torch.equal(got_weights, want_weights)
    assert not routing._failure, routing._failure
    launches = (routing._dense_launch, routing._count_launch, routing._ascending_launch)
    assert all(launch.working and launch.compiled for launch in launches)
