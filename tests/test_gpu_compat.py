"""The drop-in modules on the real libraries: each framework's stand-in, registered under the framework's
module name, driven the way its dispatcher calls it, against the dense reference (forward and gradients).

``torchrun --nproc-per-node 2 -m pytest -m gpu tests/test_gpu_compat.py`` with DeepEP's hybrid-ep build and
uccl installed (processes may share one GPU).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import compat_workers as drive
import fused_a2a.compat
from fused_a2a.backends.deepep import DEEP_EP
from fused_a2a.backends.hybridep import HAVE_HYBRIDEP
from fused_a2a.backends.uccl_buffer import UCCL_EP
from gpu import BACKEND_CASES, gpu_ready, real
from reference import check_case

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not gpu_ready() or not real(DEEP_EP), reason="needs CUDA GPUs under torchrun and DeepEP"),
]


@pytest.fixture(params=["automodel", "megatron"])
def stand_in(request, gpu_device):
    module = drive._installed(request.param)  # installs it as a training script does
    yield request.param, module
    fused_a2a.compat.uninstall(request.param)


@pytest.mark.parametrize("case", BACKEND_CASES[::4], ids=lambda c: f"h{c.spec.hidden}-n{c.spec.num_tokens}-k{c.spec.topk}")
def test_deepep_through_the_stand_in(stand_in, gpu_device, case) -> None:
    _, module = stand_in
    module.set_deepep_num_sms(20)  # what both dispatchers call when their user set no SM count
    calls = drive._framework_calls(module.fused_dispatch, module.fused_combine, dist.group.WORLD, False)
    check_case(case, dist.get_rank(), dist.get_world_size(), gpu_device, *calls)


@pytest.mark.skipif(not real(UCCL_EP), reason="needs uccl")
def test_uccl_through_automodels_stand_in(gpu_device) -> None:
    module = drive._installed("automodel")
    module.set_uccl_num_sms(20)
    calls = drive._framework_calls(module.uccl_fused_dispatch, module.uccl_fused_combine, dist.group.WORLD, False)
    check_case(BACKEND_CASES[0], dist.get_rank(), dist.get_world_size(), gpu_device, *calls)
    fused_a2a.compat.uninstall("automodel")


@pytest.mark.skipif(not HAVE_HYBRIDEP, reason="needs DeepEP's HybridEP")
def test_hybridep_through_the_stand_in(stand_in, gpu_device) -> None:
    framework, module = stand_in
    args = (dict(num_sms_dispatch_api=20, num_sms_combine_api=20) if framework == "automodel" else
            dict(num_sms_dispatch_api=None, num_sms_combine_api=None, num_blocks_permute=None,
                 num_blocks_unpermute=None, fused=False, num_sms_preprocessing_api=108))
    combine = {} if framework == "automodel" else {"fused": False}
    handle = drive._check_hybrid(dist.get_rank(), dist.get_world_size(), 1, module.hybrid_ep_dispatch,
                                 module.hybrid_ep_combine, args, device=gpu_device, hidden=2048, **combine)
    if framework == "megatron":  # the overflow flag Megatron's dispatcher reads after a non-blocking dispatch
        assert isinstance(handle[-1], torch.Tensor) and handle[-1].numel() == 1
    module.reset_hybrid_ep_buffer()
