"""UCCL-EP (``uccl.ep``): the seed's UCCL buffer management and autograd Functions."""

from __future__ import annotations

import torch

from fused_a2a.autograd import Comm, combine_backward, combine_forward, dispatch_backward, dispatch_forward
from fused_a2a.backends.optional import try_import

UCCL_EP = try_import("uccl.ep", "pip install uccl (and a CUDA 12 runtime: nvidia-cuda-runtime-cu12)")
HAVE_UCCL_EP = UCCL_EP.available

DEFAULT_NUM_SMS = 20
_uccl_buffer = None
_num_sms = DEFAULT_NUM_SMS


def get_uccl_buffer(group: torch.distributed.ProcessGroup, hidden_bytes: int):
    """Get or create the process-wide UCCL-EP buffer for ``group``.

    Args:
        group: the expert-parallel process group.
        hidden_bytes: bytes of one token row.

    Returns:
        a buffer with the ``deep_ep.Buffer`` methods, over ``uccl.ep``.
    """
    UCCL_EP.require("get_uccl_buffer")
    raise RuntimeError("the UCCL-EP buffer adapter is not built yet in this version of fused_a2a")


def free_uccl_buffer() -> None:
    """Destroy the process-wide UCCL-EP buffer, if any (before ``destroy_process_group``)."""
    global _uccl_buffer
    if _uccl_buffer is not None:
        buffer, _uccl_buffer = _uccl_buffer, None
        buffer.destroy()


def set_uccl_num_sms(num_sms: int) -> None:
    """Set the number of SMs UCCL-EP's kernels use."""
    global _num_sms
    UCCL_EP.require("set_uccl_num_sms")
    _num_sms = num_sms


def _comm() -> Comm:
    return Comm(name="uccl", get_buffer=get_uccl_buffer)


class UCCLFusedDispatch(torch.autograd.Function):
    """Fused dispatch using UCCL-EP instead of DeepEP."""

    @staticmethod
    def forward(ctx, x, token_indices, token_probs, num_experts, group, async_finish=False, allocate_on_comm_stream=False):
        """Forward pass: layout + dispatch (see :func:`uccl_fused_dispatch`)."""
        return dispatch_forward(
            ctx, _comm(), x, token_indices, token_probs, num_experts, group, async_finish, allocate_on_comm_stream
        )

    @staticmethod
    def backward(ctx, grad_output, grad_token_indices, grad_token_probs, grad_tokens_per_expert, grad_handle):
        """Backward pass: a combine of the gradients."""
        grad_x, grad_probs = dispatch_backward(ctx, grad_output, grad_token_probs)
        return grad_x, None, grad_probs, None, None, None, None


class UCCLFusedCombine(torch.autograd.Function):
    """Fused combine using UCCL-EP instead of DeepEP."""

    @staticmethod
    def forward(ctx, x, group, handle, async_finish=False, allocate_on_comm_stream=False):
        """Forward pass (see :func:`uccl_fused_combine`)."""
        return combine_forward(ctx, _comm(), x, group, handle, async_finish, allocate_on_comm_stream), None

    @staticmethod
    def backward(ctx, grad_output, _grad_event=None):
        """Backward pass: a cached dispatch of the gradient."""
        return combine_backward(ctx, grad_output), None, None, None, None


def uccl_fused_dispatch(x, token_indices, token_probs, num_experts, group, async_finish=False, allocate_on_comm_stream=False):
    """Dispatch with UCCL-EP; arguments and returns as :func:`fused_a2a.fused_dispatch`."""
    UCCL_EP.require("uccl_fused_dispatch")
    return UCCLFusedDispatch.apply(
        x.contiguous(), token_indices, token_probs, num_experts, group, async_finish, allocate_on_comm_stream
    )


def uccl_fused_combine(x, group, handle, async_finish=False, allocate_on_comm_stream=False):
    """Combine with UCCL-EP; arguments and returns as :func:`fused_a2a.fused_combine`."""
    UCCL_EP.require("uccl_fused_combine")
    return UCCLFusedCombine.apply(x, group, handle, async_finish, allocate_on_comm_stream)
