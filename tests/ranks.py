"""Run a function on N real CPU ranks (separate processes, gloo), or on the ranks of a torchrun job."""

from __future__ import annotations

import importlib
import os
import sys
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spawn(fn, world_size: int, *args, sys_path: tuple[str, ...] = ()) -> None:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; re-raise any rank's failure.

    ``sys_path`` entries go first on each rank's ``sys.path`` before ``fn``'s module is imported (a
    rank is a fresh process: ``fn`` can import packages from there, e.g. a fake library, without
    touching this one). ``fn`` travels by name, so its module is imported only after that.
    """
    target = (fn.__module__, fn.__qualname__)
    mp.start_processes(
        _entry, args=(target, world_size, free_port(), args, sys_path), nprocs=world_size, join=True,
        start_method="spawn",
    )


def _entry(rank: int, target: tuple[str, str], world_size: int, port: int, args, sys_path: tuple[str, ...]) -> None:
    sys.path[:0] = sys_path
    fn = getattr(importlib.import_module(target[0]), target[1])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    fn(rank, world_size, *args)
    # every rank leaves together: a rank tearing gloo down while a peer still talks to it aborts the peer
    dist.barrier()
    dist.destroy_process_group()
    # gloo's background threads can abort the interpreter's own exit ("terminate called without an
    # active exception"): the rank's work is done and checked, so leave without running destructors
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def under_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ
