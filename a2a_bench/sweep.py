"""The sweep driver: process group, run folder, resume, progress, one row per point, teardown."""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from a2a_bench import __version__
from a2a_bench.environment import backend_versions
from a2a_bench.measure import link_peak_gbps
from a2a_bench.report import summary_table
from a2a_bench.results import RESULTS_FILE, RUN_FILE, read_results
from a2a_bench.runfolder import MAX_ATTEMPTS, RunFolder
from a2a_bench.runner import RunContext, base_row, run_point
from a2a_bench.search import coordinate_search, groups, search_size
from a2a_bench.spec import Point, SpecError, SweepSpec, expand, validate
from a2a_bench.watchdog import Watchdog
from fused_a2a.backends import get_backend
from fused_a2a.cluster import detect_cluster
from fused_a2a.teardown import free_all_buffers
from fused_a2a.files import atomic_write_text

logger = logging.getLogger("a2a_bench")


@dataclass(frozen=True)
class Placement:
    """Where this process runs: its rank, the world size and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def placement_from_env() -> Placement:
    """Read torchrun's variables (a lone process is rank 0 of 1); CUDA if present, else CPU.

    With fewer GPUs than local ranks, ranks share GPUs round-robin (for trying the code paths on a
    small machine: shared GPUs time-slice, so the times are not the link's).
    """
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    device = torch.device("cuda", local % gpus) if gpus else torch.device("cpu")
    return Placement(rank, world, local, device)


def shares_gpus() -> bool:
    """This node runs more ranks than it has GPUs (NCCL refuses that: the group is gloo's)."""
    return torch.cuda.is_available() and torch.cuda.device_count() < int(os.environ.get("LOCAL_WORLD_SIZE", 1))


def init_group(where: Placement) -> None:
    """Join the default process group: NCCL on GPU, gloo on CPU (a lone process gets a local store).

    The group's keys live under a prefix of torchrun's restart count: the agent's store outlives a
    restart, and a new rank must not read the addresses of the ranks that died.
    """
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(_free_port())
    timeout = timedelta(minutes=10)
    store, rank, world = next(dist.rendezvous("env://", rank=where.rank, world_size=where.world_size, timeout=timeout))
    store = dist.PrefixStore(f"a2a-bench/restart-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
    if where.device.type == "cuda":
        torch.cuda.set_device(where.device)
    if where.device.type == "cuda" and not shares_gpus():
        dist.init_process_group("nccl", store=store, rank=rank, world_size=world, device_id=where.device, timeout=timeout)
    else:
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timeout)


def run_sweep(spec: SweepSpec, out_dir: Path, resume: bool, argv: list[str]) -> Path:
    """Run every point of ``spec`` not yet in ``out_dir/results.csv``; returns the results path.

    Raises ``SpecError`` before joining the process group for user errors. Buffers are freed before
    the process group is destroyed, also on an exception, Ctrl-C or SIGTERM.
    """
    where = placement_from_env()
    validate(spec, where.world_size)
    results = out_dir / RESULTS_FILE
    if results.exists() and not resume:
        raise SpecError(f"{results} already exists: pass --resume to continue it, or choose another --out")
    points = expand(spec, where.world_size)
    with process_group(where):
        _sweep(spec, points, out_dir, argv, where)
    return results


@contextmanager
def process_group(where: Placement):
    """Join the process group for the body; then free every buffer and destroy the group, also after
    an exception, Ctrl-C or SIGTERM (DeepEP hangs if the group goes first)."""
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    init_group(where)
    try:
        yield
    finally:
        free_all_buffers()
        logger.info("buffers freed; destroying the process group")
        dist.destroy_process_group()
        logger.info("process group destroyed")


def _raise_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)


def _sweep(spec: SweepSpec, points: list[Point], out_dir: Path, argv: list[str], where: Placement) -> None:
    folder = RunFolder(out_dir)
    cluster = detect_cluster(where.world_size)
    plan: list = [None]
    if where.rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        plan[0] = _plan(folder, points)
    dist.broadcast_object_list(plan, src=0)
    known, attempts, given_up = plan[0]
    peak = link_peak_gbps(where.device)
    ctx = RunContext(where.device, cluster.id, peak, spec.warmup, spec.iters,
                     ranks_per_node=int(os.environ.get("LOCAL_WORLD_SIZE", where.world_size)))
    if where.rank == 0:
        run_info = {
            "spec": spec.to_json(), "cluster": cluster.to_json(), "world_size": where.world_size,
            "versions": {"a2a_bench": __version__, **backend_versions()}, "command": argv,
            "points": len(points), "resumed_with_done": len(known),
        }
        atomic_write_text(out_dir / RUN_FILE, json.dumps(run_info, indent=2) + "\n")
        for point, phase in given_up:
            folder.record({**base_row(point, ctx), "status": f"error: a rank died during {phase} in {MAX_ATTEMPTS} attempts"})
    known.update({point.point_id: math.inf for point, _ in given_up})
    current: dict[str, Point] = {}

    def on_expire(label: str, phase: str) -> None:
        if where.rank == 0:
            folder.record({**base_row(current["point"], ctx),
                           "status": f"timeout: {phase} exceeded {spec.point_timeout_s:g} s"})

    watchdog = Watchdog(on_expire, grace_s=0.0 if where.rank == 0 else 10.0)
    console = Console(stderr=True)
    point_groups = groups(points)
    total = sum(len(g) if spec.exhaustive else search_size(g, _sms_knob(g)) for g in point_groups)
    timed = 0
    started = time.monotonic()
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("ETA"), TimeRemainingColumn(), console=console, disable=where.rank != 0,
    ) as progress:
        task = progress.add_task(f"sweep on {cluster.id}", total=total)

        def cost(point: Point) -> float:
            """The point's dispatch + combine kernel median (µs), timing it unless a row exists."""
            nonlocal timed
            if point.point_id in known:
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
            if where.rank == 0:
                folder.record(row)
            progress.advance(task)
            timed += 1
            known[point.point_id] = _cost(row)
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
        console.print(f"{strategy}: timed {timed} of {len(points)} grid points in {time.monotonic() - started:.1f} s; "
                      f"link peak {peak:.1f} GB/s; results in {folder.results}")
        Console().print(summary_table(read_results(folder.results)))


def _sms_knob(group: list[Point]) -> str | None:
    """The SM knob the search starts with for a group of one backend's points."""
    knobs = get_backend(group[0].backend).sms_knobs
    return knobs[0] if knobs else None


def _cost(row: dict) -> float:
    if row.get("status") != "ok":
        return math.inf
    return float(row["dispatch_kernel_us_median"]) + float(row["combine_kernel_us_median"])


def _plan(folder: RunFolder, points: list[Point]):
    """Rank 0's plan: the cost of each point with a row, attempt numbers, and the points given up."""
    known = {str(r["point_id"]): _cost(r) for r in folder.rows()}
    left = folder.in_flight()
    attempts, given_up = {}, []
    if left is not None and left.point_id not in known:
        died = next((p for p in points if p.point_id == left.point_id), None)
        if died is not None and left.attempt >= MAX_ATTEMPTS:
            given_up.append((died, left.phase))
        else:
            attempts[left.point_id] = left.attempt + 1
    return known, attempts, given_up


def _measure(point: Point, ctx: RunContext) -> dict:
    """Run one point; any rank's exception becomes the point's ``error`` status on every rank.

    After an error, every backend buffer is freed, so the next point starts from fresh ones.
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
    free_all_buffers()
    return {**base_row(point, ctx), "status": first}


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else ""


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_local(nproc: int, argv: list[str], max_restarts: int = 0) -> int:
    """Re-run this command under torchrun's own launcher with ``nproc`` local ranks; its exit status."""
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args([
        "--nproc-per-node", str(nproc), "--standalone", "--max-restarts", str(max_restarts),
        "-m", "a2a_bench", *argv,
    ])
    try:
        run(args)
    except Exception as exc:  # torchrun's ChildFailedError: the ranks already printed their errors
        print(f"a2a-bench: a rank failed: {type(exc).__name__}", file=sys.stderr)
        return 1
    return 0
