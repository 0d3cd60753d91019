"""A backend's own calls, made directly on its buffer: what a benchmark compares fused_a2a's paths against.

A backend declares these in its :class:`~fused_a2a.backends.base.BackendSpec` (``buffer_slot``,
``direct_calls``, ``seed_path``, ``stages``); the harness (``a2a-bench overhead``, ``paths``,
``breakdown`` and a sweep's ``seed`` timing mode) times them and knows no backend by name. Nothing
here is on a training job's path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch


@dataclass(frozen=True)
class BufferSlot:
    """Where a backend keeps its process-wide buffer (what its sessions fetch).

    Attributes:
        current: ``group -> buffer``, the buffer the backend's calls on ``group`` use now (``None``: none).
        install: ``(group, buffer) -> None``, makes ``buffer`` that buffer (a stand-in such as a replay,
            or the one taken away before).
    """

    current: Callable[[Any], Any]
    install: Callable[[Any, Any], None]


@dataclass(frozen=True)
class DirectCalls:
    """One path's buffer calls.

    Attributes:
        dispatch: ``tokens -> (rows, handle)``, an uncached dispatch (layout + dispatch where the buffer
            needs a layout).
        combine: ``(rows, handle) -> combined``.
        cached: ``(tokens, handle, rows) -> rows``, a dispatch reusing ``handle`` (what ``kernel`` mode
            times); ``None`` where the path has none of its own.
    """

    dispatch: Callable[[Any], tuple[Any, Any]]
    combine: Callable[[Any, Any], Any]
    cached: Callable[[Any, Any, Any], Any] | None = None


DirectCallsFn = Callable[[str, Any, Any, torch.Tensor, torch.Tensor, int, Any], DirectCalls]
"""``(path, buffer, comm, topk_idx, topk_weights, num_experts, group) -> DirectCalls``: the buffer calls of
one round trip of ``path`` (``api``: what :func:`fused_a2a.dispatch` wraps; ``seed``: what the seed
functions wrap), made on ``buffer`` with ``comm``'s configs (``comm``: a :class:`~fused_a2a.autograd.Comm`)."""


def buffer_calls(path: str, buffer: Any, comm, idx: torch.Tensor, weights: torch.Tensor, num_experts: int,
                 group=None) -> DirectCalls:
    """The :data:`DirectCallsFn` of a buffer with DeepEP's interface (``get_dispatch_layout``, ``dispatch``,
    ``combine``; a buffer whose ``needs_layout`` is false routes itself from ``topk_idx``): the same calls
    for every path, since the seed functions of such a backend make the calls :func:`fused_a2a.dispatch`
    makes."""

    def combine(rows, handle):
        return buffer.combine(rows, handle=handle, config=comm.combine_config,
                              previous_event=None, async_finish=False, allocate_on_comm_stream=False)

    def cached(tokens, handle, rows):
        return buffer.dispatch(tokens, handle=handle, config=comm.dispatch_config, previous_event=None,
                               async_finish=False, allocate_on_comm_stream=False)[0]

    if not getattr(buffer, "needs_layout", True):

        def dispatch_routing(tokens):
            out = buffer.dispatch(tokens, topk_idx=idx, topk_weights=weights, num_experts=num_experts,
                                  config=comm.dispatch_config, previous_event=None, async_finish=False,
                                  allocate_on_comm_stream=False)
            return out[0], out[4]

        return DirectCalls(dispatch_routing, combine, cached)

    def dispatch(tokens):
        per_rank, per_rdma, per_expert, in_rank, _ = buffer.get_dispatch_layout(
            idx, num_experts, previous_event=None, async_finish=False, allocate_on_comm_stream=False)
        out = buffer.dispatch(tokens, topk_idx=idx, topk_weights=weights, num_tokens_per_rank=per_rank,
                              num_tokens_per_rdma_rank=per_rdma, is_token_in_rank=in_rank,
                              num_tokens_per_expert=per_expert, config=comm.dispatch_config,
                              previous_event=None, async_finish=False, allocate_on_comm_stream=False)
        return out[0], out[4]

    return DirectCalls(dispatch, combine, cached)


@dataclass(frozen=True)
class SeedPath:
    """A dispatch of one point's inputs and a combine of its rows, ready to time (a sweep's ``seed`` mode).

    Attributes:
        dispatch: a fresh dispatch of the seed functions' own path (routing metadata included).
        combine: a combine of the first dispatch's rows.
    """

    dispatch: Callable[[], object]
    combine: Callable[[], object]


SeedPathFn = Callable[[dict[str, Any], torch.Tensor, torch.Tensor, torch.Tensor, int, Any], SeedPath]
"""``(knobs, x, topk_idx, topk_weights, num_experts, group) -> SeedPath``: the seed functions' path on
these inputs (``x``: ``[N, H]`` tokens; ``topk_idx``/``topk_weights``: ``[N, K]``), called on the buffer
with ``knobs`` (missing ones: the defaults). Collective: it runs one dispatch to have rows to combine."""


@dataclass(frozen=True)
class Stages:
    """The stages of one fresh dispatch, each a call to time on its own.

    Attributes:
        calls: stage name -> a call that runs that stage alone (``None``: a stage this dispatch does
            not run), in the order the dispatch runs them.
        kernel: the cached dispatch (reusing the first dispatch's handle).
        how: how the stages run, in words (e.g. ``graph, triton``).
    """

    calls: dict[str, Callable[[], object] | None]
    kernel: Callable[[], object]
    how: str


StagesFn = Callable[[Any, torch.Tensor, torch.Tensor, torch.Tensor, int, Any], Stages]
"""``(comm, x, topk_idx, topk_weights, num_experts, group) -> Stages`` of a dispatch of these inputs with
``comm``'s dispatch config (``comm``: a :class:`~fused_a2a.autograd.Comm` of the backend). Collective: it
runs one dispatch first."""
