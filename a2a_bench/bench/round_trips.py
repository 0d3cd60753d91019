"""The dispatch + combine round trips a training step makes through fused_a2a, as the benchmarks time them."""

from __future__ import annotations

from typing import Any, Callable

import torch.distributed as dist

import fused_a2a
from fused_a2a.backends.hybridep_routing import topk_to_routing_map

# the seed module's functions of each backend that has them (HybridEP's take a routing map instead)
SEED_FUNCTIONS = {"deepep": (fused_a2a.fused_dispatch, fused_a2a.fused_combine),
                  "uccl": (fused_a2a.uccl_fused_dispatch, fused_a2a.uccl_fused_combine)}


def round_trips(backend: str, x, idx, weights, num_experts: int, group=None) -> dict[str, Callable[[], Any]]:
    """Round trips of ``x`` (``[N, H]``) routed by ``idx``/``weights`` (``[N, K]``) through ``backend``
    with the knobs fused_a2a resolves (nothing passed: arguments > ``FUSED_A2A_*`` > table > defaults):
    ``"api"`` (``fused_a2a.dispatch``/``combine``) and, for a backend of the seed module, ``"seed"``
    (``fused_dispatch``/``fused_combine``, ``uccl_fused_dispatch``/``uccl_fused_combine``, or
    ``hybrid_ep_dispatch``/``hybrid_ep_combine`` with the routing map and probabilities its callers
    build, made here once). The routing a call declares comes from ``$FUSED_A2A_ROUTING``."""
    def api():
        out = fused_a2a.dispatch(x, idx, weights, num_experts, group, backend=backend)
        return fused_a2a.combine(out[0], out[4])

    paths = {"api": api}
    if backend == "hybridep":
        routing_map, probs = topk_to_routing_map(idx, weights, num_experts)
        num_local = num_experts // dist.get_world_size(group)

        def hybridep_seed():
            out = fused_a2a.hybrid_ep_dispatch(x, routing_map, probs, group, num_local)
            return fused_a2a.hybrid_ep_combine(out[0], out[4])

        paths["seed"] = hybridep_seed
    if backend in SEED_FUNCTIONS:
        dispatch_fn, combine_fn = SEED_FUNCTIONS[backend]

        def seed_round_trip():
            out = dispatch_fn(x, idx, weights, num_experts, group)
            return combine_fn(out[0], group, out[4])

        paths["seed"] = seed_round_trip
    return paths
