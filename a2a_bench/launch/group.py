"""The process group of a command's ranks: where this process runs, joining the group, leaving it cleanly."""

from __future__ import annotations

import logging
import os
import signal
import socket
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from fused_a2a.teardown import free_all_buffers

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


@contextmanager
def process_group(where: Placement):
    """Join the process group for the body; then free every buffer and destroy the group, also after
    an exception, Ctrl-C or SIGTERM (DeepEP hangs if the group goes first). Rank 0 logs the teardown.

    SIGTERM is turned into an exception only once the group is joined: a rank still waiting in the
    rendezvous (whose rank 0 stopped on a user error) has nothing to free and must die at once when
    torchrun stops it (Python cannot run a handler inside the blocking wait).
    """
    init_group(where)
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    try:
        yield
    finally:
        free_all_buffers()
        if where.rank == 0:
            logger.info("buffers freed; destroying the process group")
        dist.destroy_process_group()
        if where.rank == 0:
            logger.info("process group destroyed")


def _raise_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
