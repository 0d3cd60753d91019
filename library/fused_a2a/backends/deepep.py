"""DeepEP (``deep_ep.Buffer``, normal mode): the seed's buffer management and autograd Functions."""

from __future__ import annotations

import torch

from fused_a2a.autograd import (
    Comm,
    combine_backward,
    combine_forward,
    dispatch_backward,
    dispatch_forward,
    get_hidden_bytes,
)
from fused_a2a.backends.optional import try_import

DEEP_EP = try_import("deep_ep", "build DeepEP from its source (github.com/deepseek-ai/DeepEP) for your torch and CUDA")
HAVE_DEEP_EP = DEEP_EP.available

_buffer = None
_nvshmem_available: bool | None = None


def is_nvshmem_available() -> bool:
    """Whether DeepEP was compiled with NVSHMEM (``Buffer.is_sm90_compiled()`` stands in for it).

    DeepEP's build disables NVSHMEM whenever it disables its SM90 features, so the two agree.
    """
    global _nvshmem_available
    if _nvshmem_available is None:
        _nvshmem_available = bool(DEEP_EP.require("is_nvshmem_available").Buffer.is_sm90_compiled())
    return _nvshmem_available


def get_buffer(group: torch.distributed.ProcessGroup, hidden_bytes: int):
    """Get or create the process-wide DeepEP buffer for ``group``.

    The NVL (and, with NVSHMEM, RDMA) sizes are the largest of the size hints of DeepEP's default
    dispatch and combine configs for this group size. A new buffer (``explicitly_destroy=True``) is
    created only when there is none, the group changed, or a larger one is needed.

    Args:
        group: the expert-parallel process group.
        hidden_bytes: bytes of one token row (:func:`get_hidden_bytes`).

    Returns:
        deep_ep.Buffer: the communication buffer.
    """
    global _buffer
    deep_ep = DEEP_EP.require("get_buffer")
    size = group.size()
    nvshmem = is_nvshmem_available()
    if not nvshmem and size > 8:
        raise RuntimeError(
            f"DeepEP was compiled without NVSHMEM, but an expert-parallel group of {size} ranks needs internode "
            "RDMA: rebuild DeepEP with NVSHMEM or keep the group within one node (at most 8 GPUs)"
        )
    num_nvl_bytes = num_rdma_bytes = 0
    for config in (deep_ep.Buffer.get_dispatch_config(size), deep_ep.Buffer.get_combine_config(size)):
        num_nvl_bytes = max(num_nvl_bytes, config.get_nvl_buffer_size_hint(hidden_bytes, size))
        if nvshmem:
            num_rdma_bytes = max(num_rdma_bytes, config.get_rdma_buffer_size_hint(hidden_bytes, size))
    if (
        _buffer is None
        or _buffer.group != group
        or _buffer.num_nvl_bytes < num_nvl_bytes
        or _buffer.num_rdma_bytes < num_rdma_bytes
    ):
        free_buffer()
        _buffer = deep_ep.Buffer(group, num_nvl_bytes, num_rdma_bytes, explicitly_destroy=True)
    return _buffer


def free_buffer() -> None:
    """Destroy the process-wide DeepEP buffer, if any.

    Call it before ``torch.distributed.destroy_process_group``: DeepEP's buffer holds NCCL
    sub-groups and NVSHMEM state, and ``destroy_process_group`` hangs while it is alive.
    """
    global _buffer
    if _buffer is not None:
        buffer, _buffer = _buffer, None
        buffer.destroy()


def _new_event():
    utils = DEEP_EP.require("async_finish").utils
    return utils.EventOverlap(utils.EventHandle())


def _comm() -> Comm:
    return Comm(name="deepep", get_buffer=get_buffer, new_event=_new_event)


class FusedDispatch(torch.autograd.Function):
    """Fused dispatch operation for MoE routing combining computation and communication."""

    @staticmethod
    def forward(ctx, x, token_indices, token_probs, num_experts, group, async_finish=False, allocate_on_comm_stream=False):
        """Forward pass of fused dispatch (see :func:`fused_dispatch`)."""
        return dispatch_forward(
            ctx, _comm(), x, token_indices, token_probs, num_experts, group, async_finish, allocate_on_comm_stream
        )

    @staticmethod
    def backward(ctx, grad_output, grad_token_indices, grad_token_probs, grad_tokens_per_expert, grad_handle):
        """Backward pass of fused dispatch: a combine of the gradients."""
        grad_x, grad_probs = dispatch_backward(ctx, grad_output, grad_token_probs)
        return grad_x, None, grad_probs, None, None, None, None


class FusedCombine(torch.autograd.Function):
    """Fused combine operation for MoE output combining computation and communication."""

    @staticmethod
    def forward(ctx, x, group, handle, async_finish=False, allocate_on_comm_stream=False):
        """Forward pass of fused combine (see :func:`fused_combine`)."""
        return combine_forward(ctx, _comm(), x, group, handle, async_finish, allocate_on_comm_stream), None

    @staticmethod
    def backward(ctx, grad_output, previous_event=None):
        """Backward pass of fused combine: a cached dispatch of the gradient."""
        return combine_backward(ctx, grad_output), None, None, None, None


def fused_dispatch(x, token_indices, token_probs, num_experts, group, async_finish=False, allocate_on_comm_stream=False):
    """Dispatch tokens to the ranks holding their experts, with DeepEP.

    Args:
        x: ``[num_tokens, hidden]`` bf16 tokens of this rank.
        token_indices: ``[num_tokens, topk]`` int64 global expert ids, ``-1`` for none.
        token_probs: ``[num_tokens, topk]`` float32 routing probabilities.
        num_experts: total number of experts (divisible by the group size).
        group: the expert-parallel process group.
        async_finish: run on DeepEP's communication stream and make the current stream wait.
        allocate_on_comm_stream: allocate the outputs on the communication stream.

    Returns:
        ``(recv_x [R, hidden], recv_token_indices [R, topk] int64 local ids or -1,
        recv_token_probs [R, topk] float32, tokens_per_expert [num_local_experts] int64 (CPU), handle)``.
    """
    DEEP_EP.require("fused_dispatch")
    return FusedDispatch.apply(
        x.contiguous(), token_indices, token_probs, num_experts, group, async_finish, allocate_on_comm_stream
    )


def fused_combine(x, group, handle, async_finish=False, allocate_on_comm_stream=False):
    """Return each token's expert outputs to its source rank and sum them, with DeepEP.

    Args:
        x: ``[R, hidden]`` rows in the order :func:`fused_dispatch` received them.
        group: the expert-parallel process group.
        handle: the handle returned by that dispatch.
        async_finish, allocate_on_comm_stream: as in :func:`fused_dispatch`.

    Returns:
        ``(combined_x [num_tokens, hidden], None)``.
    """
    DEEP_EP.require("fused_combine")
    return FusedCombine.apply(x, group, handle, async_finish, allocate_on_comm_stream)


def set_deepep_num_sms(num_sms: int) -> None:
    """Set the number of SMs DeepEP's normal-mode kernels use (``deep_ep.Buffer.set_num_sms``)."""
    DEEP_EP.require("set_deepep_num_sms").Buffer.set_num_sms(num_sms)
