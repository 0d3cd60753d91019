"""Graph mode: the kernel-mode calls of a backend captured in a CUDA graph and replayed, with new inputs
written into the captured tensors, give the reference's results. A backend that cannot be captured
raises :class:`~a2a_bench.engine.measure.NotCapturable` (the sweep records why); the test prints which did.

``torchrun --nproc-per-node 1 -m pytest -m gpu -s tests/test_gpu_graph.py`` (torch over NCCL needs one GPU
per process) and ``--nproc-per-node 2`` for DeepEP and HybridEP (processes may share one GPU).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import fused_a2a
from a2a_bench.engine.measure import NotCapturable, capture
from a2a_bench.engine.workload import WorkloadSpec
from fused_a2a.backends import BACKENDS, make_comm
from gpu import gpu_ready, shares_gpus
from reference import Case, expected_dispatch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not gpu_ready(), reason="needs CUDA GPUs under torchrun")]

CASE = Case(WorkloadSpec(num_tokens=128, hidden=2048, topk=8, num_experts=16, dtype="bf16", rng_seed=3))


def _runs_here(backend: str) -> bool:
    spec = BACKENDS[backend]
    if spec.unavailable() is not None or spec.invalid({}, dist.get_world_size()) is not None:
        return False
    return not (backend == "torch" and shares_gpus())  # NCCL refuses two ranks on one GPU


@pytest.mark.parametrize("backend", ["torch", "deepep", "hybridep", "uccl"])
def test_replayed_cached_dispatch_and_combine_match_the_reference(gpu_device, backend: str) -> None:
    if not _runs_here(backend):
        pytest.skip(f"{backend} does not run here")
    rank, world = dist.get_rank(), dist.get_world_size()
    inputs = [CASE.inputs(r, world) for r in range(world)]
    mine = inputs[rank]
    x = mine.x.to(gpu_device)
    idx, weights = mine.topk_idx.to(gpu_device), mine.topk_weights.to(gpu_device)
    out = fused_a2a.dispatch(x, idx, weights, CASE.spec.num_experts, backend=backend)
    comm = make_comm(backend, {}, num_ranks=world)
    buffer = comm.get_buffer(None, x)
    handle, rows = out[4].raw, out[0]
    held: dict[str, torch.Tensor] = {}

    def cached_dispatch():
        held["recv"] = buffer.dispatch(x, handle=handle, config=comm.dispatch_config)[0]

    def cached_combine():
        held["combined"] = buffer.combine(rows, handle, config=comm.combine_config)[0]

    try:
        replays = [capture(cached_dispatch, gpu_device), capture(cached_combine, gpu_device)]
    except NotCapturable as why:
        print(f"\n[graph] {backend}: not capturable ({why})")
        statuses = [None] * world
        dist.all_gather_object(statuses, str(why))
        return
    print(f"\n[graph] {backend}: captured")
    new = [Case(CASE.spec).inputs(r, world) for r in range(world)]
    new = [type(i)(i.x * 2 + 1, i.topk_idx, i.topk_weights) for i in new]  # same routing, new token values
    x.copy_(new[rank].x.to(gpu_device))
    rows.copy_(rows * 3)
    expected_rows = rows.clone()
    for replay in replays:
        replay()
    torch.cuda.synchronize()
    assert torch.equal(held["recv"].cpu(), expected_dispatch(new, rank, CASE.spec.num_experts)[0])
    eager = buffer.combine(expected_rows, handle, config=comm.combine_config)[0]
    assert torch.equal(held["combined"], eager)
    fused_a2a.teardown.free_all_buffers()
