"""Measure one point on every rank: inputs, first call (compile), verification, timing in every mode,
bytes and imbalance → one row.

Modes (columns ``{dispatch,combine}_<mode>_us_*``): ``kernel`` (the buffer's cached dispatch and its
combine: what DeepEP's and HybridEP's own tests time), ``api`` (the full ``fused_a2a.dispatch`` /
``combine`` a training step makes), ``seed`` (the seed functions' own path where it differs from ``api``:
HybridEP's permute path, ``BackendSpec.seed_path``) and ``graph`` (the ``kernel`` calls captured in one
CUDA graph each and replayed: no launch overhead; ``graph_status`` says why a backend could not be
captured).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable

import torch
import torch.distributed as dist

import fused_a2a
from a2a_bench.engine.measure import (
    NotCapturable, Stats, capture, comm_device, gbps, imbalance, mean_over_ranks, received_bytes, time_op,
)
from a2a_bench.engine.installed import not_installed
from a2a_bench.engine.spec import REFERENCE, Point
from a2a_bench.engine.verify import RoundTrip, reference_round_trip, verify
from a2a_bench.engine.workload import dispatch_input, make_inputs
from fused_a2a.backends import get_backend, make_comm
from fused_a2a.fp8 import dequantize_fp8, is_fp8_pair
from fused_a2a.shape import CallShape


@dataclass(frozen=True)
class RunContext:
    """Where a sweep runs: this rank's device, the group, the cluster id and the measured link peak.

    Attributes:
        device: this rank's device.
        cluster: the cluster id.
        link_peak_gbps: the measured link peak, GB/s.
        warmup, iters: untimed and timed iterations per mode.
        group: the process group (``None``: the default one).
        on_phase: called with each phase's name as the point reaches it (watchdog, progress).
        ranks_per_node: ranks of one node (the limits of HybridEP depend on it).
        gpu_sharing: how ranks share a GPU (``"mps"``, ``"timeslice"``; ``None``: they do not).
        ranks_per_gpu: the most ranks on one GPU.
        prepared: the last workload's :class:`Prepared` inputs (points of one workload follow each
            other: every knob setting reuses them; a sweep's contexts share it).
    """

    device: torch.device
    cluster: str
    link_peak_gbps: float
    warmup: int
    iters: int
    group: Any = None
    on_phase: Callable[[str], None] = lambda name: None
    ranks_per_node: int | None = None
    gpu_sharing: str | None = None
    ranks_per_gpu: int = 1
    prepared: dict = field(default_factory=dict)


@dataclass
class Prepared:
    """One workload's inputs on this rank's device, made once for all its knob settings.

    Attributes:
        key: ``(workload, rank, device)`` they were made for.
        x: the dispatch input (tokens, or an FP8 pair), topk_idx, weights: as :func:`make_inputs`.
        inputs_hash: the hash of every rank's inputs.
        reference: the torch reference's round trip (:func:`reference_round_trip`), once computed.
    """

    key: tuple
    x: Any
    topk_idx: torch.Tensor
    weights: torch.Tensor
    inputs_hash: str
    reference: RoundTrip | None = None


def prepare(point: Point, ctx: RunContext) -> Prepared:
    """The inputs of ``point``'s workload on this rank: those of the previous point when it had the
    same workload, else made (seeded), moved to the device and hashed over the group. Collective
    when made (every rank of a sweep runs the same points in the same order, so all make them or none)."""
    w, rank = point.workload, dist.get_rank(ctx.group)
    key = (w, rank, ctx.device)
    last = ctx.prepared.get("last")
    if last is not None and last.key == key:
        return last
    ctx.prepared.clear()
    inputs = make_inputs(w, rank)
    x, topk_idx, weights = (t.to(ctx.device) for t in (inputs.x, inputs.topk_idx, inputs.topk_weights))
    digests: list[str | None] = [None] * point.world_size
    dist.all_gather_object(digests, inputs.digest(), group=ctx.group)
    inputs_hash = hashlib.sha256("".join(digests).encode()).hexdigest()[:16]
    ctx.prepared["last"] = Prepared(key, dispatch_input(w, x), topk_idx, weights, inputs_hash)
    return ctx.prepared["last"]


def base_row(point: Point, ctx: RunContext) -> dict[str, Any]:
    """The columns that describe a point, before anything is measured."""
    w = point.workload
    backend = get_backend(point.backend)
    knobs = point.knob_dict
    sms = backend.num_sms(knobs)
    return {
        "point_id": point.point_id, "backend": point.backend, "knobs": json.dumps(knobs, sort_keys=True),
        "is_default": knobs == backend.defaults(), "num_sms": "" if sms is None else sms,
        "world_size": point.world_size, "cluster": ctx.cluster, "gpu_sharing": ctx.gpu_sharing or "none",
        "ranks_per_gpu": ctx.ranks_per_gpu, "comparable": ctx.gpu_sharing != "timeslice", "dtype": w.dtype,
        "hidden": w.hidden, "num_tokens": w.num_tokens, "topk": w.topk, "num_experts": w.num_experts, "routing": w.routing,
        "skew": w.skew, "seed": w.rng_seed, "warmup": ctx.warmup, "iters": ctx.iters, "verified": False,
        "build": backend.version() or "", "torch": get_backend(REFERENCE).version(),
        "link_peak_gbps": round(ctx.link_peak_gbps, 1),
        "timestamp": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def skip_reason(point: Point, ranks_per_node: int | None = None) -> str | None:
    """Why the point cannot run here (backend not installed, dtype, a shape or knob combination the
    backend rejects), or ``None``. Pure apart from the installed check."""
    backend = get_backend(point.backend)
    missing = not_installed(point.backend)
    if missing is not None:
        return missing
    w = point.workload
    if w.dtype not in backend.dtypes:
        return f"{point.backend} moves {', '.join(backend.dtypes)} tokens only"
    shape = CallShape(w.dtype, w.hidden, w.topk, w.num_experts, world_size=point.world_size,
                      tokens=(w.num_tokens,) * point.world_size, ranks_per_node=ranks_per_node)
    return backend.shape_problem(shape, point.knob_dict) or backend.invalid(point.knob_dict, point.world_size)


def run_point(point: Point, ctx: RunContext) -> dict[str, Any]:
    """Measure ``point``; collective over ``ctx.group``; every rank returns the same row."""
    row = base_row(point, ctx)
    reason = skip_reason(point, ctx.ranks_per_node)
    if reason is not None:
        return {**row, "status": f"skipped: {reason}"}
    w, group, device = point.workload, ctx.group, ctx.device
    rank = dist.get_rank(group)
    ctx.on_phase("inputs")
    prepared = prepare(point, ctx)
    x, topk_idx, weights = prepared.x, prepared.topk_idx, prepared.weights
    row["inputs_hash"] = prepared.inputs_hash

    ctx.on_phase("compile")
    started = time.perf_counter()
    with torch.no_grad():
        first = fused_a2a.dispatch(x, topk_idx, weights, w.num_experts, group, backend=point.backend, **point.knob_dict)
        fused_a2a.combine(_combinable(first[0]), first[4])
    _synchronize(device)
    row["compile_s"] = round(time.perf_counter() - started, 3)

    ctx.on_phase("verify")
    if prepared.reference is None:
        prepared.reference = reference_round_trip(x, topk_idx, weights, w.num_experts, w.rng_seed, group)
    problem = verify(point.backend, point.knob_dict, x, topk_idx, weights, w.num_experts, w.rng_seed, group,
                     prepared.reference)
    if problem is not None:
        return {**row, "status": f"error: verification failed: {problem}"}
    row["verified"] = True

    timings, graph_status = _time_modes(point, ctx, x, topk_idx, weights)
    row["graph_status"] = graph_status
    for name, stats in timings.items():
        row.update(stats.as_columns(f"{name}_us"))

    recv_counts = _recv_counts(topk_idx, w.num_experts, group)
    row.update(_imbalance(recv_counts, topk_idx, w.num_experts, device, group).as_columns())
    rows_in, rows_crossed = received_bytes(recv_counts, rank, row_bytes=1)
    rows_in, rows_crossed = mean_over_ranks(rows_in, device, group), mean_over_ranks(rows_crossed, device, group)
    for op, row_bytes in (("dispatch", _row_bytes(x)), ("combine", _row_bytes(_combinable(first[0])))):
        total, crossed = rows_in * row_bytes, rows_crossed * row_bytes
        median = timings[f"{op}_kernel"].median
        row[f"{op}_algbw_gbps"] = round(gbps(total, median), 2)
        row[f"{op}_xbw_gbps"] = round(gbps(crossed, median), 2)
        row[f"{op}_xbw_frac_peak"] = round(gbps(crossed, median) / ctx.link_peak_gbps, 3) if ctx.link_peak_gbps else ""
    return {**row, "status": "ok"}


def _time_modes(point: Point, ctx: RunContext, x, topk_idx, weights) -> tuple[dict[str, Stats], str]:
    """Every mode's timings (``<op>_<mode>`` -> Stats) and the graph mode's status. Collective."""
    w, group, device = point.workload, ctx.group, ctx.device
    timed = lambda fn: time_op(fn, ctx.warmup, ctx.iters, device, group)  # noqa: E731
    comm = make_comm(point.backend, point.knob_dict, num_ranks=point.world_size)
    buffer = comm.get_buffer(group, x)
    with torch.no_grad():
        fresh = fused_a2a.dispatch(x, topk_idx, weights, w.num_experts, group, backend=point.backend, **point.knob_dict)
    handle, recv_rows = fresh[4].raw, _combinable(fresh[0])

    def kernel_dispatch():
        return buffer.dispatch(x, handle=handle, config=comm.dispatch_config)

    def kernel_combine():
        return buffer.combine(recv_rows, handle, config=comm.combine_config)

    ctx.on_phase("dispatch_kernel")
    timings = {"dispatch_kernel": timed(kernel_dispatch)}
    ctx.on_phase("combine_kernel")
    timings["combine_kernel"] = timed(kernel_combine)

    api_handle = []

    def api_dispatch():
        api_handle[:] = [fused_a2a.dispatch(x, topk_idx, weights, w.num_experts, group, backend=point.backend,
                                            **point.knob_dict)]

    with torch.no_grad():
        ctx.on_phase("dispatch_api")
        timings["dispatch_api"] = timed(api_dispatch)
        api_rows, api_handle_of = _combinable(api_handle[0][0]), api_handle[0][4]
        ctx.on_phase("combine_api")
        timings["combine_api"] = timed(lambda: fused_a2a.combine(api_rows, api_handle_of))
        seed_path = get_backend(point.backend).seed_path
        seed = None if is_fp8_pair(x) or seed_path is None else seed_path(point.knob_dict, x, topk_idx, weights,
                                                                          w.num_experts, group)
        if seed is not None:
            ctx.on_phase("dispatch_seed")
            timings["dispatch_seed"] = timed(seed.dispatch)
            ctx.on_phase("combine_seed")
            timings["combine_seed"] = timed(seed.combine)

    ctx.on_phase("graph")
    status = _graph_status(device, group)
    if status == "ok":
        try:
            graphs = {op: capture(fn, device) for op, fn in (("dispatch", kernel_dispatch), ("combine", kernel_combine))}
        except NotCapturable as why:
            status = f"not capturable ({why})"
        statuses: list[str | None] = [None] * dist.get_world_size(group)
        dist.all_gather_object(statuses, status, group=group)
        status = next((s for s in statuses if s != "ok"), "ok")
        if status == "ok":
            for op, replay in graphs.items():
                timings[f"{op}_graph"] = timed(replay)
    return timings, status


def _graph_status(device: torch.device, group) -> str:
    """``ok`` where a capture can be tried, else why not (the same on every rank)."""
    if device.type != "cuda":
        return "not capturable (CPU: CUDA graphs need a GPU)"
    return "ok"


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _row_bytes(x) -> int:
    """Bytes one token row takes on the wire: FP8 values plus their float32 scales, else ``H * element size``."""
    if is_fp8_pair(x):
        return x[0].size(1) * x[0].element_size() + x[1].size(1) * x[1].element_size()
    return x.size(1) * x.element_size()


def _combinable(recv_x):
    """Received rows as combine takes them: an FP8 pair dequantised to bf16 (what the experts return)."""
    return dequantize_fp8(*recv_x).to(torch.bfloat16) if is_fp8_pair(recv_x) else recv_x


def _recv_counts(topk_idx: torch.Tensor, num_experts: int, group) -> list[int]:
    """Tokens this rank receives from each source rank in a dispatch of ``topk_idx``. Collective."""
    per_rank = get_backend(REFERENCE).buffer_slot.current(group).get_dispatch_layout(topk_idx, num_experts)[0].to(torch.int64)
    per_rank = per_rank.to(comm_device(topk_idx.device, group))
    gathered = [torch.empty_like(per_rank) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, per_rank, group=group)
    rank = dist.get_rank(group)
    return [int(counts[rank]) for counts in gathered]


def _imbalance(recv_counts: list[int], topk_idx: torch.Tensor, num_experts: int, device: torch.device, group):
    """The group's :func:`~a2a_bench.engine.measure.imbalance` (every rank gets the same figures). Collective."""
    where = comm_device(device, group)
    received = torch.zeros(dist.get_world_size(group), dtype=torch.int64, device=where)
    received[dist.get_rank(group)] = sum(recv_counts)
    per_expert = torch.bincount(topk_idx[topk_idx >= 0].cpu(), minlength=num_experts).to(where)
    dist.all_reduce(received, group=group)
    dist.all_reduce(per_expert, group=group)
    return imbalance(received.tolist(), per_expert.tolist())

