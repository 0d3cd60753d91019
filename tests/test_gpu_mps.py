"""Ranks that share one GPU under MPS (real GPU, real MPS daemon, real DeepEP): the cluster id says so, and
fused_a2a's seed function finds and uses a table of that id at run time.

Run with an MPS control daemon serving the ranks (``scripts/gpu_checks.sh OUT mps`` starts one for it):
``torchrun --nproc-per-node 2 -m pytest -m gpu tests/test_gpu_mps.py``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import fused_a2a
from fused_a2a import mps
from fused_a2a.backends.deepep import DEEP_EP
from fused_a2a.cluster import detect_cluster
from fused_a2a import tuning
from fused_a2a.tuning.resolve import TUNING_DIR_ENV, resolve
from fused_a2a.shape import CallShape
from gpu import gpu_ready, real, shares_gpus

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not gpu_ready() or not shares_gpus() or mps.daemon_pid() is None or not real(DEEP_EP),
                       reason="needs ranks sharing a CUDA GPU under a running MPS daemon, and DeepEP"),
]

TUNED = {"num_sms": 48, "nvl_send": 16, "nvl_recv": 512, "rdma_send": 0, "rdma_recv": 0}


def test_the_seed_function_finds_the_mps_table_at_run_time(gpu_device, monkeypatch) -> None:
    world = dist.get_world_size()
    cluster = detect_cluster(world)
    assert (cluster.gpu_sharing, cluster.ranks_per_gpu) == ("mps", world // torch.cuda.device_count())
    assert cluster.id.endswith(f"-mps{cluster.ranks_per_gpu}")
    root = Path(f"/tmp/a2a-bench-gpu-mps-{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}")
    if dist.get_rank() == 0:
        (root / cluster.id).mkdir(parents=True, exist_ok=True)
        (root / cluster.id / "tuning.json").write_text(json.dumps({
            "schema": "a2a-bench/tuning/v1", "cluster": cluster.to_json(), "created": "2026-12-04T00:00:00Z",
            "tool_version": "test", "entries": [{
                "backend": "deepep", "world_size": world, "dtype": "bf16", "hidden": 7168, "num_tokens": 4096, "topk": 8,
                "num_experts": 64, "dispatch": TUNED, "combine": TUNED, "frontier": [],
                "measured": {"dispatch_us": 300.0, "combine_us": 300.0}}]}))
    dist.barrier()
    monkeypatch.setenv(TUNING_DIR_ENV, str(root))
    tuning.clear()
    res = resolve("deepep", CallShape("bf16", 7168, topk=8, num_experts=64, world_size=world, tokens=(4096,)), {})
    assert res.dispatch == TUNED and set(res.sources.values()) == {"table"}, res
    generator = torch.Generator().manual_seed(dist.get_rank())
    x = torch.randn(4096, 7168, generator=generator).to(torch.bfloat16).to(gpu_device)
    idx = torch.rand(4096, 64, generator=generator).topk(8, dim=1).indices.to(gpu_device)
    weights = torch.softmax(torch.rand(4096, 8, generator=generator), dim=1).to(gpu_device)
    recv_x, _, _, _, handle = fused_a2a.fused_dispatch(x, idx, weights, 64, dist.group.WORLD)
    out = fused_a2a.fused_combine(recv_x, dist.group.WORLD, handle)[0]
    # combine sums the copies of each token: one per rank that holds one of its experts
    holders = torch.stack([(idx // (64 // world) == r).any(dim=1) for r in range(world)]).sum(dim=0)
    torch.testing.assert_close(out.float(), x.float() * holders[:, None], rtol=2e-2, atol=2e-2)
    tuning.clear()
