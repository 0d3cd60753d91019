"""The seed's DeepEP functions: ``fused_dispatch``/``fused_combine``, their autograd Functions and the
buffer helpers, on the ``deepep`` backend with this cluster's tuned knobs.

Knobs of a call: :func:`set_deepep_num_sms` (an explicit argument), else ``$FUSED_A2A_DEEPEP_<KNOB>``,
else the tuning table, else DeepEP's defaults, agreed by the group (:mod:`fused_a2a.tuning.agreement`).
A combine runs with the configs of the dispatch that made its handle.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from fused_a2a.autograd import run_function
from fused_a2a.backends import deepep
from fused_a2a.backends.deepep import DEEP_EP, HAVE_DEEP_EP, KNOBS, handle_layout, is_nvshmem_available
from fused_a2a.groups import group_or_world
from fused_a2a.seed.buffer_functions import SeedCombine, SeedDispatch, combine_forward_of, dispatch_forward_of
from fused_a2a.tuning.resolve import env_var

__all__ = [
    "HAVE_DEEP_EP", "FusedCombine", "FusedDispatch", "free_buffer", "fused_combine", "fused_dispatch", "get_buffer",
    "is_nvshmem_available", "set_deepep_num_sms",
]


_num_sms: int | None = None  # set by set_deepep_num_sms: an explicit argument for every seed call


def explicit_knobs() -> dict[str, Any]:
    """The knobs the caller fixed through :func:`set_deepep_num_sms`."""
    return {} if _num_sms is None else {"num_sms": _num_sms}


def _untuned_knobs() -> dict[str, Any]:
    """Every knob from :func:`set_deepep_num_sms`, else its environment variable, else its default
    (a bad variable raises ``ValueError`` naming it)."""
    knobs = {}
    for knob in KNOBS:
        name = env_var("deepep", knob.name)
        try:
            knobs[knob.name] = knob.validate(knob.parse(os.environ[name])) if name in os.environ else knob.default
        except ValueError as err:
            raise ValueError(f"environment variable {name}: {err}") from None
    return {**knobs, **explicit_knobs()}


def get_buffer(group: torch.distributed.ProcessGroup, hidden_bytes: int):
    """Get or create the process-wide DeepEP buffer for ``group``.

    The NVL (and, with NVSHMEM, RDMA) sizes are the largest of the size hints of the dispatch and
    combine configs in use: ``num_sms`` from :func:`set_deepep_num_sms`, else
    ``$FUSED_A2A_DEEPEP_NUM_SMS``, else DeepEP's default (likewise for the chunk knobs; without a call
    shape there is no tuning-table entry). A new buffer (``explicitly_destroy=True``) is created only
    when there is none, the group changed, or a larger one is needed; the old one is destroyed first.

    Args:
        group: the expert-parallel process group.
        hidden_bytes: bytes of one token row (:func:`~fused_a2a.get_hidden_bytes`).

    Returns:
        deep_ep.Buffer: the communication buffer.
    """
    DEEP_EP.require("get_buffer")
    knobs = _untuned_knobs()
    group = group_or_world(group)
    return deepep.ensure_buffer(group, hidden_bytes, *deepep.deep_configs(knobs, knobs, group.size()))


def free_buffer() -> None:
    """Destroy the process-wide DeepEP buffer, if any. Collective over the buffer's group.

    Call it before ``torch.distributed.destroy_process_group``: DeepEP's buffer holds NCCL
    sub-groups and NVSHMEM state, and ``destroy_process_group`` hangs while it is alive.
    """
    deepep.free_buffer()


def set_deepep_num_sms(num_sms: int | None) -> None:
    """Set the number of SMs DeepEP's normal-mode kernels use (``deep_ep.Buffer.set_num_sms``).

    It also counts as an explicit ``num_sms`` argument for every later seed call: it wins over
    ``$FUSED_A2A_DEEPEP_NUM_SMS`` and the tuning table. ``None`` forgets an earlier count: the SM
    count comes from those sources again (``Buffer.num_sms`` back to DeepEP's default).
    """
    global _num_sms
    buffer = DEEP_EP.require("set_deepep_num_sms").Buffer
    buffer.set_num_sms(deepep.DEFAULT_NUM_SMS if num_sms is None else num_sms)
    _num_sms = num_sms


class FusedDispatch(SeedDispatch):
    """Fused dispatch operation for MoE routing combining computation and communication."""

    @staticmethod
    def forward(ctx, x, token_indices, token_probs, num_experts, group, async_finish=False, allocate_on_comm_stream=False):
        """Forward pass of fused dispatch (see :func:`fused_dispatch`)."""
        return dispatch_forward_of("deepep", explicit_knobs(), ctx, x, token_indices, token_probs, num_experts, group,
                                   async_finish, allocate_on_comm_stream)


class FusedCombine(SeedCombine):
    """Fused combine operation for MoE output combining computation and communication."""

    @staticmethod
    def forward(ctx, x, group, handle, async_finish=False, allocate_on_comm_stream=False):
        """Forward pass of fused combine (see :func:`fused_combine`)."""
        return combine_forward_of("deepep", handle_layout, ctx, x, group, handle, async_finish, allocate_on_comm_stream)


def fused_dispatch(x, token_indices, token_probs, num_experts, group, async_finish=False, allocate_on_comm_stream=False):
    """Dispatch tokens to the ranks holding their experts, with DeepEP.

    The configs come from :func:`set_deepep_num_sms`, ``$FUSED_A2A_DEEPEP_<KNOB>``, this cluster's
    tuning table for this shape, or DeepEP's defaults, in that order, agreed by every rank of ``group``.

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

    Tensors of any memory layout are taken (made contiguous once, before the library sees them).

    Raises:
        ValueError: inputs of the wrong shape or dtype, or ``token_indices`` outside ``[-1,
            num_experts)``, on any rank: raised on every rank of ``group`` (:mod:`fused_a2a.calls`).
    """
    DEEP_EP.require("fused_dispatch")
    return run_function(
        FusedDispatch, x, token_indices, token_probs, num_experts, group, async_finish, allocate_on_comm_stream
    )


def fused_combine(x, group, handle, async_finish=False, allocate_on_comm_stream=False):
    """Return each token's expert outputs to its source rank and sum them, with DeepEP.

    The combine runs with the configs of the dispatch that returned ``handle``.

    Args:
        x: ``[R, hidden]`` bf16 rows in the order :func:`fused_dispatch` received them.
        group: the expert-parallel process group.
        handle: the handle returned by that dispatch.
        async_finish, allocate_on_comm_stream: as in :func:`fused_dispatch`.

    Returns:
        ``(combined_x [num_tokens, hidden], None)``.
    """
    DEEP_EP.require("fused_combine")
    return run_function(FusedCombine, x, group, handle, async_finish, allocate_on_comm_stream)

