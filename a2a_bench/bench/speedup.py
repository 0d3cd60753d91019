"""The proof: dispatch + combine round trips through fused_a2a with the knobs it finds at run time vs.
the backend's defaults.

The tuned round trip is what a user's job runs: ``fused_a2a.dispatch``/``combine`` (path ``api``) or the
seed module's functions (path ``seed``: ``fused_dispatch``/``fused_combine``, UCCL's, HybridEP's
``hybrid_ep_dispatch``/``hybrid_ep_combine``), passing no knob, so the library resolves them itself:
``FUSED_A2A_*`` variables, this cluster's tuning table (found as a job finds it), the defaults. The
default round trip is the same call with every knob of the backend forced to its default through its
``FUSED_A2A_<BACKEND>_<KNOB>`` variable. The routing is declared as a job declares it
(``$FUSED_A2A_ROUTING``). Both configs run on the same inputs in alternating blocks (tuned, default,
default, tuned, ... so a slow drift of the machine weighs on both alike), each block after one untimed
round trip (a change of the variables makes the library resolve the knobs again); each block's median
is one sample. The ratio is default over tuned (> 1: the tuned knobs are faster), with a bootstrap
interval over the block pairs. Verdicts: ``same config`` when the tuned knobs are the defaults
(nothing to compare, the default is not timed), ``no measurable difference`` when the interval
contains 1.0, else the ratio.

``--from-table`` takes the cases from the cluster's tuning table: one per entry of the group's world
size (every backend, routing and shape measured), so one run covers every kind of entry.
"""

from __future__ import annotations

import contextlib
import os
import random
import statistics
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist
from rich.table import Table

from a2a_bench.bench.round_trips import round_trips
from a2a_bench.engine.installed import not_installed
from a2a_bench.engine.measure import Stats, summarize, time_op
from a2a_bench.engine.spec import SpecError, SweepSpec, expand, parse_routing
from a2a_bench.engine.workload import WorkloadSpec, make_inputs, routing_key
from fused_a2a.backends import get_backend
from fused_a2a.cluster import detect_cluster
from fused_a2a.shape import CallShape
from fused_a2a.tuning.resolve import ROUTING_ENV, env_var, load_cluster_table, resolve

PATHS = ("api", "seed")
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
    """One backend, path and shape: the tuned and the default round trip (dispatch + combine).

    Attributes:
        backend, path, workload: what ran (``path``: ``api`` or ``seed``).
        tuned_dispatch, tuned_combine, sources: the library's resolution of the knobs (``sources``
            says where each came from: ``table`` when the cluster's tuning table set it).
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
    path: str = "api"

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


def parse_paths(text: str) -> tuple[str, ...]:
    """``--path``: a comma list of ``api`` and ``seed``; ``SpecError`` otherwise."""
    paths = tuple(dict.fromkeys(word.strip() for word in text.split(",") if word.strip()))
    wrong = [p for p in paths if p not in PATHS]
    if not paths or wrong:
        raise SpecError(f"--path takes a comma list of {', '.join(PATHS)}, got {text!r}")
    return paths


Case = tuple[str, WorkloadSpec]


def spec_cases(spec: SweepSpec, world_size: int) -> list[Case]:
    """Every (backend, workload) of ``spec`` (its knobs are ignored)."""
    return list(dict.fromkeys((point.backend, point.workload) for point in expand(spec, world_size)))


def table_cases(world_size: int, backends: tuple[str, ...] | None = None, hidden: tuple[int, ...] | None = None,
                tokens: tuple[int, ...] | None = None, routings: tuple[str, ...] | None = None) -> list[Case]:
    """One case per entry of this cluster's tuning table (as a job finds it) for ``world_size`` ranks,
    those of the given backends, hidden sizes, token counts and routings when given; FP8 entries are
    left out (a round trip combines bf16).

    Raises:
        SpecError: there is no table for this cluster, no entry is left, or an entry's backend is
            not installed.
    """
    cluster = detect_cluster(world_size).id
    table, path = load_cluster_table(cluster)
    if table is None:
        raise SpecError(f"--from-table: no tuning table of cluster {cluster} (a2a-bench tune writes one)")
    wanted = None if routings is None else {routing_key(*parse_routing(r)) for r in routings}
    cases = []
    for e in table.entries:
        if (e.world_size != world_size or e.dtype == "fp8" or (backends and e.backend not in backends)
                or (hidden and e.hidden not in hidden) or (tokens and e.num_tokens not in tokens)
                or (wanted is not None and e.routing not in wanted)):
            continue
        routing, skew = parse_routing(e.routing)
        cases.append((e.backend, WorkloadSpec(num_tokens=e.num_tokens, hidden=e.hidden, topk=e.topk,
                                              num_experts=e.num_experts, dtype=e.dtype, routing=routing, skew=skew)))
    if not cases:
        raise SpecError(f"--from-table: {path} has no entry for {world_size} ranks that the filters leave")
    for backend, _ in cases:
        missing = not_installed(backend)
        if missing is not None:
            raise SpecError(f"--from-table: {path} has entries of {missing}")
    return list(dict.fromkeys(cases))


@contextlib.contextmanager
def variables(values: dict[str, str]) -> Iterator[None]:
    """The environment variables ``values`` set for the body, as they were afterwards."""
    before = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def default_variables(backend: str) -> dict[str, str]:
    """``FUSED_A2A_<BACKEND>_<KNOB>`` = the knob's default, for every knob of ``backend``."""
    return {env_var(backend, knob.name): str(knob.default) for knob in get_backend(backend).knobs}


def measure_speedup(backend: str, workload: WorkloadSpec, warmup: int, iters: int, blocks: int,
                    device: torch.device, paths: Sequence[str] = ("api",)) -> list[Speedup]:
    """Time ``blocks`` blocks of ``iters`` round trips of each config on each of ``paths`` the backend
    has, alternating. Collective."""
    world = dist.get_world_size()
    inputs = make_inputs(workload, dist.get_rank())
    x, idx, weights = (t.to(device) for t in (inputs.x, inputs.topk_idx, inputs.topk_weights))
    routing = workload.routing_key
    forced = default_variables(backend)
    out = []
    with variables({ROUTING_ENV: routing}):
        shape = CallShape(workload.dtype, workload.hidden, workload.topk, workload.num_experts, world_size=world,
                          tokens=(workload.num_tokens,))
        res = resolve(backend, shape, {})
        defaults = get_backend(backend).defaults()
        same = res.dispatch == defaults and res.combine == defaults
        trips = round_trips(backend, x, idx, weights, workload.num_experts)
        for path in (p for p in paths if p in trips):
            run = trips[path]

            def default_run(run=run):
                with variables(forced):
                    run()

            for _ in range(warmup):
                run()
                if not same:
                    default_run()
            if same:
                medians = [time_op(run, 1, iters, device).median for _ in range(blocks)]
                out.append(Speedup(backend, workload, res.dispatch, res.combine, res.sources, summarize(medians),
                                   None, None, path))
                continue
            samples: dict[str, list[float]] = {"tuned": [], "default": []}
            for b in range(blocks):
                order = (("tuned", run), ("default", default_run))
                for name, fn in order if b % 2 == 0 else order[::-1]:
                    samples[name].append(time_op(fn, 1, iters, device).median)
            out.append(Speedup(backend, workload, res.dispatch, res.combine, res.sources,
                               summarize(samples["tuned"]), summarize(samples["default"]),
                               ratio_interval(samples["tuned"], samples["default"]), path))
    return out


def run_speedups(cases: Sequence[Case], paths: Sequence[str], warmup: int, iters: int, blocks: int,
                 device: torch.device) -> list[Speedup]:
    """:func:`measure_speedup` of every (backend, workload) case on each of ``paths``."""
    return [row for backend, workload in cases
            for row in measure_speedup(backend, workload, warmup, iters, blocks, device, paths)]


@dataclass
class SpeedupRun:
    """What ``a2a-bench speedup`` measures: the cases of ``spec`` (every backend and workload), or with
    ``from_table`` one per entry of this cluster's table kept by ``filters`` (the keyword arguments of
    :func:`table_cases`), each on ``paths``.

    The table is read in :meth:`check` by each process that measures (a launcher cannot know the
    cluster id its ranks will see: an MPS daemon may not run yet).
    """

    spec: SweepSpec
    paths: tuple[str, ...]
    blocks: int
    from_table: bool = False
    filters: dict = field(default_factory=dict)
    cases: list[Case] = field(default_factory=list)

    def check(self, spec: SweepSpec, measuring: bool) -> None:
        """User errors (``SpecError``) before any group is joined: an uninstalled backend; with
        ``from_table`` in a process that ``measuring``, no table or no entry left."""
        check_backends(spec)
        if self.from_table and measuring:
            self.cases = table_cases(int(os.environ.get("WORLD_SIZE", "1")), **self.filters)

    def measure(self, device: torch.device) -> list[Speedup]:
        """The rows of every case. Collective."""
        cases = self.cases if self.from_table else spec_cases(self.spec, dist.get_world_size())
        return run_speedups(cases, self.paths, self.spec.warmup, self.spec.iters, self.blocks, device)


def speedup_table(rows: list[Speedup]) -> Table:
    """Tuned vs. default per backend, path and shape: block medians (p10–p90), the knobs and their
    source, the verdict."""
    table = Table(title="tuned (knobs fused_a2a finds at run time) vs. default knobs: dispatch + combine round trip, "
                        "slowest rank, µs: median of block medians (p10–p90)")
    for column in ("backend", "path", "shape", "tuned knobs (d | c)", "source", "tuned", "default",
                   "default / tuned (95% interval)"):
        table.add_column(column)
    for r in rows:
        w = r.workload
        table.add_row(
            r.backend, r.path, f"{w.dtype} h{w.hidden} n{w.num_tokens} k{w.topk} e{w.num_experts} "
                               f"{w.routing_key}",
            f"{_knobs(r.tuned_dispatch)} | {_knobs(r.tuned_combine)}", ",".join(sorted(set(r.sources.values()))),
            _stats(r.tuned), "= tuned" if r.default is None else _stats(r.default), r.verdict,
        )
    return table


def _knobs(knobs: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted(knobs.items()))


def _stats(s: Stats) -> str:
    return f"{s.median:.1f} ({s.p10:.1f}–{s.p90:.1f})"
