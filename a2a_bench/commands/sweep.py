"""``a2a-bench sweep``: the grid assembled from options, a spec file and presets; run here, or on ``--nproc``
local ranks; then tuned when asked."""

from __future__ import annotations

import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from a2a_bench.commands.exit import CommandExit
from a2a_bench.commands.tables import tune_and_print
from a2a_bench.engine.interrupt import Interrupted
from a2a_bench.engine.sharing import launcher_sharing
from a2a_bench.engine.spec import (
    QUICK, SpecError, SweepSpec, load_spec_file, merge, parse_ints, parse_knob, parse_optional, parse_words,
    validate,
)
from a2a_bench.engine.sweep import claim_run_folder, finish_local, run_sweep
from a2a_bench.launch.argv import without_options
from a2a_bench.launch.group import placement_from_env
from a2a_bench.launch.lifeline import launched_by_torchrun
from a2a_bench.launch.local import command_line, launch_local
from a2a_bench.engine.writable import check_out_dir
from a2a_bench.reports.summary import print_summary
from a2a_bench.reports.tune import default_out_root


def sweep_spec(backends: Optional[str], sms: Optional[str], hidden: Optional[str], tokens: Optional[str],
               topk: Optional[str], experts: Optional[str], dtype: Optional[str], routing: Optional[str],
               knob: Optional[list[str]], rng_seed: Optional[int], warmup: Optional[int], iters: Optional[int],
               point_timeout: Optional[float], exhaustive: Optional[bool], spec: Optional[Path], quick: bool) -> SweepSpec:
    """The grid of ``sweep``'s options: the preset (``quick``) or the defaults, then the spec file, then the
    options given (a backend left out by ``--backends`` loses the preset's or file's knobs)."""
    base = QUICK if quick else SweepSpec()
    if spec is not None:
        base = merge(base, load_spec_file(spec))
    knobs = {b: dict(v) for b, v in base.knobs.items()}
    if backends is not None:
        knobs = {b: v for b, v in knobs.items() if b in parse_words(backends, "--backends")}
    for text in knob or []:
        backend, name, values = parse_knob(text)
        knobs.setdefault(backend, {})[name] = values
    return merge(base, {
        "backends": parse_optional(backends, parse_words, "--backends"), "sms": parse_optional(sms, parse_ints, "--sms"),
        "hidden": parse_optional(hidden, parse_ints, "--hidden"), "tokens": parse_optional(tokens, parse_ints, "--tokens"),
        "topk": parse_optional(topk, parse_ints, "--topk"), "experts": parse_optional(experts, parse_ints, "--experts"),
        "dtypes": parse_optional(dtype, parse_words, "--dtype"), "routings": parse_optional(routing, parse_words, "--routing"),
        "knobs": knobs, "rng_seed": rng_seed, "warmup": warmup, "iters": iters, "point_timeout_s": point_timeout,
        "exhaustive": exhaustive,
    })


def sweep(spec: SweepSpec, out: Optional[Path], resume: bool, extend: bool, then_tune: bool, tune_out: Optional[Path],
          wide: bool, nproc: Optional[int], max_restarts: int, share: Optional[str]) -> None:
    """Measure every point of ``spec`` (here, or on ``nproc`` local ranks sharing GPUs as ``share`` says)
    into ``out``; tune after when ``then_tune``. ``CommandExit`` for a nonzero exit status of the ranks
    or an interrupt."""
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
        _launch(spec, out, resume, extend, argv, nproc, max_restarts, share)
    else:
        try:
            run_sweep(spec, out, resume, argv, lambda results, folder: print_summary(results, folder, wide), extend, share)
        except Interrupted as exc:  # Typer would turn it into a silent exit
            if exc.report is not None:
                print(f"a2a-bench: {exc.report}", file=sys.stderr, flush=True)
            raise CommandExit(130) from None
        if placement_from_env().rank != 0:
            return
    if tables is not None:
        tune_and_print(out, tables, None, "api", wide)


def _launch(spec: SweepSpec, out: Path, resume: bool, extend: bool, argv: list[str], nproc: int, max_restarts: int,
            share: Optional[str]) -> None:
    """The sweep on ``nproc`` local ranks, this process their launcher (it holds the run folder's lock)."""
    if nproc < 1:
        raise SpecError(f"--nproc must be >= 1, got {nproc}")
    if max_restarts < 0:
        raise SpecError(f"--max-restarts must be >= 0, got {max_restarts}")
    validate(spec, nproc)
    lock = claim_run_folder(out, resume, argv, None, spec, extend)  # rank 0 checks the cluster
    try:
        ranks_argv = argv_for_ranks(sys.argv[1:], out)
        if max_restarts and "--resume" not in ranks_argv:
            ranks_argv.append("--resume")
        with launcher_sharing(nproc, share):
            status = launch_local(nproc, ranks_argv, max_restarts)
        code = finish_local(status, out, spec, nproc, argv)
    finally:
        if lock is not None:
            lock.release()
    if code:
        raise CommandExit(code)


def argv_for_ranks(argv: list[str], out: Path) -> list[str]:
    """The command line each launched rank runs: ``--nproc`` and what the launcher does itself
    (``--tune``) removed, ``--out`` fixed."""
    return [*without_options(argv, ("--nproc", "--out", "--max-restarts", "--tune-out"), ("--tune",)), "--out", str(out)]
