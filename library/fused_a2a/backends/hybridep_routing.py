"""HybridEP's routing for the backend-neutral path (:mod:`fused_a2a.backends.hybridep`): top-k ids and
weights to HybridEP's dense map and back.

HybridEP moves a dense ``[N, columns]`` bool routing map with float32 probabilities. The backend gives
each rank ``padded`` expert columns (:class:`ExpertColumns`): its ``local`` real experts, then
*phantom* experts that no valid id names. A token holding an id outside ``[-1, E)`` is routed, besides
its valid ids, to the first phantom expert of every rank; every rank then counts received rows for a
phantom expert, reads that count at the host synchronisation HybridEP's dispatch makes anyway, and
raises the same ``ValueError``. So a bad id on one rank is an error on every rank, without a collective
or a host round trip of ours. ``padded`` is the smallest multiple of ``16 / gcd(W, 16)`` above
``local``: ``W * padded`` is a multiple of 16 (HybridEP's custom allgather moves 16-byte multiples per
rank, whatever the token count) and ``padded * W`` a multiple of 4 (its preprocessing's rule).

Three conversions, each one Triton kernel for CUDA tensors where Triton runs, torch operations
elsewhere (the same values; the GPU tests compare them):

* :func:`dense_routing` (sender, before HybridEP's preprocessing): ids and weights to map and probabilities;
* :func:`start_count` / :func:`count_rows` (receiver): received rows per expert column, counted on the
  device before the synchronisation, with the row count read from HybridEP's pinned counter;
* :func:`ascending_topk` (receiver, after dispatch): each received row's local experts in ascending
  order, then ``-1``, and their weights.

The seed API (:func:`fused_a2a.hybrid_ep_dispatch`) takes a dense map of the real experts alone:
:func:`topk_to_routing_map` makes it from top-k (torch operations).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any
from functools import cached_property

import torch

from fused_a2a.checks import check_topk_range

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU builds of torch ship without Triton
    triton = None


@dataclass(frozen=True)
class ExpertColumns:
    """Where each expert sits in HybridEP's routing map.

    Attributes:
        num_experts: real experts of the group ``E``.
        world: ranks of the group ``W`` (the map's columns are ``W * padded``, rank-major).
    """

    num_experts: int
    world: int

    @cached_property
    def local(self) -> int:
        """Real experts per rank ``L``."""
        return self.num_experts // self.world

    @cached_property
    def padded(self) -> int:
        """Columns per rank: the real experts, then at least one phantom."""
        step = 16 // math.gcd(self.world, 16)
        return (self.local // step + 1) * step

    @cached_property
    def columns(self) -> int:
        """Columns of the routing map."""
        return self.world * self.padded

    def column_of(self, topk_idx: torch.Tensor) -> torch.Tensor:
        """The map column of each valid global id (garbage where the id is not valid)."""
        return (topk_idx // self.local) * self.padded + topk_idx % self.local


_failure: list[str] = []  # why the kernels stopped being used in this process (empty: they are used)


def _usable(tensor: torch.Tensor) -> bool:
    return triton is not None and not _failure and tensor.is_cuda


def _give_up(error: Exception) -> None:
    """Use the torch operations from now on (they compute the same values), with one warning."""
    if not _failure:
        _failure.append(str(error).splitlines()[0] if str(error) else type(error).__name__)
        warnings.warn(f"fused_a2a: HybridEP's Triton routing kernels failed ({_failure[0]}); using torch "
                      "operations instead", RuntimeWarning, stacklevel=3)


def _pow2(value: int) -> int:
    return max(2, 1 << max(value - 1, 0).bit_length())


# --------------------------------------------------------------------------------------------- torch ops


def dense_routing_torch(topk_idx: torch.Tensor, topk_weights: torch.Tensor | None, columns: ExpertColumns):
    """:func:`dense_routing` with torch operations."""
    num_experts, num_columns = columns.num_experts, columns.columns
    valid = (topk_idx >= 0) & (topk_idx < num_experts)
    bad = ((topk_idx < -1) | (topk_idx >= num_experts)).any(dim=1, keepdim=True)
    where = torch.where(valid, columns.column_of(topk_idx), num_columns)
    routing_map, probs = _scatter_columns(where, num_columns, topk_weights)
    phantoms = torch.arange(columns.world, device=topk_idx.device) * columns.padded + columns.local
    routing_map[:, phantoms] |= bad
    return routing_map, probs


def _scatter_columns(where: torch.Tensor, num_columns: int, topk_weights: torch.Tensor | None):
    """``(map [N, num_columns] bool, probs [N, num_columns] float32 or None)`` marking column ``where[n, k]``
    of each row (``num_columns``: no column) with its weight, weights of one column summed."""
    rows, device = where.size(0), where.device
    routing_map = torch.zeros(rows, num_columns + 1, dtype=torch.bool, device=device)  # + a spare column, dropped
    routing_map.scatter_(1, where, True)
    probs = None
    if topk_weights is not None:
        probs = torch.zeros(rows, num_columns + 1, dtype=torch.float32, device=device)
        probs.scatter_add_(1, where, topk_weights.float())
        probs = probs[:, :num_columns].contiguous()
    return routing_map[:, :num_columns].contiguous(), probs

def ascending_topk_torch(local_map: torch.Tensor, local_probs: torch.Tensor, topk: int):
    """:func:`ascending_topk` with torch operations, on the ``[R, L]`` real columns of the map and
    the matching ``[R, L]`` probabilities."""
    rows, local = local_map.shape
    order = torch.argsort((~local_map).to(torch.int8), dim=1, stable=True)[:, :topk]
    valid = local_map.gather(1, order)
    ids = torch.where(valid, order, -1)
    weights = torch.where(valid, local_probs.gather(1, order), 0.0)
    if local < topk:
        ids = torch.cat([ids, ids.new_full((rows, topk - local), -1)], dim=1)
        weights = torch.cat([weights, weights.new_zeros(rows, topk - local)], dim=1)
    return ids, weights


# --------------------------------------------------------------------------------------------- kernels

if triton is not None:

    @triton.jit
    def _dense(idx_ptr, w_ptr, map_ptr, probs_ptr, n, k, num_experts, local, padded, num_columns, world,
               HAS_W: tl.constexpr, B: tl.constexpr, KP: tl.constexpr, CP: tl.constexpr, WP: tl.constexpr):
        t = tl.program_id(0) * B + tl.arange(0, B)
        rows = t < n
        # the block's rows cleared, then each (token, slot) written where it goes
        cc = tl.arange(0, CP)
        cleared = t[:, None] * num_columns + cc[None, :]
        cmask = rows[:, None] & (cc < num_columns)[None, :]
        tl.store(map_ptr + cleared, tl.zeros([B, CP], dtype=tl.uint8), mask=cmask)
        if HAS_W:
            tl.store(probs_ptr + cleared, tl.zeros([B, CP], dtype=tl.float32), mask=cmask)
        tl.debug_barrier()
        kk = tl.arange(0, KP)
        m2 = rows[:, None] & (kk < k)[None, :]
        ids = tl.load(idx_ptr + t[:, None] * k + kk[None, :], mask=m2, other=-1)
        valid = m2 & (ids >= 0) & (ids < num_experts)
        safe = tl.where(valid, ids, 0)
        where = t[:, None] * num_columns + (safe // local) * padded + safe % local
        tl.store(map_ptr + where, tl.full([B, KP], 1, dtype=tl.uint8), mask=valid)
        if HAS_W:
            w = tl.load(w_ptr + t[:, None] * k + kk[None, :], mask=m2, other=0.0)
            tl.atomic_add(probs_ptr + where, w, mask=valid)  # an expert named twice gets the sum
        bad = tl.max((m2 & ((ids < -1) | (ids >= num_experts))).to(tl.int32), axis=1)
        rr = tl.arange(0, WP)
        phantoms = t[:, None] * num_columns + rr[None, :] * padded + local
        tl.store(map_ptr + phantoms, tl.full([B, WP], 1, dtype=tl.uint8), mask=(bad != 0)[:, None] & (rr < world)[None, :])

    @triton.jit
    def _count(map_ptr, rows_ptr, partial_ptr, ticket_ptr, out_ptr, padded, BR: tl.constexpr, LP: tl.constexpr):
        rows = tl.load(rows_ptr).to(tl.int32)
        grid = tl.num_programs(0)
        cc = tl.arange(0, LP)
        acc = tl.zeros([LP], dtype=tl.int32)
        for start in range(tl.program_id(0) * BR, rows, grid * BR):
            r = start + tl.arange(0, BR)
            m = (r < rows)[:, None] & (cc < padded)[None, :]
            acc += tl.sum(tl.load(map_ptr + r[:, None] * padded + cc[None, :], mask=m, other=0).to(tl.int32), axis=0)
        tl.atomic_add(partial_ptr + cc, acc, mask=cc < padded)
        # the last program to finish writes the totals and leaves the scratch zeroed for the next launch
        if tl.atomic_add(ticket_ptr, 1) == grid - 1:
            total = tl.atomic_xchg(partial_ptr + cc, tl.zeros([LP], dtype=tl.int32), mask=cc < padded)
            tl.store(out_ptr + cc, total.to(tl.int64), mask=cc < padded)
            tl.atomic_xchg(ticket_ptr, 0)

    @triton.jit
    def _ascending(map_ptr, probs_ptr, ids_ptr, w_ptr, rows, local, padded, probs_stride, first, k,
                   BR: tl.constexpr, LP: tl.constexpr, KP: tl.constexpr):
        r = tl.program_id(0) * BR + tl.arange(0, BR)
        cc = tl.arange(0, LP)
        m = (r < rows)[:, None] & (cc < local)[None, :]
        v = tl.load(map_ptr + r[:, None] * padded + cc[None, :], mask=m, other=0).to(tl.int32)
        # a set column's slot is the number of set columns up to it; slots past k are dropped
        slot = tl.cumsum(v, axis=1) - 1
        put = m & (v != 0) & (slot < k)
        weight = tl.load(probs_ptr + r.to(tl.int64)[:, None] * probs_stride + first + cc[None, :], mask=put, other=0.0)
        tl.store(ids_ptr + r[:, None] * k + slot, tl.broadcast_to(cc[None, :], (BR, LP)).to(tl.int64), mask=put)
        tl.store(w_ptr + r[:, None] * k + slot, weight, mask=put)
        kk = tl.arange(0, KP)
        unused = (r < rows)[:, None] & (kk < k)[None, :] & (kk[None, :] >= tl.sum(v, axis=1)[:, None])
        tl.store(ids_ptr + r[:, None] * k + kk[None, :], tl.full([BR, KP], -1, dtype=tl.int64), mask=unused)
        tl.store(w_ptr + r[:, None] * k + kk[None, :], tl.zeros([BR, KP], dtype=tl.float32), mask=unused)


def _trait(arg: Any) -> tuple:
    """What Triton specializes a kernel argument on (NVIDIA): a tensor's dtype, device and 16-byte
    alignment; an int's being 1, its divisibility by 16 and whether it fits in 32 bits."""
    if isinstance(arg, torch.Tensor):
        return arg.dtype, arg.device, arg.data_ptr() % 16 == 0
    if isinstance(arg, bool) or not isinstance(arg, int):
        return type(arg), arg
    return int, arg == 1, arg % 16 == 0, -(2**31) <= arg < 2**31


class _Launch:
    """``kernel[(grid,)](*args, **meta)`` for a ``triton.jit`` kernel, through the compiled kernel's own
    launcher once a call of the same specialization (:func:`_trait` of each argument, and ``meta``) has
    compiled it: Triton's ``JITFunction.run`` spends some 25 µs of Python per launch on a slow host,
    the compiled launcher a few. A launcher that fails is given up for good (the normal launch runs)."""

    def __init__(self, kernel) -> None:
        self.kernel = kernel
        self.compiled: dict[tuple, Any] = {}
        self.working = True

    def __call__(self, grid: int, *args, **meta) -> None:
        key = (tuple(_trait(arg) for arg in args), tuple(meta.items()))
        compiled = self.compiled.get(key) if self.working else None
        if compiled is None:
            handle = self.kernel[(grid,)](*args, **meta)
            if self.working:
                self.compiled[key] = handle
            return
        constexprs = [meta[name] for name in self.kernel.arg_names[len(args):]]
        try:
            run = compiled.run
            run(grid, 1, 1, torch.cuda.current_stream().cuda_stream, compiled.function, compiled.packed_metadata, None,
                None, None, *args, *constexprs)
        except Exception:  # noqa: BLE001 - another Triton's launcher: its normal launch still works
            self.working = False
            self.kernel[(grid,)](*args, **meta)


if triton is not None:
    _dense_launch, _count_launch, _ascending_launch = _Launch(_dense), _Launch(_count), _Launch(_ascending)


# --------------------------------------------------------------------------------------------- entry points


def dense_routing(topk_idx: torch.Tensor, topk_weights: torch.Tensor | None, columns: ExpertColumns):
    """Top-k routing as HybridEP's dense map and probabilities, with the phantom signal.

    Args:
        topk_idx: ``[N, K]`` int64 global expert ids, contiguous; ``-1`` for "no expert"; any other id
            outside ``[0, E)`` marks the token as bad (routed to every rank's first phantom expert).
        topk_weights: ``[N, K]`` float32, contiguous, or ``None``.
        columns: the map's layout.

    Returns:
        ``(routing_map [N, columns] bool, probs [N, columns] float32 or None)`` on ``topk_idx``'s
        device; an expert named twice for one token gets the sum of its weights; phantom columns
        have probability 0.
    """
    n, k = topk_idx.shape
    if n == 0 or not _usable(topk_idx):
        return dense_routing_torch(topk_idx, topk_weights, columns)
    routing_map = torch.empty(n, columns.columns, dtype=torch.bool, device=topk_idx.device)
    probs = None if topk_weights is None else torch.empty(n, columns.columns, dtype=torch.float32,
                                                          device=topk_idx.device)
    cp = _pow2(columns.columns)
    block = max(1, min(64, 8192 // cp))
    try:
        _dense_launch(
            triton.cdiv(n, block), topk_idx, topk_weights if probs is not None else topk_idx, routing_map.view(torch.uint8),
            probs if probs is not None else routing_map, n, k, columns.num_experts, columns.local,
            columns.padded, columns.columns, columns.world, HAS_W=probs is not None, B=block, KP=_pow2(k), CP=cp,
            WP=_pow2(columns.world))
    except Exception as error:  # noqa: BLE001 - e.g. a Triton that cannot compile here
        _give_up(error)
        return dense_routing_torch(topk_idx, topk_weights, columns)
    return routing_map, probs


def start_count(local_map: torch.Tensor, num_rows: torch.Tensor) -> torch.Tensor | None:
    """Launch the count of received rows per expert column: ``[padded]`` int64 in pinned host memory,
    readable after the next synchronisation of the current stream; ``None`` where the kernel does not
    run (then :func:`count_rows` counts after the synchronisation).

    Args:
        local_map: ``[capacity, padded]`` bool, HybridEP's ``local_expert_routing_map`` (rows past the
            received count are not read).
        num_rows: HybridEP's ``[1]`` int32 received-row count in pinned host memory.
    """
    if not _usable(local_map):
        return None
    padded = local_map.size(1)
    out = torch.empty(padded, dtype=torch.int64, pin_memory=True)
    try:
        lp = _pow2(padded)
        block = max(16, 4096 // lp)
        partial, ticket, programs = _count_scratch(local_map.device, lp)
        grid = max(1, min(programs, triton.cdiv(local_map.size(0), block)))
        _count_launch(grid, local_map.view(torch.uint8), num_rows, partial, ticket, out, padded, BR=block, LP=lp)
    except Exception as error:  # noqa: BLE001
        _give_up(error)
        return None
    return out


_scratch: dict[tuple, tuple[torch.Tensor, torch.Tensor, int]] = {}


def _count_scratch(device: torch.device, lp: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The zeroed ``[lp]`` int32 partial sums and ``[1]`` int32 ticket :func:`start_count`'s kernel uses on
    the current stream of ``device`` (its last program zeroes them again), and the device's SM count."""
    stream = torch.cuda.current_stream(device)
    key = (device, stream.cuda_stream, lp)
    found = _scratch.get(key)
    if found is None:
        found = (torch.zeros(lp, dtype=torch.int32, device=device), torch.zeros(1, dtype=torch.int32, device=device),
                 torch.cuda.get_device_properties(device).multi_processor_count)
        _scratch[key] = found
    return found


def count_rows(local_map: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Received rows per expert column, ``[padded]`` int64 on ``local_map``'s device (torch operations)."""
    return local_map[:num_rows].sum(dim=0, dtype=torch.int64)


def ascending_topk(local_map: torch.Tensor, recv_probs: torch.Tensor | None, num_rows: int, columns: ExpertColumns,
                   first: int, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each received row's local experts in ascending order, then ``-1``, and their weights.

    Args:
        local_map: ``[capacity, padded]`` bool, HybridEP's ``local_expert_routing_map``.
        recv_probs: ``[R, ranks_per_node * padded]`` float32 received probabilities, contiguous, or
            ``None`` (weights are then 0).
        num_rows: ``R``, the received rows.
        columns: the map's layout.
        first: the column of this rank's first expert in ``recv_probs``.
        topk: ``K``, slots per row (a row naming more than K local experts keeps the first K).

    Returns:
        ``(ids [R, K] int64 local expert ids or -1, weights [R, K] float32, 0 where -1)``.
    """
    local, padded = columns.local, columns.padded
    if recv_probs is None:
        recv_probs = torch.zeros(num_rows, first + padded, dtype=torch.float32, device=local_map.device)
    if num_rows == 0 or not _usable(local_map):
        return ascending_topk_torch(local_map[:num_rows, :local], recv_probs[:num_rows, first:first + local], topk)
    ids = torch.empty(num_rows, topk, dtype=torch.int64, device=local_map.device)
    weights = torch.empty(num_rows, topk, dtype=torch.float32, device=local_map.device)
    lp = _pow2(padded)
    block = max(1, min(64, 2048 // lp))
    try:
        _ascending_launch(
            triton.cdiv(num_rows, block), local_map.view(torch.uint8), recv_probs, ids, weights, num_rows, local, padded, recv_probs.stride(0), first,
            topk, BR=block, LP=lp, KP=_pow2(topk))
    except Exception as error:  # noqa: BLE001
        _give_up(error)
        return ascending_topk_torch(local_map[:num_rows, :local], recv_probs[:num_rows, first:first + local], topk)
    return ids, weights


def dense_routing_map(topk_idx: torch.Tensor, topk_weights: torch.Tensor | None, num_experts: int):
    """Top-k routing as HybridEP's dense map and probabilities (the seed API's map: one column per expert).

    Args:
        topk_idx: ``[N, K]`` int64 global expert ids, ``-1`` for "no expert" (ignored).
        topk_weights: ``[N, K]`` routing weights, any floating dtype, or ``None``.
        num_experts: total number of experts ``E``.

    Returns:
        ``(routing_map [N, E] bool, probs [N, E] float32 or None)`` on ``topk_idx``'s device; an
        expert named twice for one token gets the sum of its weights.
    """
    return _scatter_columns(torch.where(topk_idx >= 0, topk_idx, num_experts), num_experts, topk_weights)


def topk_to_routing_map(
    topk_idx: torch.Tensor, topk_weights: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn top-k routing into HybridEP's dense routing map and probabilities (for the seed API's
    :func:`fused_a2a.hybrid_ep_dispatch`, which takes a map).

    Args:
        topk_idx: ``[N, K]`` int64 global expert ids, ``-1`` for "no expert" (ignored).
        topk_weights: ``[N, K]`` routing weights, any floating dtype (differentiable).
        num_experts: total number of experts ``E``.

    Returns:
        routing_map: ``[N, E]`` bool, ``True`` where a token goes to an expert.
        probs: ``[N, E]`` float32, the weight of each (token, expert), ``0`` where not routed; an
            expert named twice for one token gets the sum of its weights. On ``topk_idx``'s device.

    Raises:
        ValueError: ``topk_idx`` not 2-D int64, ``topk_weights`` of another shape or not floating
            point, ``num_experts`` not positive, or an id outside ``[-1, num_experts)``.
    """
    if topk_idx.dim() != 2 or topk_idx.dtype != torch.int64:
        raise ValueError(f"topk_idx must be a 2-D int64 tensor [num_tokens, topk], got {topk_idx.dtype} {tuple(topk_idx.shape)}")
    if topk_weights.shape != topk_idx.shape or not topk_weights.is_floating_point():
        raise ValueError(
            f"topk_weights must be a floating-point tensor of topk_idx's shape {tuple(topk_idx.shape)}, "
            f"got {topk_weights.dtype} {tuple(topk_weights.shape)}"
        )
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts <= 0:
        raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
    check_topk_range(topk_idx, num_experts)
    return dense_routing_map(topk_idx, topk_weights, num_experts)
