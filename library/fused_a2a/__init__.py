"""fused_a2a: expert-parallel (MoE) dispatch/combine for training frameworks.

The public API of NeMo Automodel's ``fused_a2a`` module (DeepEP, HybridEP and UCCL-EP variants,
:mod:`fused_a2a.seed`), plus a ``torch.distributed`` backend that runs anywhere and a backend-neutral
:func:`dispatch` / :func:`combine` entry over every backend of :mod:`fused_a2a.backends`.
``fused_a2a.teardown.free_all_buffers()`` releases every buffer before ``destroy_process_group``. Optional backends are imported inside ``try``: a missing
one sets its ``HAVE_*`` flag to False and its functions raise ``RuntimeError`` naming what to install.
"""

from fused_a2a import teardown
from fused_a2a.api import DispatchHandle, combine, dispatch
from fused_a2a.autograd import get_hidden_bytes
from fused_a2a.backends.torch_a2a import TorchBuffer, TorchConfig, TorchHandle
from fused_a2a.seed.deepep import (
    HAVE_DEEP_EP,
    FusedCombine,
    FusedDispatch,
    free_buffer,
    fused_combine,
    fused_dispatch,
    get_buffer,
    is_nvshmem_available,
    set_deepep_num_sms,
)
from fused_a2a.seed.hybridep import (
    HAVE_HYBRIDEP,
    HybridEPCombine,
    HybridEPDispatch,
    hybrid_ep_combine,
    hybrid_ep_dispatch,
    init_hybrid_ep_buffer,
    reset_hybrid_ep_buffer,
)
from fused_a2a.seed.uccl import (
    HAVE_UCCL_EP,
    UCCLFusedCombine,
    UCCLFusedDispatch,
    get_uccl_buffer,
    set_uccl_num_sms,
    uccl_fused_combine,
    uccl_fused_dispatch,
)

__all__ = [
    "HAVE_DEEP_EP",
    "HAVE_HYBRIDEP",
    "HAVE_UCCL_EP",
    "DispatchHandle",
    "FusedCombine",
    "FusedDispatch",
    "HybridEPCombine",
    "HybridEPDispatch",
    "TorchBuffer",
    "TorchConfig",
    "TorchHandle",
    "UCCLFusedCombine",
    "UCCLFusedDispatch",
    "combine",
    "dispatch",
    "free_buffer",
    "fused_combine",
    "fused_dispatch",
    "get_buffer",
    "get_hidden_bytes",
    "get_uccl_buffer",
    "hybrid_ep_combine",
    "hybrid_ep_dispatch",
    "init_hybrid_ep_buffer",
    "is_nvshmem_available",
    "reset_hybrid_ep_buffer",
    "set_deepep_num_sms",
    "set_uccl_num_sms",
    "teardown",
    "uccl_fused_combine",
    "uccl_fused_dispatch",
]
