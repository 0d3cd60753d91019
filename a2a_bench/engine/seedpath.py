"""The seed module's path of a backend, as a sweep times it (mode ``seed``).

For ``hybridep`` it is HybridEP's permute path, ``dispatch_with_permute`` then ``combine_with_unpermute``
(expert-major rows: what Automodel's and Megatron's ``hybrid_ep_dispatch``/``hybrid_ep_combine`` run),
called on the buffer with the point's knobs. The other backends' seed functions run the same kernels as
the ``api`` mode, so they have no separate seed path here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist

from fused_a2a.backends import get_backend


@dataclass(frozen=True)
class SeedPath:
    """A dispatch of one point's inputs and a combine of its rows, ready to time.

    Attributes:
        dispatch: a fresh permute + dispatch (routing metadata included).
        combine: a combine + unpermute of the first dispatch's rows.
    """

    dispatch: Callable[[], object]
    combine: Callable[[], object]


def seed_path(backend: str, knobs: dict[str, Any], x: torch.Tensor, topk_idx: torch.Tensor, weights: torch.Tensor,
              num_experts: int, group=None) -> SeedPath | None:
    """The seed path of ``backend`` with ``knobs`` on these inputs, ``None`` for a backend without one.
    Collective: it runs one dispatch to have rows to combine."""
    if backend != "hybridep":
        return None
    from fused_a2a.backends import hybridep_buffer
    from fused_a2a.backends.hybridep_routing import topk_to_routing_map

    full = {**get_backend(backend).defaults(), **knobs}
    settings = hybridep_buffer.Settings.from_knobs(full, full)
    local = num_experts // dist.get_world_size(group)
    buffer = hybridep_buffer.ensure_buffer(group, x.size(1), local, x.size(0), settings)
    routing_map, probs = topk_to_routing_map(topk_idx, weights, num_experts)
    dispatch_kw = {"fuse_permute_dispatch": True} if settings.fused else {}
    combine_kw = {"fuse_unpermute_combine": True} if settings.fused else {}

    def dispatch():
        hybridep_buffer.apply_environment(settings)
        return buffer.dispatch_with_permute(hidden=x, routing_map=routing_map, probs=probs,
                                            num_of_experts_per_rank=local, **dispatch_kw)

    rows, _, _, _, handle = dispatch()

    def combine():
        hybridep_buffer.apply_environment(settings)
        return buffer.combine_with_unpermute(hidden=rows, handle=handle, **combine_kw)

    return SeedPath(dispatch, combine)
