"""A backend's own calls, made directly on its buffer with the arguments fused_a2a passes: what the
benchmarks compare fused_a2a's paths against (``overhead``: host time added; ``paths``: time per call)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch.distributed as dist

from fused_a2a.backends.hybridep_routing import ExpertColumns, dense_routing, topk_to_routing_map


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


def direct_calls(backend: str, path: str, buffer: Any, comm, idx, weights, num_experts: int, group=None) -> DirectCalls:
    """The buffer calls of one round trip of ``path`` (``api``: what :func:`fused_a2a.dispatch` wraps;
    ``seed``: what the seed functions wrap), made on ``buffer`` with ``comm``'s configs.

    For hybridep, HybridEP's own Python API: ``dispatch``/``combine`` with the routing map fused_a2a
    builds (its columns, phantom experts included) for ``api``; the permuting ones with a one-column-
    per-expert map, as its callers build it, for ``seed``.
    """
    world = dist.get_world_size(group)
    if backend == "hybridep":
        return _hybridep_calls(path, buffer, idx, weights, num_experts, world)

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


def _hybridep_calls(path: str, buffer: Any, idx, weights, num_experts: int, world: int) -> DirectCalls:
    if path == "seed":
        routing_map, probs = topk_to_routing_map(idx, weights, num_experts)

        def dispatch_permute(tokens):
            out = buffer.dispatch_with_permute(
                hidden=tokens, routing_map=routing_map, probs=probs, scaling_factor=None,
                num_of_experts_per_rank=num_experts // world, pad_multiple=None, num_permuted_tokens=None,
                non_blocking=False)
            return out[0], out[4]

        return DirectCalls(dispatch_permute,
                           lambda rows, handle: buffer.combine_with_unpermute(hidden=rows, handle=handle, pad_multiple=None))
    columns = ExpertColumns(num_experts, world)
    routing_map, probs = dense_routing(idx, weights, columns)

    def dispatch(tokens):
        rows, _, _, handle = buffer.dispatch(hidden=tokens, routing_map=routing_map, probs=probs,
                                             num_of_experts=columns.columns)
        return rows, handle

    def cached(tokens, handle, rows):
        return buffer.dispatch(hidden=tokens, handle=handle, num_of_experts=columns.columns,
                               num_dispatched_tokens=rows.size(0))[0]

    return DirectCalls(dispatch, lambda rows, handle: buffer.combine(hidden=rows, handle=handle), cached)
