"""The dispatch + combine round trips a training step makes through fused_a2a, as the benchmarks time them."""

from __future__ import annotations

from typing import Any, Callable

import fused_a2a
from fused_a2a.seed.round_trip import seed_calls


def round_trips(backend: str, x, idx, weights, num_experts: int, group=None) -> dict[str, Callable[[], Any]]:
    """Round trips of ``x`` (``[N, H]``) routed by ``idx``/``weights`` (``[N, K]``) through ``backend``
    with the knobs fused_a2a resolves (nothing passed: arguments > ``FUSED_A2A_*`` > table > defaults):
    ``"api"`` (``fused_a2a.dispatch``/``combine``) and, for a backend of the seed module, ``"seed"``
    (its seed functions, :func:`fused_a2a.seed.round_trip.seed_calls`: ``fused_dispatch``/``fused_combine``,
    ``uccl_fused_dispatch``/``uccl_fused_combine``, or ``hybrid_ep_dispatch``/``hybrid_ep_combine`` with the
    routing map and probabilities its callers build, made here once). The routing a call declares comes
    from ``$FUSED_A2A_ROUTING``."""
    def api():
        out = fused_a2a.dispatch(x, idx, weights, num_experts, group, backend=backend)
        return fused_a2a.combine(out[0], out[4])

    paths = {"api": api}
    seed = seed_calls(backend, x, idx, weights, num_experts, group)
    if seed is not None:
        paths["seed"] = seed.round_trip
    return paths
