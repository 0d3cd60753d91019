"""The ``a2a-bench`` command line: parse the options, call the command's body (:mod:`a2a_bench.commands`)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from a2a_bench import __version__
from a2a_bench.commands.exit import CommandExit
from a2a_bench.engine.plugins import load_backend_plugins
from a2a_bench.engine.results import ResultsError
from a2a_bench.engine.spec import REFERENCE, SpecError, SweepSpec
from a2a_bench.launch.lifeline import die_with_launcher, launched_by_torchrun
from a2a_bench.launch.report import user_error
from a2a_bench.output import log_to_stderr
from fused_a2a.tuning.table import TuningFileError

SHARE_GPU_HELP = ("When ranks outnumber a node's GPUs: mps (the default: an MPS daemon serves them; --nproc starts one "
                  "when none runs) or timeslice (they take turns: timings marked not comparable).")

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Sweep, verify and tune MoE dispatch/combine backends; write tuning tables for fused_a2a.")


def _version(value: bool) -> None:
    if value:
        print(f"a2a-bench {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """Sweep, verify and tune MoE dispatch/combine backends; write tuning tables for fused_a2a."""


def _grid_help(text: str, field: str) -> str:
    """``text`` with the default of a :class:`SweepSpec` field (when no option, spec file or preset sets it)."""
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
    rng_seed: Optional[int] = typer.Option(None, "--seed", help=_grid_help("Base seed of the workloads.", "rng_seed")),
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
    from a2a_bench.commands import sweep as command
    from a2a_bench.engine.sharing import parse_share_gpu

    share = parse_share_gpu(share_gpu)
    grid = command.sweep_spec(backends, sms, hidden, tokens, topk, experts, dtype, routing, knob, rng_seed, warmup, iters,
                              point_timeout, exhaustive, spec, quick)
    command.sweep(grid, out, resume, extend, then_tune, tune_out, wide, nproc, max_restarts, share)


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
    from a2a_bench.commands.bench import speedup as command

    command(backends, hidden, tokens, topk, experts, dtype, routing, path, from_table, warmup, iters, blocks, nproc,
            share_gpu)


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
    from a2a_bench.commands.bench import breakdown as command

    command(hidden, tokens, topk, experts, dtype, impl, warmup, iters, nproc, share_gpu)


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
    from a2a_bench.commands.bench import overhead as command

    command(backends, hidden, tokens, topk, experts, iters, nproc, share_gpu)


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
    from a2a_bench.commands.bench import paths as command

    command(backends, hidden, tokens, topk, experts, warmup, iters, nproc, share_gpu)


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
    from a2a_bench.commands.tables import tune as command

    command(run_dir, out, routing, by, wide)


@app.command()
def table(
    cluster_dir: Optional[Path] = typer.Argument(None, help="A folder holding tuning.json (default: the tables of "
                                                            "this machine's cluster, any world size)."),
    wide: bool = typer.Option(False, "--wide", help="Print every column (default: those that fit the terminal)."),
) -> None:
    """Print a cluster's tuning table and write it as Markdown to CLUSTER_DIR/TABLE.md."""
    from a2a_bench.commands.tables import table as command

    command(cluster_dir, wide)


@app.command()
def show(
    backend: str = typer.Option(REFERENCE, help="Backend name."),
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
    from a2a_bench.commands.show import show as command

    command(backend, hidden, tokens, world_size, dtype, topk, experts, cluster, knob, routing, framework)


@app.command()
def env(
    world_size: Optional[int] = typer.Option(None, help="World size for the cluster id (default: GPUs of this node)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Installed backends (version, or why not), GPUs, link topology, MPS and cluster id."""
    from a2a_bench.commands.show import env as command

    command(world_size, as_json)


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
    from a2a_bench.commands.results import plot as command

    command(run_dir, out, metric)


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
    from a2a_bench.commands.results import compare as command

    command(run_dir, hidden, tokens, dtype, topk, experts, routing, by, wide)


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
    from a2a_bench.commands.results import search_check as command

    command(default_run, exhaustive_run, within)


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
    from a2a_bench.commands.tables import export as command

    command(fmt, backend, hidden, tokens, world_size, dtype, topk, experts, cluster_dir, out, routing)


USER_ERRORS = (SpecError, ResultsError, TuningFileError, ValueError)


def main() -> None:
    """Entry point: a user error prints one line and exits with status 2.

    Under torchrun every rank parses the same command: rank 0 prints the error; another rank prints
    it only if rank 0 has not ended the job meanwhile (:func:`a2a_bench.launch.report.user_error`).
    A rank launched by torchrun dies with its launcher (:func:`a2a_bench.launch.lifeline.die_with_launcher`).
    """
    log_to_stderr()
    if launched_by_torchrun():
        die_with_launcher()
    try:
        load_backend_plugins()
        result = app(standalone_mode=False)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except CommandExit as exc:
        sys.exit(exc.code)
    except (typer.Abort, KeyboardInterrupt):
        print("a2a-bench: interrupted", file=sys.stderr)
        sys.exit(130)
    except USER_ERRORS as exc:
        user_error(str(exc))
    except OSError as exc:
        if exc.filename is None:
            raise
        user_error(f"cannot use {exc.filename}: {exc.strerror or exc}")
    except Exception as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # bare `a2a-bench`: the help, on stdout
            print(exc.format_message())
            sys.exit(0)
        if not hasattr(exc, "format_message"):  # Typer's usage errors (bad or unknown option) have it
            raise
        user_error(exc.format_message())
    sys.exit(result if isinstance(result, int) else 0)

