"""The proof: a round trip with the library's tuned knobs vs. the backend's defaults, alternating."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from rich.table import Table

from a2a_bench.measure import Stats, time_alternating
from a2a_bench.spec import SweepSpec, expand
from a2a_bench.workload import WorkloadSpec, make_inputs
from fused_a2a.autograd import BufferCombine, BufferDispatch
from fused_a2a.backends import get_backend, make_comm
from fused_a2a.tuning.resolve import resolve


@dataclass(frozen=True)
class Speedup:
    """One backend and shape: the tuned and the default round trip (dispatch + combine, api mode)."""

    backend: str
    workload: WorkloadSpec
    tuned_dispatch: dict[str, Any]
    tuned_combine: dict[str, Any]
    sources: dict[str, str]
    tuned: Stats
    default: Stats

    @property
    def ratio(self) -> float:
        """Default median over tuned median: how many times faster the tuned knobs are."""
        return self.default.median / self.tuned.median


def measure_speedup(backend: str, workload: WorkloadSpec, warmup: int, iters: int, device: torch.device) -> Speedup:
    """Time ``iters`` tuned and ``iters`` default round trips in turn on the same inputs. Collective."""
    world = dist.get_world_size()
    inputs = make_inputs(workload, dist.get_rank())
    x, idx, weights = (t.to(device) for t in (inputs.x, inputs.topk_idx, inputs.topk_weights))
    res = resolve(backend, world, workload.dtype, workload.hidden, workload.num_tokens, {},
                  topk=workload.topk, num_experts=workload.num_experts)
    tuned = make_comm(backend, res.dispatch, res.combine, num_ranks=world)
    default = make_comm(backend, get_backend(backend).defaults(), num_ranks=world)

    def round_trip(comm):
        def run():
            with torch.no_grad():
                out = BufferDispatch.apply(x, idx, weights, workload.num_experts, None, comm, False, False)
                BufferCombine.apply(out[0], None, out[4], comm, False, False)
        return run

    tuned_stats, default_stats = time_alternating([round_trip(tuned), round_trip(default)], warmup, iters, device)
    return Speedup(backend, workload, res.dispatch, res.combine, res.sources, tuned_stats, default_stats)


def run_speedups(spec: SweepSpec, device: torch.device) -> list[Speedup]:
    """:func:`measure_speedup` for every backend and workload of ``spec`` (its knobs are ignored)."""
    seen, out = set(), []
    for point in expand(spec, dist.get_world_size()):
        if (point.backend, point.workload) not in seen:
            seen.add((point.backend, point.workload))
            out.append(measure_speedup(point.backend, point.workload, spec.warmup, spec.iters, device))
    return out


def speedup_table(rows: list[Speedup]) -> Table:
    """Tuned vs. default per backend and shape: medians (p10–p90), the knobs and their source, the ratio."""
    table = Table(title="tuned vs. default knobs: dispatch + combine round trip (api mode), slowest rank, µs")
    for column in ("backend", "shape", "tuned knobs (d | c)", "source", "tuned", "default", "default / tuned"):
        table.add_column(column)
    for r in rows:
        w = r.workload
        table.add_row(
            r.backend, f"{w.dtype} h{w.hidden} n{w.num_tokens} k{w.topk} e{w.num_experts}",
            f"{_knobs(r.tuned_dispatch)} | {_knobs(r.tuned_combine)}", ",".join(sorted(set(r.sources.values()))),
            _stats(r.tuned), _stats(r.default), f"{r.ratio:.2f}x",
        )
    return table


def _knobs(knobs: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted(knobs.items()))


def _stats(s: Stats) -> str:
    return f"{s.median:.1f} ({s.p10:.1f}–{s.p90:.1f})"
