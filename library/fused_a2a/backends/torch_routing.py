"""The routing half of a torch-backend dispatch: everything that depends on ``topk_idx`` alone.

:func:`plan_routing` computes, in fixed shapes, the order of the rows each rank sends (by destination,
then token) and sends every destination one segment: the counts (rows, pairs per local expert, the
smallest and largest id, the sender's token count) followed by the local expert ids and weights of
its first ``capacity`` rows. One ``all_to_all_single`` moves all segments; the receiver packs the
received ids and weights by source rank and copies the counts to the host. After one synchronisation
the host knows every size, and, when no rank held more tokens than ``capacity``, the received ids and
weights are already in place. ``capacity`` (:class:`Capacity`) follows the most tokens any rank of the
group held in recent dispatches (every rank reads them from the same segments, so all agree on it); a
dispatch in which some rank holds more exchanges the routing once more, after the synchronisation.

Fixed shapes make the plan capturable: on a GPU with an NCCL group, :class:`RoutingGraphs` captures it
in one CUDA graph per shape and replays it, one launch instead of many (the torch backend is otherwise
bound by the host's launch rate). Its computing steps are two Triton kernels and one after the
exchange (:mod:`fused_a2a.backends.torch_routing_kernels`) where Triton runs, else torch operations
that write the same values. Elsewhere (CPU, gloo, while another graph is being captured) it runs
eagerly.
"""

from __future__ import annotations

import ctypes
import operator
from collections import deque
from dataclasses import dataclass
from functools import cached_property, partial
from typing import Callable, NamedTuple

import torch
import torch.distributed as dist

import fused_a2a.backends.torch_routing_kernels as kernels
from fused_a2a.shared_errors import range_error

_ALIGN = 16


def _round_up(value: int, multiple: int = _ALIGN) -> int:
    return (value + multiple - 1) // multiple * multiple


def layout(topk_idx: torch.Tensor, num_experts: int, world: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(is_token_in_rank [N, W] bool, tokens per rank [W] int64, (token, expert) pairs per expert [E]
    int64)``, on the device, no host synchronisation; ids outside ``[-1, E)`` count as "no expert"."""
    num_local = num_experts // world
    valid = (topk_idx >= 0) & (topk_idx < num_experts)
    experts = torch.where(valid, topk_idx, num_experts)
    dest = torch.div(experts, num_local, rounding_mode="floor")  # "no expert" lands in column W, dropped
    in_rank = torch.zeros(topk_idx.size(0), world + 1, dtype=torch.bool, device=topk_idx.device)
    in_rank = in_rank.scatter_(1, dest, True)[:, :world]
    flat = experts.flatten()
    per_expert = torch.zeros(num_experts + 1, dtype=torch.int64, device=topk_idx.device)
    per_expert = per_expert.scatter_add_(0, flat, torch.ones_like(flat))[:num_experts]
    return in_rank, in_rank.sum(dim=0), per_expert


@dataclass(frozen=True)
class PlanShape:
    """The sizes of one routing plan (every buffer's layout follows from them).

    Attributes:
        num_tokens: ``N``, tokens of this rank.
        topk: ``K``.
        num_experts: ``E``, divisible by ``world``.
        world: ``W``, ranks of the group.
        capacity: ``C``, routing rows each segment carries.
    """

    num_tokens: int
    topk: int
    num_experts: int
    world: int
    capacity: int

    @property
    def num_local(self) -> int:
        return self.num_experts // self.world

    @property
    def meta_len(self) -> int:
        """int64 counts per segment: rows, pairs per local expert, smallest id, largest id, tokens."""
        return self.num_local + 4

    @property
    def segment_bytes(self) -> int:
        """Bytes per destination: the counts, then ``C x K`` int64 ids, then ``C x K`` float32 weights."""
        return _round_up(8 * self.meta_len + 12 * self.capacity * self.topk)

    @property
    def ids_offset(self) -> int:
        """Byte offset of the ids in a segment."""
        return 8 * self.meta_len

    @property
    def weights_offset(self) -> int:
        """Byte offset of the weights in a segment."""
        return 8 * self.meta_len + 8 * self.capacity * self.topk

    @property
    def slots(self) -> int:
        """Rows of the packed received ids and weights: ``W x C`` and one that absorbs padding."""
        return self.world * self.capacity + 1

    @cached_property
    def regions(self) -> dict[str, tuple[int, int]]:
        """Byte ``(offset, length)`` of each part of the plan's output buffer: ``token`` (``N W``
        int64), ``ids`` (``slots x K`` int64), ``weights`` (``slots x K`` float32), ``staging``
        (``2 x W x meta_len`` int64: the received counts, then the sent ones)."""
        sizes = {
            "token": 8 * self.num_tokens * self.world,
            "ids": 8 * self.slots * self.topk,
            "weights": 4 * self.slots * self.topk,
            "staging": 8 * 2 * self.world * self.meta_len,
        }
        regions, offset = {}, 0
        for name, size in sizes.items():
            regions[name] = (offset, size)
            offset += _round_up(size)
        return regions

    @property
    def out_bytes(self) -> int:
        offset, size = self.regions["staging"]
        return offset + _round_up(size)

    def sent(self, out: torch.Tensor, rows: int) -> torch.Tensor:
        """``[rows]`` int64 view of a plan's output buffer ``out`` (int64, storage offset 0): the source
        token of each sent row, ordered by destination rank."""
        return out.as_strided((rows,), (1,), self.regions["token"][0] // 8)

    def received(self, out: torch.Tensor, received: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of a plan's output buffer ``out`` (int64, storage offset 0) once the counts are known:
        ``(ids [received, K] int64, weights [received, K] float32)``."""
        k = self.topk
        ids = out.as_strided((received, k), (k, 1), self.regions["ids"][0] // 8)
        weights = out.view(torch.float32).as_strided((received, k), (k, 1), self.regions["weights"][0] // 4)
        return ids, weights


@dataclass(frozen=True)
class PlanViews:
    """Typed views of a plan's output buffer (:attr:`PlanShape.regions`)."""

    token: torch.Tensor
    ids: torch.Tensor
    weights: torch.Tensor
    staging: torch.Tensor

    @classmethod
    def of(cls, out: torch.Tensor, shape: PlanShape) -> "PlanViews":
        raw = out.view(torch.uint8)

        def part(name: str, dtype: torch.dtype) -> torch.Tensor:
            offset, size = shape.regions[name]
            return raw[offset:offset + size].view(dtype)

        return cls(
            token=part("token", torch.int64),
            ids=part("ids", torch.int64).view(shape.slots, shape.topk),
            weights=part("weights", torch.float32).view(shape.slots, shape.topk),
            staging=part("staging", torch.int64).view(2, shape.world, shape.meta_len),
        )


class RoutingPlan(NamedTuple):
    """What :func:`plan_routing` leaves.

    Attributes:
        shape: its sizes.
        out: the output buffer (int64 on the device, :attr:`PlanShape.regions`): the source token
            of each sent row, ordered by destination then token (the first ``S`` are real); the
            received local ids (``-1`` elsewhere) and weights (``0`` elsewhere), by source rank (the
            first ``R`` rows are real when no rank held more than ``capacity`` tokens); the counts.
        host: the counts on the host (``2 W meta_len`` int64), valid after the stream synchronises.
    """

    shape: PlanShape
    out: torch.Tensor
    host: torch.Tensor


def plan_routing(topk_idx: torch.Tensor, topk_weights: torch.Tensor, num_experts: int, group, world: int,
                 capacity: int, host: torch.Tensor, inputs: torch.Tensor | None = None) -> RoutingPlan:
    """Compute a dispatch's routing (see the module doc) and start copying its counts into ``host``.

    Args:
        topk_idx: ``[N, K]`` int64 global expert ids.
        topk_weights: ``[N, K]`` float32.
        num_experts: ``E``, divisible by ``world``.
        group: the process group (collective: one ``all_to_all_single``).
        world: its size ``W``.
        capacity: routing rows per segment (the same on every rank).
        host: ``[2 W (E/W + 4)]`` int64 host tensor (pinned for a CUDA ``topk_idx``).
        inputs: ``None``, or a pinned ``[3]`` int64 host tensor through which the Triton kernels, where
            they run, read the addresses of top-k, weights and the output buffer (``kernels.plan_send``).
    """
    shape = PlanShape(topk_idx.size(0), topk_idx.size(1), num_experts, world, capacity)
    out = torch.empty(shape.out_bytes // 8, dtype=torch.int64, device=topk_idx.device)
    views = PlanViews.of(out, shape)
    send = _with_kernels_or_torch(partial(kernels.plan_send, inputs=inputs), send_with_torch, topk_idx,
                                  topk_idx, topk_weights, shape, views)
    received = torch.empty_like(send)
    dist.all_to_all_single(received, send, group=group)
    _with_kernels_or_torch(partial(kernels.plan_receive, inputs=inputs), receive_with_torch, topk_idx,
                           received, shape, views)
    host.copy_(views.staging.flatten(), non_blocking=True)
    return RoutingPlan(shape, out, host)


def _with_kernels_or_torch(with_kernels, with_torch, topk_idx: torch.Tensor, *args):
    """``with_kernels(*args)`` where the kernels run for ``topk_idx``, else (or once they fail, e.g.
    a Triton that cannot compile here: they fail before launching anything) ``with_torch(*args)``."""
    if kernels.usable(topk_idx):
        try:
            return with_kernels(*args)
        except Exception as error:  # noqa: BLE001 - any failure of the optional kernels falls back
            kernels.give_up(error)
    return with_torch(*args)


def send_with_torch(topk_idx: torch.Tensor, topk_weights: torch.Tensor, shape: PlanShape, views: PlanViews) -> torch.Tensor:
    """Torch operations for the send side: the row order into ``views.token``, the sent counts into
    ``views.staging[1]``; returns the ``[W, segment_bytes]`` uint8 segments."""
    n, k, world, num_local, capacity = shape.num_tokens, shape.topk, shape.world, shape.num_local, shape.capacity
    device = topk_idx.device
    in_rank, per_rank, per_expert = layout(topk_idx, shape.num_experts, world)
    bounds = torch.stack(torch.aminmax(topk_idx)) if topk_idx.numel() else topk_idx.new_full((2,), -1)
    meta = torch.cat([per_rank.view(world, 1), per_expert.view(world, num_local), bounds.view(1, 2).expand(world, 2),
                      per_rank.new_full((world, 1), n)], dim=1)
    views.staging[1].copy_(meta)
    pairs = torch.nonzero_static(in_rank.t(), size=n * world, fill_value=0)
    dest, token = pairs[:, 0], pairs[:, 1]
    views.token.copy_(token)
    row = torch.arange(n * world, device=device)
    first_row = torch.cumsum(per_rank, 0) - per_rank
    slot_in_dest = row - first_row[dest]
    carried = (row < per_rank.sum()) & (slot_in_dest < capacity)
    slot = torch.where(carried, dest * capacity + slot_in_dest, world * capacity)
    row_ids, row_weights = local_routing(topk_idx, topk_weights, token, dest, num_local)
    ids = torch.empty(world * capacity + 1, k, dtype=torch.int64, device=device)
    ids.index_put_((slot,), row_ids)
    weights = torch.empty(world * capacity + 1, k, dtype=torch.float32, device=device)
    weights.index_put_((slot,), row_weights)
    # the segments are written through typed views of one fresh, contiguous buffer whose rows are a
    # multiple of 16 bytes: no view depends on the strides or the row width of the inputs
    segments = torch.zeros(world, shape.segment_bytes, dtype=torch.uint8, device=device)
    words, floats = segments.view(torch.int64), segments.view(torch.float32)
    words[:, :shape.meta_len] = meta
    if capacity:
        ids_at, weights_at = shape.ids_offset // 8, shape.weights_offset // 4
        words[:, ids_at:ids_at + capacity * k] = ids[:-1].reshape(world, capacity * k)
        floats[:, weights_at:weights_at + capacity * k] = weights[:-1].reshape(world, capacity * k)
    return segments


def receive_with_torch(received: torch.Tensor, shape: PlanShape, views: PlanViews) -> None:
    """Torch operations for the receive side: the received ids and weights packed by source rank into
    ``views.ids``/``views.weights``, the received counts into ``views.staging[0]``."""
    world, k, capacity = shape.world, shape.topk, shape.capacity
    words = received.view(torch.int64)  # received: contiguous [W, segment_bytes], rows of 16-byte multiples
    meta = words[:, :shape.meta_len]
    views.staging[0].copy_(meta)
    if not capacity:
        return
    ids_at, weights_at = shape.ids_offset // 8, shape.weights_offset // 4
    ids = words[:, ids_at:ids_at + capacity * k].reshape(world * capacity, k)
    weights = received.view(torch.float32)[:, weights_at:weights_at + capacity * k].reshape(world * capacity, k)
    counts = meta[:, 0]
    first = torch.cumsum(counts, 0) - counts
    row = torch.arange(capacity, device=received.device)
    slot = first.view(world, 1) + row.view(1, capacity)
    real = (row.view(1, capacity) < counts.view(world, 1)) & (slot < world * capacity)
    slot = torch.where(real, slot, world * capacity).flatten()
    views.ids.index_put_((slot,), ids)
    views.weights.index_put_((slot,), weights)


class Counts(NamedTuple):
    """What the count exchange tells a rank (host values).

    Attributes:
        send: rows this rank sends to each rank.
        recv: rows this rank receives from each rank.
        per_local_expert: (token, expert) pairs received for each local expert.
        max_tokens: the most tokens any rank of the group holds in this dispatch.
    """

    send: tuple[int, ...]
    recv: tuple[int, ...]
    per_local_expert: tuple[int, ...]
    max_tokens: int


def read_counts(host: torch.Tensor, world: int, num_experts: int) -> Counts:
    """The :class:`Counts` in a plan's ``host`` buffer (after the synchronisation).

    Raises:
        ValueError: an expert id outside ``[-1, num_experts)`` on any rank, or a rank whose inputs failed
            another check (:data:`~fused_a2a.shared_errors.POISON_ID`): the same on every rank.
    """
    num_local = num_experts // world
    meta_len = num_local + 4
    end = world * meta_len
    values = host.tolist()  # [W, meta_len] received metadata (one row per source rank), then the sent rows
    lows, highs = values[num_local + 1:end:meta_len], values[num_local + 2:end:meta_len]
    if min(lows) < -1 or max(highs) >= num_experts:
        raise range_error(num_experts, lows, highs)
    per_expert = values[1:num_local + 1]
    for start in range(meta_len + 1, end, meta_len):
        per_expert = list(map(operator.add, per_expert, values[start:start + num_local]))
    return Counts(tuple(values[end:2 * end:meta_len]), tuple(values[0:end:meta_len]), tuple(per_expert),
                  max(values[num_local + 3:end:meta_len]))


def routing_rows(topk_idx: torch.Tensor, topk_weights: torch.Tensor, token: torch.Tensor,
                 send: tuple[int, ...], num_local: int) -> torch.Tensor:
    """``[S, 2 K]`` int64: each sent row's ``K`` local expert ids (``-1`` elsewhere), then the bits of its
    ``K`` float32 weights (``0`` elsewhere) as int32 values widened to int64, for rows ``token`` sent
    ``send[r]`` to rank ``r`` (only same-width views: any strides and any ``K`` work)."""
    ids, weights = local_routing(topk_idx, topk_weights, token, row_destinations(send, token), num_local)
    return torch.cat([ids, weights.view(torch.int32).to(torch.int64)], dim=1)


def split_routing_rows(rows: torch.Tensor, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``([R, K] int64 ids, [R, K] float32 weights)`` of received :func:`routing_rows`."""
    return rows[:, :topk].contiguous(), rows[:, topk:].to(torch.int32).view(torch.float32)


def row_destinations(send: tuple[int, ...], token: torch.Tensor) -> torch.Tensor:
    """``[S]`` int64 on ``token``'s device: the rank each of the ``S`` rows ``token`` goes to, when
    ``send[r]`` consecutive rows go to rank ``r``."""
    device = token.device
    return torch.repeat_interleave(torch.arange(len(send), device=device), torch.tensor(send, device=device),
                                   output_size=token.numel())


def local_routing(topk_idx: torch.Tensor, topk_weights: torch.Tensor, token: torch.Tensor, dest: torch.Tensor,
                  num_local: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For rows of source tokens ``token`` sent to ranks ``dest``: ``[rows, K]`` int64 local expert ids
    (``-1`` for experts elsewhere) and ``[rows, K]`` float32 weights (``0`` elsewhere)."""
    local = topk_idx[token] - (dest * num_local).unsqueeze(1)
    mine = (local >= 0) & (local < num_local)
    return torch.where(mine, local, -1), torch.where(mine, topk_weights[token].float(), 0.0)


class Capacity:
    """The routing rows each segment carries: the next power of two of the most tokens any rank of the
    group held in the last ``window`` dispatches (``0`` before the first). Every rank observes the same
    values in the same order, so every rank holds the same capacity.

    Args:
        window: how many dispatches a peak is remembered (after a long prefill, decode steps stop
            paying for its padding after that many).
    """

    def __init__(self, window: int = 64) -> None:
        self._recent: deque[int] = deque(maxlen=window)
        self.rows = 0

    def observe(self, max_tokens: int) -> bool:
        """Record a dispatch's largest token count; whether the capacity changed."""
        self._recent.append(max_tokens)
        peak = max(self._recent)
        rows = 1 << (peak - 1).bit_length() if peak else 0
        changed, self.rows = rows != self.rows, rows
        return changed


def host_buffer(world: int, num_experts: int, device: torch.device) -> torch.Tensor:
    """A host buffer for :func:`plan_routing`'s counts (pinned when the plan runs on a GPU)."""
    size = 2 * world * (num_experts // world + 4)
    return torch.empty(size, dtype=torch.int64, pin_memory=device.type == "cuda")


@dataclass
class _Captured:
    """One shape's graph: its static inputs, the plan its replay refreshes, the graph, and where its
    Triton kernels read the addresses of their inputs (``None``: they read the static inputs).

    Attributes:
        inputs: the pinned ``[3]`` int64 tensor of those addresses (top-k, weights, output buffer), or ``None``.
        addresses: a ``ctypes`` view of ``inputs`` (what a replay writes), or ``None``.
    """

    topk_idx: torch.Tensor
    topk_weights: torch.Tensor
    plan: RoutingPlan
    graph: torch.cuda.CUDAGraph
    inputs: torch.Tensor | None
    addresses: ctypes.Array | None


class RoutingGraphs:
    """:func:`plan_routing` captured in a CUDA graph per (tokens, top-k, experts, capacity) and replayed.

    Only for CUDA tensors on an NCCL group. A shape is captured once the group's communicator has run
    (after the first, eager, plan of this object); a shape whose capture fails runs eagerly from then
    on. Capturing launches nothing, so every rank still exchanges counts once per call whatever the
    others do. Where the graph's buffers are static (the torch operations), the returned plan's tensors
are overwritten by the next replay of the same shape.

    Where the Triton kernels run, a replay copies nothing in or out: the host writes the addresses of
    this call's top-k and weights and of a new output buffer into pinned memory that the graph's
    kernels read when they start. So a plan must be called again only once the previous replay is
    done (a dispatch synchronises with it before returning).
    """

    def __init__(self, group: Callable[[], dist.ProcessGroup | None], world: int) -> None:
        self._group = group  # the group, when called (a weak reference: see fused_a2a.groups)
        self.world = world
        self._graphs: dict[tuple, _Captured | None] = {}
        self._warm = False

    def plan(self, topk_idx: torch.Tensor, topk_weights: torch.Tensor, num_experts: int,
             capacity: int) -> tuple[RoutingPlan, bool]:
        """The routing plan of this call and whether its output buffer is a graph's (overwritten by the
        next replay: copy what must outlive it)."""
        key = (topk_idx.device, tuple(topk_idx.shape), num_experts, topk_weights.dtype, capacity)
        if not self._warm or torch.cuda.is_current_stream_capturing():
            self._warm = True
            return self._eager(topk_idx, topk_weights, num_experts, capacity), False
        if key not in self._graphs:
            self._graphs[key] = self._capture(topk_idx, topk_weights, num_experts, capacity)
        captured = self._graphs[key]
        if captured is None:
            return self._eager(topk_idx, topk_weights, num_experts, capacity), False
        plan = captured.plan
        if captured.addresses is None:
            captured.topk_idx.copy_(topk_idx)
            captured.topk_weights.copy_(topk_weights)
            captured.graph.replay()
            return plan, True
        topk_idx, topk_weights = topk_idx.contiguous(), topk_weights.float().contiguous()
        out = torch.empty(plan.out.numel(), dtype=torch.int64, device=topk_idx.device)
        addresses = captured.addresses
        addresses[0], addresses[1], addresses[2] = topk_idx.data_ptr(), topk_weights.data_ptr(), out.data_ptr()
        captured.graph.replay()
        return RoutingPlan(plan.shape, out, plan.host), False

    def forget(self) -> None:
        """Drop every captured graph (their capacity is outgrown)."""
        self._graphs.clear()

    def _eager(self, topk_idx, topk_weights, num_experts: int, capacity: int) -> RoutingPlan:
        host = host_buffer(self.world, num_experts, topk_idx.device)
        return plan_routing(topk_idx, topk_weights, num_experts, self._group(), self.world, capacity, host)

    def _capture(self, topk_idx, topk_weights, num_experts: int, capacity: int) -> _Captured | None:
        static_idx, static_weights = topk_idx.contiguous().clone(), topk_weights.float().contiguous().clone()
        host = host_buffer(self.world, num_experts, topk_idx.device)
        inputs = addresses = None
        if kernels.usable(static_idx):  # the output buffer's address is written before each replay
            inputs = torch.zeros(3, dtype=torch.int64, pin_memory=True)
            addresses = (ctypes.c_int64 * 3).from_address(inputs.data_ptr())
            addresses[0], addresses[1] = static_idx.data_ptr(), static_weights.data_ptr()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                plan = plan_routing(static_idx, static_weights, num_experts, self._group(), self.world, capacity, host,
                                    inputs)
        except RuntimeError:  # an op or a collective that cannot be captured here: eager from now on
            torch.cuda.synchronize(topk_idx.device)
            return None
        if not kernels.usable(static_idx):  # the kernels gave way to torch operations, which read the static inputs
            inputs = addresses = None
        return _Captured(static_idx, static_weights, plan, graph, inputs, addresses)
