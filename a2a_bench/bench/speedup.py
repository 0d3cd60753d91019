"""The proof: a round trip with the library's tuned knobs vs. the backend's defaults.

Both configs run on the same inputs in alternating blocks (tuned, default, default, tuned, ... so a
slow drift of the machine weighs on both alike); each block's median is one sample. The ratio is
default over tuned (> 1: the tuned knobs are faster), with a bootstrap interval over the block pairs.
Verdicts: ``same config`` when the tuned knobs are the defaults (nothing to compare, the default is
not timed), ``no measurable difference`` when the interval contains 1.0, else the ratio.
"""

from __future__ import annotations

import random
import statistics
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.distributed as dist
from rich.table import Table

from a2a_bench.engine.installed import not_installed
from a2a_bench.engine.measure import Stats, summarize, time_op
from a2a_bench.engine.spec import SpecError, SweepSpec, expand
from a2a_bench.engine.workload import WorkloadSpec, make_inputs
from fused_a2a.autograd import BufferCombine, BufferDispatch
from fused_a2a.backends import get_backend, make_comm
from fused_a2a.tuning.resolve import resolve

CONFIDENCE = 0.95
RESAMPLES = 2000


@dataclass(frozen=True)
class Ratio:
    """Default time over tuned time: the median ratio and its bootstrap interval."""

    value: float
    low: float
    high: float

    @property
    def includes_one(self) -> bool:
        return self.low <= 1.0 <= self.high


@dataclass(frozen=True)
class Speedup:
    """One backend and shape: the tuned and the default round trip (dispatch + combine, api mode).

    Attributes:
        backend, workload: what ran.
        tuned_dispatch, tuned_combine, sources: the library's resolution of the knobs.
        tuned: the tuned config's block medians, summarised (µs, slowest rank).
        default: the default config's, ``None`` when the tuned knobs are the defaults (not timed).
        ratio: default over tuned with its interval, ``None`` when the configs are the same.
    """

    backend: str
    workload: WorkloadSpec
    tuned_dispatch: dict[str, Any]
    tuned_combine: dict[str, Any]
    sources: dict[str, str]
    tuned: Stats
    default: Stats | None
    ratio: Ratio | None

    @property
    def verdict(self) -> str:
        """``same config``, ``no measurable difference (low–high)`` or ``1.23x (low–high)``."""
        return verdict(self.ratio)


def verdict(ratio: Ratio | None) -> str:
    """The words for a ratio (``None``: the two configs are the same)."""
    if ratio is None:
        return "same config"
    spread = f"({ratio.low:.2f}–{ratio.high:.2f})"
    if ratio.includes_one:
        return f"no measurable difference {spread}"
    return f"{ratio.value:.2f}x {spread}"


def ratio_interval(tuned: Sequence[float], default: Sequence[float], confidence: float = CONFIDENCE,
                   resamples: int = RESAMPLES, seed: int = 0) -> Ratio:
    """``median(default) / median(tuned)`` of paired block medians, with a percentile bootstrap interval.

    Block pairs ``(tuned[i], default[i])`` are resampled together (seeded: every rank computes the same).
    """
    if len(tuned) != len(default) or len(tuned) < 2:
        raise ValueError("need at least two pairs of blocks")
    rng = random.Random(seed)
    n = len(tuned)
    ratios = []
    for _ in range(resamples):
        picks = [rng.randrange(n) for _ in range(n)]
        ratios.append(statistics.median(default[i] for i in picks) / statistics.median(tuned[i] for i in picks))
    ratios.sort()
    tail = (1.0 - confidence) / 2
    low, high = ratios[int(tail * (resamples - 1))], ratios[int((1.0 - tail) * (resamples - 1))]
    return Ratio(statistics.median(default) / statistics.median(tuned), low, high)


def check_backends(spec: SweepSpec) -> None:
    """``SpecError`` for a backend of ``spec`` that is not installed (speedup has nothing to run)."""
    for name in spec.backends:
        missing = not_installed(name)
        if missing is not None:
            raise SpecError(missing)


def measure_speedup(backend: str, workload: WorkloadSpec, warmup: int, iters: int, blocks: int,
                    device: torch.device) -> Speedup:
    """Time ``blocks`` blocks of ``iters`` round trips of each config, alternating. Collective."""
    world = dist.get_world_size()
    inputs = make_inputs(workload, dist.get_rank())
    x, idx, weights = (t.to(device) for t in (inputs.x, inputs.topk_idx, inputs.topk_weights))
    res = resolve(backend, world, workload.dtype, workload.hidden, workload.num_tokens, {},
                  topk=workload.topk, num_experts=workload.num_experts)
    defaults = get_backend(backend).defaults()
    tuned = _round_trip(make_comm(backend, res.dispatch, res.combine, num_ranks=world), x, idx, weights, workload)
    if res.dispatch == defaults and res.combine == defaults:
        medians = [time_op(tuned, warmup if b == 0 else 0, iters, device).median for b in range(blocks)]
        return Speedup(backend, workload, res.dispatch, res.combine, res.sources, summarize(medians), None, None)
    default = _round_trip(make_comm(backend, defaults, num_ranks=world), x, idx, weights, workload)
    for _ in range(warmup):
        tuned()
        default()
    samples: dict[str, list[float]] = {"tuned": [], "default": []}
    for b in range(blocks):
        order = (("tuned", tuned), ("default", default)) if b % 2 == 0 else (("default", default), ("tuned", tuned))
        for name, fn in order:
            samples[name].append(time_op(fn, 0, iters, device).median)
    return Speedup(backend, workload, res.dispatch, res.combine, res.sources, summarize(samples["tuned"]),
                   summarize(samples["default"]), ratio_interval(samples["tuned"], samples["default"]))


def _round_trip(comm, x, idx, weights, workload: WorkloadSpec):
    def run():
        with torch.no_grad():
            out = BufferDispatch.apply(x, idx, weights, (workload.num_experts, None, comm, False, False))
            BufferCombine.apply(out[0], (None, out[4], comm, False, False))
    return run


def run_speedups(spec: SweepSpec, blocks: int, device: torch.device) -> list[Speedup]:
    """:func:`measure_speedup` for every backend and workload of ``spec`` (its knobs are ignored)."""
    seen, out = set(), []
    for point in expand(spec, dist.get_world_size()):
        if (point.backend, point.workload) not in seen:
            seen.add((point.backend, point.workload))
            out.append(measure_speedup(point.backend, point.workload, spec.warmup, spec.iters, blocks, device))
    return out


def speedup_table(rows: list[Speedup]) -> Table:
    """Tuned vs. default per backend and shape: block medians (p10–p90), the knobs and their source, the verdict."""
    table = Table(title="tuned vs. default knobs: dispatch + combine round trip (api mode), slowest rank, "
                        "µs: median of block medians (p10–p90)")
    for column in ("backend", "shape", "tuned knobs (d | c)", "source", "tuned", "default", "default / tuned (95% interval)"):
        table.add_column(column)
    for r in rows:
        w = r.workload
        table.add_row(
            r.backend, f"{w.dtype} h{w.hidden} n{w.num_tokens} k{w.topk} e{w.num_experts}",
            f"{_knobs(r.tuned_dispatch)} | {_knobs(r.tuned_combine)}", ",".join(sorted(set(r.sources.values()))),
            _stats(r.tuned), "= tuned" if r.default is None else _stats(r.default), r.verdict,
        )
    return table


def _knobs(knobs: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted(knobs.items()))


def _stats(s: Stats) -> str:
    return f"{s.median:.1f} ({s.p10:.1f}–{s.p90:.1f})"
