"""The ``torch`` backend: DeepEP's dispatch/combine semantics on plain ``torch.distributed``.

It is the correctness reference for every other backend and the default that runs anywhere
(NCCL on GPU, gloo on CPU). :class:`TorchBuffer` has the method names, arguments and returns of
``deep_ep.Buffer`` (normal mode), so the autograd code in :mod:`fused_a2a.autograd` drives it the
same way it drives DeepEP.

Semantics (identical to DeepEP's intranode normal mode):

* dispatch sends each token once to every rank that holds at least one of its experts; the
  received tokens are ordered by source rank, then by token index on the source;
* ``recv_topk_idx`` holds local expert ids (``global - rank * num_local_experts``) and ``-1`` for
  experts held elsewhere; ``recv_topk_weights`` is ``0`` where the expert is held elsewhere;
* combine sends each received row back to its source and sums the copies of a token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from fused_a2a.autograd import Comm, counts_tensor
from fused_a2a.backends.base import BackendSpec, Knob, one_of
from fused_a2a.backends.direct import BufferSlot
from fused_a2a.backends.torch_routing import (
    Capacity, Counts, RoutingGraphs, host_buffer, layout, plan_routing, read_counts, routing_rows,
    row_destinations, split_routing_rows,
)
from fused_a2a.backends.torch_stages import torch_stages
from fused_a2a.checks import check_combine_input, check_dispatch_inputs
from fused_a2a.fp8 import is_fp8_pair
from fused_a2a.groups import GroupMap, GroupRef

IMPLS = ("all_to_all", "p2p")


@dataclass(frozen=True)
class TorchConfig:
    """Knobs of the torch backend.

    Attributes:
        impl: ``"all_to_all"`` moves the tokens with one ``all_to_all_single`` per tensor;
            ``"p2p"`` with one batch of ``isend``/``irecv`` pairs per peer (own rows copied locally).
    """

    impl: str = "all_to_all"

    def __post_init__(self) -> None:
        if self.impl not in IMPLS:
            raise ValueError(f"torch backend: impl must be one of {', '.join(IMPLS)}, got {self.impl!r}")


@dataclass(eq=False)  # not frozen: a cheaper __init__; takes attributes (fused_a2a.seed.handles)
class TorchHandle:
    """What a torch-backend dispatch leaves for its combine and for cached dispatches.

    Attributes:
        group: the process group of the dispatch.
        send_token_idx: ``[S]`` int64, the source token of each sent row, ordered by destination rank.
        send_counts: rows sent to each rank (length = group size).
        recv_counts: rows received from each rank (length = group size).
        num_tokens: ``N``, the number of tokens of this rank before dispatch.
    """

    group: dist.ProcessGroup | None
    send_token_idx: torch.Tensor
    send_counts: tuple[int, ...]
    recv_counts: tuple[int, ...]
    num_tokens: int

    @property
    def num_recv_tokens(self) -> int:
        return sum(self.recv_counts)

    @property
    def is_token_in_rank(self) -> torch.Tensor:
        """``[N, W]`` bool, which ranks received each token."""
        dest = row_destinations(self.send_counts, self.send_token_idx)
        in_rank = torch.zeros(self.num_tokens, len(self.send_counts), dtype=torch.bool, device=dest.device)
        return in_rank.index_put_((self.send_token_idx, dest), torch.ones_like(dest, dtype=torch.bool))


class TorchBuffer:
    """A :class:`~fused_a2a.autograd.BufferLike` over ``torch.distributed`` collectives.

    Args:
        group: the expert-parallel process group (``None`` for the default group).
    """

    num_nvl_bytes = 0
    num_rdma_bytes = 0
    # fused_a2a's autograd code gives dispatch top-k and num_experts: the routing is planned in one go
    needs_layout = False

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self._group = GroupRef(group)  # weak: a cached buffer must not keep a destroyed group alive
        self.group_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self._graphs = RoutingGraphs(self._group, self.group_size)
        self._captures = dist.get_backend(group) == "nccl"
        self.capacity = Capacity()

    @property
    def group(self) -> dist.ProcessGroup | None:
        """The process group (``None``: the default group); ``RuntimeError`` once it was destroyed and freed."""
        return self._group()

    def get_dispatch_layout(
        self,
        topk_idx: torch.Tensor,
        num_experts: int,
        previous_event=None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ):
        """As :meth:`fused_a2a.autograd.BufferLike.get_dispatch_layout`, on the device without a host
        synchronisation. Ids outside ``[-1, num_experts)`` count as "no expert" here; :meth:`dispatch` rejects
        them with ``ValueError`` on every rank before any token moves. ``num_tokens_per_rdma_rank`` and the
        event are ``None``; ``previous_event``, ``async_finish`` and ``allocate_on_comm_stream`` are
        accepted and unused (the torch backend runs on the current stream).
        """
        in_rank, per_rank, per_expert = layout(topk_idx, num_experts, self.group_size)
        return per_rank.to(torch.int32), None, per_expert.to(torch.int32), in_rank, None

    def dispatch(
        self,
        x: torch.Tensor,
        handle: TorchHandle | None = None,
        num_tokens_per_rank: torch.Tensor | None = None,
        num_tokens_per_rdma_rank: torch.Tensor | None = None,
        is_token_in_rank: torch.Tensor | None = None,
        num_tokens_per_expert: torch.Tensor | None = None,
        topk_idx: torch.Tensor | None = None,
        topk_weights: torch.Tensor | None = None,
        expert_alignment: int = 1,
        num_worst_tokens: int = 0,
        config: TorchConfig | None = None,
        previous_event=None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
        num_experts: int | None = None,
    ):
        """As :meth:`fused_a2a.autograd.BufferLike.dispatch` (an FP8 pair in, an FP8 pair out).

        The routing (which rows go where; the counts, ids and weights each rank receives, in one
        exchange) is computed from ``topk_idx`` in one step (:mod:`fused_a2a.backends.torch_routing`;
        one CUDA graph replay on a GPU with NCCL), then one host synchronisation, then the token
        exchange. A dispatch in which some rank holds more tokens than the group's routing capacity
        exchanges the ids and weights once more (every rank of the group does, the same call).

        Here: ``num_experts`` (``E``) may stand in for the layout, of which only the expert count is read;
        ``num_tokens_per_rdma_rank``, ``num_worst_tokens``, ``previous_event``, ``async_finish`` and
        ``allocate_on_comm_stream`` are accepted and unused; ``config`` is a :class:`TorchConfig`
        (default ``TorchConfig()``); the per-expert counts are an ``[E / W]`` int64 CPU tensor, the handle
        a :class:`TorchHandle`, the event ``None``.
        """
        config = config or TorchConfig()
        if handle is not None:
            recv_x = self.exchange_tokens(x, handle.send_token_idx, handle.send_counts, handle.recv_counts, config)
            return recv_x, None, None, None, None, None

        if topk_idx is None or topk_weights is None:
            raise ValueError("a dispatch without a handle needs topk_idx and topk_weights")
        if num_experts is None:
            if num_tokens_per_expert is None:
                raise ValueError("a dispatch without a handle needs num_experts or the layout from get_dispatch_layout")
            num_experts = int(num_tokens_per_expert.numel())
        check_dispatch_inputs(x, topk_idx, topk_weights, num_experts, self.group_size)

        plan, shared = self.plan(topk_idx, topk_weights, num_experts)
        if topk_idx.is_cuda:
            torch.cuda.current_stream(topk_idx.get_device()).synchronize()
        counts = read_counts(plan.host, self.group_size, num_experts)
        rows, carried = sum(counts.send), counts.max_tokens <= plan.shape.capacity
        # the tokens first, from the plan's own buffer: the GPU waits for them, not for the host work below
        send_token_idx = plan.shape.sent(plan.out, rows)
        recv_x = self.exchange_tokens(x, send_token_idx, counts.send, counts.recv, config)
        out = plan.out
        if shared:  # a graph's buffer is overwritten by its next replay
            out = out.clone()
            send_token_idx = plan.shape.sent(out, rows)
        recv_topk_idx, recv_topk_weights = plan.shape.received(out, sum(counts.recv) if carried else 0)
        if not carried:  # the segments could not carry every routing row: exchange them now
            routing = routing_rows(topk_idx, topk_weights, send_token_idx, counts.send, num_experts // self.group_size)
            recv_topk_idx, recv_topk_weights = self.exchange_routing(routing, topk_idx.size(1), counts, config)
        if self.capacity.observe(counts.max_tokens):
            self._graphs.forget()
        per_expert = counts.per_local_expert
        if expert_alignment > 1:
            per_expert = [(count + expert_alignment - 1) // expert_alignment * expert_alignment for count in per_expert]
        handle = TorchHandle(
            group=self.group,
            send_token_idx=send_token_idx,
            send_counts=counts.send,
            recv_counts=counts.recv,
            num_tokens=topk_idx.size(0),
        )
        return recv_x, recv_topk_idx, recv_topk_weights, counts_tensor(per_expert), handle, None

    def plan(self, topk_idx: torch.Tensor, topk_weights: torch.Tensor, num_experts: int):
        """The routing plan of a fresh dispatch (:func:`~fused_a2a.backends.torch_routing.plan_routing`)
        and whether its buffers belong to a replayed graph. Collective."""
        if self._captures and topk_idx.is_cuda:
            return self._graphs.plan(topk_idx, topk_weights, num_experts, self.capacity.rows)
        host = host_buffer(self.group_size, num_experts, topk_idx.device)
        plan = plan_routing(topk_idx, topk_weights, num_experts, self.group, self.group_size, self.capacity.rows, host)
        return plan, False

    def exchange_routing(self, routing: torch.Tensor, topk: int, counts: Counts,
                         config: TorchConfig) -> tuple[torch.Tensor, torch.Tensor]:
        """Send each row's local expert ids and weights (``[S, 2 K]`` int64 of :func:`routing_rows`) in one
        exchange; returns the received ``[R, K]`` int64 ids and float32 weights."""
        return split_routing_rows(self._exchange(routing, counts.send, counts.recv, config), topk)

    def combine(
        self,
        x: torch.Tensor,
        handle: TorchHandle,
        topk_weights: torch.Tensor | None = None,
        bias=None,
        config: TorchConfig | None = None,
        previous_event=None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ):
        """As :meth:`fused_a2a.autograd.BufferLike.combine`. ``handle`` is a :class:`TorchHandle`,
        ``config`` a :class:`TorchConfig` (default ``TorchConfig()``); ``previous_event``, ``async_finish``
        and ``allocate_on_comm_stream`` are accepted and unused; the event is ``None``.
        """
        config = config or TorchConfig()
        check_combine_input(x, handle.num_recv_tokens)
        back = self._exchange(x, handle.recv_counts, handle.send_counts, config)
        combined = torch.zeros(handle.num_tokens, x.size(1), dtype=torch.float32, device=x.device)
        combined.index_add_(0, handle.send_token_idx, back.float())
        for extra in _bias_terms(bias):
            combined += extra.float()
        combined_weights = None
        if topk_weights is not None:
            back_w = self._exchange(topk_weights.float().contiguous(), handle.recv_counts, handle.send_counts, config)
            combined_weights = torch.zeros(
                handle.num_tokens, topk_weights.size(1), dtype=torch.float32, device=x.device
            )
            combined_weights.index_add_(0, handle.send_token_idx, back_w)
        return combined.to(x.dtype), combined_weights, None

    def destroy(self) -> None:
        """Release nothing: the torch backend holds no buffers of its own."""

    def exchange_tokens(self, x, token_idx: torch.Tensor, send_counts, recv_counts, config: TorchConfig):
        """Send the rows ``token_idx`` of ``x`` (a tensor or an FP8 pair) and return the received rows."""
        if not is_fp8_pair(x):
            return self._exchange(x[token_idx], send_counts, recv_counts, config)
        x_fp8, scales = x
        recv_bytes = self._exchange(x_fp8.view(torch.uint8)[token_idx], send_counts, recv_counts, config)
        return recv_bytes.view(torch.float8_e4m3fn), self._exchange(scales[token_idx], send_counts, recv_counts, config)

    def _exchange(
        self,
        rows: torch.Tensor,
        send_counts: tuple[int, ...],
        recv_counts: tuple[int, ...],
        config: TorchConfig,
    ) -> torch.Tensor:
        """Send ``send_counts[r]`` consecutive rows of ``rows`` to rank ``r``; return the received rows
        (on ``rows``' device)."""
        rows = rows.contiguous()
        if config.impl == "all_to_all":
            out = rows.new_empty((sum(recv_counts), *rows.shape[1:]))
            dist.all_to_all_single(out, rows, list(recv_counts), list(send_counts), group=self.group)
            return out
        if rows.device.type != "cpu" and dist.get_backend(self.group) == "gloo":
            # gloo's send/recv read and write the tensor's memory as host memory: stage GPU rows on the host
            return self._p2p(rows.cpu(), send_counts, recv_counts).to(rows.device)
        return self._p2p(rows, send_counts, recv_counts)

    def _p2p(self, rows: torch.Tensor, send_counts: tuple[int, ...], recv_counts: tuple[int, ...]) -> torch.Tensor:
        """The ``p2p`` exchange of :meth:`_exchange` (contiguous ``rows``); the received rows on ``rows``'
        device. Collective."""
        out = rows.new_empty((sum(recv_counts), *rows.shape[1:]))
        sends = rows.split(list(send_counts))
        recvs = out.split(list(recv_counts))
        ops = []
        for peer in range(self.group_size):
            if peer == self.rank:
                recvs[peer].copy_(sends[peer])
                continue
            global_peer = dist.get_global_rank(self.group, peer) if self.group is not None else peer
            if send_counts[peer]:
                ops.append(dist.P2POp(dist.isend, sends[peer], global_peer, self.group))
            if recv_counts[peer]:
                ops.append(dist.P2POp(dist.irecv, recvs[peer], global_peer, self.group))
        if ops:
            for work in dist.batch_isend_irecv(ops):
                work.wait()
        return out


def _bias_terms(bias) -> tuple[torch.Tensor, ...]:
    if bias is None:
        return ()
    if isinstance(bias, torch.Tensor):
        return (bias,)
    return tuple(b for b in bias if b is not None)


_buffers: GroupMap[TorchBuffer] = GroupMap()  # an entry goes with its group


def get_torch_buffer(group: dist.ProcessGroup | None, tokens=None) -> TorchBuffer:
    """The torch buffer of ``group`` (``None``: the default group), created on first use (one
    buffer moves tokens of any size: ``tokens``, what :attr:`Comm.get_buffer` passes, is unused)."""
    buffer = _buffers.get(group)
    if buffer is None:
        buffer = _buffers.set(group, TorchBuffer(group))
    return buffer


def set_torch_buffer(group: dist.ProcessGroup | None, buffer) -> None:
    """Make ``buffer`` the torch buffer of ``group`` (a stand-in, e.g. a benchmark's replay of it;
    it must not hold ``group`` strongly, or the group outlives ``destroy_process_group``)."""
    _buffers.set(group, buffer)


def free_torch_buffers() -> None:
    """Forget every torch buffer (they hold no device memory of their own)."""
    _buffers.clear()


def make_torch_comm(dispatch: dict[str, Any], combine: dict[str, Any], num_ranks: int | None = None) -> Comm:
    """The :class:`Comm` of the torch backend for two full knob dicts (``num_ranks`` is not needed)."""
    return Comm(name="torch", get_buffer=get_torch_buffer, dispatch_config=TorchConfig(**dispatch),
                combine_config=TorchConfig(**combine))


def version() -> str:
    """torch's version, with NCCL's when torch has CUDA."""
    nccl = torch.cuda.nccl.version() if torch.cuda.is_available() else None
    return torch.__version__ + (f" nccl {'.'.join(map(str, nccl))}" if isinstance(nccl, tuple) else "")


SPEC = BackendSpec(
    name="torch",
    knobs=(
        Knob("impl", "all_to_all", IMPLS, "all_to_all: one all_to_all_single per tensor; p2p: batched isend/irecv per peer",
             check=one_of("impl", IMPLS)),
    ),
    make_comm=make_torch_comm,
    teardown=free_torch_buffers,
    version=version,
    dtypes=("bf16", "fp16", "fp32", "fp8"),
    reference=True,
    buffer_slot=BufferSlot(get_torch_buffer, set_torch_buffer),
    stages=torch_stages,
)
