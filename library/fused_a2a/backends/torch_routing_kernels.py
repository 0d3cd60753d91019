"""Triton kernels for the torch backend's routing plan (:mod:`fused_a2a.backends.torch_routing`).

Three kernels write exactly what the plan's torch operations write, in three launches instead of
some thirty: ``_count`` (per block of tokens: the tokens it sends to each rank, its smallest and
largest id, and its histogram of (token, expert) pairs per expert, added atomically), ``_send`` (each token's row
in the send order, the routing rows of the segments and, in block 0, the counts of every segment) and
``_receive`` (after the exchange: the received routing rows packed by source rank, the received
counts). Used only for CUDA tensors when Triton imports; the torch operations run everywhere else.
"""

from __future__ import annotations

import warnings

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU builds of torch ship without Triton
    triton = None


_failure: list[str] = []  # why the kernels stopped being used in this process (empty: they are used)


def usable(topk_idx: torch.Tensor) -> bool:
    """Whether the kernels run for ``topk_idx`` (CUDA, Triton importable, at least one token, and no
    kernel has failed in this process)."""
    return triton is not None and not _failure and topk_idx.is_cuda and topk_idx.size(0) > 0


def give_up(error: Exception) -> None:
    """Stop using the kernels in this process (the torch operations write the same values), with one
    warning naming ``error`` (e.g. a Triton that cannot compile on this machine)."""
    if not _failure:
        _failure.append(str(error).splitlines()[0] if str(error) else type(error).__name__)
        warnings.warn(f"fused_a2a: the torch backend's Triton routing kernels failed ({_failure[0]}); "
                      "using torch operations instead", RuntimeWarning, stacklevel=3)


def _pow2(value: int, least: int = 2) -> int:
    return max(least, 1 << max(value - 1, 0).bit_length())


if triton is not None:
    _BIG = tl.constexpr(1 << 62)  # above any expert id

    @triton.jit
    def _block(idx_ptr, blk, n, k, num_experts, num_local, B: tl.constexpr, KP: tl.constexpr, WP: tl.constexpr):
        """Block ``blk``'s tokens ``t`` [B], top-k slots ``kk`` [KP], ranks ``dd`` [WP], the mask of real
        (token, slot) pairs, their ids, which are valid experts, and which ranks each token goes to [B, WP]."""
        t = blk * B + tl.arange(0, B)
        kk = tl.arange(0, KP)
        dd = tl.arange(0, WP)
        m2 = (t < n)[:, None] & (kk < k)[None, :]
        ids = tl.load(idx_ptr + t[:, None] * k + kk[None, :], mask=m2, other=-1)
        valid = m2 & (ids >= 0) & (ids < num_experts)
        dest = tl.where(valid, ids // num_local, -1)
        in_dest = tl.max((dest[:, :, None] == dd[None, None, :]).to(tl.int32), axis=1)
        return t, kk, dd, m2, ids, valid, in_dest

    @triton.jit
    def _count(idx_ptr, inputs_ptr, n, k, num_experts, num_local, world, block_counts_ptr, block_bounds_ptr, hist_ptr,
               B: tl.constexpr, KP: tl.constexpr, WP: tl.constexpr, EP: tl.constexpr, INDIRECT: tl.constexpr):
        if INDIRECT:  # the address of top-k comes from the host at each launch (a graph's replay)
            idx_ptr = tl.load(inputs_ptr).to(tl.pointer_type(tl.int64))
        blk = tl.program_id(0)
        t, kk, dd, m2, ids, valid, in_dest = _block(idx_ptr, blk, n, k, num_experts, num_local, B, KP, WP)
        tl.store(block_counts_ptr + blk * world + dd, tl.sum(in_dest, axis=0), mask=dd < world)
        # the block's histogram first (bin num_experts collects the pairs of no expert), then one add per expert
        bins = tl.histogram(tl.reshape(tl.where(valid, ids, num_experts).to(tl.int32), [B * KP]), EP)
        ee = tl.arange(0, EP)
        tl.atomic_add(hist_ptr + ee, bins, mask=(ee < num_experts) & (bins > 0))
        tl.store(block_bounds_ptr + blk * 2, tl.min(tl.where(m2, ids, _BIG)))
        tl.store(block_bounds_ptr + blk * 2 + 1, tl.max(tl.where(m2, ids, -_BIG)))

    @triton.jit
    def _store_counts(base, stride, dd, ee, dmask, hmask, totals, hist, low, high, n, num_local, WP: tl.constexpr):
        zero = tl.zeros([WP], dtype=tl.int64)
        tl.store(base + dd * stride, totals, mask=dmask)
        tl.store(base + dd[:, None] * stride + 1 + ee[None, :], hist, mask=hmask)
        tl.store(base + dd * stride + num_local + 1, zero + low, mask=dmask)
        tl.store(base + dd * stride + num_local + 2, zero + high, mask=dmask)
        tl.store(base + dd * stride + num_local + 3, zero + n, mask=dmask)

    @triton.jit
    def _send(idx_ptr, w_ptr, inputs_ptr, n, k, num_experts, num_local, world, capacity, num_blocks,
              block_counts_ptr, block_bounds_ptr, hist_ptr, token_ptr, token_offset, words_ptr, floats_ptr, staging_ptr,
              segment_words, meta_len, weights_float_offset,
              B: tl.constexpr, KP: tl.constexpr, WP: tl.constexpr, LP: tl.constexpr, CH: tl.constexpr,
              INDIRECT: tl.constexpr):
        if INDIRECT:  # top-k, weights and the output buffer at the addresses the host wrote for this launch
            idx_ptr = tl.load(inputs_ptr).to(tl.pointer_type(tl.int64))
            w_ptr = tl.load(inputs_ptr + 1).to(tl.pointer_type(tl.float32))
            token_ptr = (tl.load(inputs_ptr + 2) + token_offset).to(tl.pointer_type(tl.int64))
        blk = tl.program_id(0)
        dd = tl.arange(0, WP)
        dmask = dd < world
        totals = tl.zeros([WP], dtype=tl.int64)
        before = tl.zeros([WP], dtype=tl.int64)
        for start in range(0, num_blocks, CH):
            rows = start + tl.arange(0, CH)
            counts = tl.load(block_counts_ptr + rows[:, None] * world + dd[None, :],
                             mask=(rows < num_blocks)[:, None] & dmask[None, :], other=0).to(tl.int64)
            totals += tl.sum(counts, axis=0)
            before += tl.sum(tl.where((rows < blk)[:, None], counts, 0), axis=0)
        first = tl.cumsum(totals, axis=0) - totals

        t, kk, dd, m2, ids, valid, in_dest = _block(idx_ptr, blk, n, k, num_experts, num_local, B, KP, WP)
        weights = tl.load(w_ptr + t[:, None] * k + kk[None, :], mask=m2, other=0.0)
        slot = before[None, :] + tl.cumsum(in_dest, axis=0).to(tl.int64) - 1
        sent = (in_dest > 0) & dmask[None, :]
        tl.store(token_ptr + first[None, :] + slot, t[:, None].to(tl.int64) + tl.zeros([B, WP], dtype=tl.int64), mask=sent)

        local = ids[:, None, :] - (dd * num_local)[None, :, None]
        mine = valid[:, None, :] & (local >= 0) & (local < num_local)
        carried = (sent & (slot < capacity))[:, :, None] & (kk < k)[None, None, :]
        row = dd[None, :, None] * segment_words + slot[:, :, None] * k + kk[None, None, :]
        tl.store(words_ptr + meta_len + row, tl.where(mine, local, -1), mask=carried)
        frow = dd[None, :, None] * (2 * segment_words) + slot[:, :, None] * k + kk[None, None, :]
        tl.store(floats_ptr + weights_float_offset + frow, tl.where(mine, weights[:, None, :], 0.0), mask=carried)

        if blk == 0:
            low = tl.full([CH], _BIG, dtype=tl.int64)
            high = tl.full([CH], -_BIG, dtype=tl.int64)
            for start in range(0, num_blocks, CH):
                rows = start + tl.arange(0, CH)
                low = tl.minimum(low, tl.load(block_bounds_ptr + rows * 2, mask=rows < num_blocks, other=_BIG))
                high = tl.maximum(high, tl.load(block_bounds_ptr + rows * 2 + 1, mask=rows < num_blocks, other=-_BIG))
            ee = tl.arange(0, LP)
            hmask = dmask[:, None] & (ee < num_local)[None, :]
            hist = tl.load(hist_ptr + dd[:, None] * num_local + ee[None, :], mask=hmask, other=0).to(tl.int64)
            low, high = tl.min(low), tl.max(high)
            _store_counts(words_ptr, segment_words, dd, ee, dmask, hmask, totals, hist, low, high, n, num_local, WP)
            _store_counts(staging_ptr, meta_len, dd, ee, dmask, hmask, totals, hist, low, high, n, num_local, WP)

    @triton.jit
    def _receive(words_ptr, floats_ptr, ids_ptr, weights_ptr, inputs_ptr, ids_offset, weights_offset, staging_ptr,
                 world, k, capacity, segment_words, meta_len, weights_float_offset,
                 BR: tl.constexpr, KP: tl.constexpr, WP: tl.constexpr, MP: tl.constexpr, INDIRECT: tl.constexpr):
        if INDIRECT:
            out = tl.load(inputs_ptr + 2)
            ids_ptr = (out + ids_offset).to(tl.pointer_type(tl.int64))
            weights_ptr = (out + weights_offset).to(tl.pointer_type(tl.float32))
        src = tl.program_id(0)
        chunk = tl.program_id(1)
        dd = tl.arange(0, WP)
        counts = tl.load(words_ptr + dd * segment_words, mask=dd < world, other=0)
        first = tl.cumsum(counts, axis=0) - counts
        mine_first = tl.sum(tl.where(dd == src, first, 0))
        mine_count = tl.sum(tl.where(dd == src, counts, 0))
        j = chunk * BR + tl.arange(0, BR)
        kk = tl.arange(0, KP)
        slot = mine_first + j
        m2 = ((j < mine_count) & (j < capacity) & (slot < world * capacity))[:, None] & (kk < k)[None, :]
        ids = tl.load(words_ptr + src * segment_words + meta_len + j[:, None] * k + kk[None, :], mask=m2)
        tl.store(ids_ptr + slot[:, None] * k + kk[None, :], ids, mask=m2)
        weights = tl.load(floats_ptr + src * 2 * segment_words + weights_float_offset + j[:, None] * k + kk[None, :], mask=m2)
        tl.store(weights_ptr + slot[:, None] * k + kk[None, :], weights, mask=m2)
        if chunk == 0:
            mm = tl.arange(0, MP)
            meta = tl.load(words_ptr + src * segment_words + mm, mask=mm < meta_len)
            tl.store(staging_ptr + src * meta_len + mm, meta, mask=mm < meta_len)


def plan_send(topk_idx: torch.Tensor, topk_weights: torch.Tensor, shape, views,
              inputs: torch.Tensor | None = None) -> torch.Tensor:
    """The send side of :func:`~fused_a2a.backends.torch_routing.plan_routing` (same outputs as its
    torch operations): fills ``views.token`` and ``views.staging[1]``, returns the ``[W,
    segment_bytes]`` uint8 segments.

    ``inputs``: ``None``, or a pinned ``[3]`` int64 host tensor from which the kernels read, when they
    run, the addresses of a contiguous int64 top-k, of float32 weights shaped like ``topk_idx``, and
    of an output buffer laid out as :attr:`PlanShape.regions` whose token region they fill instead of
    ``views.token`` (only shapes are read from ``topk_idx``/``topk_weights`` then): a captured graph
    replays on new tensors without copying them in or out.
    """
    n, k, world = shape.num_tokens, shape.topk, shape.world
    kp, wp = _pow2(k), _pow2(world)
    block = max(16, min(256, 4096 // (kp * wp)))
    num_blocks = triton.cdiv(n, block)
    device = topk_idx.device
    topk_idx, topk_weights = topk_idx.contiguous(), topk_weights.float().contiguous()
    indirect = inputs is not None
    inputs = inputs if indirect else topk_idx  # not read without INDIRECT
    block_counts = torch.empty(num_blocks, world, dtype=torch.int32, device=device)
    block_bounds = torch.empty(num_blocks, 2, dtype=torch.int64, device=device)
    hist = torch.zeros(shape.num_experts, dtype=torch.int32, device=device)
    _count[(num_blocks,)](topk_idx, inputs, n, k, shape.num_experts, shape.num_local, world, block_counts, block_bounds,
                          hist, B=block, KP=kp, WP=wp, EP=_pow2(shape.num_experts + 1), INDIRECT=indirect)
    send = torch.empty(world, shape.segment_bytes, dtype=torch.uint8, device=device)
    _send[(num_blocks,)](topk_idx, topk_weights, inputs, n, k, shape.num_experts, shape.num_local, world, shape.capacity,
                         num_blocks, block_counts, block_bounds, hist, views.token, shape.regions["token"][0],
                         send.view(torch.int64), send.view(torch.float32), views.staging[1], shape.segment_bytes // 8,
                         shape.meta_len, shape.weights_offset // 4, B=block, KP=kp, WP=wp, LP=_pow2(shape.num_local),
                         CH=64, INDIRECT=indirect)
    return send


def plan_receive(received: torch.Tensor, shape, views, inputs: torch.Tensor | None = None) -> None:
    """The receive side of :func:`~fused_a2a.backends.torch_routing.plan_routing` (same outputs as its
    torch operations): fills ``views.ids``, ``views.weights`` (or, with ``inputs`` as for
    :func:`plan_send`, the ids and weights regions of the buffer at ``inputs[2]``) and ``views.staging[0]``."""
    rows = 64
    grid = (shape.world, max(1, triton.cdiv(shape.capacity, rows)))
    indirect = inputs is not None
    _receive[grid](received.view(torch.int64), received.view(torch.float32), views.ids, views.weights,
                   inputs if indirect else received, shape.regions["ids"][0], shape.regions["weights"][0],
                   views.staging[0], shape.world, shape.topk, shape.capacity, shape.segment_bytes // 8,
                   shape.meta_len, shape.weights_offset // 4, BR=rows, KP=_pow2(shape.topk), WP=_pow2(shape.world),
                   MP=_pow2(shape.meta_len), INDIRECT=indirect)
