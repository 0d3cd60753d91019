"""Rank functions of ``tests/test_fake_hybridep.py``: the CPU fake of ``deep_ep.HybridEPBuffer`` against a
dense reference built by all-gathering every rank's inputs.

``spawn(worker, n, ..., sys_path=FAKES)`` puts ``tests/fakes`` first on each rank's ``sys.path``; the workers
import ``deep_ep`` (the fake) inside their bodies. Nothing here imports fused_a2a: the fake depends only on
torch.distributed.
"""

from __future__ import annotations

import gc
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

FAKES = (str(Path(__file__).parent / "fakes"),)
HIDDEN = 32
LOCAL_EXPERTS = 2
TOPK = 2
CHUNK_VARS = ("NUM_OF_TOKENS_PER_CHUNK_DISPATCH_API", "NUM_OF_TOKENS_PER_CHUNK_COMBINE_API", "NUM_OF_TOKENS_PER_CHUNK_PREPROCESSING_API")
RPN_VAR = "NUM_OF_HYBRID_EP_RANKS_PER_NVLINK_DOMAIN"


def _deep_ep():
    import deep_ep

    assert deep_ep.__file__.startswith(FAKES[0]), "the rank did not import the fake deep_ep"
    return deep_ep


def _gather(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's tensor, concatenated in rank order (bit-exact: other than fp32/int/uint8, raw bytes travel)."""
    if tensor.dtype == torch.bool:
        return _gather(tensor.to(torch.uint8)).bool()
    if tensor.dtype not in (torch.float32, torch.int64, torch.uint8):
        return _gather(tensor.contiguous().view(torch.uint8)).view(tensor.dtype)
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def _inputs(rank: int, num_tokens: int, num_experts: int, seed: int = 0, nowhere: int = 2):
    """``(hidden bf16 [N, H], topk_idx [N, K], routing_map [N, E], probs [N, E] fp32)``: K distinct experts per
    token, probs non-zero exactly there; the last ``nowhere`` tokens are routed nowhere (map and probs)."""
    gen = torch.Generator().manual_seed(1000 * seed + rank)
    hidden = torch.randn(num_tokens, HIDDEN, generator=gen).to(torch.bfloat16)
    topk_idx = torch.stack([torch.randperm(num_experts, generator=gen)[:TOPK] for _ in range(num_tokens)])
    weights = torch.rand(num_tokens, TOPK, generator=gen) + 0.5
    routing_map = torch.zeros(num_tokens, num_experts, dtype=torch.bool).scatter(1, topk_idx, True)
    probs = torch.zeros(num_tokens, num_experts).scatter(1, topk_idx, weights)
    if nowhere:
        routing_map[-nowhere:] = False
        probs[-nowhere:] = 0
    return hidden, topk_idx, routing_map, probs


def _reference_combine(copies: list[torch.Tensor]) -> torch.Tensor:
    """fp32 sum of bf16 copies, rounded to bf16 once."""
    return torch.stack([c.float() for c in copies]).sum(0).to(torch.bfloat16)


def _expect_dispatch(rank: int, hidden, routing_map, probs, e_loc: int, rpn: int, local_rank: int):
    """Rows, probs (the node's E_loc*RPN columns) and local map the fake must return on ``rank``."""
    g_hidden, g_map, g_probs = _gather(hidden), _gather(routing_map), _gather(probs)
    local = slice(rank * e_loc, (rank + 1) * e_loc)
    node = rank // rpn
    row_mask = g_map[:, local].any(1)
    return (
        g_hidden[row_mask],
        g_probs[row_mask][:, node * e_loc * rpn:(node + 1) * e_loc * rpn],
        g_map[row_mask][:, local],
        row_mask,
        g_map,
        g_hidden,
        g_probs,
    )


def _bitwise(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.int16) if a.element_size() == 2 else a,
                                                                     b.view(torch.int16) if b.element_size() == 2 else b)


def _check_dispatch_combine(buffer, rank: int, world: int, num_tokens: int, seed: int) -> None:
    """Plain dispatch (map and top-k routes), combine, cached dispatch, against the dense reference."""
    e_loc, rpn, local_rank = LOCAL_EXPERTS, buffer.num_of_hybrid_ep_ranks_per_nvlink_domain, buffer.local_rank
    num_experts = e_loc * world
    hidden, topk_idx, routing_map, probs = _inputs(rank, num_tokens, num_experts, seed)
    rows_ref, probs_ref, map_ref, _, _, _, _ = _expect_dispatch(rank, hidden, routing_map, probs, e_loc, rpn, local_rank)
    num_rows = rows_ref.size(0)

    rows, row_probs, scales, handle = buffer.dispatch(hidden=hidden, routing_map=routing_map, probs=probs)
    assert scales is None and isinstance(handle, tuple) and len(handle) == 7
    assert _bitwise(rows, rows_ref)
    assert row_probs.dtype == torch.float32 and _bitwise(row_probs, probs_ref)
    s2d, r2a, a2r, count, local_map, tokens_per_rank, config = handle
    assert count.dtype == torch.int32 and count.shape == (1,) and int(count.item()) == num_rows
    assert local_map.shape == (num_tokens * world, e_loc) and local_map.dtype == torch.bool
    assert torch.equal(local_map[:num_rows], map_ref)
    assert tokens_per_rank == num_tokens and config.hidden_dim == HIDDEN
    nodes = world // rpn
    assert s2d.shape == (num_tokens * nodes, rpn) and s2d.dtype == torch.int32
    assert r2a.shape == (-(-num_tokens // 16) * 16, nodes) and a2r.shape == (num_tokens, nodes - 1)

    # top-k route (scatter into map + probs) gives the same result where every token has its K experts
    k_probs = probs.gather(1, topk_idx)
    full_map = torch.zeros_like(routing_map).scatter(1, topk_idx, True)
    full_probs = torch.zeros_like(probs).scatter(1, topk_idx, k_probs)
    k_rows, k_row_probs, _, k_handle = buffer.dispatch(hidden, topk_idx=topk_idx, topk_weights=k_probs, num_of_experts=num_experts)
    k_rows_ref, k_probs_ref, k_map_ref, _, _, _, _ = _expect_dispatch(rank, hidden, full_map, full_probs, e_loc, rpn, local_rank)
    assert _bitwise(k_rows, k_rows_ref) and _bitwise(k_row_probs, k_probs_ref)
    assert torch.equal(k_handle[4][: k_rows.size(0)], k_map_ref)

    # combine: each row scaled by its count of local experts; masked probs come back exactly
    counts = local_map[:num_rows].sum(1, keepdim=True)
    scaled = (rows.float() * counts).to(torch.bfloat16)
    masked = torch.zeros_like(row_probs)
    cols = slice(local_rank * e_loc, (local_rank + 1) * e_loc)
    masked[:, cols] = row_probs[:, cols] * local_map[:num_rows]
    combined, combined_probs = buffer.combine(scaled, probs=masked, handle=handle)
    assert combined.dtype == torch.bfloat16 and combined.shape == (num_tokens, HIDDEN)
    expected = []
    for t in range(num_tokens):
        copies = [(hidden[t].float() * int(routing_map[t, j * e_loc:(j + 1) * e_loc].sum())).to(torch.bfloat16)
                  for j in range(world) if routing_map[t, j * e_loc:(j + 1) * e_loc].any()]
        expected.append(_reference_combine(copies) if copies else torch.zeros(HIDDEN, dtype=torch.bfloat16))
    assert _bitwise(combined, torch.stack(expected))
    routed = routing_map.any(1)
    assert torch.allclose((combined[routed].float() / TOPK), hidden[routed].float(), atol=2e-5, rtol=1e-2)
    assert not combined[~routed].any()
    assert combined_probs.dtype == torch.float32 and torch.equal(combined_probs, probs)
    plain, no_probs = buffer.combine(scaled, handle=handle)
    assert no_probs is None and _bitwise(plain, combined)

    # cached dispatch: no routing, same layout; the same hidden gives the same rows, new data moves the same way
    again, again_probs, _, again_handle = buffer.dispatch(hidden, handle=handle, num_of_experts=num_experts, num_dispatched_tokens=num_rows)
    assert again_probs is None and _bitwise(again, rows) and again_handle[0] is handle[0]
    grad = torch.randn(num_tokens, HIDDEN).to(torch.bfloat16)
    grad_rows, grad_probs, _, _ = buffer.dispatch(grad, probs=probs, handle=handle, num_of_experts=num_experts)
    g_rows_ref, g_probs_ref, _, _, _, _, _ = _expect_dispatch(rank, grad, routing_map, probs, e_loc, rpn, local_rank)
    assert _bitwise(grad_rows, g_rows_ref) and _bitwise(grad_probs, g_probs_ref)


def _permute_reference(g_hidden, g_probs, g_map, rank: int, e_loc: int, pad: int):
    """Expert-major rows (within an expert: source rank, then token), each segment zero-padded to ``pad``."""
    rows, probs, counts = [], [], []
    for k in range(e_loc):
        expert = rank * e_loc + k
        sel = g_map[:, expert]
        count = int(sel.sum())
        padded = -(-count // pad) * pad if pad else count
        block = torch.zeros(padded, g_hidden.size(1), dtype=g_hidden.dtype)
        block[:count] = g_hidden[sel]
        block_probs = torch.zeros(padded)
        block_probs[:count] = g_probs[sel, expert]
        rows.append(block)
        probs.append(block_probs)
        counts.append(count)
    return torch.cat(rows), torch.cat(probs), counts


def _check_permute(buffer, rank: int, world: int, num_tokens: int, seed: int) -> None:
    e_loc, rpn = LOCAL_EXPERTS, buffer.num_of_hybrid_ep_ranks_per_nvlink_domain
    num_experts = e_loc * world
    hidden, _, routing_map, probs = _inputs(rank, num_tokens, num_experts, seed)
    _, _, _, _, g_map, g_hidden, g_probs = _expect_dispatch(rank, hidden, routing_map, probs, e_loc, rpn, buffer.local_rank)

    for pad in (0, 4):
        rows_ref, probs_ref, counts = _permute_reference(g_hidden, g_probs, g_map, rank, e_loc, pad)
        rows, row_probs, scales, padded, handle = buffer.dispatch_with_permute(
            hidden=hidden, routing_map=routing_map, probs=probs, pad_multiple=pad or None
        )
        assert scales is None and len(handle) == 11
        assert _bitwise(rows, rows_ref) and _bitwise(row_probs, probs_ref)
        padded_ref = [-(-c // pad) * pad if pad else c for c in counts]
        assert padded.dtype == torch.int64 and padded.device.type == "cpu" and padded.tolist() == padded_ref
        assert handle[7].dtype == torch.int32 and handle[7].tolist() == counts
        assert handle[8] == num_tokens and handle[10].tolist() == [0]
        num_rows = int(handle[3].item())
        assert int(handle[5][-1]) == num_rows  # dense_chunk_layout: running count of received rows
        assert handle[6].shape == (num_tokens * world, e_loc) and handle[6].dtype == torch.int32

        # combine_with_unpermute inverts it: each token comes back as the sum of its TOPK expert copies
        combined, combined_probs = buffer.combine_with_unpermute(hidden=rows, probs=row_probs, handle=handle, pad_multiple=pad or None)
        routed = routing_map.any(1)
        expected = (hidden.float() * routing_map.sum(1, keepdim=True)).to(torch.bfloat16)  # x*2 is exact in bf16
        expected[~routed] = 0  # +0.0, not x * 0 (-0.0 for negative x)
        assert _bitwise(combined, expected) and not combined[~routed].any()
        assert torch.equal(combined_probs, probs)
        plain, none = buffer.combine_with_unpermute(hidden=rows, handle=handle)
        assert none is None and _bitwise(plain, combined)

        # a cached call (num_permuted_tokens may be a 0-d tensor) gives the same rows, no padded counts
        cached = buffer.dispatch_with_permute(hidden=hidden, probs=probs, handle=handle, num_permuted_tokens=torch.tensor(rows.size(0)),
                                              pad_multiple=pad or None)
        assert _bitwise(cached[0], rows) and _bitwise(cached[1], row_probs) and cached[3] is None

    # non_blocking: exactly num_permuted_tokens rows; overflow dropped and flagged, spare rows zero
    blocking = buffer.dispatch_with_permute(hidden=hidden, routing_map=routing_map, probs=probs, pad_multiple=4)
    total = blocking[0].size(0)
    for capacity in (total + 8, total - 4):
        rows, row_probs, _, padded, handle = buffer.dispatch_with_permute(
            hidden=hidden, routing_map=routing_map, probs=probs, pad_multiple=4, num_permuted_tokens=capacity,
            non_blocking=True, fuse_permute_dispatch=True,
        )
        assert rows.size(0) == capacity and row_probs.size(0) == capacity
        keep = min(capacity, total)
        assert _bitwise(rows[:keep], blocking[0][:keep]) and torch.equal(row_probs[:keep], blocking[1][:keep])
        assert not rows[keep:].any()
        assert handle[10].tolist() == [int(capacity < total)]
        if capacity < total:
            assert int(handle[7].sum()) < int(blocking[4][7].sum())
            assert int(padded.sum()) <= capacity


def data_paths(rank: int, world_size: int) -> None:
    """Dispatch/combine, cached dispatch, permute/unpermute and fp8 against the dense reference."""
    deep_ep = _deep_ep()
    group = dist.group.WORLD
    buffer = deep_ep.HybridEPBuffer(group=group, hidden_dim=HIDDEN, max_num_of_tokens_per_rank=64, num_local_experts=LOCAL_EXPERTS)
    _check_dispatch_combine(buffer, rank, world_size, 24, seed=1)
    _check_dispatch_combine(buffer, rank, world_size, 6, seed=2)  # 6 % 64 = 6, 6 * 2 * 4 = 48: TMA-aligned
    _check_permute(buffer, rank, world_size, 24, seed=3)

    # fp8 buffer: uint8 tokens and their fp32 scales travel together
    fp8 = deep_ep.HybridEPBuffer(group, 512, 64, LOCAL_EXPERTS, use_fp8=True)
    num_experts = LOCAL_EXPERTS * world_size
    _, _, routing_map, probs = _inputs(rank, 8, num_experts, seed=4)
    tokens = torch.randint(0, 256, (8, 512), dtype=torch.uint8, generator=torch.Generator().manual_seed(rank))
    scales = torch.rand(8, 4)
    rows, _, row_scales, handle = fp8.dispatch(tokens, scaling_factor=scales, routing_map=routing_map)
    row_mask = _gather(routing_map)[:, rank * LOCAL_EXPERTS:(rank + 1) * LOCAL_EXPERTS].any(1)
    assert torch.equal(rows, _gather(tokens)[row_mask]) and torch.equal(row_scales, _gather(scales)[row_mask])
    with pytest.raises(RuntimeError, match="bfloat16 only"):
        fp8.combine(rows, handle=handle)  # combine is bf16-only, whatever the buffer dispatches


def multinode(rank: int, world_size: int) -> None:
    """Two NVLink domains of one rank each (``NUM_OF_HYBRID_EP_RANKS_PER_NVLINK_DOMAIN=1``)."""
    deep_ep = _deep_ep()
    os.environ[RPN_VAR] = "1"
    try:
        with pytest.warns(UserWarning, match="differs from detected value"):
            buffer = deep_ep.HybridEPBuffer(dist.group.WORLD, HIDDEN, 64, 4)
    finally:
        del os.environ[RPN_VAR]
    assert (buffer.num_of_hybrid_ep_ranks_per_nvlink_domain, buffer.num_of_nodes) == (1, world_size)
    assert (buffer.local_rank, buffer.node_rank) == (0, rank)
    assert buffer.config["num_sms_dispatch_api"] == 8 and buffer.config["num_sms_combine_api"] == 8
    hidden, _, routing_map, probs = _inputs(rank, 6, 4 * world_size, seed=5)
    with pytest.raises(RuntimeError, match=r"remainder_chunk\(6\) \* ranks_per_node\(1\) \* 4 = 24B"):
        buffer.dispatch(hidden, routing_map=routing_map)
    hidden, _, routing_map, probs = _inputs(rank, 8, 4 * world_size, seed=5)
    rows_ref, probs_ref, map_ref, _, _, _, _ = _expect_dispatch(rank, hidden, routing_map, probs, 4, 1, 0)
    rows, row_probs, _, handle = buffer.dispatch(hidden, routing_map=routing_map, probs=probs)
    assert _bitwise(rows, rows_ref) and _bitwise(row_probs, probs_ref) and row_probs.size(1) == 4
    assert torch.equal(handle[4][: rows.size(0)], map_ref)
    combined, combined_probs = buffer.combine(rows, probs=row_probs * map_ref, handle=handle)
    ranks_routed = routing_map.view(8, world_size, 4).any(2).sum(1, keepdim=True)
    expected = (hidden.float() * ranks_routed).to(torch.bfloat16)  # x * 1 or x * 2: exact in bf16
    expected[ranks_routed.squeeze(1) == 0] = 0
    assert _bitwise(combined, expected)
    assert torch.equal(combined_probs, probs)


def contract(rank: int, world_size: int) -> None:
    """Construction attributes and rules, call contract errors (every rank raises, none hangs), liveness."""
    deep_ep = _deep_ep()
    from deep_ep import hybrid_ep_buffer

    group = dist.group.WORLD
    num_experts = LOCAL_EXPERTS * world_size
    os.environ[CHUNK_VARS[1]] = "128"
    try:
        buffer = deep_ep.HybridEPBuffer(group, HIDDEN, 100, LOCAL_EXPERTS)
    finally:
        del os.environ[CHUNK_VARS[1]]
    assert (buffer.group, buffer.rank, buffer.group_size) == (group, rank, world_size)
    assert buffer.num_of_hybrid_ep_ranks_per_nvlink_domain == world_size
    assert (buffer.local_rank, buffer.node_rank, buffer.num_of_nodes) == (rank, 0, 1)
    expected = {
        "num_sms_dispatch_api": 24, "num_sms_combine_api": 24, "num_sms_preprocessing_api": 108,
        "num_blocks_permute": -1, "num_blocks_unpermute": -1, "num_of_tokens_per_chunk_dispatch_api": 64,
        "num_of_tokens_per_chunk_combine_api": 128, "num_of_tokens_per_chunk_preprocessing_api": 64,
        "max_num_of_tokens_per_rank": 512, "hidden_dim": HIDDEN, "num_local_experts": LOCAL_EXPERTS, "use_fp8": False,
    }
    assert {key: buffer.config[key] for key in expected} == expected
    tuned = deep_ep.HybridEPBuffer(group, HIDDEN, 64, LOCAL_EXPERTS, num_sms_dispatch_api=16, num_sms_combine_api=8,
                                   num_sms_preprocessing_api=32, num_blocks_permute=4, num_blocks_unpermute=2)
    assert [tuned.config[key] for key in ("num_sms_dispatch_api", "num_sms_combine_api", "num_sms_preprocessing_api",
                                          "num_blocks_permute", "num_blocks_unpermute")] == [16, 8, 32, 4, 2]
    assert ("hybrid_create", id(buffer)) in deep_ep.EVENTS and ("hybrid_create", id(tuned)) in deep_ep.EVENTS
    assert buffer in hybrid_ep_buffer.LIVE and tuned in hybrid_ep_buffer.LIVE
    del tuned
    gc.collect()
    assert len(hybrid_ep_buffer.LIVE) == 1 and buffer in hybrid_ep_buffer.LIVE

    # construction rules (raised before any collective, on every rank alike)
    for kwargs in ({"hidden_dim": 24}, {"num_local_experts": 1}, {"hidden_dim": 256, "use_fp8": True}):
        args = {"group": group, "hidden_dim": HIDDEN, "max_num_of_tokens_per_rank": 64, "num_local_experts": LOCAL_EXPERTS, **kwargs}
        with pytest.raises(RuntimeError, match=r"^The buffer config is not valid\.$"):
            deep_ep.HybridEPBuffer(**args)
    for value in ("40", "8"):
        os.environ[CHUNK_VARS[0]] = value
        try:
            with pytest.raises(RuntimeError, match=r"^The buffer config is not valid\.$"):
                deep_ep.HybridEPBuffer(group, HIDDEN, 64, LOCAL_EXPERTS)
        finally:
            del os.environ[CHUNK_VARS[0]]
    assert len(hybrid_ep_buffer.LIVE) == 1

    hidden, topk_idx, routing_map, probs = _inputs(rank, 8, num_experts)
    with pytest.raises(RuntimeError, match=r"^fake HybridEP: 0 tokens on this rank would hang the real library$"):
        buffer.dispatch(hidden[:0], routing_map=routing_map[:0])
    with pytest.raises(RuntimeError, match="0 tokens"):
        buffer.dispatch_with_permute(hidden=hidden[:0], routing_map=routing_map[:0])
    n = 8 if rank == 0 else 16
    uneven, _, uneven_map, _ = _inputs(rank, n, num_experts)
    with pytest.raises(RuntimeError, match=r"same number of tokens, got \[8, 16(, 16)*\].*hangs"):
        buffer.dispatch(uneven, routing_map=uneven_map)
    odd, _, odd_map, _ = _inputs(rank, 7, num_experts)
    tma = (r"^TMA 16B alignment error: tma_load_size = remainder_chunk\(7\) \* ranks_per_node\(2\) \* 4 = 56B, "
           r"must be multiple of 16B")
    if world_size == 2:
        with pytest.raises(RuntimeError, match=tma):
            buffer.dispatch(odd, routing_map=odd_map)
        with pytest.raises(RuntimeError, match=tma):
            buffer.dispatch_with_permute(hidden=odd, routing_map=odd_map)
        os.environ[CHUNK_VARS[0]] = "16"  # read at call time: 71 % 16 = 7 fails, 70 % 16 = 6 (48 B) passes
        try:
            with pytest.raises(RuntimeError, match=r"remainder_chunk\(7\)"):
                long, _, long_map, _ = _inputs(rank, 71, num_experts)
                buffer.dispatch(long, routing_map=long_map)
            even, _, even_map, _ = _inputs(rank, 70, num_experts)
            assert buffer.dispatch(even, routing_map=even_map)[3][6].num_of_tokens_per_chunk_dispatch_api == 16
        finally:
            del os.environ[CHUNK_VARS[0]]
    with pytest.raises(AssertionError, match="number of experts should be provided"):
        buffer.dispatch(hidden)
    with pytest.raises(RuntimeError, match="2-byte"):
        buffer.dispatch(hidden.float(), routing_map=routing_map)
    with pytest.raises(RuntimeError, match="routing_map has"):
        buffer.dispatch(hidden, routing_map=routing_map[:, :-1])
    bad_idx = topk_idx.clone()
    bad_idx[0, 0] = -1
    with pytest.raises(RuntimeError):  # the scatter of indices_to_map refuses -1
        buffer.dispatch(hidden, topk_idx=bad_idx, topk_weights=torch.ones(8, TOPK), num_of_experts=num_experts)

    rows, row_probs, _, handle = buffer.dispatch(hidden, routing_map=routing_map, probs=probs)
    with pytest.raises(AssertionError, match="number of experts should be provided"):
        buffer.dispatch(hidden, handle=handle)  # even with a handle
    with pytest.raises(RuntimeError, match="bfloat16 only"):
        buffer.combine(rows.float(), handle=handle)
    with pytest.raises(RuntimeError, match="bfloat16 only"):
        buffer.combine(rows.half(), handle=handle)
    with pytest.raises(AssertionError, match="handle is necessary"):
        buffer.combine(rows)
    # one rank alone breaks the contract: it raises its error, its peers say who failed, nobody hangs
    if rank == 0:
        with pytest.raises(RuntimeError, match="bfloat16 only"):
            buffer.combine(rows.float(), handle=handle)
    else:
        with pytest.raises(RuntimeError, match=r"rank\(s\) \[0\] failed"):
            buffer.combine(rows, handle=handle)
    combined, _ = buffer.combine(rows, handle=handle)  # and the ranks are still in step
    assert combined.shape == hidden.shape

    with pytest.raises(AssertionError, match="num_permuted_tokens is required"):
        buffer.dispatch_with_permute(hidden=hidden, routing_map=routing_map, non_blocking=True)
    with pytest.raises(AssertionError, match="must be a multiple of pad_multiple"):
        buffer.dispatch_with_permute(hidden=hidden, routing_map=routing_map, non_blocking=True, num_permuted_tokens=10, pad_multiple=4)
    permuted, _, _, _, permute_handle = buffer.dispatch_with_permute(hidden=hidden, routing_map=routing_map)
    with pytest.raises(RuntimeError, match="bfloat16 only"):
        buffer.combine_with_unpermute(hidden=permuted.float(), handle=permute_handle)
    with pytest.raises(TypeError):
        buffer.dispatch_with_permute(hidden=hidden, routing_map=routing_map, handle=permute_handle, num_permuted_tokens=None)
    assert buffer.calls[:1] == ["dispatch"] and buffer.calls[-1] == "dispatch_with_permute"
    buffer.empty_jit_cache()
    assert buffer.update_template_config(hidden_dim=64, num_of_tokens_per_rank=600).max_num_of_tokens_per_rank == 608
    assert buffer.config["max_num_of_tokens_per_rank"] == 608
    with pytest.raises(AssertionError, match="The config is not valid"):
        buffer.update_template_config(hidden_dim=40)
