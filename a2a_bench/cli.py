"""The ``a2a-bench`` command line: parse options, call one function per command, print."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from a2a_bench import __version__
from a2a_bench.engine.lifeline import die_with_launcher, launched_by_torchrun
from a2a_bench.output import make_console
from a2a_bench.paths import check_out_dir, check_out_file
from a2a_bench.engine.plugins import load_backend_plugins
from a2a_bench.engine.results import ResultsError
from a2a_bench.engine.spec import (
    QUICK, SpecError, SweepSpec, expand, load_spec_file, merge, parse_ints, parse_knob, parse_words, validate,
)
from fused_a2a.tuning.table import TuningFileError

SHARE_GPU_HELP = ("When ranks outnumber a node's GPUs: mps (the default: an MPS daemon serves them; --nproc starts one "
                  "when none runs) or timeslice (they take turns: timings marked not comparable).")

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Sweep, verify and tune MoE dispatch/combine backends; write tuning tables for fused_a2a.")
# a rank other than 0 that hits a user error waits this long for rank 0 to report it (torchrun then stops it)
RANK0_REPORTS_S = 5.0


def _version(value: bool) -> None:
    if value:
        print(f"a2a-bench {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """Sweep, verify and tune MoE dispatch/combine backends; write tuning tables for fused_a2a."""


def _opt(text: Optional[str], parse, what: str):
    return None if text is None else parse(text, what)


def _grid_help(text: str, field: str) -> str:
    """``text`` with the default of a :class:`SweepSpec` field (the value when neither the option, a
    spec file nor ``--quick`` gives one)."""
    value = getattr(SweepSpec(), field)
    return f"{text} (default: {','.join(map(str, value)) if isinstance(value, tuple) else value})"


@app.command()
def sweep(
    backends: Optional[str] = typer.Option(None, help=_grid_help("Backends, comma list (torch, deepep, hybridep, uccl).", "backends")),
    sms: Optional[str] = typer.Option(None, help="SM counts for backends with a num_sms knob: 8,16 or 8:64:8 (stop included) "
                                                 "(default: each backend's own)."),
    hidden: Optional[str] = typer.Option(None, help=_grid_help("Hidden sizes, comma list or start:stop:step.", "hidden")),
    tokens: Optional[str] = typer.Option(None, help=_grid_help("Tokens per rank, comma list or start:stop:step.", "tokens")),
    topk: Optional[str] = typer.Option(None, help=_grid_help("Experts per token, comma list.", "topk")),
    experts: Optional[str] = typer.Option(None, help=_grid_help("Number of experts, comma list (divisible by the ranks).", "experts")),
    dtype: Optional[str] = typer.Option(None, help=_grid_help("Token dtypes: bf16, fp16, fp32, fp8 (bf16 tokens sent as "
                                                              "DeepEP's fp8 pair, forward only).", "dtypes")),
    routing: Optional[str] = typer.Option(None, help=_grid_help("Routings: uniform, zipf:<skew>, hot:<fraction>.", "routings")),
    knob: Optional[List[str]] = typer.Option(None, help="A backend knob's values: backend.knob=v1,v2 (repeatable; "
                                                        "default: the knob's default)."),
    seed: Optional[int] = typer.Option(None, help=_grid_help("Base seed of the workloads.", "seed")),
    warmup: Optional[int] = typer.Option(None, help=_grid_help("Untimed iterations per mode.", "warmup")),
    iters: Optional[int] = typer.Option(None, help=_grid_help("Timed iterations per mode (>= 1).", "iters")),
    point_timeout: Optional[float] = typer.Option(None, help=_grid_help("Seconds before a point is recorded as timeout.",
                                                                        "point_timeout_s")),
    exhaustive: Optional[bool] = typer.Option(None, "--exhaustive", help="Time every knob combination (default: coordinate search)."),
    spec: Optional[Path] = typer.Option(None, help="TOML spec file with the same keys; options override it."),
    quick: bool = typer.Option(False, "--quick", help="A small preset: torch, hidden 1024,2048, tokens 256,512, both impls "
                                                      "(about 11 s on 2 CPU ranks)."),
    out: Optional[Path] = typer.Option(None, help="Run folder (default runs/sweep-<UTC time>)."),
    resume: bool = typer.Option(False, "--resume", help="Continue RUN_DIR: skip the points already in its results.csv "
                                                        "(the grid and timing settings must be the folder's)."),
    extend: bool = typer.Option(False, "--extend", help="With --resume: accept another grid than the folder's and add "
                                                        "its points (timing settings must still match)."),
    then_tune: bool = typer.Option(False, "--tune", help="After the sweep, tune its results into the tuning table "
                                                         "(as a2a-bench tune RUN_DIR)."),
    tune_out: Optional[Path] = typer.Option(None, help="With --tune: root of the tuning tables (default: "
                                                       "$FUSED_A2A_TUNING_DIR, else ./tuning_results)."),
    wide: bool = typer.Option(False, "--wide", help="Print every column of the tables (default: those that fit the terminal)."),
    nproc: Optional[int] = typer.Option(None, help="Without torchrun: launch this many local ranks through torchrun's launcher."),
    max_restarts: int = typer.Option(0, help="With --nproc: restarts after a rank dies or a point times out (implies --resume)."),
    share_gpu: Optional[str] = typer.Option(None, help=SHARE_GPU_HELP),
) -> None:
    """Measure every point of the grid on every rank; append one row per point to RUN_DIR/results.csv."""
    from a2a_bench.engine.interrupt import Interrupted
    from a2a_bench.engine.sharing import launcher_sharing, parse_share_gpu
    from a2a_bench.engine.sweep import (
        claim_run_folder, command_line, finish_local, launch_local, placement_from_env, run_sweep,
    )
    from a2a_bench.reports.tune import default_out_root

    share = parse_share_gpu(share_gpu)
    base = QUICK if quick else SweepSpec()
    if spec is not None:
        base = merge(base, load_spec_file(spec))
    knobs = {b: dict(v) for b, v in base.knobs.items()}
    if backends is not None:  # the preset's or spec file's knobs of backends the command line leaves out
        knobs = {b: v for b, v in knobs.items() if b in parse_words(backends, "--backends")}
    for text in knob or []:
        backend, name, values = parse_knob(text)
        knobs.setdefault(backend, {})[name] = values
    sweep_spec = merge(base, {
        "backends": _opt(backends, parse_words, "--backends"), "sms": _opt(sms, parse_ints, "--sms"),
        "hidden": _opt(hidden, parse_ints, "--hidden"), "tokens": _opt(tokens, parse_ints, "--tokens"),
        "topk": _opt(topk, parse_ints, "--topk"), "experts": _opt(experts, parse_ints, "--experts"),
        "dtypes": _opt(dtype, parse_words, "--dtype"), "routings": _opt(routing, parse_words, "--routing"),
        "knobs": knobs, "seed": seed, "warmup": warmup, "iters": iters, "point_timeout_s": point_timeout,
        "exhaustive": exhaustive,
    })
    out = out or Path("runs") / datetime.now(timezone.utc).strftime("sweep-%Y%m%d-%H%M%S")
    if extend and not resume:
        raise SpecError("--extend adds grid points to a run folder: it needs --resume")
    tables = (tune_out or default_out_root()) if then_tune else None
    if tune_out is not None and not then_tune:
        raise SpecError("--tune-out names where --tune writes: pass --tune too")
    if tables is not None:
        check_out_dir(tables, "--tune-out")
    argv = command_line()
    if nproc is not None and not launched_by_torchrun():
        if nproc < 1:
            raise SpecError(f"--nproc must be >= 1, got {nproc}")
        if max_restarts < 0:
            raise SpecError(f"--max-restarts must be >= 0, got {max_restarts}")
        validate(sweep_spec, nproc)
        lock = claim_run_folder(out, resume, argv, None, sweep_spec, extend)  # rank 0 checks the cluster
        try:
            ranks_argv = _argv_for_ranks(sys.argv[1:], out)
            if max_restarts and "--resume" not in ranks_argv:
                ranks_argv.append("--resume")
            with launcher_sharing(nproc, share):
                status = launch_local(nproc, ranks_argv, max_restarts)
            code = finish_local(status, out, sweep_spec, nproc, argv)
        finally:
            if lock is not None:
                lock.release()
        if code:
            raise typer.Exit(code)
    else:
        try:
            run_sweep(sweep_spec, out, resume, argv, extend, wide, share)
        except Interrupted as exc:  # Typer would turn it into a silent exit
            if exc.report is not None:
                print(f"a2a-bench: {exc.report}", file=sys.stderr, flush=True)
            raise typer.Exit(130)
        if placement_from_env().rank != 0:
            return
    if tables is not None:
        _tune_and_print(out, tables, None, "api", wide)


def _argv_for_ranks(argv: list[str], out: Path) -> list[str]:
    """The command line each launched rank runs: ``--nproc`` and what the launcher does itself
    (``--tune``) removed, ``--out`` fixed."""
    kept, skip = [], False
    for word in argv:
        if skip:
            skip = False
            continue
        if word in ("--nproc", "--out", "--max-restarts", "--tune-out"):
            skip = True
            continue
        if word.startswith(("--nproc=", "--out=", "--max-restarts=", "--tune-out=")) or word == "--tune":
            continue
        kept.append(word)
    return [*kept, "--out", str(out)]


@app.command()
def speedup(
    backends: Optional[str] = typer.Option(None, help="Backends, comma list."),
    hidden: Optional[str] = typer.Option(None, help="Hidden sizes, comma list (default 7168; with --from-table: all)."),
    tokens: Optional[str] = typer.Option(None, help="Tokens per rank, comma list (default 4096; with --from-table: all)."),
    topk: str = typer.Option("8", help="Experts per token."),
    experts: str = typer.Option("64", help="Number of experts."),
    dtype: str = typer.Option("bf16", help="Token dtype."),
    routing: Optional[str] = typer.Option(None, help="Routings the job declares: uniform, zipf:<skew>, hot:<fraction> "
                                                     "(default uniform; with --from-table: all)."),
    path: str = typer.Option("api", help="Round trips: api (fused_a2a.dispatch/combine), seed (the seed functions: "
                                         "fused_dispatch, hybrid_ep_dispatch, ...), or api,seed."),
    from_table: bool = typer.Option(False, "--from-table", help="One case per entry of this cluster's tuning table "
                                                                "(as a job finds it), kept by the options above."),
    warmup: int = typer.Option(5, help="Untimed round trips of each config."),
    iters: int = typer.Option(5, help="Timed round trips of each config per block."),
    blocks: int = typer.Option(8, help="Blocks of each config, alternating (>= 2): the ratio's interval is over them."),
    nproc: Optional[int] = typer.Option(None, help="Without torchrun: launch this many local ranks."),
    share_gpu: Optional[str] = typer.Option(None, help=SHARE_GPU_HELP),
) -> None:
    """Benchmark: round trips through fused_a2a with the knobs it finds at run time (tuning table) vs. the backend's
    defaults, in alternating blocks, same inputs; the ratio with its 95% bootstrap interval, or "same config" /
    "no measurable difference"."""
    from a2a_bench.bench.speedup import SpeedupRun, parse_paths, speedup_table

    given = {"backends": _opt(backends, parse_words, "--backends"), "hidden": _opt(hidden, parse_ints, "--hidden"),
             "tokens": _opt(tokens, parse_ints, "--tokens"), "routings": _opt(routing, parse_words, "--routing")}
    spec = merge(SweepSpec(), {
        **given, "hidden": given["hidden"] or (7168,), "tokens": given["tokens"] or (4096,),
        "topk": parse_ints(topk, "--topk"), "experts": parse_ints(experts, "--experts"),
        "dtypes": parse_words(dtype, "--dtype"), "warmup": warmup, "iters": iters,
    })
    if blocks < 2:
        raise SpecError(f"--blocks must be >= 2, got {blocks}")
    run = SpeedupRun(spec, parse_paths(path), blocks, from_table, given)
    _run_benchmark("speedup", spec, nproc, lambda checked: run.check(checked, nproc is None or launched_by_torchrun()),
                   lambda where: run.measure(where.device), speedup_table, share_gpu)


def _run_benchmark(command: str, spec: SweepSpec, nproc: Optional[int], check, measure, table,
                   share_gpu: Optional[str]) -> None:
    """A benchmark command's body: with ``--nproc`` outside torchrun, check ``spec`` on ``nproc`` ranks
    and relaunch this command on them (under MPS when they share GPUs, :mod:`a2a_bench.engine.sharing`);
    else join the group, ``measure(where)`` the rows and print ``table(rows)`` on rank 0.
    ``check(spec)`` raises a user error before any group is joined."""
    from a2a_bench.engine.sharing import NOT_COMPARABLE, check_rank, launcher_sharing, parse_share_gpu
    from a2a_bench.engine.sweep import launch_local, placement_from_env, process_group

    share = parse_share_gpu(share_gpu)
    if nproc is not None and not launched_by_torchrun():
        if nproc < 1:
            raise SpecError(f"--nproc must be >= 1, got {nproc}")
        validate(spec, nproc)
        check(spec)
        with launcher_sharing(nproc, share):
            code = launch_local(nproc, [command, *_without(sys.argv[2:], "--nproc")])
        raise typer.Exit(code)
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


def _without(argv: list[str], option: str) -> list[str]:
    """``argv`` without ``option`` and its value (``--opt v`` or ``--opt=v``)."""
    out, skip = [], False
    for word in argv:
        if skip:
            skip = False
        elif word == option:
            skip = True
        elif not word.startswith(option + "="):
            out.append(word)
    return out


@app.command()
def breakdown(
    hidden: str = typer.Option("7168", help="Hidden sizes, comma list."),
    tokens: str = typer.Option("128,4096", help="Tokens per rank, comma list."),
    topk: int = typer.Option(8, help="Experts per token."),
    experts: int = typer.Option(64, help="Number of experts."),
    dtype: str = typer.Option("bf16", help="Token dtype."),
    impl: str = typer.Option("all_to_all", help="The torch backend's impl knob: all_to_all or p2p."),
    warmup: int = typer.Option(5, help="Untimed iterations per stage."),
    iters: int = typer.Option(20, help="Timed iterations per stage."),
    nproc: Optional[int] = typer.Option(None, help="Without torchrun: launch this many local ranks."),
    share_gpu: Optional[str] = typer.Option(None, help=SHARE_GPU_HELP),
) -> None:
    """Benchmark: where the torch backend's api dispatch spends its time, stage by stage, against kernel mode."""
    from a2a_bench.bench.breakdown import measure_breakdown
    from a2a_bench.reports.report import breakdown_table
    from fused_a2a.backends import get_backend

    get_backend("torch").knob("impl").validate(impl)
    spec = merge(SweepSpec(), {"hidden": parse_ints(hidden, "--hidden"), "tokens": parse_ints(tokens, "--tokens"),
                               "topk": (topk,), "experts": (experts,), "dtypes": parse_words(dtype, "--dtype"),
                               "warmup": warmup, "iters": iters})

    def measure(where):
        return [measure_breakdown(point.workload, impl, warmup, iters, where.device) for point in expand(spec, where.world_size)]

    _run_benchmark("breakdown", spec, nproc, lambda checked: None, measure, breakdown_table, share_gpu)


@app.command()
def overhead(
    backends: Optional[str] = typer.Option(None, help="Backends, comma list (default: every installed one)."),
    hidden: int = typer.Option(7168, help="Hidden size."),
    tokens: int = typer.Option(128, help="Tokens per rank."),
    topk: int = typer.Option(8, help="Experts per token."),
    experts: int = typer.Option(64, help="Number of experts."),
    iters: int = typer.Option(30, help="Timed batches (50 calls each) per path."),
    nproc: Optional[int] = typer.Option(None, help="Without torchrun: launch this many local ranks."),
    share_gpu: Optional[str] = typer.Option(None, help=SHARE_GPU_HELP),
) -> None:
    """Benchmark: host time fused_a2a adds per dispatch + combine over calling each backend's buffer directly."""
    from a2a_bench.bench.overhead import measure_overhead
    from a2a_bench.reports.report import overhead_table
    from fused_a2a.backends import BACKENDS

    names = parse_words(backends, "--backends") if backends else tuple(n for n, b in BACKENDS.items() if b.unavailable() is None)
    spec = merge(SweepSpec(), {"backends": names, "hidden": (hidden,), "tokens": (tokens,), "topk": (topk,),
                               "experts": (experts,), "iters": iters})

    def installed(checked: SweepSpec) -> None:
        from a2a_bench.engine.installed import not_installed

        for name in checked.backends:
            if not_installed(name) is not None:
                raise SpecError(not_installed(name))

    def measure(where):
        return [row for point in expand(spec, where.world_size)
                for row in measure_overhead(point.backend, point.workload, iters, where.device)]

    _run_benchmark("overhead", spec, nproc, installed, measure, overhead_table, share_gpu)


@app.command()
def paths(
    backends: Optional[str] = typer.Option(None, help="Backends, comma list (default: every installed one)."),
    hidden: str = typer.Option("7168", help="Hidden sizes, comma list."),
    tokens: str = typer.Option("512,4096", help="Tokens per rank, comma list."),
    topk: int = typer.Option(8, help="Experts per token."),
    experts: int = typer.Option(64, help="Number of experts."),
    warmup: int = typer.Option(5, help="Untimed calls of each path."),
    iters: int = typer.Option(30, help="Timed calls of each path (alternating)."),
    nproc: Optional[int] = typer.Option(None, help="Without torchrun: launch this many local ranks."),
    share_gpu: Optional[str] = typer.Option(None, help=SHARE_GPU_HELP),
) -> None:
    """Benchmark: per call, each backend's own uncached dispatch/combine, fused_a2a's api, the seed path and
    the cached kernel, side by side with the api/raw and seed/raw ratios."""
    from a2a_bench.bench.paths import measure_paths
    from a2a_bench.reports.report import paths_table
    from fused_a2a.backends import BACKENDS

    names = parse_words(backends, "--backends") if backends else tuple(n for n, b in BACKENDS.items() if b.unavailable() is None)
    spec = merge(SweepSpec(), {"backends": names, "hidden": parse_ints(hidden, "--hidden"),
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

    _run_benchmark("paths", spec, nproc, installed, measure, paths_table, share_gpu)


@app.command()
def tune(
    run_dir: Path = typer.Argument(..., help="A sweep's run folder (holding results.csv and run.json)."),
    out: Optional[Path] = typer.Option(None, help="Root of the tuning tables; writes OUT/<cluster-id>/tuning.json "
                                                  "and TABLE.md (default: $FUSED_A2A_TUNING_DIR, else ./tuning_results)."),
    routing: Optional[str] = typer.Option(None, help="Only the rows of this routing (uniform, zipf:<skew>, hot:<fraction>); default: one entry per routing measured."),
    by: str = typer.Option("api", help="Select by this timing mode: api (the full call a training step pays), kernel "
                                       "(the buffer's cached calls), seed (HybridEP's permute path), graph."),
    wide: bool = typer.Option(False, "--wide", help="Print every column (default: those that fit the terminal)."),
) -> None:
    """Select the fastest verified config per shape, routing and backend build; keep the backend's default
    unless it is beaten beyond the noise; merge the entries into the cluster's tuning.json."""
    from a2a_bench.reports.tune import default_out_root
    from fused_a2a.tuning.resolve import declared_routing

    out = out or default_out_root()
    check_out_dir(out)
    _tune_and_print(run_dir, out, None if routing is None else declared_routing(routing), by, wide)


def _tune_and_print(run_dir: Path, out: Path, routing: Optional[str], by: str, wide: bool) -> None:
    """Tune ``run_dir`` into ``out`` and print the table, where it went and how a job uses it."""
    from a2a_bench.reports.fit import print_table
    from a2a_bench.reports.report import tuning_table
    from a2a_bench.reports.tables import MARKDOWN_NAME, publish
    from a2a_bench.reports.tune import library_reads

    path, table = publish(run_dir, out, routing, by)
    console = make_console()
    print_table(console, tuning_table(table), wide, str(path.parent / MARKDOWN_NAME))
    e = table.entries[0]
    console.print(f"wrote {path}; {library_reads(path)}", markup=False, highlight=False)
    console.print(f"the whole table as Markdown: {path.parent / MARKDOWN_NAME}; jobs get these knobs from "
                  f"fused_a2a.dispatch/combine and fused_a2a.compat; what a call uses: a2a-bench show --backend "
                  f"{e.backend} --hidden {e.hidden} --tokens {e.num_tokens} --world-size {e.world_size}",
                  markup=False, highlight=False)


@app.command()
def table(
    cluster_dir: Optional[Path] = typer.Argument(None, help="A folder holding tuning.json (default: the tables of "
                                                            "this machine's cluster, any world size)."),
    wide: bool = typer.Option(False, "--wide", help="Print every column (default: those that fit the terminal)."),
) -> None:
    """Print a cluster's tuning table and write it as Markdown to CLUSTER_DIR/TABLE.md."""
    from a2a_bench.reports.fit import print_table
    from a2a_bench.reports.report import tuning_markdown, tuning_table
    from a2a_bench.reports.tables import MARKDOWN_NAME, check_printable, machine_ids, machine_tables
    from fused_a2a.files import atomic_write_text
    from fused_a2a.tuning.resolve import tuning_dirs
    from fused_a2a.tuning.table import read_table

    folders = [cluster_dir] if cluster_dir is not None else machine_tables()
    if not folders:
        raise ResultsError(f"no tuning table for this machine yet: looked for {machine_ids()} in "
                           f"{' or '.join(map(str, tuning_dirs()))}; make one with a2a-bench sweep --nproc 2 --tune, "
                           "or pass a CLUSTER_DIR")
    tables = []
    for folder in folders:
        path = folder / "tuning.json"
        tuning = read_table(path)
        check_printable(tuning, str(path))
        check_out_file(folder / MARKDOWN_NAME, "CLUSTER_DIR")
        tables.append((folder, tuning))
    console = make_console()
    for folder, tuning in tables:
        atomic_write_text(folder / MARKDOWN_NAME, tuning_markdown(tuning))
        print_table(console, tuning_table(tuning), wide, str(folder / MARKDOWN_NAME))
        console.print(f"wrote {folder / MARKDOWN_NAME}", markup=False, highlight=False)


@app.command()
def show(
    backend: str = typer.Option("torch", help="Backend name."),
    hidden: int = typer.Option(..., help="Hidden size of the call."),
    tokens: int = typer.Option(..., help="Tokens per rank of the call."),
    world_size: int = typer.Option(..., help="Ranks in the expert-parallel group."),
    dtype: str = typer.Option("bf16", help="Token dtype."),
    topk: Optional[int] = typer.Option(None, help="Experts per token (prefer entries with it)."),
    experts: Optional[int] = typer.Option(None, help="Number of experts (prefer entries with it)."),
    cluster: Optional[str] = typer.Option(None, help="Cluster id (default: this machine's)."),
    knob: Optional[List[str]] = typer.Option(None, help="An explicit knob as a caller would pass it: name=value."),
    routing: Optional[str] = typer.Option(None, help="The routing the job declares (default: $FUSED_A2A_ROUTING, else uniform)."),
    framework: Optional[str] = typer.Option(None, help="automodel or megatron: the module fused_a2a.compat replaces, and the knobs of each of the framework's backends."),
) -> None:
    """What fused_a2a would use for this call on this machine and where each knob comes from; with
    --framework, the framework module the drop-in replaces and the knobs each of its backends will use.

    The call is checked by the library's own checks; an unusable FUSED_A2A_* variable or tuning file
    is an error here (the library in a job ignores it with a warning unless FUSED_A2A_TUNING_STRICT=1).
    """
    from a2a_bench.call import Call, check_call
    from fused_a2a.backends import get_backend
    from fused_a2a.cluster import cluster_id_problem
    from fused_a2a.shape import CallShape
    from fused_a2a.tuning.resolve import resolve

    if cluster is not None and cluster_id_problem(cluster):
        raise SpecError(f"--cluster: {cluster_id_problem(cluster)}")
    backends = [backend]
    console = make_console()
    if framework is not None:
        from fused_a2a.compat import FRAMEWORKS, replaced

        if framework not in FRAMEWORKS:
            raise SpecError(f"--framework must be one of {', '.join(sorted(FRAMEWORKS))}, got {framework!r}")
        here = "replaced in this process" if framework in replaced() else "not replaced in this process"
        console.print(f"{framework}: fused_a2a.compat.install({framework!r}) (or python -m fused_a2a.compat {framework} -- "
                      f"SCRIPT) puts fused_a2a.compat.{framework} in place of {FRAMEWORKS[framework]} ({here}); "
                      "the framework's default SM counts count as not set", markup=False)
        backends = ["deepep", "hybridep", "uccl"] if framework == "automodel" else ["deepep", "hybridep"]
    for name in backends:
        spec = get_backend(name)
        check_call(Call(name, world_size, dtype, hidden, tokens, topk, experts))
        explicit = {}
        for text in knob or []:
            knob_name, sep, value = text.partition("=")
            if not sep:
                raise SpecError(f"--knob takes name=value, got {text!r}")
            if framework is None or knob_name in {k.name for k in spec.knobs}:
                explicit[knob_name] = spec.knob(knob_name).parse(value)
        with _strict_tuning():
            shape = CallShape(dtype, hidden, topk, experts, routing, world_size=world_size, tokens=(tokens,))
            res = resolve(name, shape, explicit, cluster=cluster)
        _print_resolution(console, res, hidden, tokens, world_size, dtype, cluster)


def _print_resolution(console, res, hidden: int, tokens: int, world_size: int, dtype: str,
                      cluster: Optional[str]) -> None:
    """One backend's knobs, their sources and the table entry they came from, with the mode that chose
    it and how it compared with the default."""
    from a2a_bench.reports.report import entry_verdict
    from fused_a2a.cluster import detect_cluster
    from fused_a2a.tuning.resolve import tuning_dirs

    out = Table(title=f"{res.backend}: hidden {hidden}, {tokens} tokens, {world_size} ranks, {dtype}, {res.routing} routing")
    for column in ("knob", "dispatch", "combine", "source"):
        out.add_column(column)
    for name in res.dispatch:
        out.add_row(name, str(res.dispatch[name]), str(res.combine[name]), res.sources[name])
    console.print(out)
    if res.entry is not None:
        e = res.entry
        console.print(f"table entry: {res.table_path} ({e.backend}, {e.world_size} ranks, {e.dtype}, {e.routing} routing, "
                      f"hidden {e.hidden}, {e.num_tokens} tokens, top-{e.topk}, {e.num_experts} experts, "
                      f"measured with {e.build or 'an unrecorded build'}; installed: {res.build or 'not installed'})",
                      markup=False)
        mode = f"chosen by {e.selected_by} mode"
        if e.selected_by == "kernel":
            mode += (" (the buffer's cached calls, not the full call a training step makes: a table tuned before "
                     "a2a-bench tune ranked by api, or with --by kernel)")
        console.print(f"{mode}; vs the default: {entry_verdict(e)}", markup=False)
    elif res.table_path is not None:
        console.print(f"no table entry for this call in {res.table_path}: the backend's defaults apply", markup=False)
    else:
        cluster = cluster or detect_cluster(world_size).id
        console.print(f"no tuning table for cluster {cluster} (looked in {' and '.join(map(str, tuning_dirs()))}): "
                      "the backend's defaults apply; a2a-bench sweep --tune makes one", markup=False)


@contextmanager
def _strict_tuning():
    """The library's strict mode for the body: unusable overrides and tables raise instead of warning."""
    from fused_a2a.tuning.resolve import STRICT_ENV

    before = os.environ.get(STRICT_ENV)
    os.environ[STRICT_ENV] = "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ[STRICT_ENV]
        else:
            os.environ[STRICT_ENV] = before


@app.command()
def env(
    world_size: Optional[int] = typer.Option(None, help="World size for the cluster id (default: GPUs of this node)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Installed backends (version, or why not), GPUs, link topology, MPS and cluster id."""
    from a2a_bench.reports.environment import describe, mps_line

    if world_size is not None and world_size < 1:
        raise SpecError(f"--world-size must be >= 1, got {world_size}")
    info = describe(world_size)
    console = make_console()
    if as_json:
        print(json.dumps(info, indent=2))
        return
    c = info["cluster"]
    console.print(f"cluster id: [bold]{c['id']}[/bold]  gpu: {c['gpu'] or 'none'}  gpus/node: {c['gpus_per_node']}  "
                  f"nodes: {c['nodes']}  intranode link: {c['intranode_link'] or 'n/a'}  internode: {c['internode'] or 'n/a'}")
    console.print(f"GPUs: {', '.join(info['gpus']) or 'none'}")
    console.print(mps_line(info["mps"]), markup=False, highlight=False)
    console.print("versions: " + ", ".join(f"{k} {v}" for k, v in info["versions"].items() if v))
    out = Table(title="backends")
    for column in ("backend", "available", "version or reason"):
        out.add_column(column)
    for b in info["backends"]:
        out.add_row(b["backend"], "yes" if b["available"] else "no", b["detail"])
    console.print(out)


@app.command()
def plot(
    run_dir: Path = typer.Argument(..., help="A sweep's run folder (holding results.csv)."),
    out: Optional[Path] = typer.Option(None, help="Folder of the PNGs (default RUN_DIR/plots)."),
    metric: str = typer.Option("gbps", help="gbps: GB/s against SMs per backend and shape (against tokens without an "
                                            "SM knob), with the link peak; time: dispatch and combine µs against SMs, "
                                            "every backend of a shape in one plot, knees marked."),
) -> None:
    """PNG plots: GB/s against SMs per backend and shape (GB/s against tokens without an SM knob), with the link
    peak; or dispatch and combine time against SMs with each backend's knee (--metric time)."""
    from a2a_bench.reports.plot import METRICS, plot_run
    from a2a_bench.engine.results import RESULTS_FILE, read_results

    if metric not in METRICS:
        raise SpecError(f"--metric must be one of {', '.join(METRICS)}, got {metric!r}")
    out = out or run_dir / "plots"
    check_out_dir(out)
    for path in plot_run(read_results(run_dir / RESULTS_FILE), out, metric):
        print(path)


@app.command()
def compare(
    run_dir: Path = typer.Argument(..., help="A sweep's run folder (holding results.csv)."),
    hidden: int = typer.Option(..., help="Hidden size of the shape."),
    tokens: int = typer.Option(..., help="Tokens per rank of the shape."),
    dtype: Optional[str] = typer.Option(None, help="Token dtype (needed when the results hold several)."),
    topk: Optional[int] = typer.Option(None, help="Experts per token (needed when the results hold several)."),
    experts: Optional[int] = typer.Option(None, help="Number of experts (needed when the results hold several)."),
    routing: str = typer.Option("uniform", help="Routing: uniform, zipf:<skew>, hot:<fraction>."),
    by: str = typer.Option("api", help="Pick each backend's best config by this timing mode: api (the full call a "
                                       "training step pays), kernel, seed, graph."),
    wide: bool = typer.Option(False, "--wide", help="Print every column (default: those that fit the terminal)."),
) -> None:
    """Backends side by side for one shape: best verified knobs (by --by), µs, GB/s, default's µs, speedup vs torch."""
    from a2a_bench.reports.compare import compare_table
    from a2a_bench.reports.fit import print_table
    from a2a_bench.engine.results import RESULTS_FILE, read_results

    table = compare_table(read_results(run_dir / RESULTS_FILE), hidden, tokens, dtype, topk, experts, routing, by)
    print_table(make_console(), table, wide, str(run_dir / RESULTS_FILE))


@app.command("search-check")
def search_check(
    default_run: Path = typer.Argument(..., help="A run folder swept with the default (coordinate) search."),
    exhaustive_run: Path = typer.Argument(..., help="A run folder swept with --exhaustive over the same knob grid "
                                                    "(all of the default run's shapes, or some)."),
    within: float = typer.Option(3.0, help="Tolerance, percent: the search's choice may be this much slower than the "
                                           "exhaustive best."),
) -> None:
    """How many points the default search timed against --exhaustive, and whether its choice is within 3% of the
    exhaustive best, per backend and shape."""
    from a2a_bench.reports.search_check import check_search, search_table, summary

    if not within > 0:
        raise SpecError(f"--within must be a positive percentage, got {within:g}")
    checks = check_search(default_run, exhaustive_run)
    console = make_console()
    console.print(search_table(checks, within / 100))
    console.print(summary(checks, within / 100), markup=False, highlight=False)


@app.command()
def export(
    fmt: str = typer.Option(..., "--format", help="sglang: SGLang's --deepep-config JSON; env: export lines."),
    backend: str = typer.Option(..., help="Backend name (sglang: deepep)."),
    hidden: int = typer.Option(..., help="Hidden size of the call."),
    tokens: int = typer.Option(..., help="Tokens per rank of the call."),
    world_size: int = typer.Option(..., help="Ranks in the expert-parallel group."),
    dtype: str = typer.Option("bf16", help="Token dtype."),
    topk: Optional[int] = typer.Option(None, help="Experts per token (prefer entries with it)."),
    experts: Optional[int] = typer.Option(None, help="Number of experts (prefer entries with it)."),
    cluster_dir: Optional[Path] = typer.Option(None, help="A folder holding tuning.json (default: this machine's cluster)."),
    out: Optional[Path] = typer.Option(None, help="Write to this file (atomically) instead of stdout."),
    routing: str = typer.Option("uniform", help="The routing the job declares: uniform, zipf:<skew>, hot:<fraction>."),
) -> None:
    """The tuning table's knobs for a call, as SGLang's --deepep-config JSON or environment variables
    (with the Megatron-LM and NeMo Automodel settings that give them)."""
    from a2a_bench.reports.export import check_request, describe, find_entry, load_table, render
    from fused_a2a.files import atomic_write_text
    from fused_a2a.tuning.resolve import declared_routing

    check_request(fmt, backend)
    if out is not None:
        check_out_file(out)
    entry = find_entry(load_table(cluster_dir, world_size), backend, world_size, dtype, hidden, tokens, topk, experts,
                       declared_routing(routing))
    text = render(fmt, entry)
    if out is None:
        print(text, end="")
        return
    atomic_write_text(out, text)
    print(f"wrote {out} (entry: {describe(entry)})")


USER_ERRORS = (SpecError, ResultsError, TuningFileError, ValueError)


def main() -> None:
    """Entry point: a user error prints one line and exits with status 2.

    Under torchrun every rank parses the same command: rank 0 prints the error; another rank prints
    it only if rank 0 has not ended the job within :data:`RANK0_REPORTS_S` (the error was its own).
    A rank launched by torchrun dies with its launcher (:func:`a2a_bench.engine.lifeline.die_with_launcher`).
    """
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("a2a-bench: %(message)s"))
    logging.getLogger("a2a_bench").addHandler(handler)
    logging.getLogger("a2a_bench").setLevel(logging.INFO)
    if launched_by_torchrun():
        die_with_launcher()
    try:
        load_backend_plugins()
        result = app(standalone_mode=False)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        print("a2a-bench: interrupted", file=sys.stderr)
        sys.exit(130)
    except USER_ERRORS as exc:
        _user_error(str(exc))
    except OSError as exc:
        if exc.filename is None:
            raise
        _user_error(f"cannot use {exc.filename}: {exc.strerror or exc}")
    except Exception as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # bare `a2a-bench`: the help, on stdout
            print(exc.format_message())
            sys.exit(0)
        if not hasattr(exc, "format_message"):  # Typer's usage errors (bad or unknown option) have it
            raise
        _user_error(exc.format_message())
    sys.exit(result if isinstance(result, int) else 0)


def _user_error(message: str) -> None:
    rank = int(os.environ.get("RANK", "0")) if launched_by_torchrun() else 0
    if rank != 0:
        time.sleep(RANK0_REPORTS_S)
        message = f"rank {rank}: {message}"
    print(f"a2a-bench: error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)
