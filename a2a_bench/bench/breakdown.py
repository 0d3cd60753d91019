"""Where the torch backend's ``api`` dispatch spends its time: each stage timed on its own.

Stages of ``TorchBuffer.dispatch`` (a fresh dispatch): ``plan`` (the routing computed from top-k and
exchanged with the counts, :mod:`fused_a2a.backends.torch_routing`: one CUDA-graph replay on a GPU with
NCCL, Triton kernels where Triton runs), ``sync`` (the same plus the host synchronisation and reading
the counts), ``copy`` (the copy of a replayed graph's buffer that the dispatch keeps; none where the
graph's Triton kernels write a new buffer each call, or the plan runs eagerly), ``tokens`` (the
token exchange: all a cached, ``kernel``-mode dispatch does) and ``routing again`` (the routing rows
exchanged once more, which only a dispatch where some rank holds more tokens than the capacity pays);
then the whole ``fused_a2a.dispatch`` and the ``kernel`` dispatch, timed alternately so their ratio
compares like with like. Each figure is the slowest rank's time per call (CUDA events on GPU).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

import fused_a2a
from a2a_bench.engine.measure import Stats, time_alternating, time_op
from a2a_bench.engine.workload import WorkloadSpec, make_inputs
import fused_a2a.backends.torch_routing_kernels as kernels
from fused_a2a.backends.torch_a2a import TorchConfig, get_torch_buffer
from fused_a2a.backends.torch_routing import read_counts, routing_rows


@dataclass(frozen=True)
class Breakdown:
    """One workload's stage times and the api/kernel comparison.

    Attributes:
        workload: what was dispatched.
        impl: the torch backend's ``impl`` knob.
        plan: how the routing plan ran: ``graph`` (a replayed CUDA graph) or ``eager``, computed by
            ``triton`` kernels or ``torch ops``.
        stages: stage name -> its time per call (``None``: a stage this dispatch does not run).
        api, kernel: the whole ``fused_a2a.dispatch`` and the cached dispatch, timed alternately.
    """

    workload: WorkloadSpec
    impl: str
    plan: str
    stages: dict[str, Stats | None]
    api: Stats
    kernel: Stats

    @property
    def ratio(self) -> float:
        """api median over kernel median."""
        return self.api.median / self.kernel.median


def measure_breakdown(workload: WorkloadSpec, impl: str, warmup: int, iters: int, device: torch.device,
                      group=None) -> Breakdown:
    """Time each stage of a torch-backend dispatch of ``workload``. Collective."""
    inputs = make_inputs(workload, dist.get_rank(group))
    x, idx, weights = (t.to(device) for t in (inputs.x, inputs.topk_idx, inputs.topk_weights))
    buffer, config, num_experts = get_torch_buffer(group), TorchConfig(impl), workload.num_experts
    out = buffer.dispatch(x, topk_idx=idx, topk_weights=weights, num_experts=num_experts, config=config)
    handle = out[4]
    plan, shared = buffer.plan(idx, weights, num_experts)

    def planned():
        plan = buffer.plan(idx, weights, num_experts)[0]
        if device.type == "cuda":
            torch.cuda.current_stream(device).synchronize()
        return read_counts(plan.host, buffer.group_size, num_experts)

    counts = planned()
    rows = routing_rows(idx, weights, handle.send_token_idx, counts.send, num_experts // buffer.group_size)
    timed = lambda fn: time_op(fn, warmup, iters, device, group)  # noqa: E731
    stages = {
        "plan": timed(lambda: buffer.plan(idx, weights, num_experts)),
        "sync": timed(planned),
        "copy": timed(plan.out.clone) if shared else None,
        "tokens": timed(lambda: buffer.exchange_tokens(x, handle.send_token_idx, counts.send, counts.recv, config)),
        "routing again": timed(lambda: buffer.exchange_routing(rows, workload.topk, counts, config)),
    }

    def api():
        with torch.no_grad():
            fused_a2a.dispatch(x, idx, weights, num_experts, group, backend="torch", impl=impl)

    def kernel():
        buffer.dispatch(x, handle=handle, config=config)

    api_stats, kernel_stats = time_alternating([api, kernel], warmup, iters, device, group)
    how = f"{'graph' if shared else 'eager'}, {'triton' if kernels.usable(idx) else 'torch ops'}"
    return Breakdown(workload, impl, how, stages, api_stats, kernel_stats)
