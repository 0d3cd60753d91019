"""HybridEP's own Python API called directly on its buffer: what the benchmarks compare fused_a2a against
(:mod:`fused_a2a.backends.direct`), and the seed functions' permute path that a sweep's ``seed`` mode times."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from fused_a2a.backends.direct import DirectCalls, SeedPath
from fused_a2a.backends.hybridep_buffer import Settings, apply_environment, ensure_buffer
from fused_a2a.backends.hybridep_knobs import with_defaults
from fused_a2a.backends.hybridep_routing import ExpertColumns, dense_routing, topk_to_routing_map


def hybridep_calls(path: str, buffer: Any, comm, idx: torch.Tensor, weights: torch.Tensor, num_experts: int,
                   group=None) -> DirectCalls:
    """HybridEP's :data:`~fused_a2a.backends.direct.DirectCallsFn` on a ``HybridEPBuffer``: ``dispatch``/
    ``combine`` with the routing map fused_a2a builds (its columns, phantom experts included) for ``api``;
    the permuting ones with a one-column-per-expert map, as the seed functions' callers build it, for
    ``seed``. ``comm`` is unused: the buffer was built with its settings."""
    world = dist.get_world_size(group)
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


def hybridep_seed_path(knobs: dict[str, Any], x: torch.Tensor, topk_idx: torch.Tensor, weights: torch.Tensor,
                       num_experts: int, group=None) -> SeedPath:
    """HybridEP's permute path, ``dispatch_with_permute`` then ``combine_with_unpermute`` (expert-major rows:
    what Automodel's and Megatron's ``hybrid_ep_dispatch``/``hybrid_ep_combine`` run), called on the buffer
    with ``knobs`` (:data:`~fused_a2a.backends.direct.SeedPathFn`). Collective: it dispatches once."""
    full = with_defaults(knobs)
    settings = Settings.from_knobs(full, full)
    local = num_experts // dist.get_world_size(group)
    buffer = ensure_buffer(group, x.size(1), local, x.size(0), settings)
    routing_map, probs = topk_to_routing_map(topk_idx, weights, num_experts)
    dispatch_kw = {"fuse_permute_dispatch": True} if settings.fused else {}
    combine_kw = {"fuse_unpermute_combine": True} if settings.fused else {}

    def dispatch():
        apply_environment(settings)
        return buffer.dispatch_with_permute(hidden=x, routing_map=routing_map, probs=probs,
                                            num_of_experts_per_rank=local, **dispatch_kw)

    rows, _, _, _, handle = dispatch()

    def combine():
        apply_environment(settings)
        return buffer.combine_with_unpermute(hidden=rows, handle=handle, **combine_kw)

    return SeedPath(dispatch, combine)
