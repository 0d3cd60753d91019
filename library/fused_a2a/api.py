"""The backend-neutral entry: ``dispatch`` / ``combine`` with ``backend=`` and knobs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from fused_a2a.autograd import BufferCombine, BufferDispatch, Comm, run_function
from fused_a2a.calls import agreed_dispatch

@dataclass(slots=True, eq=False)  # not frozen: a cheaper __init__
class DispatchHandle:
    """The handle of a backend-neutral dispatch: the backend's own handle and how to reach it again.

    Attributes:
        comm: the backend with its resolved knobs.
        group: the process group of the dispatch.
        raw: the backend's own handle (what its ``combine`` takes).
    """

    comm: Comm
    group: dist.ProcessGroup | None
    raw: Any

    @property
    def backend(self) -> str:
        return self.comm.name


def dispatch(
    x: torch.Tensor,
    topk_idx: torch.Tensor,
    topk_weights: torch.Tensor,
    num_experts: int,
    group: dist.ProcessGroup | None = None,
    backend: str = "torch",
    async_finish: bool = False,
    allocate_on_comm_stream: bool = False,
    num_sms_budget: int | None = None,
    routing: str | None = None,
    **knobs: Any,
):
    """Send each token to the ranks that hold its experts, with any backend.

    Args:
        x: ``[N, H]`` bf16/fp16/fp32 tokens of this rank, or an FP8 pair ``(x_fp8 [N, H]
            float8_e4m3fn, scales [N, H/128] float32)`` (``fused_a2a.fp8.quantize_fp8``; forward
            only: the pair is not differentiable, ``recv_x`` is a pair too).
        topk_idx: ``[N, K]`` int64 global expert ids, ``-1`` for "no expert".
        topk_weights: ``[N, K]`` float32 routing weights (differentiable).
        num_experts: total number of experts, divisible by the group size.
        group: the expert-parallel process group (``None``: the default group).
        backend: a name of ``fused_a2a.backends.BACKENDS`` (``"torch"``, the reference, runs
            anywhere), or ``"auto"``: the installed backend that this cluster's tuning table
            measured fastest for this shape (``"torch"`` without a table).
        async_finish, allocate_on_comm_stream: as in DeepEP (no-ops for the torch backend).
        num_sms_budget: most SMs a tuned or default ``num_sms`` may be (default:
            ``$FUSED_A2A_NUM_SMS_BUDGET``); the best measured config within it is used.
        routing: the routing the model's router produces, as the tuning table keys it
            (``uniform``, ``zipf:<skew>``, ``hot:<fraction>``; default ``$FUSED_A2A_ROUTING``, else
            ``uniform``): entries measured with it are preferred.
        **knobs: the backend's knobs (``fused_a2a.backends.BACKENDS[backend].knobs``). A knob not
            given comes from ``FUSED_A2A_<BACKEND>_<KNOB>``, else from this cluster's tuning table,
            else from the backend's default (``a2a-bench show`` prints the choice). The knobs are
            agreed by every rank of ``group`` at the first call of a shape (one collective) and
            cached (:mod:`fused_a2a.tuning.agreement`): every rank runs the same config.

    Returns:
        recv_x: ``[R, H]`` received tokens, ordered by source rank then source token.
        recv_topk_idx: ``[R, K]`` int64 local expert ids, ``-1`` for experts on other ranks.
        recv_topk_weights: ``[R, K]`` float32, ``0`` where the expert is on another rank.
        tokens_per_expert: ``[E / W]`` int64 CPU tensor, received tokens per local expert.
        handle: a :class:`DispatchHandle` for :func:`combine`.

    Inputs of any memory layout are taken (made contiguous once, here).

    Raises:
        ValueError: inputs of the wrong shape or dtype, ``topk_idx`` values outside ``[-1,
            num_experts)``, a knob the backend rejects, a shape the backend's kernels do not take, or
            knobs that differ between the ranks: on one rank or several, raised on every rank of
            ``group`` (the rank concerned names its reason; :mod:`fused_a2a.calls` says how, and its limit).
        RuntimeError: the backend's library is not installed.
    """
    agreed, x, topk_idx, topk_weights = agreed_dispatch(backend, group, x, topk_idx, topk_weights, num_experts, knobs,
                                                        num_sms_budget, routing)
    comm = agreed.comm
    recv_x, recv_idx, recv_weights, tokens_per_expert, raw = run_function(
        BufferDispatch, x, topk_idx, topk_weights, (num_experts, group, comm, async_finish, allocate_on_comm_stream)
    )
    return recv_x, recv_idx, recv_weights, tokens_per_expert, DispatchHandle(comm, group, raw)


def combine(
    y: torch.Tensor,
    handle: DispatchHandle,
    async_finish: bool = False,
    allocate_on_comm_stream: bool = False,
) -> torch.Tensor:
    """Return each received row to its source rank and sum the copies of each token.

    Args:
        y: ``[R, H]`` rows in the order :func:`dispatch` received them (differentiable).
        handle: the :class:`DispatchHandle` of that dispatch.

    Returns:
        ``[N, H]`` in ``y``'s dtype (summed in float32).
    """
    if not isinstance(handle, DispatchHandle):
        raise ValueError(f"combine needs the handle returned by fused_a2a.dispatch, got {type(handle).__name__}")
    return run_function(BufferCombine, y, (handle.group, handle.raw, handle.comm, async_finish, allocate_on_comm_stream))
