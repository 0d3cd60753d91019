"""What the GPU-marked tests share: the group fixture, the issue's shapes, and "is it the real library"."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist

from a2a_bench.engine.workload import WorkloadSpec
from fused_a2a.backends.optional import OptionalModule
from fused_a2a.teardown import free_all_buffers
from nvlink_check_off import ranks_share_gpus, skip_nvlink_pair_check
from ranks import under_torchrun
from reference import Case

FAKES = Path(__file__).parent / "fakes"

# hidden {2048, 7168} x tokens {128, 4096} x top-k {2, 8}, 64 experts, bf16, plus -1 entries
BACKEND_CASES = [
    Case(WorkloadSpec(num_tokens=tokens, hidden=hidden, topk=topk, num_experts=64, dtype="bf16", rng_seed=seed))
    for seed, (hidden, tokens, topk) in enumerate(
        (h, n, k) for h in (2048, 7168) for n in (128, 4096) for k in (2, 8)
    )
] + [Case(WorkloadSpec(num_tokens=4096, hidden=7168, topk=8, num_experts=64, dtype="bf16", drop=0.2, rng_seed=20))]


def real(module: OptionalModule) -> bool:
    """The library is importable and is not one of the CPU fakes."""
    return module.available and not Path(module.module.__file__).resolve().is_relative_to(FAKES.resolve())


def gpu_ready() -> bool:
    return torch.cuda.is_available() and under_torchrun()


shares_gpus = ranks_share_gpus  # this node runs more test processes than it has GPUs


def gpu_group():
    """Join a group for a torchrun-launched pytest session; yields this rank's device.

    One GPU per process: NCCL. Processes that share GPUs (fewer GPUs than local processes, as on a
    one-GPU machine): gloo, which the fused backends use only for their handshake (the tokens move
    through CUDA IPC); NCCL refuses two ranks on one GPU. There, and only in these tests, DeepEP's
    check that every pair of ranks' GPUs is linked by NVLink (its hybrid-ep branch asserts it; two ranks
    on one GPU cannot pass it) is skipped. Buffers are freed before the group goes.
    """
    local_rank = int(os.environ["LOCAL_RANK"])
    device = torch.device("cuda", local_rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    if not shares_gpus():
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
        skip_nvlink_pair_check()
    yield device
    free_all_buffers()
    dist.barrier()
    dist.destroy_process_group()
