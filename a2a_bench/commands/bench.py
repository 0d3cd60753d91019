"""The benchmark commands (``speedup``, ``breakdown``, ``overhead``, ``paths``): checked, run on the ranks of
this torchrun job or relaunched on ``--nproc`` local ranks, their table printed on rank 0."""

from __future__ import annotations

import sys
from typing import Optional

from a2a_bench.commands.exit import CommandExit
from a2a_bench.engine.installed import not_installed
from a2a_bench.engine.sharing import NOT_COMPARABLE, check_rank, launcher_sharing, parse_share_gpu
from a2a_bench.engine.spec import (
    SpecError, SweepSpec, expand, merge, parse_ints, parse_optional, parse_words, validate,
)
from a2a_bench.launch.argv import without_options
from a2a_bench.launch.group import placement_from_env, process_group
from a2a_bench.launch.lifeline import launched_by_torchrun
from a2a_bench.launch.local import launch_local
from a2a_bench.output import make_console
from fused_a2a.backends import BACKENDS


def run_benchmark(command: str, spec: SweepSpec, nproc: Optional[int], check, measure, table,
                  share_gpu: Optional[str]) -> None:
    """A benchmark command's body: with ``--nproc`` outside torchrun, check ``spec`` on ``nproc`` ranks
    and relaunch this command on them (under MPS when they share GPUs, :mod:`a2a_bench.engine.sharing`),
    else join the group, ``measure(where)`` the rows and print ``table(rows)`` on rank 0.
    ``check(spec)`` raises a user error before any group is joined."""
    share = parse_share_gpu(share_gpu)
    if nproc is not None and not launched_by_torchrun():
        if nproc < 1:
            raise SpecError(f"--nproc must be >= 1, got {nproc}")
        validate(spec, nproc)
        check(spec)
        with launcher_sharing(nproc, share):
            code = launch_local(nproc, [command, *without_options(sys.argv[2:], ("--nproc",))])
        raise CommandExit(code)
    where = placement_from_env()
    validate(spec, where.world_size)
    check(spec)
    sharing = check_rank(share, where.rank)
    with process_group(where):
        rows = measure(where)
    if where.rank == 0:
        make_console().print(table(rows))
        if sharing is not None and sharing.mode == "timeslice":
            print(f"a2a-bench: warning: {sharing.describe()} by time slices: every time in the table is {NOT_COMPARABLE}",
                  file=sys.stderr)


def speedup(backends: Optional[str], hidden: Optional[str], tokens: Optional[str], topk: str, experts: str, dtype: str,
            routing: Optional[str], path: str, from_table: bool, warmup: int, iters: int, blocks: int,
            nproc: Optional[int], share_gpu: Optional[str]) -> None:
    """Tuned against default knobs, in alternating blocks (:mod:`a2a_bench.bench.speedup`)."""
    from a2a_bench.bench.speedup import SpeedupRun, parse_paths, speedup_table

    given = {"backends": parse_optional(backends, parse_words, "--backends"), "hidden": parse_optional(hidden, parse_ints, "--hidden"),
             "tokens": parse_optional(tokens, parse_ints, "--tokens"), "routings": parse_optional(routing, parse_words, "--routing")}
    spec = merge(SweepSpec(), {
        **given, "hidden": given["hidden"] or (7168,), "tokens": given["tokens"] or (4096,),
        "topk": parse_ints(topk, "--topk"), "experts": parse_ints(experts, "--experts"),
        "dtypes": parse_words(dtype, "--dtype"), "warmup": warmup, "iters": iters,
    })
    if blocks < 2:
        raise SpecError(f"--blocks must be >= 2, got {blocks}")
    run = SpeedupRun(spec, parse_paths(path), blocks, from_table, given)
    run_benchmark("speedup", spec, nproc, lambda checked: run.check(checked, nproc is None or launched_by_torchrun()),
                  lambda where: run.measure(where.device), speedup_table, share_gpu)


def breakdown(hidden: str, tokens: str, topk: int, experts: int, dtype: str, impl: str, warmup: int, iters: int,
              nproc: Optional[int], share_gpu: Optional[str]) -> None:
    """The staged backend's dispatch, stage by stage (:mod:`a2a_bench.bench.breakdown`)."""
    from a2a_bench.bench.breakdown import measure_breakdown, staged_backend
    from a2a_bench.reports.report import breakdown_table

    staged_backend().knob("impl").validate(impl)
    spec = merge(SweepSpec(), {"hidden": parse_ints(hidden, "--hidden"), "tokens": parse_ints(tokens, "--tokens"),
                               "topk": (topk,), "experts": (experts,), "dtypes": parse_words(dtype, "--dtype"),
                               "warmup": warmup, "iters": iters})

    def measure(where):
        return [measure_breakdown(point.workload, impl, warmup, iters, where.device) for point in expand(spec, where.world_size)]

    run_benchmark("breakdown", spec, nproc, lambda checked: None, measure, breakdown_table, share_gpu)


def overhead(backends: Optional[str], hidden: int, tokens: int, topk: int, experts: int, iters: int,
             nproc: Optional[int], share_gpu: Optional[str]) -> None:
    """Host time fused_a2a adds over the backends' own calls (:mod:`a2a_bench.bench.overhead`)."""
    from a2a_bench.bench.overhead import measure_overhead
    from a2a_bench.reports.report import overhead_table

    spec = merge(SweepSpec(), {"backends": _backends(backends), "hidden": (hidden,), "tokens": (tokens,), "topk": (topk,),
                               "experts": (experts,), "iters": iters})

    def installed(checked: SweepSpec) -> None:
        for name in checked.backends:
            if not_installed(name) is not None:
                raise SpecError(not_installed(name))

    def measure(where):
        return [row for point in expand(spec, where.world_size)
                for row in measure_overhead(point.backend, point.workload, iters, where.device)]

    run_benchmark("overhead", spec, nproc, installed, measure, overhead_table, share_gpu)


def paths(backends: Optional[str], hidden: str, tokens: str, topk: int, experts: int, warmup: int, iters: int,
          nproc: Optional[int], share_gpu: Optional[str]) -> None:
    """Each way of calling a backend, per call (:mod:`a2a_bench.bench.paths`)."""
    from a2a_bench.bench.paths import measure_paths
    from a2a_bench.reports.report import paths_table

    spec = merge(SweepSpec(), {"backends": _backends(backends), "hidden": parse_ints(hidden, "--hidden"),
                               "tokens": parse_ints(tokens, "--tokens"), "topk": (topk,), "experts": (experts,),
                               "warmup": warmup, "iters": iters})

    def installed(checked: SweepSpec) -> None:
        for name in checked.backends:
            reason = BACKENDS[name].unavailable()
            if reason is not None:
                raise SpecError(f"backend {name!r} is not available: {reason}")

    def measure(where):
        return [measure_paths(point.backend, point.workload, warmup, iters, where.device)
                for point in expand(spec, where.world_size)]

    run_benchmark("paths", spec, nproc, installed, measure, paths_table, share_gpu)


def _backends(text: Optional[str]) -> tuple[str, ...]:
    """``--backends``, default: every installed backend."""
    return parse_words(text, "--backends") if text else tuple(n for n, b in BACKENDS.items() if b.unavailable() is None)

