"""HybridEP's Triton routing kernels (:mod:`fused_a2a.backends.hybridep_routing`) run by Triton's
interpreter on CPU tensors, against the torch operations that compute the same values. The GPU runs them
compiled (``tests/test_gpu_hybridep_routing.py``); this catches a wrong index or mask without a GPU.

The interpreter must be chosen before Triton is imported, so the kernels run in a child process
(this file run as a script).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")


def test_kernels_match_torch_under_the_interpreter() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1] / "library"), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "cases 12" in done.stdout, done.stdout


def _check(seed: int, routing) -> None:
    generator = torch.Generator().manual_seed(seed)
    world = (2, 3, 4)[seed % 3]
    local = (1, 3, 4, 8)[seed % 4]
    num_experts = world * local
    topk = min(num_experts, (1, 2, 5, 8)[(seed // 3) % 4])
    tokens = (0, 1, 7, 37, 130)[seed % 5]
    columns = routing.ExpertColumns(num_experts, world)
    idx = torch.stack([torch.randperm(num_experts, generator=generator)[:topk] for _ in range(tokens)]) \
        if tokens else torch.empty(0, topk, dtype=torch.int64)
    idx[torch.rand(idx.shape, generator=generator) < 0.2] = -1
    weights = torch.rand(idx.shape, generator=generator)
    routing_map, probs = routing.dense_routing_torch(idx, weights, columns)
    lp, kp = routing._pow2(columns.columns), routing._pow2(topk)
    if tokens:
        got_map = torch.empty_like(routing_map)
        got_probs = torch.empty_like(probs)
        routing._dense[(triton.cdiv(tokens, 8),)](idx, weights, got_map.view(torch.uint8), got_probs, tokens, topk,
                                                   num_experts, local, columns.padded, columns.columns, world,
                                                   HAS_W=True, B=8, KP=kp, CP=lp, WP=routing._pow2(world))
        assert torch.equal(got_map, routing_map) and torch.equal(got_probs, probs), "dense"

    rank = seed % world
    first = rank * columns.padded
    local_map = routing_map[:, first:first + columns.padded].contiguous()
    want_ids, want_weights = routing.ascending_topk_torch(local_map[:, :local], probs[:, first:first + local], topk)
    rows = tokens
    ids = torch.full((rows, topk), 99, dtype=torch.int64)
    got_weights = torch.full((rows, topk), 9.0)
    if rows:
        block = 4
        routing._ascending[(triton.cdiv(rows, block),)](local_map.view(torch.uint8), probs, ids, got_weights, rows, local,
                                                        columns.padded, probs.stride(0), first, topk, BR=block,
                                                        LP=routing._pow2(columns.padded), KP=kp)
    assert torch.equal(ids, want_ids) and torch.equal(got_weights, want_weights), "ascending"

    partial = torch.zeros(routing._pow2(columns.padded), dtype=torch.int32)
    ticket = torch.zeros(1, dtype=torch.int32)
    num_rows = torch.tensor([rows], dtype=torch.int32)
    for grid in (1, 3):  # twice on one scratch: the kernel must leave it zeroed
        out = torch.full((columns.padded,), -5, dtype=torch.int64)
        routing._count[(grid,)](local_map.view(torch.uint8), num_rows, partial, ticket, out, columns.padded, BR=4,
                                LP=routing._pow2(columns.padded))
        assert torch.equal(out, routing.count_rows(local_map, rows)), f"count, {grid} programs"
        assert not partial.any() and ticket.item() == 0, "count scratch left dirty"


def main() -> None:
    import fused_a2a.backends.hybridep_routing as routing

    assert routing.triton is not None
    for seed in range(12):
        _check(seed, routing)
    print("cases 12")


if __name__ == "__main__":
    main()
