"""The routing property run (:mod:`property_workers`) on GPUs with the real libraries: DeepEP, UCCL-EP and
HybridEP where installed (HybridEP on its legal shapes; the cases a backend cannot take must raise the
same ValueError on every rank), and the torch backend (its Triton routing kernels).

Two processes, which may share one GPU (the group is then gloo; the fused libraries move the tokens
through CUDA IPC): ``torchrun --nproc-per-node 2 -m pytest -m gpu -s tests/test_gpu_routing_property.py``.
``PROPERTY_CASES`` sets the number of cases (default 120). The tally of runs per backend is printed
(rank 0) and written to ``$PROPERTY_SUMMARY`` when set.
"""

from __future__ import annotations

import json
import os

import pytest
import torch.distributed as dist

from fused_a2a.backends.deepep import DEEP_EP
from fused_a2a.backends.hybridep import HAVE_HYBRIDEP, HYBRID_EP
from fused_a2a.backends.uccl_buffer import UCCL_EP
from gpu import gpu_ready, real
from property_workers import property_run

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not gpu_ready(), reason="needs CUDA GPUs under torchrun")]


def installed_backends() -> tuple[str, ...]:
    """torch, and each fused library that is installed for real (not a CPU fake)."""
    found = ["torch"]
    if real(DEEP_EP):
        found.append("deepep")
    if real(UCCL_EP):
        found.append("uccl")
    if HAVE_HYBRIDEP and real(HYBRID_EP):
        found.append("hybridep")
    return tuple(found)


def test_every_routing_on_the_real_libraries(gpu_device, tmp_path) -> None:
    count = int(os.environ.get("PROPERTY_CASES", "120"))
    summary = os.environ.get("PROPERTY_SUMMARY") or str(tmp_path / "summary.json")
    result = property_run(dist.get_rank(), dist.get_world_size(), count, 31, installed_backends(), summary,
                          gpu_device)
    if dist.get_rank() == 0:
        print(f"\nGPU routing property, {dist.get_world_size()} ranks, {count} cases: {json.dumps(result['runs'])}")
    assert all(tally.get("ok", 0) > 0 for name, tally in result["runs"].items() if name != "hybridep" or count >= 40)
