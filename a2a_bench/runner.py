"""Measure one point on every rank: inputs, verification, timing in both modes, bytes → one row."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable

import torch
import torch.distributed as dist

import fused_a2a
from a2a_bench.measure import comm_device, gbps, mean_over_ranks, received_bytes, time_op
from a2a_bench.spec import SMS_KNOB, Point
from a2a_bench.verify import verify
from a2a_bench.workload import dispatch_input, make_inputs
from fused_a2a.autograd import get_hidden_bytes
from fused_a2a.fp8 import dequantize_fp8, is_fp8_pair
from fused_a2a.backends import get_backend, make_comm
from fused_a2a.backends.torch_a2a import get_torch_buffer


@dataclass(frozen=True)
class RunContext:
    """Where a sweep runs: this rank's device, the group, the cluster id and the measured link peak."""

    device: torch.device
    cluster: str
    link_peak_gbps: float
    warmup: int
    iters: int
    group: Any = None
    on_phase: Callable[[str], None] = lambda name: None


def base_row(point: Point, ctx: RunContext) -> dict[str, Any]:
    """The columns that describe a point, before anything is measured."""
    w = point.workload
    backend = get_backend(point.backend)
    knobs = point.knob_dict
    return {
        "point_id": point.point_id, "backend": point.backend, "knobs": json.dumps(knobs, sort_keys=True),
        "is_default": knobs == backend.defaults(), "num_sms": knobs.get(SMS_KNOB, ""),
        "world_size": point.world_size, "cluster": ctx.cluster, "dtype": w.dtype, "hidden": w.hidden,
        "num_tokens": w.num_tokens, "topk": w.topk, "num_experts": w.num_experts, "routing": w.routing,
        "skew": w.skew, "seed": w.seed, "warmup": ctx.warmup, "iters": ctx.iters, "verified": False,
        "link_peak_gbps": round(ctx.link_peak_gbps, 1),
        "timestamp": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def skip_reason(point: Point) -> str | None:
    """Why the point cannot run here (backend not installed, invalid knob combination), or ``None``."""
    backend = get_backend(point.backend)
    reason = backend.unavailable()
    if reason is not None:
        return f"backend not available: {reason}"
    if point.workload.dtype not in backend.dtypes:
        return f"{point.backend} moves {', '.join(backend.dtypes)} tokens only"
    return backend.invalid(point.knob_dict, point.world_size)


def run_point(point: Point, ctx: RunContext) -> dict[str, Any]:
    """Measure ``point``; collective over ``ctx.group``; every rank returns the same row."""
    row = base_row(point, ctx)
    reason = skip_reason(point)
    if reason is not None:
        return {**row, "status": f"skipped: {reason}"}
    w, group, device = point.workload, ctx.group, ctx.device
    rank = dist.get_rank(group)
    ctx.on_phase("inputs")
    inputs = make_inputs(w, rank)
    x, topk_idx, weights = (t.to(device) for t in (inputs.x, inputs.topk_idx, inputs.topk_weights))
    x = dispatch_input(w, x)
    digests: list[str | None] = [None] * point.world_size
    dist.all_gather_object(digests, inputs.digest(), group=group)
    row["inputs_hash"] = hashlib.sha256("".join(digests).encode()).hexdigest()[:16]

    ctx.on_phase("verify")
    problem = verify(point.backend, point.knob_dict, x, topk_idx, weights, w.num_experts, w.seed, group)
    if problem is not None:
        return {**row, "status": f"error: verification failed: {problem}"}
    row["verified"] = True

    ctx.on_phase("dispatch_kernel")
    comm = make_comm(point.backend, point.knob_dict, num_ranks=point.world_size)
    buffer = comm.get_buffer(group, get_hidden_bytes(x))
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, w.num_experts)
    recv_x, _, _, _, handle, _ = buffer.dispatch(
        x, topk_idx=topk_idx, topk_weights=weights, num_tokens_per_rank=per_rank,
        is_token_in_rank=in_rank, num_tokens_per_expert=per_expert, config=comm.dispatch_config,
    )
    timings = {"dispatch_kernel": time_op(lambda: buffer.dispatch(x, handle=handle, config=comm.dispatch_config),
                                          ctx.warmup, ctx.iters, device, group)}
    ctx.on_phase("combine_kernel")
    recv_rows = _combinable(recv_x)
    timings["combine_kernel"] = time_op(lambda: buffer.combine(recv_rows, handle, config=comm.combine_config),
                                        ctx.warmup, ctx.iters, device, group)

    api_handle = []

    def api_dispatch():
        api_handle[:] = [fused_a2a.dispatch(x, topk_idx, weights, w.num_experts, group, backend=point.backend, **point.knob_dict)]

    with torch.no_grad():
        ctx.on_phase("dispatch_api")
        timings["dispatch_api"] = time_op(api_dispatch, ctx.warmup, ctx.iters, device, group)
        api_recv_x, handle_api = _combinable(api_handle[0][0]), api_handle[0][4]
        ctx.on_phase("combine_api")
        timings["combine_api"] = time_op(lambda: fused_a2a.combine(api_recv_x, handle_api), ctx.warmup, ctx.iters, device, group)
    for name, stats in timings.items():
        row.update(stats.as_columns(f"{name}_us"))

    rows_in, rows_crossed = received_bytes(_recv_counts(topk_idx, w.num_experts, group), rank, row_bytes=1)
    rows_in, rows_crossed = mean_over_ranks(rows_in, device, group), mean_over_ranks(rows_crossed, device, group)
    row["recv_tokens"] = round(rows_in, 1)
    for op, row_bytes in (("dispatch", _row_bytes(x)), ("combine", _row_bytes(recv_rows))):
        total, crossed = rows_in * row_bytes, rows_crossed * row_bytes
        median = timings[f"{op}_kernel"].median
        row[f"{op}_algbw_gbps"] = round(gbps(total, median), 2)
        row[f"{op}_xbw_gbps"] = round(gbps(crossed, median), 2)
        row[f"{op}_xbw_frac_peak"] = round(gbps(crossed, median) / ctx.link_peak_gbps, 3) if ctx.link_peak_gbps else ""
    return {**row, "status": "ok"}


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
    per_rank = get_torch_buffer(group).get_dispatch_layout(topk_idx, num_experts)[0].to(torch.int64)
    per_rank = per_rank.to(comm_device(topk_idx.device, group))
    gathered = [torch.empty_like(per_rank) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, per_rank, group=group)
    rank = dist.get_rank(group)
    return [int(counts[rank]) for counts in gathered]
