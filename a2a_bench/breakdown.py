"""Where the torch backend's ``api`` dispatch spends its time: each stage timed on its own.

Stages of ``TorchBuffer.dispatch`` (a fresh dispatch): ``layout`` (counts per rank and expert on the
device), ``counts`` (one exchange of the counts and one host synchronisation), ``rows`` (which token
goes where, with its local expert ids and weights), ``tokens`` (the token exchange: all a cached,
``kernel``-mode dispatch does) and ``routing`` (the ids and weights in one exchange); then the whole
``fused_a2a.dispatch`` and the ``kernel`` dispatch, timed alternately so their ratio compares like
with like. Each figure is the slowest rank's time per call (CUDA events on GPU).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

import fused_a2a
from a2a_bench.measure import Stats, time_alternating, time_op
from a2a_bench.workload import WorkloadSpec, make_inputs
from fused_a2a.backends.torch_a2a import TorchConfig, get_torch_buffer


@dataclass(frozen=True)
class Breakdown:
    """One workload's stage times and the api/kernel comparison.

    Attributes:
        workload: what was dispatched.
        impl: the torch backend's ``impl`` knob.
        stages: stage name -> its time per call.
        api, kernel: the whole ``fused_a2a.dispatch`` and the cached dispatch, timed alternately.
    """

    workload: WorkloadSpec
    impl: str
    stages: dict[str, Stats]
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
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(idx, num_experts)
    counts = buffer.exchange_counts(idx, per_rank, per_expert)
    token, local_idx, local_weights = buffer.send_rows(idx, weights, in_rank, counts, num_experts)
    handle = buffer.dispatch(x, topk_idx=idx, topk_weights=weights, num_tokens_per_rank=per_rank,
                             is_token_in_rank=in_rank, num_tokens_per_expert=per_expert, config=config)[4]
    timed = lambda fn: time_op(fn, warmup, iters, device, group)  # noqa: E731
    stages = {
        "layout": timed(lambda: buffer.get_dispatch_layout(idx, num_experts)),
        "counts": timed(lambda: buffer.exchange_counts(idx, per_rank, per_expert)),
        "rows": timed(lambda: buffer.send_rows(idx, weights, in_rank, counts, num_experts)),
        "tokens": timed(lambda: buffer.exchange_tokens(x, token, counts.send, counts.recv, config)),
        "routing": timed(lambda: buffer.exchange_routing(local_idx, local_weights, counts, config)),
    }

    def api():
        with torch.no_grad():
            fused_a2a.dispatch(x, idx, weights, num_experts, group, backend="torch", impl=impl)

    def kernel():
        buffer.dispatch(x, handle=handle, config=config)

    api_stats, kernel_stats = time_alternating([api, kernel], warmup, iters, device, group)
    return Breakdown(workload, impl, stages, api_stats, kernel_stats)
