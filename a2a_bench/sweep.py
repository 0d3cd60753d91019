"""The sweep driver: process group, run folder, resume, progress, one row per point, teardown."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
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
from a2a_bench.results import RESULTS_FILE, RUN_FILE, append_row, done_point_ids, read_results
from a2a_bench.runner import RunContext, base_row, run_point
from a2a_bench.spec import SpecError, SweepSpec, expand, validate
from fused_a2a.cluster import detect_cluster
from fused_a2a.teardown import free_all_buffers
from fused_a2a.files import atomic_write_text


@dataclass(frozen=True)
class Placement:
    """Where this process runs: its rank, the world size and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def placement_from_env() -> Placement:
    """Read torchrun's variables (a lone process is rank 0 of 1); CUDA if present, else CPU."""
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    return Placement(rank, world, local, device)


def init_group(where: Placement) -> None:
    """Join the default process group: NCCL on GPU, gloo on CPU (a lone process gets a local store)."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(_free_port())
    if where.device.type == "cuda":
        torch.cuda.set_device(where.device)
        dist.init_process_group("nccl", rank=where.rank, world_size=where.world_size, device_id=where.device,
                                timeout=timedelta(minutes=10))
    else:
        dist.init_process_group("gloo", rank=where.rank, world_size=where.world_size, timeout=timedelta(minutes=10))


def run_sweep(spec: SweepSpec, out_dir: Path, resume: bool, argv: list[str]) -> Path:
    """Run every point of ``spec`` not yet in ``out_dir/results.csv``; returns the results path.

    Raises ``SpecError`` before joining the process group for user errors.
    """
    where = placement_from_env()
    validate(spec, where.world_size)
    results = out_dir / RESULTS_FILE
    if results.exists() and not resume:
        raise SpecError(f"{results} already exists: pass --resume to continue it, or choose another --out")
    points = expand(spec, where.world_size)
    init_group(where)
    try:
        _sweep(spec, points, out_dir, resume, argv, where)
    finally:
        free_all_buffers()
        dist.destroy_process_group()
    return results


def _sweep(spec: SweepSpec, points, out_dir: Path, resume: bool, argv: list[str], where: Placement) -> None:
    results = out_dir / RESULTS_FILE
    cluster = detect_cluster(where.world_size)
    done: list = [done_point_ids(results) if (where.rank == 0 and resume) else set()]
    dist.broadcast_object_list(done, src=0)
    todo = [p for p in points if p.point_id not in done[0]]
    if where.rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        run_info = {
            "spec": spec.to_json(), "cluster": cluster.to_json(), "world_size": where.world_size,
            "versions": {"a2a_bench": __version__, **backend_versions()}, "command": argv,
            "points": len(points), "resumed_with_done": len(points) - len(todo),
        }
        atomic_write_text(out_dir / RUN_FILE, json.dumps(run_info, indent=2) + "\n")
    peak = link_peak_gbps(where.device)
    ctx = RunContext(where.device, cluster.id, peak, spec.warmup, spec.iters)
    console = Console(stderr=True)
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("ETA"), TimeRemainingColumn(), console=console, disable=where.rank != 0, transient=False,
    ) as progress:
        task = progress.add_task(f"sweep on {cluster.id}", total=len(todo))
        for point in todo:
            progress.update(task, description=f"{point.backend} h{point.workload.hidden} n{point.workload.num_tokens}")
            try:
                row = run_point(point, ctx)
            except Exception as exc:  # recorded, not raised: one bad point must not end the sweep
                row = {**base_row(point, ctx), "status": f"error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
                free_all_buffers()
            if where.rank == 0:
                append_row(results, row)
            progress.advance(task)
    if where.rank == 0:
        console.print(f"link peak {peak:.1f} GB/s; {len(todo)} points measured; results in {results}")
        Console().print(summary_table(read_results(results)))


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_local(nproc: int, argv: list[str]) -> int:
    """Re-run this command under torchrun's own launcher with ``nproc`` local ranks; its exit status."""
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args(["--nproc-per-node", str(nproc), "--standalone", "-m", "a2a_bench", *argv])
    try:
        run(args)
    except Exception as exc:  # torchrun's ChildFailedError: the ranks already printed their errors
        print(f"a2a-bench: a rank failed: {type(exc).__name__}", file=sys.stderr)
        return 1
    return 0
