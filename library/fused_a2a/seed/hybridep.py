"""The seed's HybridEP functions: permute + dispatch and combine + unpermute (expert-major rows), as
NeMo Automodel and Megatron-LM call them, on the ``hybridep`` backend's buffers.

Knobs: an argument the caller gives wins; one it leaves ``None`` comes from
``$FUSED_A2A_HYBRIDEP_<KNOB>``, the tuning table or HybridEP's defaults, agreed by the group. A
buffer made by :func:`init_hybrid_ep_buffer` is used as it is. A handle is always served by the buffer
that made it: a knob change between forward and backward makes a new buffer for new calls, while
the old one lives on for the handles it made.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from fused_a2a.autograd import run_function
from fused_a2a.backends import hybridep_buffer
from fused_a2a.backends.hybridep_adapter import shape_problem
from fused_a2a.backends.hybridep_buffer import HAVE_HYBRIDEP, Settings
from fused_a2a.layout import dense
from fused_a2a.shape import CallShape, keyed
from fused_a2a.tuning.agreement import agreed_comm
from fused_a2a.tuning.resolve import env_or_default

__all__ = [
    "HAVE_HYBRIDEP", "HybridEPCombine", "HybridEPDispatch", "hybrid_ep_combine", "hybrid_ep_dispatch",
    "init_hybrid_ep_buffer", "reset_hybrid_ep_buffer",
]

# an init_hybrid_ep_buffer call made the current buffer: seed calls use it as it is
_made_by_caller = False
# the attribute of a handle's first tensor that says whether its dispatch fused the permute: its
# combine does the same, whatever the caller passes
_FUSED_ATTRIBUTE = "_fused_a2a_hybridep_fused"


def init_hybrid_ep_buffer(
    group: torch.distributed.ProcessGroup,
    hidden_dim: int,
    seq_len: int,
    num_local_experts: int,
    num_sms_dispatch_api: int | None = None,
    num_sms_combine_api: int | None = None,
    fp8_dispatch: bool = False,
    *,
    num_blocks_permute: int | None = None,
    num_blocks_unpermute: int | None = None,
    num_sms_preprocessing_api: int | None = None,
) -> None:
    """Create the process-wide HybridEP buffer (replacing any earlier one; handles of the earlier one
    keep it alive). A later call that needs more tokens grows it at run time, at extra cost. The
    routing maps are gathered as the ``enable_custom_allgather`` knob says (``$FUSED_A2A_HYBRIDEP_
    ENABLE_CUSTOM_ALLGATHER``, else the knob's default: HybridEP's own allgather).

    Args:
        group: process group of the HybridEP all-to-all.
        hidden_dim: hidden size ``H`` of the tokens.
        seq_len: most tokens a rank dispatches in one call.
        num_local_experts: experts per rank.
        num_sms_dispatch_api, num_sms_combine_api: SMs of the dispatch and combine kernels
            (``None``: HybridEP's defaults).
        fp8_dispatch: send tokens as FP8 during dispatch.
        num_blocks_permute, num_blocks_unpermute, num_sms_preprocessing_api: as Megatron-LM passes
            them (``None``: HybridEP's defaults).
    """
    global _made_by_caller
    deep_ep = hybridep_buffer.require("init_hybrid_ep_buffer")
    kwargs = dict(num_sms_dispatch_api=num_sms_dispatch_api, num_sms_combine_api=num_sms_combine_api,
                  num_blocks_permute=num_blocks_permute, num_blocks_unpermute=num_blocks_unpermute,
                  num_sms_preprocessing_api=num_sms_preprocessing_api)
    if hybridep_buffer.constructor_takes("enable_custom_allgather"):
        kwargs["enable_custom_allgather"] = env_or_default("hybridep", "enable_custom_allgather")
    hybridep_buffer.set_current_buffer(None, None)
    group = torch.distributed.group.WORLD if group is None else group
    buffer = deep_ep.HybridEPBuffer(group=group, hidden_dim=hidden_dim, max_num_of_tokens_per_rank=seq_len,
                                    num_local_experts=num_local_experts, use_fp8=fp8_dispatch,
                                    **{name: value for name, value in kwargs.items() if value is not None})
    hybridep_buffer.set_current_buffer(buffer, ("caller", group, hidden_dim, num_local_experts, fp8_dispatch))
    _made_by_caller = True


def adopt_buffer(buffer) -> None:
    """Make ``buffer`` (a ``HybridEPBuffer`` the caller built) the process-wide one, used as it is, as
    after :func:`init_hybrid_ep_buffer`."""
    global _made_by_caller
    hybridep_buffer.set_current_buffer(buffer, ("caller",))
    _made_by_caller = True


def reset_hybrid_ep_buffer() -> None:
    """Drop the process-wide HybridEP buffer; the next dispatch creates a new one."""
    global _made_by_caller
    hybridep_buffer.free_buffers()
    _made_by_caller = False


def _buffer_for(x: torch.Tensor, routing_map: torch.Tensor, group, num_local_experts: int, given: dict[str, Any]):
    """The buffer a seed dispatch runs on and its settings: the caller's own buffer, else the
    process-wide one of the agreed knobs (created when needed). Collective at a shape's first call."""
    current = hybridep_buffer.current_buffer()
    if _made_by_caller and current is not None:
        return current, None
    explicit = {name: value for name, value in given.items() if value is not None}
    num_tokens, hidden = x.shape
    num_experts = routing_map.size(1)
    comm = agreed_comm("hybridep", group, keyed("bf16", hidden, None, num_experts, None), num_tokens, explicit).comm
    settings: Settings = comm.dispatch_config
    return hybridep_buffer.ensure_buffer(group, hidden, num_local_experts, num_tokens, settings), settings


_checked: list = [None]  # the last (id of the buffer, group, tokens, hidden, experts) found fine (no reference kept)


def _check_shape(buffer, x: torch.Tensor, routing_map: torch.Tensor, group) -> None:
    """Raise ``ValueError`` where HybridEP's kernels cannot take this call's shape (a repeat of the
    last shape found fine is not checked again)."""
    (num_tokens, hidden), num_experts = x.shape, routing_map.shape[1]
    key = (id(buffer), group, num_tokens, hidden, num_experts)
    if key == _checked[0]:
        return
    world = torch.distributed.get_world_size(group)
    shape = CallShape("bf16", hidden, 1, num_experts, world_size=world, tokens=(num_tokens,),
                      ranks_per_node=hybridep_buffer.ranks_per_node(buffer))
    problem = shape_problem(shape)
    if problem is not None:
        raise ValueError(f"hybridep: {problem}")
    _checked[0] = key


def _fused_supported(fused: bool, blocks: tuple) -> bool:
    """``fused``, or ``False`` with a warning when the installed HybridEP has no fused permute."""
    if (fused or any(b is not None for b in blocks)) and not hybridep_buffer.has_fused_permute():
        warnings.warn("the installed HybridEP has no fused permute or num_blocks_permute/num_blocks_unpermute; "
                      "running the unfused dispatch", UserWarning, stacklevel=4)
        return False
    return fused


class HybridEPDispatch(torch.autograd.Function):
    """Fused dispatch operation for permute + dispatch a2a + permute using the HybridEP backend."""

    differentiable = (0, 2)  # x, probs (for run_function)

    @staticmethod
    def forward(ctx, x, routing_map, probs, group, num_local_experts, num_sms_dispatch_api=None,
                num_sms_combine_api=None, num_permuted_tokens=None, pad_multiple=None, num_blocks_permute=None,
                num_blocks_unpermute=None, fused=False, num_sms_preprocessing_api=None):
        """Forward pass of fused dispatch of the HybridEP backend (see :func:`hybrid_ep_dispatch`)."""
        fused = _fused_supported(fused, (num_blocks_permute, num_blocks_unpermute))
        given = dict(num_sms_dispatch_api=num_sms_dispatch_api, num_sms_combine_api=num_sms_combine_api,
                     num_sms_preprocessing_api=num_sms_preprocessing_api, num_blocks_permute=num_blocks_permute,
                     num_blocks_unpermute=num_blocks_unpermute, fused=fused or None)
        buffer, settings = _buffer_for(x, routing_map, group, num_local_experts, given)
        _check_shape(buffer, x, routing_map, group)
        fused = settings.fused if settings is not None else fused  # ensure_buffer applied settings' variables
        num_permuted = None if num_permuted_tokens is None else int(num_permuted_tokens)
        hidden, out_probs, scaling_factor, tokens_per_expert, handle = buffer.dispatch_with_permute(
            hidden=dense(x), routing_map=routing_map, probs=probs, scaling_factor=None,
            num_of_experts_per_rank=num_local_experts, pad_multiple=pad_multiple, num_permuted_tokens=num_permuted,
            non_blocking=num_permuted is not None, **({"fuse_permute_dispatch": True} if fused else {}),
        )
        hybridep_buffer.remember_buffer(handle, buffer)
        setattr(handle[0], _FUSED_ATTRIBUTE, fused)
        if ctx is not None:
            ctx.buffer, ctx.settings, ctx.handle, ctx.pad_multiple, ctx.fused = buffer, settings, handle, pad_multiple, fused
        return hidden, out_probs, scaling_factor, tokens_per_expert, handle

    @staticmethod
    def backward(ctx, grad_x, grad_probs, grad_scaling_factor, grad_tokens_per_expert, grad_handle):
        """Backward pass of fused dispatch of the HybridEP backend: combine + unpermute of the gradients."""
        if ctx.settings is not None:
            hybridep_buffer.apply_environment(ctx.settings)
        grad_hidden, grad_in_probs = ctx.buffer.combine_with_unpermute(
            hidden=dense(grad_x), probs=grad_probs, handle=ctx.handle, pad_multiple=ctx.pad_multiple,
            **({"fuse_unpermute_combine": True} if ctx.fused else {}),
        )
        return grad_hidden, None, grad_in_probs, None, None, None, None, None, None, None, None, None, None


class HybridEPCombine(torch.autograd.Function):
    """Fused combine operation for permute + combine a2a + permute using the HybridEP backend."""

    differentiable = (0,)  # x (for run_function)

    @staticmethod
    def forward(ctx, x, handle, num_permuted_tokens=None, pad_multiple=None, fused=False):
        """Forward pass of fused combine of the HybridEP backend (see :func:`hybrid_ep_combine`)."""
        buffer = hybridep_buffer.buffer_of(handle)
        fused = getattr(handle[0], _FUSED_ATTRIBUTE, fused and hybridep_buffer.has_fused_permute())
        combined, _ = buffer.combine_with_unpermute(hidden=dense(x), handle=handle, pad_multiple=pad_multiple,
                                                    **({"fuse_unpermute_combine": True} if fused else {}))
        if ctx is not None:
            ctx.buffer, ctx.handle, ctx.pad_multiple, ctx.fused = buffer, handle, pad_multiple, fused
            ctx.num_permuted_tokens = None if num_permuted_tokens is None else int(num_permuted_tokens)
        return combined

    @staticmethod
    def backward(ctx, grad_x):
        """Backward pass of fused combine of the HybridEP backend: a cached permute + dispatch."""
        hidden, _, _, _, _ = ctx.buffer.dispatch_with_permute(
            hidden=dense(grad_x), scaling_factor=None, handle=ctx.handle, pad_multiple=ctx.pad_multiple,
            num_permuted_tokens=ctx.num_permuted_tokens, **({"fuse_permute_dispatch": True} if ctx.fused else {}),
        )
        return hidden, None, None, None, None


def hybrid_ep_dispatch(
    x,
    routing_map,
    probs,
    group,
    num_local_experts,
    num_sms_dispatch_api=None,
    num_sms_combine_api=None,
    num_permuted_tokens=None,
    pad_multiple=None,
    *,
    num_blocks_permute=None,
    num_blocks_unpermute=None,
    fused=False,
    num_sms_preprocessing_api=None,
):
    """Permute + dispatch with HybridEP (the seed's positional order; Megatron's extra arguments by keyword).

    Args:
        x: ``[num_tokens, hidden]`` bf16 tokens of this rank (the same count on every rank).
        routing_map: ``[num_tokens, num_experts]`` bool, which experts each token goes to.
        probs: ``[num_tokens, num_experts]`` float32 routing probabilities.
        group: the expert-parallel process group.
        num_local_experts: experts per rank.
        num_sms_dispatch_api, num_sms_combine_api: SMs of the kernels (``None``: the tuned value).
        num_permuted_tokens: size of the permuted output if known (int or 0-d tensor; makes the call
            non-blocking: no host sync, rows beyond it dropped and flagged in ``handle[-1]``).
        pad_multiple: pad each expert's rows to a multiple of this.
        num_blocks_permute, num_blocks_unpermute, num_sms_preprocessing_api: HybridEP's other kernel
            sizes (``None``: the tuned value).
        fused: fuse the permute into the dispatch kernel (falls back, with a warning, where the
            installed HybridEP lacks it).

    Returns:
        ``(hidden [P, hidden] expert-major, probs [P] float32, scaling_factor or None,
        tokens_per_expert [num_local_experts] int64, handle)``; ``handle[-1]`` is the overflow flag.

    Raises:
        ValueError: a token count HybridEP cannot take (see :func:`fused_a2a.backends.hybridep_adapter.shape_problem`).
    """
    hybridep_buffer.require("hybrid_ep_dispatch")
    return run_function(HybridEPDispatch, x, routing_map, probs, group, num_local_experts, num_sms_dispatch_api,
                        num_sms_combine_api, num_permuted_tokens, pad_multiple, num_blocks_permute,
                        num_blocks_unpermute, fused, num_sms_preprocessing_api)


def hybrid_ep_combine(x, handle, num_permuted_tokens=None, pad_multiple=None, *, fused=False):
    """Combine + unpermute with HybridEP: ``[P, hidden]`` expert-major rows back to ``[num_tokens, hidden]``
    (on the buffer that made ``handle``).

    Args:
        x: ``[P, hidden]`` bf16 rows in the order :func:`hybrid_ep_dispatch` returned them.
        handle: that dispatch's handle.
        num_permuted_tokens: ``P`` (int or 0-d tensor), for the backward's cached dispatch.
        pad_multiple: as given to the dispatch.
        fused: fuse the unpermute into the combine kernel (a handle of :func:`hybrid_ep_dispatch`
            combines as its dispatch ran, fused or not, whatever is passed here).

    Returns:
        ``[num_tokens, hidden]``.
    """
    hybridep_buffer.require("hybrid_ep_combine")
    return run_function(HybridEPCombine, x, handle, num_permuted_tokens, pad_multiple, fused)
