"""The sweep driver: run folder, resume, progress, one row per point (in a process group, :mod:`a2a_bench.launch.group`)."""

from __future__ import annotations

import math
import os
import shlex
import sys
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import pandas as pd

import torch.distributed as dist
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from a2a_bench import __version__
from a2a_bench.engine import interrupt
from a2a_bench.engine.lock import RunLock
from a2a_bench.engine.measure import link_peak_gbps
from a2a_bench.engine.results import (
    RESULTS_FILE, RUN_FILE, SUMMARY_FILE, Invocation, RunInfo, read_results, read_run_info, write_run_info,
)
from a2a_bench.engine.runfolder import MAX_ATTEMPTS, RunFolder
from a2a_bench.engine.runner import RunContext, base_row, run_point
from a2a_bench.engine.search import coordinate_search, groups, search_size
from a2a_bench.engine.sharing import NOT_COMPARABLE, check_rank
from a2a_bench.engine.spec import Point, SpecError, SweepSpec, expand, validate
from a2a_bench.engine.versions import backend_versions
from a2a_bench.engine.watchdog import Watchdog
from a2a_bench.launch.group import Placement, placement_from_env, process_group
from a2a_bench.launch.lifeline import launched_by_torchrun
from a2a_bench.launch.local import under_local_launcher
from a2a_bench.output import make_console
from a2a_bench.engine.writable import check_out_dir
from fused_a2a.backends import get_backend
from fused_a2a.cluster import detect_cluster
from fused_a2a.teardown import free_all_buffers

Summarize = Callable[[pd.DataFrame, Path], None]
"""``(results, run folder) -> None``: prints a finished sweep's tables on rank 0 (and writes them to the folder)."""


class NothingMeasured(SpecError):
    """No point of a sweep's grid measured ``ok`` (the CLI exits with status 2)."""


def run_sweep(spec: SweepSpec, out_dir: Path, resume: bool, argv: list[str], summarize: Summarize, extend: bool = False,
              share_gpu: str | None = None) -> Path:
    """Run every point of ``spec`` not yet in ``out_dir/results.csv``; returns the results path. Rank 0
    ``summarize``s the results when the points are done.

    User errors raise ``SpecError``/``ResultsError`` before the process group is joined and before
    anything is written: the spec and how ranks share GPUs (``share_gpu``: ``--share-gpu``,
    :func:`a2a_bench.engine.sharing.check_rank`) on every rank; on rank 0 the run folder (writable,
    not locked by a live sweep, and on ``--resume`` holding this tool's files of this cluster, of the
    same timing settings and, unless ``extend``, the same grid). Rank 0 holds the folder's lock for
    the sweep (unless its parent, ``a2a-bench --nproc``, holds it). Buffers are freed before the
    process group is destroyed, also on an exception, Ctrl-C or SIGTERM.

    A process outside torchrun runs alone (1 rank): it says so in one warning line.

    Raises:
        Interrupted: SIGINT (Ctrl-C) stopped the sweep; rank 0 marked the point in flight as
            interrupted. Its ``report`` is the line to print on rank 0 when no local launcher prints it.
        NothingMeasured: on rank 0 outside ``a2a-bench --nproc`` (the launcher checks itself), when
            no point of the grid measured ``ok``.
    """
    where = placement_from_env()
    validate(spec, where.world_size)
    check_rank(share_gpu, where.rank)
    points = expand(spec, where.world_size)
    lock = (claim_run_folder(out_dir, resume, argv, detect_cluster(where.world_size).id, spec, extend)
            if where.rank == 0 else None)
    if not launched_by_torchrun():
        print("a2a-bench: warning: running 1 rank (no torchrun, no --nproc): nothing crosses between ranks; "
              "use --nproc N or torchrun for a real sweep", file=sys.stderr, flush=True)
    folder = RunFolder(out_dir)
    try:
        with interrupt.on_sigint(folder.interrupt) if where.rank == 0 else _nothing():
            with process_group(where):
                _sweep(spec, points, folder, argv, where, resume, extend, summarize)
    except KeyboardInterrupt:
        raise interrupt.Interrupted(_interrupt_report(folder, points, argv, where)) from None
    finally:
        if lock is not None:
            lock.release()
    if where.rank == 0 and not under_local_launcher():
        problem = measured_nothing(read_results(folder.results, allow_empty=True), points)
        if problem is not None:
            raise NothingMeasured(problem)
    return out_dir / RESULTS_FILE


@contextmanager
def _nothing():
    yield


def _interrupt_report(folder: RunFolder, points: list[Point], argv: list[str], where: Placement) -> str | None:
    """The line rank 0 ends an interrupted sweep with (``None`` on other ranks and under a local launcher)."""
    if where.rank != 0 or under_local_launcher():
        return None
    if launched_by_torchrun():
        command = interrupt.torchrun_resume(argv, folder.path, where.world_size,
                                            int(os.environ.get("LOCAL_WORLD_SIZE", where.world_size)))
    else:
        command = shlex.join(interrupt.resume_argv(argv, folder.path))
    return interrupt.report(folder.path, kept_points(folder.results, points), command)


def kept_points(results: Path, points: list[Point]) -> int:
    """How many of ``points`` have a row in ``results`` (0 when it cannot be read)."""
    try:
        ids = set(read_results(results, allow_empty=True)["point_id"].astype(str))
    except ValueError:
        return 0
    return sum(point.point_id in ids for point in points)


def measured_nothing(results: pd.DataFrame, points: list[Point]) -> str | None:
    """Why no point of ``points`` measured ``ok`` in ``results`` (their statuses, most common first),
    or ``None`` when one did."""
    statuses = results[results["point_id"].astype(str).isin({p.point_id for p in points})]["status"].astype(str)
    if (statuses == "ok").any():
        return None
    if statuses.empty:
        return "nothing could be measured: no point of the grid has a row"
    counts = Counter(statuses)
    return "nothing could be measured: " + "; ".join(
        f"{n} point{'s' if n != 1 else ''} {status}" for status, n in counts.most_common())


def claim_run_folder(out_dir: Path, resume: bool, argv: list[str], cluster: str | None,
                     spec: SweepSpec | None = None, extend: bool = False) -> RunLock | None:
    """Check that a sweep may write ``out_dir`` and lock it; the lock taken (``None``: this
    process's parent, the local launcher, holds it). Writes nothing but the lock file.

    Raises:
        SpecError: ``--out`` is not a writable folder, a live sweep holds it, ``results.csv`` exists
            without ``resume``, or with ``resume`` ``spec`` has other timing settings than the folder's,
            or (without ``extend``) another grid.
        ResultsError: with ``resume``, ``results.csv`` or ``run.json`` is not this tool's, or ``run.json``
            names another cluster than ``cluster`` (``None``: not checked).
    """
    check_out_dir(out_dir)
    lock = RunLock(out_dir)
    if lock.held_by_parent():
        lock = None
    else:
        stale = lock.acquire(argv)
        if stale is not None:
            print(f"a2a-bench: taking over run folder {out_dir} from a sweep that is gone ({stale.describe()})",
                  file=sys.stderr, flush=True)
    try:
        RunFolder(out_dir).check_start(resume, cluster, spec, extend)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return lock


def point_line(done: int, total: int, point: Point, row: dict) -> str:
    """One line for a finished point (what a log gets instead of a progress bar): its status and,
    for an ``ok`` point, the kernel-mode medians in µs."""
    w = point.workload
    knobs = " ".join(f"{k}={v}" for k, v in point.knobs) or "-"
    line = (f"[{done}/{total}] {point.backend} {knobs} {w.dtype} h{w.hidden} n{w.num_tokens} k{w.topk} "
            f"e{w.num_experts} {w.routing_key}: {row['status']}")
    if row["status"] == "ok":
        line += (f", dispatch {float(row['dispatch_kernel_us_median']):.1f} µs, "
                 f"combine {float(row['combine_kernel_us_median']):.1f} µs")
    return line


def _sweep(spec: SweepSpec, points: list[Point], folder: RunFolder, argv: list[str], where: Placement,
           resume: bool, extend: bool, summarize: Summarize) -> None:
    cluster = detect_cluster(where.world_size)
    plan: list = [None]
    if where.rank == 0:
        plan[0] = _plan(folder, points)
    dist.broadcast_object_list(plan, src=0)
    known, attempts, given_up = plan[0]
    peak = link_peak_gbps(where.device)
    ctx = RunContext(where.device, cluster.id, peak, spec.warmup, spec.iters,
                     ranks_per_node=int(os.environ.get("LOCAL_WORLD_SIZE", where.world_size)),
                     gpu_sharing=cluster.gpu_sharing, ranks_per_gpu=cluster.ranks_per_gpu)
    done_before = {point.point_id for point in points if point.point_id in known}
    if where.rank == 0:
        write_run_info(folder.path / RUN_FILE, _run_info(folder, spec, cluster, where, argv, points, len(done_before),
                                                         resume, extend))
        for point, phase in given_up:
            folder.record({**base_row(point, ctx), "status": f"error: a rank died during {phase} in {MAX_ATTEMPTS} attempts"})
    known.update({point.point_id: math.inf for point, _ in given_up})
    current: dict[str, Point] = {}

    def on_expire(label: str, phase: str) -> None:
        if where.rank == 0:
            folder.record({**base_row(current["point"], ctx),
                           "status": f"timeout: {phase} exceeded {spec.point_timeout_s:g} s"})

    watchdog = Watchdog(on_expire, grace_s=0.0 if where.rank == 0 else 10.0)
    console = make_console(stderr=True)
    live = console.is_terminal
    point_groups = groups(points)
    total = sum(len(g) if spec.exhaustive else search_size(g, _sms_knob(g)) for g in point_groups)
    timed = 0
    visited: set[str] = set()  # points the search has reached, timed now or done before
    started = time.monotonic()
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("ETA"), TimeRemainingColumn(), console=console, disable=where.rank != 0 or not live,
    ) as progress:
        task = progress.add_task(f"sweep on {cluster.id}", total=total)
        if where.rank == 0 and not live:
            before = f" ({len(done_before)} done before)" if done_before else ""
            console.print(f"sweep on {cluster.id}: up to {total} points to time{before}", markup=False, highlight=False)

        def cost(point: Point) -> float:
            """The point's dispatch + combine median (µs, api mode), timing it unless a row exists."""
            nonlocal timed
            if point.point_id in known:
                if point.point_id not in visited:
                    visited.add(point.point_id)
                    progress.advance(task)
                return known[point.point_id]
            current["point"] = point
            w = point.workload
            label = f"{point.backend} h{w.hidden} n{w.num_tokens}"
            progress.update(task, description=label)

            def on_phase(name: str) -> None:
                watchdog.phase(name)
                progress.update(task, description=f"{label}: compiling" if name == "compile" else label)
                if where.rank == 0:
                    folder.phase(name)

            if where.rank == 0:
                folder.start(point.point_id, attempts.get(point.point_id, 1))
            watchdog.arm(point.point_id, spec.point_timeout_s)
            row = _measure(point, replace(ctx, on_phase=on_phase))
            watchdog.disarm()
            timed += 1
            visited.add(point.point_id)
            if where.rank == 0:
                folder.record(row)
                if not live:
                    console.print(point_line(len(visited), total, point, row), markup=False, highlight=False)
            progress.advance(task)
            known[point.point_id] = search_cost(row)
            return known[point.point_id]

        for group in point_groups:
            if spec.exhaustive:
                for point in group:
                    cost(point)
            else:
                coordinate_search(group, get_backend(group[0].backend).defaults(), cost, _sms_knob(group))
        progress.update(task, completed=total)
    if where.rank == 0:
        folder.finish()
        strategy = "exhaustive" if spec.exhaustive else "coordinate search"
        before = f" ({len(visited & done_before)} more were done before)" if visited & done_before else ""
        console.print(f"{strategy}: timed {timed} of {len(points)} grid points in {time.monotonic() - started:.1f} s{before}; "
                      f"link peak {peak:.1f} GB/s; results in {folder.results}, tables in {folder.path / SUMMARY_FILE}",
                      markup=False, highlight=False)
        summarize(read_results(folder.results), folder.path)
        if cluster.gpu_sharing == "timeslice":
            console.print(f"warning: {cluster.ranks_per_gpu} ranks time-sliced each GPU (--share-gpu timeslice): every "
                          f"time of this run is {NOT_COMPARABLE} (results column comparable=False); tune refuses it",
                          markup=False, highlight=False)


def _run_info(folder: RunFolder, spec: SweepSpec, cluster, where: Placement, argv: list[str], points: list[Point],
              done: int, resume: bool, extend: bool) -> RunInfo:
    """``run.json`` for this sweep: the history of the folder's earlier sweeps (on ``resume``) with this
    one added (a torchrun restart of this sweep's job updates its entry instead)."""
    run_file = folder.path / RUN_FILE
    history = list(read_run_info(run_file).invocations()) if resume and run_file.exists() else []
    job = os.environ.get("TORCHELASTIC_RUN_ID", "") if launched_by_torchrun() else ""
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    if job and history and history[-1].job == job:
        history[-1] = replace(history[-1], restarts=restarts)
    else:
        history.append(Invocation(list(argv), datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), spec.to_json(),
                                  len(points), done, extend, job, restarts))
    return RunInfo(spec=spec.to_json(), cluster=cluster.to_json(), world_size=where.world_size,
                   versions={"a2a_bench": __version__, **backend_versions()}, command=list(argv), points=len(points),
                   resumed_with_done=done, history=tuple(history))


def _sms_knob(group: list[Point]) -> str | None:
    """The SM knob the search starts with for a group of one backend's points."""
    knobs = get_backend(group[0].backend).sms_knobs
    return knobs[0] if knobs else None


def search_cost(row) -> float:
    """What the search ranks a point by: its dispatch + combine api median (µs; the kernel median where
    api was not timed); infinite for a point that is not ``ok``."""
    if row.get("status") != "ok":
        return math.inf
    for mode in ("api", "kernel"):
        d, c = row.get(f"dispatch_{mode}_us_median"), row.get(f"combine_{mode}_us_median")
        if d is not None and c is not None and d != "" and c != "" and not (pd.isna(d) or pd.isna(c)):
            return float(d) + float(c)
    return math.inf


def _plan(folder: RunFolder, points: list[Point]):
    """Rank 0's plan: the cost of each point with a row, attempt numbers, and the points given up
    (a point left in flight by an interrupt keeps its attempt number)."""
    known = {str(r["point_id"]): search_cost(r) for r in folder.rows()}
    left = folder.in_flight()
    attempts, given_up = {}, []
    if left is not None and left.point_id not in known:
        died = next((p for p in points if p.point_id == left.point_id), None)
        if left.interrupted:  # an interrupt is not an attempt
            attempts[left.point_id] = left.attempt
        elif died is not None and left.attempt >= MAX_ATTEMPTS:
            given_up.append((died, left.phase))
        else:
            attempts[left.point_id] = left.attempt + 1
    return known, attempts, given_up


def _measure(point: Point, ctx: RunContext) -> dict:
    """Run one point; any rank's exception becomes the point's ``error`` status on every rank.

    After an error, every backend buffer and the workload's prepared inputs are dropped on every rank,
    so the next point starts from fresh ones (and no rank reuses inputs another made again).
    """
    try:
        row, problem = run_point(point, ctx), None
    except Exception as exc:  # recorded, not raised: one bad point must not end the sweep
        row, problem = base_row(point, ctx), f"error: {type(exc).__name__}: {_first_line(exc)}"
    problems: list = [None] * dist.get_world_size()
    dist.all_gather_object(problems, problem)
    first = next((p for p in problems if p is not None), None)
    if first is None:
        return row
    ctx.prepared.clear()
    free_all_buffers()
    return {**base_row(point, ctx), "status": first}


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else ""


def finish_local(code: int, out_dir: Path, spec: SweepSpec, nproc: int, argv: list[str]) -> int:
    """The local launcher's end of a sweep whose ranks ended with status ``code`` (:func:`launch_local`);
    the command's exit status.

    Interrupted (``code`` > 128): the point left in flight is marked interrupted (the ranks mark it
    on SIGINT; a SIGTERM sent to the launcher reaches them as a stop, not as an interrupt), and one line
    says what was kept and the command that continues. Ended well: :class:`NothingMeasured` when no point
    of the grid measured ``ok``.
    """
    points = expand(spec, nproc)
    results = out_dir / RESULTS_FILE
    if code > 128:
        RunFolder(out_dir).mark_left_interrupted()
        line = interrupt.report(out_dir, kept_points(results, points), shlex.join(interrupt.resume_argv(argv, out_dir)))
        print(f"a2a-bench: {line}", file=sys.stderr, flush=True)
        return code
    if code == 0:
        problem = measured_nothing(read_results(results, allow_empty=True), points)
        if problem is not None:
            raise NothingMeasured(problem)
    return code
