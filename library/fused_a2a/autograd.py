"""The forward and backward passes shared by every ``deep_ep.Buffer``-shaped backend, and that shape
(:class:`BufferLike`).

Dispatch's backward is a combine of the gradient (which also sums the routing weights' gradient
back to the source tokens); combine's backward is a cached dispatch of the gradient with the
forward's handle. The autograd Functions of the DeepEP, UCCL-EP and torch backends call these
helpers with a :class:`Comm` that says which buffer and which configs to use.
"""

from __future__ import annotations

import array
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch

from fused_a2a.layout import dense
from fused_a2a.shared_errors import flag_counts, ids_detail, raise_if_flagged, sanitize_topk


def get_hidden_bytes(x) -> int:
    """Bytes of one token row as the buffers size it: ``H * max(element_size, 2)``.

    Args:
        x: ``[N, H]`` tensor, or an FP8 pair ``(x_fp8 [N, H], scales)`` (sized like bf16, as the
            combine that follows moves bf16).

    Returns:
        int: the number of hidden bytes.
    """
    if type(x) is tuple:
        x = x[0]
    size = x.itemsize
    return x.shape[1] * (size if size > 2 else 2)


class BufferLike(Protocol):
    """The buffer interface :func:`dispatch_forward` and :func:`combine_forward` drive: DeepEP v1's
    ``deep_ep.Buffer`` in normal mode, which ``deep_ep.Buffer`` itself implements, and so do our adapters
    (:class:`~fused_a2a.backends.torch_a2a.TorchBuffer`, :class:`~fused_a2a.backends.uccl_buffer.UCCLBuffer`,
    :class:`~fused_a2a.backends.hybridep_adapter.HybridEPAdapter`). An implementation documents only where
    it differs.

    Notation: ``N`` tokens on this rank, ``H`` hidden size, ``K`` experts per token, ``E`` experts of the
    group, ``W`` ranks, ``R`` rows this rank receives. Every row tensor a buffer is given (tokens,
    combine inputs, gradients) is contiguous and 16-byte aligned (:func:`fused_a2a.layout.dense`).

    Attributes:
        needs_layout: ``False`` for a buffer that routes from top-k itself: its :meth:`dispatch` takes
            ``num_experts`` instead of the layout of :meth:`get_dispatch_layout`, which it need not have.
            Optional (``deep_ep.Buffer`` has none): a buffer without it needs the layout.
    """

    needs_layout: bool

    def get_dispatch_layout(self, topk_idx, num_experts: int, previous_event=None, async_finish: bool = False,
                            allocate_on_comm_stream: bool = False):
        """Count where each token goes (the layout a fresh :meth:`dispatch` takes).

        Args:
            topk_idx: ``[N, K]`` int64 global expert ids in ``[-1, E)``, ``-1`` for "no expert".
            num_experts: ``E``.
            previous_event: an event of the buffer's kind to wait for before the work (``None``: none).
            async_finish: do not make the current stream wait; the returned event marks the work's end.
            allocate_on_comm_stream: allocate the outputs on the communication stream (needs
                ``previous_event`` and ``async_finish``).

        Returns:
            num_tokens_per_rank: ``[W]`` int32, tokens sent to each rank.
            num_tokens_per_rdma_rank: ``[W / ranks per node]`` int32 tokens per node, ``None`` intranode.
            num_tokens_per_expert: ``[E]`` int32, (token, expert) pairs routed to each expert.
            is_token_in_rank: ``[N, W]`` bool, which ranks receive each token.
            event: the event of the work (``None`` where the buffer makes none).
        """

    def dispatch(self, x, handle=None, num_tokens_per_rank=None, num_tokens_per_rdma_rank=None, is_token_in_rank=None,
                 num_tokens_per_expert=None, topk_idx=None, topk_weights=None, expert_alignment: int = 1,
                 num_worst_tokens: int = 0, config=None, previous_event=None, async_finish: bool = False,
                 allocate_on_comm_stream: bool = False):
        """Send each token once to every rank that holds one of its experts; received rows are ordered by
        source rank, then by token index on the source.

        Args:
            x: ``[N, H]`` tokens (bf16, or what the buffer takes), or an FP8 pair ``(x_fp8 [N, H]
                float8_e4m3fn, scales [N, H / 128] float32)`` where the buffer moves FP8.
            handle: the handle of an earlier dispatch: send ``x`` with that dispatch's layout (a "cached"
                dispatch, no top-k; what a combine's backward runs).
            num_tokens_per_rank, num_tokens_per_rdma_rank, is_token_in_rank, num_tokens_per_expert: the
                layout of :meth:`get_dispatch_layout` (a fresh dispatch of a buffer that needs it).
                :func:`dispatch_forward` passes per-expert counts that flag bad ids
                (:mod:`fused_a2a.shared_errors`): the returned counts must be the sum of the senders'.
            topk_idx: ``[N, K]`` int64 global expert ids, ``-1`` for none (a fresh dispatch).
            topk_weights: ``[N, K]`` float32 routing weights (with ``topk_idx``).
            expert_alignment: each returned per-expert count is rounded up to a multiple of it.
            num_worst_tokens: receive exactly this many rows without waiting for the counts on the host
                (``0``: the real count).
            config: the backend's config object (:attr:`Comm.dispatch_config`; ``None``: the buffer's default).
            previous_event, async_finish, allocate_on_comm_stream: as in :meth:`get_dispatch_layout`.

        Returns:
            recv_x: ``[R, H]`` received tokens in ``x``'s dtype (an FP8 pair for an FP8 pair).
            recv_topk_idx: ``[R, K]`` int64 local expert ids (``global - rank * E / W``), ``-1`` for
                experts held elsewhere (``None`` for a cached dispatch).
            recv_topk_weights: ``[R, K]`` float32, ``0`` where the expert is held elsewhere (``None`` if cached).
            num_recv_tokens_per_expert_list: received rows per local expert: ``E / W`` ints, a list or a
                CPU int64 tensor (``None`` if cached).
            handle: what :meth:`combine` and a cached dispatch take (``None`` if cached); opaque to callers.
            event: the event of the work (``None`` where the buffer makes none).
        """

    def combine(self, x, handle, topk_weights=None, bias=None, config=None, previous_event=None,
                async_finish: bool = False, allocate_on_comm_stream: bool = False):
        """Send each received row back to its source rank and sum the copies of each token.

        Args:
            x: ``[R, H]`` rows in the order the dispatch of ``handle`` received them.
            handle: the handle that dispatch returned.
            topk_weights: ``[R, K]`` float32, summed back the same way (``None``: none).
            bias: ``None``, a ``[N, H]`` tensor, or a pair of them, added to the result.
            config: the backend's config object (:attr:`Comm.combine_config`; ``None``: the buffer's default).
            previous_event, async_finish, allocate_on_comm_stream: as in :meth:`get_dispatch_layout`.

        Returns:
            combined_x: ``[N, H]`` in ``x``'s dtype (summed in float32).
            combined_topk_weights: ``[N, K]`` float32, ``None`` without ``topk_weights``.
            event: the event of the work (``None`` where the buffer makes none).
        """


@dataclass(frozen=True)
class Comm:
    """One backend with its knobs resolved: what the shared autograd code needs.

    Attributes:
        name: backend name (``torch``, ``deepep``, ``uccl``).
        get_buffer: ``(group, tokens) -> BufferLike`` able to move rows like ``tokens`` (an ``[N, H]``
            tensor or FP8 pair; :func:`get_hidden_bytes` of it sizes a buffer that depends on the row size).
        dispatch_config: passed as ``config=`` to ``buffer.dispatch`` (``None``: the buffer's default).
        combine_config: passed as ``config=`` to ``buffer.combine`` (``None``: the buffer's default).
        new_event: ``() -> previous_event`` capturing the current stream, used when ``async_finish``.
    """

    name: str
    get_buffer: Callable[[Any, Any], BufferLike]
    dispatch_config: Any = None
    combine_config: Any = None
    new_event: Callable[[], Any] | None = None

    def previous_event(self, async_finish: bool):
        """An event of the current stream when ``async_finish`` and the backend makes events, else ``None``."""
        return self.new_event() if async_finish and self.new_event is not None else None


def _wait(event) -> None:
    """Make the current stream wait for ``event`` (an ``async_finish`` call's), if any."""
    if event is not None:
        event.current_stream_wait()


def dispatch_forward(ctx, comm: Comm, x, topk_idx, topk_weights, num_experts, group, async_finish, on_comm_stream):
    """Layout + dispatch; saves what the backward needs on ``ctx`` (``None``: saves nothing).

    A buffer whose ``needs_layout`` is ``False`` routes from top-k itself: it gets ``num_experts``
    instead of the layout of ``get_dispatch_layout``. Any other buffer gets ids outside ``[-1, E)``
    as ``-1``, and its per-expert counts must be DeepEP's (the sum of the senders'
    ``num_tokens_per_expert``): a rank with such ids flags them there, and every rank raises the same
    ``ValueError`` after the dispatch (:mod:`fused_a2a.shared_errors`).

    Returns:
        ``(recv_x, recv_topk_idx, recv_topk_weights, tokens_per_expert, handle)`` where
        ``tokens_per_expert`` is a CPU int64 tensor with one count per local expert.
    """
    buffer = comm.get_buffer(group, x)
    event = comm.previous_event(True) if async_finish else None
    if not getattr(buffer, "needs_layout", True):  # the buffer routes from top-k itself (torch, HybridEP)
        out = buffer.dispatch(
            x, topk_idx=topk_idx, topk_weights=topk_weights, num_experts=num_experts, config=comm.dispatch_config,
            previous_event=event, async_finish=async_finish, allocate_on_comm_stream=on_comm_stream,
        )
    else:  # DeepEP's contract: the library sees only ids in [-1, E); bad ones flag the counts instead
        ids, bad = sanitize_topk(topk_idx, num_experts)
        if ids.numel() == 0:  # DeepEP asserts on the device that both pointers are null or both are set
            ids, topk_weights = ids.new_empty(ids.shape), topk_weights.new_empty(topk_weights.shape)
        num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank, event = (
            buffer.get_dispatch_layout(
                ids,
                num_experts,
                previous_event=event,
                async_finish=async_finish,
                allocate_on_comm_stream=on_comm_stream,
            )
        )
        world_size = num_tokens_per_rank.numel()
        out = buffer.dispatch(
            x,
            topk_idx=ids,
            topk_weights=topk_weights,
            num_tokens_per_rank=num_tokens_per_rank,
            num_tokens_per_rdma_rank=num_tokens_per_rdma_rank,
            is_token_in_rank=is_token_in_rank,
            num_tokens_per_expert=flag_counts(num_tokens_per_expert, bad, world_size),
            config=comm.dispatch_config,
            previous_event=event,
            async_finish=async_finish,
            allocate_on_comm_stream=on_comm_stream,
        )
        raise_if_flagged(out[3], world_size, num_experts, lambda: ids_detail(topk_idx, num_experts) if bad else None)
    recv_x, recv_topk_idx, recv_topk_weights, counts, handle, after = out
    if async_finish:
        _wait(after)
    if ctx is not None:
        _save(ctx, comm, group, handle, async_finish, on_comm_stream)
    return recv_x, recv_topk_idx, recv_topk_weights, counts_tensor(counts), handle


def counts_tensor(counts) -> torch.Tensor:
    """``counts`` (a list of ints, or a tensor returned as is) as a CPU int64 tensor."""
    if isinstance(counts, torch.Tensor):
        return counts
    return torch.frombuffer(array.array("q", counts), dtype=torch.int64) if counts else torch.zeros(0, dtype=torch.int64)


def _save(ctx, comm: Comm, group, handle, async_finish: bool, on_comm_stream: bool) -> None:
    ctx.comm, ctx.group, ctx.handle = comm, group, handle
    ctx.async_finish, ctx.on_comm_stream = async_finish, on_comm_stream


_grad_enabled = torch.is_grad_enabled


def run_function(function: type[torch.autograd.Function], *args):
    """``function.apply(*args)``; when autograd would record nothing (grad mode off, or none of the
    arguments at the positions ``function.differentiable`` names is a tensor that requires grad)
    ``function.forward(None, *args)``: the same outputs without the cost of building a graph node
    (a decode step's dispatch and combine). Every forward run this way saves nothing on a ``None`` ctx."""
    if _grad_enabled():
        for position in function.differentiable:
            arg = args[position]
            if isinstance(arg, torch.Tensor) and arg.requires_grad:
                return function.apply(*args)
    return function.forward(None, *args)


def dispatch_backward(ctx, grad_recv_x, grad_recv_topk_weights):
    """Combine the gradients of ``recv_x`` and ``recv_topk_weights`` back to the source tokens.

    Returns:
        ``(grad_x [N, H], grad_topk_weights [N, K] float32)``.
    """
    comm: Comm = ctx.comm
    buffer = comm.get_buffer(ctx.group, grad_recv_x)
    grad_x, grad_topk_weights, after = buffer.combine(
        dense(grad_recv_x),
        ctx.handle,
        topk_weights=grad_recv_topk_weights.float(),
        config=comm.combine_config,
        previous_event=comm.previous_event(ctx.async_finish),
        async_finish=ctx.async_finish,
        allocate_on_comm_stream=ctx.on_comm_stream,
    )
    if ctx.async_finish:
        _wait(after)
    return grad_x, grad_topk_weights


def combine_forward(ctx, comm: Comm, x, group, handle, async_finish, on_comm_stream):
    """Combine; saves what the backward needs on ``ctx`` (``None``: saves nothing). Returns
    ``[N, H]`` in ``x``'s dtype."""
    buffer = comm.get_buffer(group, x)
    combined_x, _, after = buffer.combine(
        dense(x),
        handle=handle,
        config=comm.combine_config,
        previous_event=comm.previous_event(True) if async_finish else None,
        async_finish=async_finish,
        allocate_on_comm_stream=on_comm_stream,
    )
    if async_finish:
        _wait(after)
    if ctx is not None:
        _save(ctx, comm, group, handle, async_finish, on_comm_stream)
    return combined_x


def combine_backward(ctx, grad_combined):
    """Dispatch the gradient with the forward's handle. Returns ``[R, H]``."""
    comm: Comm = ctx.comm
    buffer = comm.get_buffer(ctx.group, grad_combined)
    grad_x, _, _, _, _, after = buffer.dispatch(
        dense(grad_combined),
        handle=ctx.handle,
        config=comm.dispatch_config,
        previous_event=comm.previous_event(ctx.async_finish),
        async_finish=ctx.async_finish,
        allocate_on_comm_stream=ctx.on_comm_stream,
    )
    if ctx.async_finish:
        _wait(after)
    return grad_x



class BufferDispatch(torch.autograd.Function):
    """Dispatch through any :class:`Comm`; what the backend-neutral :func:`fused_a2a.dispatch` applies.

    ``apply(x, topk_idx, topk_weights, call)`` with ``call = (num_experts, group, comm, async_finish,
    allocate_on_comm_stream)``: one argument for the five, as ``apply``'s cost grows with each.
    """

    differentiable = (0, 2)  # x, topk_weights (for run_function)

    @staticmethod
    def forward(ctx, x, topk_idx, topk_weights, call):
        num_experts, group, comm, async_finish, allocate_on_comm_stream = call
        return dispatch_forward(ctx, comm, x, topk_idx, topk_weights, num_experts, group, async_finish, allocate_on_comm_stream)

    @staticmethod
    def backward(ctx, grad_output, grad_topk_idx, grad_topk_weights, grad_tokens_per_expert, grad_handle):
        grad_x, grad_weights = dispatch_backward(ctx, grad_output, grad_topk_weights)
        return grad_x, None, grad_weights, None


class BufferCombine(torch.autograd.Function):
    """Combine through any :class:`Comm`; what the backend-neutral :func:`fused_a2a.combine` applies.

    ``apply(x, call)`` with ``call = (group, handle, comm, async_finish, allocate_on_comm_stream)``
    (``handle``: the backend's own, of the dispatch).
    """

    differentiable = (0,)  # x (for run_function)

    @staticmethod
    def forward(ctx, x, call):
        group, handle, comm, async_finish, allocate_on_comm_stream = call
        return combine_forward(ctx, comm, x, group, handle, async_finish, allocate_on_comm_stream)

    @staticmethod
    def backward(ctx, grad_output):
        return combine_backward(ctx, grad_output), None
