"""The torch backend's routing plan for several simulated ranks in one process: each rank's send side,
the exchange done by hand (rank ``r`` receives segment ``r`` of every sender), each rank's receive side,
and what the plan must hold, computed token by token in plain Python."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fused_a2a.backends.torch_routing import PlanShape, PlanViews


@dataclass(frozen=True)
class RankPlan:
    """What one simulated rank's plan holds that the dispatch reads (host values); ``ids`` and
    ``weights`` are ``None`` when a sender had more rows for this rank than the capacity (the dispatch
    then exchanges them again and never reads these)."""

    token: list[int]
    sent: list[list[int]]
    received: list[list[int]]
    ids: list[list[int]] | None
    weights: list[list[float]] | None
    segments: list[tuple[list[int], list[list[int]], list[list[float]]]]


def routing_inputs(tokens: list[int], topk: int, num_experts: int, seed: int, device: torch.device):
    """Per rank ``(topk_idx [N, K] int64, topk_weights [N, K] float32)`` with distinct ids per token and
    some ``-1`` entries."""
    gen = torch.Generator().manual_seed(seed)
    inputs = []
    for n in tokens:
        idx = torch.stack([torch.randperm(num_experts, generator=gen)[:topk] for _ in range(n)]) if n else \
            torch.zeros(0, topk, dtype=torch.int64)
        idx[torch.rand(idx.shape, generator=gen) < 0.15] = -1
        inputs.append((idx.to(device), torch.rand(idx.shape, generator=gen).to(device)))
    return inputs


def simulate(send, receive, inputs, num_experts: int, capacity: int) -> list[RankPlan]:
    """Run ``send(topk_idx, topk_weights, shape, views)`` on every rank, exchange, run
    ``receive(received, shape, views)``; each rank's :class:`RankPlan`."""
    world = len(inputs)
    shapes = [PlanShape(idx.size(0), idx.size(1), num_experts, world, capacity) for idx, _ in inputs]
    views = [PlanViews.of(torch.empty(s.out_bytes // 8, dtype=torch.int64, device=idx.device), s)
             for s, (idx, _) in zip(shapes, inputs)]
    sent = [send(idx, w, s, v) for (idx, w), s, v in zip(inputs, shapes, views)]
    for rank, (shape, view) in enumerate(zip(shapes, views)):
        receive(torch.stack([segments[rank] for segments in sent]), shape, view)
    return [_read(shape, view, segments) for shape, view, segments in zip(shapes, views, sent)]


def _read(shape: PlanShape, views: PlanViews, segments: torch.Tensor) -> RankPlan:
    meta = views.staging.cpu().tolist()
    received_rows = sum(row[0] for row in meta[0])
    complete = all(row[0] <= shape.capacity for row in meta[0])
    parts = []
    for d in range(shape.world):
        seg = segments[d].cpu()
        seg_meta = seg[:shape.ids_offset].view(torch.int64).tolist()
        rows = min(seg_meta[0], shape.capacity)
        ids = seg[shape.ids_offset:shape.weights_offset].view(torch.int64).view(-1, shape.topk)[:rows].tolist()
        weights = seg[shape.weights_offset:shape.weights_offset + 4 * shape.capacity * shape.topk]
        parts.append((seg_meta, ids, weights.view(torch.float32).view(-1, shape.topk)[:rows].tolist()))
    return RankPlan(
        token=views.token[:sum(row[0] for row in meta[1])].tolist(),
        sent=meta[1], received=meta[0],
        ids=views.ids[:received_rows].tolist() if complete else None,
        weights=views.weights[:received_rows].tolist() if complete else None,
        segments=parts,
    )


def expected(inputs, num_experts: int, capacity: int) -> list[RankPlan]:
    """The plans of :func:`simulate`, token by token."""
    world = len(inputs)
    num_local = num_experts // world
    plain = [(idx.cpu().tolist(), w.cpu().tolist()) for idx, w in inputs]
    outgoing = []  # per sender, per destination: (tokens, local ids, weights)
    metas = []
    for ids, weights in plain:
        flat = [e for row in ids for e in row]
        low, high = (min(flat), max(flat)) if flat else (-1, -1)
        per_dest, meta = [], []
        for d in range(world):
            rows = [(t, [e - d * num_local if d * num_local <= e < (d + 1) * num_local else -1 for e in ids[t]],
                     [w if d * num_local <= e < (d + 1) * num_local else 0.0 for e, w in zip(ids[t], weights[t])])
                    for t in range(len(ids)) if any(d * num_local <= e < (d + 1) * num_local for e in ids[t])]
            per_dest.append(rows)
            experts = [sum(e == d * num_local + j for e in flat) for j in range(num_local)]
            meta.append([len(rows), *experts, low, high, len(ids)])
        outgoing.append(per_dest)
        metas.append(meta)
    plans = []
    for rank in range(world):
        received = [metas[src][rank] for src in range(world)]
        rows = [row for src in range(world) for row in outgoing[src][rank]]
        complete = all(m[0] <= capacity for m in received)
        segments = [(metas[rank][d], [r[1] for r in outgoing[rank][d][:capacity]],
                     [r[2] for r in outgoing[rank][d][:capacity]]) for d in range(world)]
        plans.append(RankPlan(
            token=[t for d in range(world) for t, _, _ in outgoing[rank][d]],
            sent=metas[rank], received=received,
            ids=[r[1] for r in rows] if complete else None,
            weights=[r[2] for r in rows] if complete else None,
            segments=segments,
        ))
    return plans
