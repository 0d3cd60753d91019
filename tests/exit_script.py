"""One rank of a 2-rank job that dispatches and combines with fused_a2a, then exits, with or without
``destroy_process_group`` (``tests/test_clean_exit.py`` runs it many times and counts aborts).

Usage: ``python exit_script.py RANK WORLD PORT DESTROY(0|1)``.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist


def main(rank: int, world_size: int, port: int, destroy: bool) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    import fused_a2a

    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(16, 8, requires_grad=True)
    weights = torch.rand(16, 2, requires_grad=True)
    recv_x, _, _, _, handle = fused_a2a.dispatch(x, torch.randint(0, 8, (16, 2), generator=gen), weights, 8)
    fused_a2a.combine(recv_x * 2, handle).sum().backward()
    dist.barrier()
    if destroy:  # the torch backend needs no free_all_buffers first (DeepEP's buffer would)
        dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1")
