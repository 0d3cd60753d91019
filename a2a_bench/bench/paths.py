"""What each way of calling a backend costs per call, side by side in one run: the library's own uncached
dispatch and its combine (``raw``), fused_a2a's backend-neutral ``api``, the ``seed`` functions (and the
library calls they wrap, ``seed raw``, where those differ from ``raw``), and the cached dispatch
(``kernel``), each with the same knobs and inputs.

The calls that share a buffer are timed alternately (``raw``, ``api``, ``kernel``; then ``seed raw``,
``seed``), so their ratios compare like with like; each figure is the slowest rank's time per call
(CUDA events on a GPU, so a call's host synchronisation is inside it), tokens without grad.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist

import fused_a2a
from a2a_bench.engine.measure import Stats, time_alternating
from a2a_bench.engine.workload import WorkloadSpec, make_inputs
from fused_a2a.backends import get_backend
from fused_a2a.seed.round_trip import seed_calls
from fused_a2a.shape import CallShape
from fused_a2a.tuning.agreement import agreed_comm

PATHS = ("raw", "api", "kernel", "seed raw", "seed")


@dataclass(frozen=True)
class PathTimes:
    """One backend and workload: per-call time of each path.

    Attributes:
        backend, workload: what ran.
        dispatch, combine: path name (of :data:`PATHS`) -> its :class:`Stats`, µs per call (a path the
            backend lacks is missing; ``kernel`` has no combine of its own).
    """

    backend: str
    workload: WorkloadSpec
    dispatch: dict[str, Stats]
    combine: dict[str, Stats]

    def ratio(self, op: str, path: str, base: str) -> float | None:
        """Median of ``path`` over the median of ``base`` for ``op`` (``dispatch``/``combine``), or ``None``."""
        times = getattr(self, op)
        if path not in times or base not in times or times[base].median <= 0:
            return None
        return times[path].median / times[base].median


def _time(named: dict[str, Callable[[], Any]], warmup: int, iters: int, device: torch.device, group) -> dict[str, Stats]:
    return dict(zip(named, time_alternating(list(named.values()), warmup, iters, device, group)))


def measure_paths(backend: str, workload: WorkloadSpec, warmup: int, iters: int, device: torch.device,
                  group=None) -> PathTimes:
    """:class:`PathTimes` of ``backend`` for ``workload`` with the knobs fused_a2a resolves for it
    (explicit none: environment, tuning table, defaults). Collective over ``group``."""
    inputs = make_inputs(workload, dist.get_rank(group))
    x, idx, weights = (t.to(device) for t in (inputs.x, inputs.topk_idx, inputs.topk_weights))
    num_experts, spec = workload.num_experts, get_backend(backend)
    with torch.no_grad():
        api_out = fused_a2a.dispatch(x, idx, weights, num_experts, group, backend=backend)
        shape = CallShape(workload.dtype, workload.hidden, workload.topk, num_experts)
        comm = agreed_comm(backend, group, shape, workload.num_tokens, {}).comm
        # the backend's own buffer, as the api dispatch left it (HybridEP's adapter routes itself: its raw
        # calls go to the HybridEPBuffer the api dispatch used)
        calls = spec.direct_calls("api", spec.buffer_slot.current(group), comm, idx, weights, num_experts, group)
        raw_rows, raw_handle = calls.dispatch(x)
        dispatch = {"raw": lambda: calls.dispatch(x),
                    "api": lambda: fused_a2a.dispatch(x, idx, weights, num_experts, group, backend=backend)}
        if calls.cached is not None:
            dispatch["kernel"] = lambda: calls.cached(x, raw_handle, raw_rows)
        combine = {"raw": lambda: calls.combine(raw_rows, raw_handle),
                   "api": lambda: fused_a2a.combine(api_out[0], api_out[4])}
        times_dispatch = _time(dispatch, warmup, iters, device, group)
        times_combine = _time(combine, warmup, iters, device, group)
        seed = seed_calls(backend, x, idx, weights, num_experts, group)
        if seed is not None:
            seed_rows, seed_handle = seed.dispatch()  # HybridEP: its seed path's buffer is now the current one
            named_dispatch, named_combine = {"seed": seed.dispatch}, {"seed": lambda: seed.combine(seed_rows, seed_handle)}
            if spec.seed_path is not None:  # the seed functions make other calls than the api: time those too
                seed_direct = spec.direct_calls("seed", spec.buffer_slot.current(group), comm, idx, weights, num_experts,
                                                group)
                seed_raw_rows, seed_raw_handle = seed_direct.dispatch(x)
                named_dispatch["seed raw"] = lambda: seed_direct.dispatch(x)
                named_combine["seed raw"] = lambda: seed_direct.combine(seed_raw_rows, seed_raw_handle)
            times_dispatch.update(_time(named_dispatch, warmup, iters, device, group))
            times_combine.update(_time(named_combine, warmup, iters, device, group))
    return PathTimes(backend, workload, times_dispatch, times_combine)

