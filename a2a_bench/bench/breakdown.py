"""Where a backend's ``api`` dispatch spends its time: each stage timed on its own (the torch backend's:
the one whose spec lists its stages, :mod:`fused_a2a.backends.torch_stages` names them).

Each stage of a fresh dispatch is timed alone; then the whole ``fused_a2a.dispatch`` and the ``kernel``
dispatch, timed alternately so their ratio compares like with like. Each figure is the slowest rank's
time per call (CUDA events on GPU).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

import fused_a2a
from a2a_bench.engine.measure import Stats, time_alternating, time_op
from a2a_bench.engine.workload import WorkloadSpec, make_inputs
from fused_a2a.backends import BACKENDS, BackendSpec, make_comm


@dataclass(frozen=True)
class Breakdown:
    """One workload's stage times and the api/kernel comparison.

    Attributes:
        workload: what was dispatched.
        impl: the backend's ``impl`` knob.
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


def staged_backend() -> BackendSpec:
    """The backend ``breakdown`` times stage by stage: the one whose spec lists its stages."""
    return next(spec for spec in BACKENDS.values() if spec.stages is not None)


def measure_breakdown(workload: WorkloadSpec, impl: str, warmup: int, iters: int, device: torch.device,
                      group=None) -> Breakdown:
    """Time each stage of a dispatch of ``workload`` by :func:`staged_backend` with knob ``impl``. Collective."""
    spec = staged_backend()
    inputs = make_inputs(workload, dist.get_rank(group))
    x, idx, weights = (t.to(device) for t in (inputs.x, inputs.topk_idx, inputs.topk_weights))
    num_experts = workload.num_experts
    stages = spec.stages(make_comm(spec.name, {"impl": impl}), x, idx, weights, num_experts, group)
    timed = lambda fn: time_op(fn, warmup, iters, device, group)  # noqa: E731
    times = {name: None if call is None else timed(call) for name, call in stages.calls.items()}

    def api():
        with torch.no_grad():
            fused_a2a.dispatch(x, idx, weights, num_experts, group, backend=spec.name, impl=impl)

    api_stats, kernel_stats = time_alternating([api, stages.kernel], warmup, iters, device, group)
    return Breakdown(workload, impl, stages.how, times, api_stats, kernel_stats)
