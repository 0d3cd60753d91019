"""The seed's UCCL-EP functions: ``uccl_fused_dispatch``/``uccl_fused_combine``, their autograd
Functions and the buffer helpers, on the ``uccl`` backend.

SM count: :func:`set_uccl_num_sms`, ``$UCCL_EP_SM_NUMS`` or ``$DEEP_EP_SM_NUMS`` (NeMo's variables) are
explicit and win; otherwise the knobs come from ``$FUSED_A2A_UCCL_<KNOB>``, the tuning table or UCCL-EP's
defaults, agreed by the group. A combine runs with the configs of the dispatch that made its handle.
"""

from __future__ import annotations

from typing import Any

import torch

from fused_a2a import env_snapshot
from fused_a2a.autograd import run_function
from fused_a2a.backends import uccl
from fused_a2a.backends.uccl import HAVE_UCCL_EP, SM_ENV_VARS, UCCL_EP, UCCLBuffer
from fused_a2a.backends.uccl_buffer import handle_layout
from fused_a2a.groups import group_or_world
from fused_a2a.seed.buffer_functions import SeedCombine, SeedDispatch, combine_forward_of, dispatch_forward_of

__all__ = [
    "HAVE_UCCL_EP", "UCCLFusedCombine", "UCCLFusedDispatch", "get_uccl_buffer", "set_uccl_num_sms",
    "uccl_fused_combine", "uccl_fused_dispatch",
]


_set_by_caller = False  # set_uccl_num_sms was called
_SM_ENV = env_snapshot.encode(SM_ENV_VARS)
_UNSET = (None,) * len(SM_ENV_VARS)


def explicit_knobs() -> dict[str, Any]:
    """``num_sms`` when the caller fixed it (:func:`set_uccl_num_sms` or NeMo's SM variables)."""
    if _set_by_caller or env_snapshot.values(_SM_ENV) != _UNSET:
        return {"num_sms": UCCLBuffer.num_sms}
    return {}


def get_uccl_buffer(group: torch.distributed.ProcessGroup, hidden_bytes: int):
    """Get or create the process-wide UCCL-EP buffer for ``group``.

    Its NVLink size is the larger of the size hints of UCCL-EP's default dispatch and combine configs
    at the current SM count (:func:`set_uccl_num_sms`). A new buffer is created only when there is
    none, the group changed, or a larger one is needed; the old one is destroyed first (collective).

    Args:
        group: the expert-parallel process group, all on one host.
        hidden_bytes: bytes of one token row (:func:`~fused_a2a.get_hidden_bytes`).

    Returns:
        UCCLBuffer: the communication buffer.
    """
    UCCL_EP.require("get_uccl_buffer")
    group = group_or_world(group)
    size = group.size()
    configs = (UCCLBuffer.get_dispatch_config(size), UCCLBuffer.get_combine_config(size))
    return uccl.ensure_buffer(group, hidden_bytes, configs)


def set_uccl_num_sms(num_sms: int | None) -> None:
    """Set the number of SMs UCCL-EP's kernels use (``UCCLBuffer.num_sms``; even, ``ValueError`` otherwise).

    It counts as an explicit ``num_sms`` for every later seed call. ``None`` forgets an earlier count
    (``UCCLBuffer.num_sms`` back to UCCL-EP's default; NeMo's SM variables still count as set)."""
    global _set_by_caller
    UCCL_EP.require("set_uccl_num_sms")
    UCCLBuffer.set_num_sms(uccl.DEFAULT_NUM_SMS if num_sms is None else num_sms)
    _set_by_caller = num_sms is not None


class UCCLFusedDispatch(SeedDispatch):
    """Fused dispatch using UCCL-EP instead of DeepEP."""

    @staticmethod
    def forward(ctx, x, token_indices, token_probs, num_experts, group, async_finish=False, allocate_on_comm_stream=False):
        """Forward pass: layout + dispatch (see :func:`uccl_fused_dispatch`)."""
        return dispatch_forward_of("uccl", explicit_knobs(), ctx, x, token_indices, token_probs, num_experts, group,
                                   async_finish, allocate_on_comm_stream)


class UCCLFusedCombine(SeedCombine):
    """Fused combine using UCCL-EP instead of DeepEP."""

    @staticmethod
    def forward(ctx, x, group, handle, async_finish=False, allocate_on_comm_stream=False):
        """Forward pass (see :func:`uccl_fused_combine`)."""
        return combine_forward_of("uccl", handle_layout, ctx, x, group, handle, async_finish, allocate_on_comm_stream)


def uccl_fused_dispatch(x, token_indices, token_probs, num_experts, group, async_finish=False, allocate_on_comm_stream=False):
    """Dispatch tokens to the ranks holding their experts, with UCCL-EP (intranode).

    Args:
        x: ``[num_tokens, hidden]`` bf16 tokens of this rank (``num_tokens`` may be 0).
        token_indices: ``[num_tokens, topk]`` int64 global expert ids, ``-1`` for none.
        token_probs: ``[num_tokens, topk]`` float32 routing probabilities.
        num_experts: total number of experts (divisible by the group size).
        group: the expert-parallel process group, all on one host.
        async_finish: run on UCCL-EP's communication stream and make the current stream wait.
        allocate_on_comm_stream: allocate the outputs on the communication stream.

    Returns:
        ``(recv_x [R, hidden], recv_token_indices [R, topk] int64 local ids or -1,
        recv_token_probs [R, topk] float32, tokens_per_expert [num_local_experts] int64 (CPU), handle)``.

    Tensors of any memory layout are taken (made contiguous once, before the library sees them).

    Raises:
        ValueError: inputs of the wrong shape or dtype, or ``token_indices`` outside ``[-1,
            num_experts)``, on any rank: raised on every rank of ``group`` (:mod:`fused_a2a.calls`).
    """
    UCCL_EP.require("uccl_fused_dispatch")
    return run_function(
        UCCLFusedDispatch, x, token_indices, token_probs, num_experts, group, async_finish,
        allocate_on_comm_stream,
    )


def uccl_fused_combine(x, group, handle, async_finish=False, allocate_on_comm_stream=False):
    """Return each token's expert outputs to its source rank and sum them, with UCCL-EP.

    Args:
        x: ``[R, hidden]`` bf16 rows in the order :func:`uccl_fused_dispatch` received them.
        group: the expert-parallel process group.
        handle: the handle returned by that dispatch (the combine runs with its configs).
        async_finish, allocate_on_comm_stream: as in :func:`uccl_fused_dispatch`.

    Returns:
        ``(combined_x [num_tokens, hidden], None)``.
    """
    UCCL_EP.require("uccl_fused_combine")
    return run_function(UCCLFusedCombine, x, group, handle, async_finish, allocate_on_comm_stream)
