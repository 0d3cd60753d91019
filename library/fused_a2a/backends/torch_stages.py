"""The stages of the torch backend's fresh dispatch, each callable on its own (``a2a-bench breakdown``).

Stages of ``TorchBuffer.dispatch``: ``plan`` (the routing computed from top-k and exchanged with the
counts, :mod:`fused_a2a.backends.torch_routing`: one CUDA-graph replay on a GPU with NCCL, Triton
kernels where Triton runs), ``sync`` (the same plus the host synchronisation and reading the counts),
``copy`` (the copy of a replayed graph's buffer that the dispatch keeps; none where the graph's Triton
kernels write a new buffer each call, or the plan runs eagerly), ``tokens`` (the token exchange: all a
cached, ``kernel``-mode dispatch does) and ``routing again`` (the routing rows exchanged once more,
which only a dispatch where some rank holds more tokens than the capacity pays).
"""

from __future__ import annotations

import torch

import fused_a2a.backends.torch_routing_kernels as kernels
from fused_a2a.backends.direct import Stages
from fused_a2a.backends.torch_routing import read_counts, routing_rows


def torch_stages(comm, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, num_experts: int,
                 group=None) -> Stages:
    """The :class:`~fused_a2a.backends.direct.Stages` of a dispatch of ``x`` (``[N, H]``) routed by
    ``idx``/``weights`` (``[N, K]``) on the torch backend's buffer of ``group`` with the dispatch config
    of ``comm`` (a torch :class:`~fused_a2a.autograd.Comm`). Collective: it dispatches once."""
    buffer, config = comm.get_buffer(group, x), comm.dispatch_config
    out = buffer.dispatch(x, topk_idx=idx, topk_weights=weights, num_experts=num_experts, config=config)
    handle = out[4]
    plan, shared = buffer.plan(idx, weights, num_experts)

    def planned():
        plan = buffer.plan(idx, weights, num_experts)[0]
        if x.device.type == "cuda":
            torch.cuda.current_stream(x.device).synchronize()
        return read_counts(plan.host, buffer.group_size, num_experts)

    counts = planned()
    rows = routing_rows(idx, weights, handle.send_token_idx, counts.send, num_experts // buffer.group_size)
    topk = idx.size(1)
    calls = {
        "plan": lambda: buffer.plan(idx, weights, num_experts),
        "sync": planned,
        "copy": plan.out.clone if shared else None,
        "tokens": lambda: buffer.exchange_tokens(x, handle.send_token_idx, counts.send, counts.recv, config),
        "routing again": lambda: buffer.exchange_routing(rows, topk, counts, config),
    }
    how = f"{'graph' if shared else 'eager'}, {'triton' if kernels.usable(idx) else 'torch ops'}"
    return Stages(calls, lambda: buffer.dispatch(x, handle=handle, config=config), how)
