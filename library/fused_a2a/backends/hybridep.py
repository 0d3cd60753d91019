"""HybridEP (``deep_ep.HybridEPBuffer``): permute + dispatch and combine + unpermute, as in the seed.

Knobs (:data:`HYBRIDEP_KNOBS`): the SM counts of the dispatch and combine kernels (constructor
arguments) and the tokens per chunk of each, which HybridEP reads from the environment variables of
:data:`CHUNK_ENV_VARS` when a buffer is created. The process-wide buffer is re-created whenever a
dispatch asks for other knobs (or the chunk variables changed) than it was built with. HybridEP
routes with a dense map; :func:`topk_to_routing_map` builds it from top-k indices.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from fused_a2a.backends.base import Knob
from fused_a2a.backends.deepep import DEEP_EP as HYBRID_EP
from fused_a2a.checks import check_topk_range

HAVE_HYBRIDEP = HYBRID_EP.available and hasattr(HYBRID_EP.module, "HybridEPBuffer")

# knob name -> the environment variable HybridEP reads it from
CHUNK_ENV_VARS: dict[str, str] = {
    "tokens_per_chunk_dispatch": "NUM_OF_TOKENS_PER_CHUNK_DISPATCH_API",
    "tokens_per_chunk_combine": "NUM_OF_TOKENS_PER_CHUNK_COMBINE_API",
}


def _positive_int(name: str):
    def check(value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            return f"{name} must be a positive int, got {value!r}"
        return None

    return check


def _chunk_tokens(name: str):
    def check(value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            return f"{name} must be an int >= 0 (0: leave {CHUNK_ENV_VARS[name]} as it is), got {value!r}"
        return None

    return check


HYBRIDEP_KNOBS: tuple[Knob, ...] = (
    Knob("num_sms_dispatch_api", 24, (8, 16, 24, 32, 48), "SMs (thread blocks) of the dispatch kernels",
         check=_positive_int("num_sms_dispatch_api")),
    Knob("num_sms_combine_api", 24, (8, 16, 24, 32, 48), "SMs (thread blocks) of the combine kernels",
         check=_positive_int("num_sms_combine_api")),
    Knob("tokens_per_chunk_dispatch", 0, (64, 128, 256),
         "tokens per dispatch chunk, $NUM_OF_TOKENS_PER_CHUNK_DISPATCH_API (0: HybridEP's default or the variable as set)",
         check=_chunk_tokens("tokens_per_chunk_dispatch")),
    Knob("tokens_per_chunk_combine", 0, (64, 128, 256),
         "tokens per combine chunk, $NUM_OF_TOKENS_PER_CHUNK_COMBINE_API (0: HybridEP's default or the variable as set)",
         check=_chunk_tokens("tokens_per_chunk_combine")),
)

_hybrid_ep_buffer = None
# what _hybrid_ep_buffer was built with (see _buffer_key); None without a buffer
_hybrid_ep_key: tuple | None = None


def topk_to_routing_map(
    topk_idx: torch.Tensor, topk_weights: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn top-k routing into HybridEP's dense routing map and probabilities.

    Args:
        topk_idx: ``[N, K]`` int64 global expert ids, ``-1`` for "no expert" (ignored).
        topk_weights: ``[N, K]`` routing weights, any floating dtype (differentiable).
        num_experts: total number of experts ``E``.

    Returns:
        routing_map: ``[N, E]`` bool, ``True`` where a token goes to an expert.
        probs: ``[N, E]`` float32, the weight of each (token, expert), ``0`` where not routed; an
            expert named twice for one token gets the sum of its weights. On ``topk_idx``'s device.

    Raises:
        ValueError: ``topk_idx`` not 2-D int64, ``topk_weights`` of another shape or not floating
            point, ``num_experts`` not positive, or an id outside ``[-1, num_experts)``.
    """
    if topk_idx.dim() != 2 or topk_idx.dtype != torch.int64:
        raise ValueError(f"topk_idx must be a 2-D int64 tensor [num_tokens, topk], got {topk_idx.dtype} {tuple(topk_idx.shape)}")
    if topk_weights.shape != topk_idx.shape or not topk_weights.is_floating_point():
        raise ValueError(
            f"topk_weights must be a floating-point tensor of topk_idx's shape {tuple(topk_idx.shape)}, "
            f"got {topk_weights.dtype} {tuple(topk_weights.shape)}"
        )
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts <= 0:
        raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
    check_topk_range(topk_idx, num_experts)
    chosen = topk_idx >= 0
    rows = torch.arange(topk_idx.size(0), device=topk_idx.device).unsqueeze(1).expand_as(topk_idx)[chosen]
    cols = topk_idx[chosen]
    routing_map = torch.zeros(topk_idx.size(0), num_experts, dtype=torch.bool, device=topk_idx.device)
    routing_map[rows, cols] = True
    probs = torch.zeros(topk_idx.size(0), num_experts, dtype=torch.float32, device=topk_idx.device)
    probs = probs.index_put((rows, cols), topk_weights[chosen].float(), accumulate=True)
    return routing_map, probs


def chunk_env(knobs: dict[str, Any]) -> dict[str, str]:
    """The environment variables to set for the chunk knobs in ``knobs`` (a ``0`` or missing one: none)."""
    return {var: str(knobs[name]) for name, var in CHUNK_ENV_VARS.items() if knobs.get(name)}


def _buffer_key(group, hidden_dim: int, num_local_experts: int, num_sms_dispatch_api: int, num_sms_combine_api: int) -> tuple:
    """What a HybridEP buffer is built with: the constructor's arguments that shape it (not the token
    count: HybridEP grows its buffer itself) and the chunk variables as set now."""
    chunks = tuple(os.environ.get(var) for var in CHUNK_ENV_VARS.values())
    return (group, hidden_dim, num_local_experts, num_sms_dispatch_api, num_sms_combine_api, chunks)


def ensure_hybrid_ep_buffer(group, hidden_dim: int, seq_len: int, num_local_experts: int, knobs: dict[str, Any]):
    """The process-wide HybridEP buffer for these knobs, re-created when they (or the group, hidden
    size, expert count or chunk variables) differ from the current buffer's.

    Args:
        group: process group of the HybridEP all-to-all.
        hidden_dim: hidden size ``H`` of the tokens.
        seq_len: most tokens a rank dispatches in one call (a new buffer's initial capacity).
        num_local_experts: experts per rank.
        knobs: values of :data:`HYBRIDEP_KNOBS` (missing ones: their defaults). Nonzero chunk knobs
            are written to their environment variables first.

    Returns:
        deep_ep.HybridEPBuffer: the buffer.

    Raises:
        ValueError: a knob value that is not acceptable.
        RuntimeError: deep_ep without HybridEP.
    """
    _require("ensure_hybrid_ep_buffer")
    knobs = {**{knob.name: knob.default for knob in HYBRIDEP_KNOBS}, **knobs}
    for knob in HYBRIDEP_KNOBS:
        problem = knob.check(knobs[knob.name])
        if problem is not None:
            raise ValueError(f"hybridep: {problem}")
    os.environ.update(chunk_env(knobs))
    sms = knobs["num_sms_dispatch_api"], knobs["num_sms_combine_api"]
    if _hybrid_ep_buffer is None or _hybrid_ep_key != _buffer_key(group, hidden_dim, num_local_experts, *sms):
        init_hybrid_ep_buffer(group, hidden_dim, seq_len, num_local_experts, *sms, False)
    return _hybrid_ep_buffer


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
    global _hybrid_ep_buffer, _hybrid_ep_key
    deep_ep = _require("init_hybrid_ep_buffer")
    _hybrid_ep_buffer = None  # HybridEP frees a buffer when it is dropped: free the old one before allocating
    _hybrid_ep_buffer = deep_ep.HybridEPBuffer(
        group=group,
        hidden_dim=hidden_dim,
        max_num_of_tokens_per_rank=seq_len,
        num_local_experts=num_local_experts,
        use_fp8=fp8_dispatch,
        num_sms_dispatch_api=num_sms_dispatch_api,
        num_sms_combine_api=num_sms_combine_api,
    )
    _hybrid_ep_key = _buffer_key(group, hidden_dim, num_local_experts, num_sms_dispatch_api, num_sms_combine_api)


def reset_hybrid_ep_buffer() -> None:
    """Drop the process-wide HybridEP buffer; the next dispatch creates a new one."""
    global _hybrid_ep_buffer, _hybrid_ep_key
    _hybrid_ep_buffer = None
    _hybrid_ep_key = None


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
        seq_len, hidden_dim = x.shape[-2:]
        sms = {"num_sms_dispatch_api": num_sms_dispatch_api, "num_sms_combine_api": num_sms_combine_api}
        ensure_hybrid_ep_buffer(group, hidden_dim, seq_len, num_local_experts, sms)
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
