"""HybridEP (``deep_ep.HybridEPBuffer``): permute + dispatch and combine + unpermute, as in the seed."""

from __future__ import annotations

import torch

from fused_a2a.backends.deepep import DEEP_EP as HYBRID_EP

HAVE_HYBRIDEP = HYBRID_EP.available and hasattr(HYBRID_EP.module, "HybridEPBuffer")

_hybrid_ep_buffer = None


def _require(what: str):
    deep_ep = HYBRID_EP.require(what)
    if not hasattr(deep_ep, "HybridEPBuffer"):
        raise RuntimeError(f"{what} needs deep_ep.HybridEPBuffer; the installed deep_ep was built without HybridEP")
    return deep_ep


def init_hybrid_ep_buffer(
    group: torch.distributed.ProcessGroup,
    hidden_dim: int,
    seq_len: int,
    num_local_experts: int,
    num_sms_dispatch_api: int,
    num_sms_combine_api: int,
    fp8_dispatch: bool,
) -> None:
    """Create the process-wide HybridEP buffer (replacing any earlier one).

    A later dispatch or combine that needs more room than this buffer reallocates it at run time,
    at extra cost.

    Args:
        group: process group of the HybridEP all-to-all.
        hidden_dim: hidden size ``H`` of the tokens.
        seq_len: most tokens a rank dispatches in one call.
        num_local_experts: experts per rank.
        num_sms_dispatch_api: SMs used by the dispatch kernels.
        num_sms_combine_api: SMs used by the combine kernels.
        fp8_dispatch: send tokens as FP8 during dispatch.
    """
    global _hybrid_ep_buffer
    deep_ep = _require("init_hybrid_ep_buffer")
    _hybrid_ep_buffer = deep_ep.HybridEPBuffer(
        group=group,
        hidden_dim=hidden_dim,
        max_num_of_tokens_per_rank=seq_len,
        num_local_experts=num_local_experts,
        use_fp8=fp8_dispatch,
        num_sms_dispatch_api=num_sms_dispatch_api,
        num_sms_combine_api=num_sms_combine_api,
    )


def reset_hybrid_ep_buffer() -> None:
    """Drop the process-wide HybridEP buffer; the next dispatch creates a new one."""
    global _hybrid_ep_buffer
    _hybrid_ep_buffer = None


class HybridEPDispatch(torch.autograd.Function):
    """Fused dispatch operation for permute + dispatch a2a + permute using the HybridEP backend."""

    @staticmethod
    def forward(
        ctx,
        x,
        routing_map,
        probs,
        group,
        num_local_experts,
        num_sms_dispatch_api=24,
        num_sms_combine_api=24,
        num_permuted_tokens=None,
        pad_multiple=None,
    ):
        """Forward pass of fused dispatch of the HybridEP backend (see :func:`hybrid_ep_dispatch`)."""
        if _hybrid_ep_buffer is None:
            seq_len, hidden_dim = x.shape[-2:]
            init_hybrid_ep_buffer(
                group, hidden_dim, seq_len, num_local_experts, num_sms_dispatch_api, num_sms_combine_api, False
            )
        hidden, out_probs, scaling_factor, tokens_per_expert, handle = _hybrid_ep_buffer.dispatch_with_permute(
            hidden=x,
            routing_map=routing_map,
            probs=probs,
            scaling_factor=None,
            num_of_experts_per_rank=num_local_experts,
            pad_multiple=pad_multiple,
            num_permuted_tokens=num_permuted_tokens,
            non_blocking=num_permuted_tokens is not None,
        )
        ctx.handle = handle
        ctx.pad_multiple = pad_multiple
        return hidden, out_probs, scaling_factor, tokens_per_expert, handle

    @staticmethod
    def backward(ctx, grad_x, grad_probs, grad_scaling_factor, grad_tokens_per_expert, grad_handle):
        """Backward pass of fused dispatch of the HybridEP backend: combine + unpermute of the gradients."""
        grad_hidden, grad_in_probs = _hybrid_ep_buffer.combine_with_unpermute(
            hidden=grad_x, probs=grad_probs, handle=ctx.handle, pad_multiple=ctx.pad_multiple
        )
        return grad_hidden, None, grad_in_probs, None, None, None, None, None, None


class HybridEPCombine(torch.autograd.Function):
    """Fused combine operation for permute + combine a2a + permute using the HybridEP backend."""

    @staticmethod
    def forward(ctx, x, handle, num_permuted_tokens=None, pad_multiple=None):
        """Forward pass of fused combine of the HybridEP backend (see :func:`hybrid_ep_combine`)."""
        combined, _ = _hybrid_ep_buffer.combine_with_unpermute(hidden=x, handle=handle, pad_multiple=pad_multiple)
        ctx.handle = handle
        ctx.pad_multiple = pad_multiple
        ctx.num_permuted_tokens = num_permuted_tokens
        return combined

    @staticmethod
    def backward(ctx, grad_x):
        """Backward pass of fused combine of the HybridEP backend: a cached permute + dispatch."""
        hidden, _, _, _, _ = _hybrid_ep_buffer.dispatch_with_permute(
            hidden=grad_x,
            scaling_factor=None,
            handle=ctx.handle,
            pad_multiple=ctx.pad_multiple,
            num_permuted_tokens=ctx.num_permuted_tokens,
        )
        return hidden, None, None, None


def hybrid_ep_dispatch(
    x,
    routing_map,
    probs,
    group,
    num_local_experts,
    num_sms_dispatch_api=24,
    num_sms_combine_api=24,
    num_permuted_tokens=None,
    pad_multiple=None,
):
    """Permute + dispatch with HybridEP.

    Args:
        x: ``[num_tokens, hidden]`` bf16 tokens of this rank.
        routing_map: ``[num_tokens, num_experts]`` bool, which experts each token goes to.
        probs: ``[num_tokens, num_experts]`` float32 routing probabilities.
        group: the expert-parallel process group.
        num_local_experts: experts per rank.
        num_sms_dispatch_api, num_sms_combine_api: SMs for a buffer created by this call.
        num_permuted_tokens: size of the permuted output if known (makes the call non-blocking).
        pad_multiple: pad each expert's rows to a multiple of this.

    Returns:
        ``(hidden [P, hidden] expert-major, probs [P] float32, scaling_factor or None,
        tokens_per_expert [num_local_experts], handle)``.
    """
    _require("hybrid_ep_dispatch")
    return HybridEPDispatch.apply(
        x,
        routing_map,
        probs,
        group,
        num_local_experts,
        num_sms_dispatch_api,
        num_sms_combine_api,
        num_permuted_tokens,
        pad_multiple,
    )


def hybrid_ep_combine(x, handle, num_permuted_tokens=None, pad_multiple=None):
    """Combine + unpermute with HybridEP: ``[P, hidden]`` expert-major rows back to ``[num_tokens, hidden]``."""
    _require("hybrid_ep_combine")
    return HybridEPCombine.apply(x, handle, num_permuted_tokens, pad_multiple)
