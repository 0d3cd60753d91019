"""A dispatch and a combine through one backend's seed functions, in one form for every backend that has
them (what ``a2a-bench speedup``, ``overhead`` and ``paths`` time as the ``seed`` path).

``fused_dispatch``/``fused_combine`` (DeepEP), ``uccl_fused_dispatch``/``uccl_fused_combine`` (UCCL) take
top-k routing; ``hybrid_ep_dispatch``/``hybrid_ep_combine`` (HybridEP) take a dense routing map and
probabilities, made here once as their callers make them
(:func:`fused_a2a.backends.hybridep_routing.topk_to_routing_map`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist

from fused_a2a.backends.hybridep_routing import topk_to_routing_map
from fused_a2a.seed.deepep import fused_combine, fused_dispatch
from fused_a2a.seed.hybridep import hybrid_ep_combine, hybrid_ep_dispatch
from fused_a2a.seed.uccl import uccl_fused_combine, uccl_fused_dispatch


@dataclass(frozen=True)
class SeedCalls:
    """One backend's seed functions bound to one rank's inputs.

    Attributes:
        dispatch: ``() -> (rows, handle)``: the seed dispatch of the inputs (rows: ``[R, H]``).
        combine: ``(rows, handle) -> combined``: the seed combine of rows a dispatch returned.
    """

    dispatch: Callable[[], tuple[Any, Any]]
    combine: Callable[[Any, Any], Any]

    def round_trip(self) -> Any:
        """A dispatch and the combine of its rows."""
        return self.combine(*self.dispatch())


def _topk_calls(dispatch_fn: Callable, combine_fn: Callable) -> Callable[..., SeedCalls]:
    def bind(x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, num_experts: int, group) -> SeedCalls:
        def dispatch():
            out = dispatch_fn(x, idx, weights, num_experts, group)
            return out[0], out[4]

        return SeedCalls(dispatch, lambda rows, handle: combine_fn(rows, group, handle))

    return bind


def _routing_map_calls(x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, num_experts: int, group) -> SeedCalls:
    routing_map, probs = topk_to_routing_map(idx, weights, num_experts)
    local = num_experts // dist.get_world_size(group)

    def dispatch():
        out = hybrid_ep_dispatch(x, routing_map, probs, group, local)
        return out[0], out[4]

    return SeedCalls(dispatch, lambda rows, handle: hybrid_ep_combine(rows, handle))


# backend name -> its seed functions, bound to inputs
_SEED_CALLS: dict[str, Callable[..., SeedCalls]] = {
    "deepep": _topk_calls(fused_dispatch, fused_combine),
    "hybridep": _routing_map_calls,
    "uccl": _topk_calls(uccl_fused_dispatch, uccl_fused_combine),
}


def seed_calls(backend: str, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, num_experts: int,
               group=None) -> SeedCalls | None:
    """The seed functions of ``backend`` bound to ``x`` (``[N, H]``) routed by ``idx``/``weights``
    (``[N, K]``) among ``num_experts`` experts of ``group``, with the knobs they resolve themselves
    (nothing passed); ``None`` for a backend the seed module has no functions of."""
    bind = _SEED_CALLS.get(backend)
    return None if bind is None else bind(x, idx, weights, num_experts, group)
