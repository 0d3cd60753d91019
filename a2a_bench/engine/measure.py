"""Timing and bandwidth: the one rule every backend is measured by.

Every rank times each iteration (CUDA events on GPU, ``perf_counter`` on CPU) after a barrier; an
iteration's time is the slowest rank's. Bandwidths divide bytes by the median of those times.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Stats:
    """Percentiles of per-iteration times, in microseconds."""

    median: float
    p10: float
    p90: float
    min: float
    max: float

    def as_columns(self, prefix: str) -> dict[str, float]:
        return {f"{prefix}_{name}": round(getattr(self, name), 2) for name in ("median", "p10", "p90", "min", "max")}


def summarize(times_us: Sequence[float]) -> Stats:
    """Median, 10th/90th percentiles (linear interpolation), min and max of ``times_us``."""
    if not times_us:
        raise ValueError("no times to summarize")
    t = torch.tensor(list(times_us), dtype=torch.float64)
    q = torch.quantile(t, torch.tensor([0.5, 0.1, 0.9], dtype=torch.float64)).tolist()
    return Stats(median=q[0], p10=q[1], p90=q[2], min=t.min().item(), max=t.max().item())


def time_op(fn: Callable[[], object], warmup: int, iters: int, device: torch.device, group=None) -> Stats:
    """Run ``fn`` ``warmup`` times, then time ``iters`` barrier-aligned runs; slowest rank per iteration.

    Collective: every rank of ``group`` must call it with the same ``warmup`` and ``iters``.
    """
    return time_alternating([fn], warmup, iters, device, group)[0]


def time_alternating(fns: Sequence[Callable[[], object]], warmup: int, iters: int, device: torch.device,
                     group=None) -> list[Stats]:
    """Time several functions in turn (``fns[0]``, ``fns[1]``, ..., repeated ``iters`` times) on the
    same footing: each run barrier-aligned, the slowest rank's time per run. Collective.
    """
    for _ in range(warmup):
        for fn in fns:
            fn()
    local = torch.empty(len(fns), iters, dtype=torch.float64)
    for i in range(iters):
        for j, fn in enumerate(fns):
            local[j, i] = _time_once(fn, device, group)
    return [summarize(row.tolist()) for row in slowest(local, device, group)]


def _time_once(fn: Callable[[], object], device: torch.device, group) -> float:
    """One barrier-aligned run of ``fn`` on this rank, in µs (CUDA events on GPU)."""
    dist.barrier(group=group)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) * 1e3
    begin = time.perf_counter()
    fn()
    return (time.perf_counter() - begin) * 1e6


class NotCapturable(Exception):
    """An operation that cannot be captured in a CUDA graph (the message says why)."""


def capture(fn: Callable[[], object], device: torch.device, warmup: int = 3) -> Callable[[], object]:
    """A function replaying ``fn`` from a CUDA graph (captured after ``warmup`` runs on a side stream).

    Raises:
        NotCapturable: on the CPU, or when capturing ``fn`` fails (a host synchronisation, a CPU
            collective, an allocation the graph cannot hold); the message is the first line of why.
    """
    if device.type != "cuda":
        raise NotCapturable("CPU tensors: CUDA graphs need a GPU")
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                fn()
        torch.cuda.current_stream(device).wait_stream(stream)
        torch.cuda.synchronize(device)
        with torch.cuda.graph(graph):
            fn()
    except Exception as exc:  # whatever the library raises while capturing: the point goes on without graph mode
        torch.cuda.synchronize(device)
        text = str(exc).strip().splitlines()
        raise NotCapturable(f"{type(exc).__name__}: {text[0][:200] if text else ''}") from None
    return graph.replay


def comm_device(device: torch.device, group=None) -> torch.device:
    """Where small bookkeeping tensors of ``group`` live: ``device`` under NCCL, the CPU under gloo."""
    return device if dist.get_backend(group) == "nccl" else torch.device("cpu")


def slowest(values: torch.Tensor, device: torch.device, group=None) -> torch.Tensor:
    """Element-wise maximum of ``values`` over the ranks of ``group`` (returned on the CPU)."""
    buf = values.to(comm_device(device, group))
    dist.all_reduce(buf, op=dist.ReduceOp.MAX, group=group)
    return buf.cpu()


def mean_over_ranks(value: float, device: torch.device, group=None) -> float:
    """The mean of a per-rank number over the ranks of ``group``."""
    buf = torch.tensor([value], dtype=torch.float64, device=comm_device(device, group))
    dist.all_reduce(buf, group=group)
    return buf.item() / dist.get_world_size(group)


def gbps(num_bytes: float, time_us: float) -> float:
    """Gigabytes (1e9 bytes) per second for ``num_bytes`` moved in ``time_us`` microseconds."""
    return num_bytes / (time_us * 1e-6) / 1e9 if time_us > 0 else 0.0


@dataclass(frozen=True)
class Imbalance:
    """How unevenly a routing loads the ranks and the experts.

    Attributes:
        recv_max, recv_mean: the most and the mean tokens received per rank.
        expert_max, expert_mean: the most and the mean (token, expert) pairs per expert.
    """

    recv_max: float
    recv_mean: float
    expert_max: float
    expert_mean: float

    def as_columns(self) -> dict[str, float]:
        return {"recv_tokens_max": self.recv_max, "recv_tokens": round(self.recv_mean, 1),
                "expert_tokens_max": self.expert_max, "expert_tokens_mean": round(self.expert_mean, 1),
                "imbalance_rank": round(self.recv_max / self.recv_mean, 3) if self.recv_mean else "",
                "imbalance_expert": round(self.expert_max / self.expert_mean, 3) if self.expert_mean else ""}


def imbalance(received_per_rank: Sequence[int], tokens_per_expert: Sequence[int]) -> Imbalance:
    """The :class:`Imbalance` of tokens received by each rank (each token once per rank that holds one
    of its experts) and (token, expert) pairs routed to each expert of the whole group."""
    ranks, experts = list(received_per_rank), list(tokens_per_expert)
    return Imbalance(float(max(ranks)), sum(ranks) / len(ranks), float(max(experts)), sum(experts) / len(experts))


def received_bytes(recv_counts: Sequence[int], rank: int, row_bytes: int) -> tuple[int, int]:
    """Bytes this rank received in a dispatch: ``(all rows, rows from other ranks)``.

    ``algbw`` divides the first by the time (DeepEP's convention: the rank's own rows count);
    ``xbw`` divides the second (what crossed the links).
    """
    total = sum(recv_counts) * row_bytes
    crossed = total - recv_counts[rank] * row_bytes
    return total, crossed


def link_peak_gbps(device: torch.device, group=None, num_bytes: int = 1 << 30) -> float:
    """The link's peak, measured once: the median of 10 large copies to a peer.

    On CUDA with two or more visible GPUs: a device-to-device copy of ``num_bytes`` from this GPU
    to the next one (the copy engine over NVLink/PCIe); ranks that share GPUs (their group is gloo's)
    the same, within the GPU when the node has one (their tokens move through its memory). On CPU: a
    gloo send of 64 MiB from rank 0 to rank 1. Every rank returns the same number; 0.0 on a single
    CPU rank. Collective.
    """
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    times = torch.zeros(10, dtype=torch.float64)
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    sharing = world > 1 and dist.get_backend(group) == "gloo"
    if device.type == "cuda" and (gpus > 1 and dist.get_backend(group) == "nccl" or sharing):
        if rank == 0:
            peer = torch.device("cuda", (device.index + 1) % gpus)
            src = torch.empty(num_bytes, dtype=torch.uint8, device=device)
            dst = torch.empty(num_bytes, dtype=torch.uint8, device=peer)
            dst.copy_(src)
            torch.cuda.synchronize()
            for i in range(len(times)):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                dst.copy_(src, non_blocking=True)
                end.record()
                torch.cuda.synchronize()
                times[i] = start.elapsed_time(end) * 1e3
            del src, dst
    elif world > 1:
        num_bytes = 64 << 20
        payload = torch.empty(num_bytes, dtype=torch.uint8, device=comm_device(device, group))
        for i in range(len(times)):
            dist.barrier(group=group)
            begin = time.perf_counter()
            if rank == 0:
                dist.send(payload, dst=dist.get_global_rank(group, 1) if group else 1, group=group)
            elif rank == 1:
                dist.recv(payload, src=dist.get_global_rank(group, 0) if group else 0, group=group)
            times[i] = (time.perf_counter() - begin) * 1e6
    times = slowest(times, device, group)
    return gbps(num_bytes, summarize(times.tolist()).median) if times.any() else 0.0
