"""The routing half of a torch-backend dispatch: everything that depends on ``topk_idx`` alone.

:func:`plan_routing` computes, in fixed shapes (rows padded to ``N * W``), which token each rank sends
to each rank with which local expert ids and weights, exchanges the counts (one ``all_to_all_single``)
and copies them to a host buffer: the host then knows how many rows it sends and receives, after one
synchronisation. Fixed shapes make it capturable: on a GPU with an NCCL group, :class:`RoutingGraphs`
captures it in one CUDA graph per (tokens, top-k, experts) and replays it, one launch instead of some
thirty (the torch backend is otherwise bound by the host's launch rate). Elsewhere (CPU, gloo, while
another graph is being captured) it runs eagerly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


def layout(topk_idx: torch.Tensor, num_experts: int, world: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(is_token_in_rank [N, W] bool, tokens per rank [W] int64, (token, expert) pairs per expert [E]
    int64)``, on the device, no host synchronisation; ids outside ``[-1, E)`` count as "no expert"."""
    num_local = num_experts // world
    valid = (topk_idx >= 0) & (topk_idx < num_experts)
    experts = torch.where(valid, topk_idx, num_experts)
    dest = torch.div(experts, num_local, rounding_mode="floor")  # "no expert" lands in column W, dropped
    in_rank = torch.zeros(topk_idx.size(0), world + 1, dtype=torch.bool, device=topk_idx.device)
    in_rank = in_rank.scatter_(1, dest, True)[:, :world]
    flat = experts.flatten()
    per_expert = torch.zeros(num_experts + 1, dtype=torch.int64, device=topk_idx.device)
    per_expert = per_expert.scatter_add_(0, flat, torch.ones_like(flat))[:num_experts]
    return in_rank, in_rank.sum(dim=0), per_expert


@dataclass(frozen=True)
class RoutingPlan:
    """What :func:`plan_routing` leaves: device tensors of ``N * W`` padded rows and the host counts.

    Attributes:
        in_rank: ``[N, W]`` bool, which ranks get each token.
        token: ``[N * W]`` int64, the source token of each sent row, ordered by destination then token
            (the first ``S`` rows are real).
        routing: ``[N * W, 12 K]`` uint8, each sent row's ``K`` local expert ids (int64, ``-1``
            elsewhere) then its ``K`` weights (float32, ``0`` elsewhere).
        host: the counts on the host (``2 W (E/W + 3)`` int64): the received then the sent table of
            (rows, rows per local expert, smallest id, largest id) per rank; valid after the stream
            synchronises.
    """

    in_rank: torch.Tensor
    token: torch.Tensor
    routing: torch.Tensor
    host: torch.Tensor


def plan_routing(topk_idx: torch.Tensor, topk_weights: torch.Tensor, num_experts: int, group, world: int,
                 host: torch.Tensor) -> RoutingPlan:
    """Compute a dispatch's routing (see the module doc) and start copying its counts into ``host``.

    Args:
        topk_idx: ``[N, K]`` int64 global expert ids.
        topk_weights: ``[N, K]`` float32.
        num_experts: ``E``, divisible by ``world``.
        group: the process group (collective: one ``all_to_all_single``).
        world: its size ``W``.
        host: ``[2 W (E/W + 3)]`` int64 host tensor (pinned for a CUDA ``topk_idx``).
    """
    num_local = num_experts // world
    in_rank, per_rank, per_expert = layout(topk_idx, num_experts, world)
    bounds = torch.stack(torch.aminmax(topk_idx)) if topk_idx.numel() else topk_idx.new_full((2,), -1)
    bounds = bounds.view(1, 2).expand(world, 2)
    meta = torch.cat([per_rank.view(world, 1), per_expert.view(world, num_local), bounds], dim=1)
    received = torch.empty_like(meta)
    dist.all_to_all_single(received, meta, group=group)
    host.copy_(torch.cat([received.flatten(), meta.flatten()]), non_blocking=True)
    pairs = torch.nonzero_static(in_rank.t(), size=in_rank.numel(), fill_value=0)
    dest, token = pairs[:, 0], pairs[:, 1]
    local = topk_idx[token] - (dest * num_local).unsqueeze(1)
    mine = (local >= 0) & (local < num_local)
    local_idx = torch.where(mine, local, -1)
    weights = torch.where(mine, topk_weights[token].float(), 0.0)
    routing = torch.cat([local_idx.view(torch.uint8), weights.view(torch.uint8)], dim=1)
    return RoutingPlan(in_rank, token.contiguous(), routing, host)


@dataclass(frozen=True)
class Counts:
    """What the count exchange tells a rank (host values).

    Attributes:
        send: rows this rank sends to each rank.
        recv: rows this rank receives from each rank.
        per_local_expert: ``[E / W]`` int64 CPU tensor, (token, expert) pairs received for each local expert.
    """

    send: tuple[int, ...]
    recv: tuple[int, ...]
    per_local_expert: torch.Tensor


def read_counts(host: torch.Tensor, world: int, num_experts: int) -> Counts:
    """The :class:`Counts` in a plan's ``host`` buffer (after the synchronisation).

    Raises:
        ValueError: an expert id outside ``[-1, num_experts)`` on any rank (the same on every rank).
    """
    num_local = num_experts // world
    tables = host.numpy().reshape(2, world, num_local + 3)
    received, sent = tables[0], tables[1]
    low, high = int(received[:, num_local + 1].min()), int(received[:, num_local + 2].max())
    if low < -1 or high >= num_experts:
        bad = [r for r in range(world) if received[r, num_local + 1] < -1 or received[r, num_local + 2] >= num_experts]
        raise ValueError(f"topk_idx values must lie in [-1, {num_experts}), found range [{low}, {high}] "
                         f"(rank {', '.join(map(str, bad))})")
    per_expert = torch.from_numpy(np.ascontiguousarray(received[:, 1:num_local + 1].sum(axis=0)))
    return Counts(tuple(sent[:, 0].tolist()), tuple(received[:, 0].tolist()), per_expert)


def host_buffer(world: int, num_experts: int, device: torch.device) -> torch.Tensor:
    """A host buffer for :func:`plan_routing`'s counts (pinned when the plan runs on a GPU)."""
    size = 2 * world * (num_experts // world + 3)
    return torch.empty(size, dtype=torch.int64, pin_memory=device.type == "cuda")


@dataclass
class _Captured:
    """One shape's graph: its static inputs, the plan its replay refreshes, the graph."""

    topk_idx: torch.Tensor
    topk_weights: torch.Tensor
    plan: RoutingPlan
    graph: torch.cuda.CUDAGraph


class RoutingGraphs:
    """:func:`plan_routing` captured in a CUDA graph per (tokens, top-k, experts) and replayed.

    Only for CUDA tensors on an NCCL group. A shape is captured once the group's communicator has run
    (after the first, eager, plan of this object); a shape whose capture fails runs eagerly from then
    on. Capturing launches nothing, so every rank still exchanges counts once per call whatever the
    others do. The returned plan's tensors are overwritten by the next replay of the same shape.
    """

    def __init__(self, group, world: int) -> None:
        self.group = group
        self.world = world
        self._graphs: dict[tuple, _Captured | None] = {}
        self._warm = False

    def plan(self, topk_idx: torch.Tensor, topk_weights: torch.Tensor, num_experts: int) -> tuple[RoutingPlan, bool]:
        """The routing plan of this call and whether its tensors are a graph's (to copy before the next call)."""
        key = (topk_idx.device, tuple(topk_idx.shape), num_experts, topk_weights.dtype)
        if not self._warm or torch.cuda.is_current_stream_capturing():
            self._warm = True
            return self._eager(topk_idx, topk_weights, num_experts), False
        if key not in self._graphs:
            self._graphs[key] = self._capture(topk_idx, topk_weights, num_experts)
        captured = self._graphs[key]
        if captured is None:
            return self._eager(topk_idx, topk_weights, num_experts), False
        captured.topk_idx.copy_(topk_idx)
        captured.topk_weights.copy_(topk_weights)
        captured.graph.replay()
        return captured.plan, True

    def _eager(self, topk_idx, topk_weights, num_experts: int) -> RoutingPlan:
        host = host_buffer(self.world, num_experts, topk_idx.device)
        return plan_routing(topk_idx, topk_weights, num_experts, self.group, self.world, host)

    def _capture(self, topk_idx, topk_weights, num_experts: int) -> _Captured | None:
        static_idx, static_weights = topk_idx.clone(), topk_weights.clone()
        host = host_buffer(self.world, num_experts, topk_idx.device)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                plan = plan_routing(static_idx, static_weights, num_experts, self.group, self.world, host)
        except RuntimeError:  # an op or a collective that cannot be captured here: eager from now on
            torch.cuda.synchronize(topk_idx.device)
            return None
        return _Captured(static_idx, static_weights, plan, graph)
