"""UCCL-EP (``uccl.ep``): the seed's UCCL buffer management and autograd Functions, and the ``uccl``
backend spec of the backend-neutral entry (:func:`uccl_backend_spec`).

The buffer is :class:`~fused_a2a.backends.uccl_buffer.UCCLBuffer`, our own Python layer over UCCL-EP's
pointer-level C++ API, with DeepEP v1's ``Buffer`` interface. **Intranode only**: a group whose ranks
span hosts raises ``RuntimeError`` (UCCL-EP's internode path needs RDMA NICs; it is not supported by
this adapter yet, and could not be run here).

SM count of the seed functions: :func:`set_uccl_num_sms`, else ``$UCCL_EP_SM_NUMS``, else
``$DEEP_EP_SM_NUMS``, else 20 (NeMo's order). The knobs of the ``uccl`` backend are DeepEP's
(``num_sms`` and the four chunk sizes of ``uccl.ep.Config``, validated with DeepEP's ``Config`` rules
by :class:`~fused_a2a.backends.deepep.DeepEPConfig`); a chunk size of ``0`` takes UCCL-EP's default for
the group size and the operation.
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from typing import Any, Mapping

import torch
import torch.distributed as dist

from fused_a2a.autograd import Comm, combine_backward, combine_forward, dispatch_backward, dispatch_forward

# fused_a2a.backends may import this module to register the spec: BackendSpec and deepep exist by then
from fused_a2a.backends import deepep
from fused_a2a.backends.base import BackendSpec
from fused_a2a.backends.deepep import CHUNK_KNOBS, NVL_PEERS, DeepEPConfig, configs_from_knobs, rank_problem
from fused_a2a.backends.uccl_buffer import (
    DEFAULT_COMBINE,
    DEFAULT_DISPATCH,
    INTERNODE_ERROR,
    UCCL_EP,
    EventOverlap,
    UCCLBuffer,
)

HAVE_UCCL_EP = UCCL_EP.available
SM_ENV_VARS = ("UCCL_EP_SM_NUMS", "DEEP_EP_SM_NUMS")
DEFAULT_NUM_SMS = 20

logger = logging.getLogger("fused_a2a")

_uccl_buffer: UCCLBuffer | None = None


def num_sms_from_env(environ: Mapping[str, str]) -> int:
    """The SM count of ``$UCCL_EP_SM_NUMS``, else ``$DEEP_EP_SM_NUMS``, else 20.

    A value that is not an even int >= 2 is ignored with a warning (importing fused_a2a never fails).
    """
    for name in SM_ENV_VARS:
        if name in environ:
            text = environ[name]
            if text.strip().isdigit() and int(text) >= 2 and int(text) % 2 == 0:
                return int(text)
            logger.warning("fused_a2a: ignoring %s=%r (the UCCL-EP SM count must be an even int >= 2)", name, text)
    return DEFAULT_NUM_SMS


UCCLBuffer.num_sms = num_sms_from_env(os.environ)


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
    group = _group_or_world(group)
    size = group.size()
    configs = (UCCLBuffer.get_dispatch_config(size), UCCLBuffer.get_combine_config(size))
    return _ensure_buffer(group, hidden_bytes, configs)


def _ensure_buffer(group: dist.ProcessGroup, hidden_bytes: int, configs: tuple) -> UCCLBuffer:
    """The process-wide buffer, (re)created for ``group`` when it lacks room for ``configs``."""
    global _uccl_buffer
    num_nvl_bytes = max(config.get_nvl_buffer_size_hint(hidden_bytes, group.size()) for config in configs)
    if _uccl_buffer is not None and _uccl_buffer.group is group:
        if _uccl_buffer.num_nvl_bytes >= num_nvl_bytes:
            return _uccl_buffer
        num_nvl_bytes = max(num_nvl_bytes, _uccl_buffer.num_nvl_bytes)
    # UCCL-EP takes one set of proxies per device: the old buffer unregisters its own first
    free_uccl_buffer()
    _uccl_buffer = UCCLBuffer(group, num_nvl_bytes, explicitly_destroy=True)
    return _uccl_buffer


def free_uccl_buffer() -> None:
    """Destroy the process-wide UCCL-EP buffer, if any (collective; before ``destroy_process_group``)."""
    global _uccl_buffer
    if _uccl_buffer is not None:
        buffer, _uccl_buffer = _uccl_buffer, None
        buffer.destroy()


def set_uccl_num_sms(num_sms: int) -> None:
    """Set the number of SMs UCCL-EP's kernels use (``UCCLBuffer.num_sms``; even, ``ValueError`` otherwise)."""
    UCCL_EP.require("set_uccl_num_sms")
    UCCLBuffer.set_num_sms(num_sms)


def _group_or_world(group: dist.ProcessGroup | None) -> dist.ProcessGroup:
    return dist.group.WORLD if group is None else group


def _comm() -> Comm:
    return Comm(name="uccl", get_buffer=get_uccl_buffer, new_event=EventOverlap.capture)


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
    """Dispatch tokens to the ranks holding their experts, with UCCL-EP (intranode).

    Args:
        x: ``[num_tokens, hidden]`` bf16 tokens of this rank (``num_tokens > 0``).
        token_indices: ``[num_tokens, topk]`` int64 global expert ids, ``-1`` for none.
        token_probs: ``[num_tokens, topk]`` float32 routing probabilities.
        num_experts: total number of experts (divisible by the group size).
        group: the expert-parallel process group, all on one host.
        async_finish: run on UCCL-EP's communication stream and make the current stream wait.
        allocate_on_comm_stream: allocate the outputs on the communication stream.

    Returns:
        ``(recv_x [R, hidden], recv_token_indices [R, topk] int64 local ids or -1,
        recv_token_probs [R, topk] float32, tokens_per_expert [num_local_experts] int64 (CPU), handle)``.
    """
    UCCL_EP.require("uccl_fused_dispatch")
    return UCCLFusedDispatch.apply(
        x.contiguous(), token_indices, token_probs, num_experts, group, async_finish, allocate_on_comm_stream
    )


def uccl_fused_combine(x, group, handle, async_finish=False, allocate_on_comm_stream=False):
    """Return each token's expert outputs to its source rank and sum them, with UCCL-EP.

    Args:
        x: ``[R, hidden]`` bf16 rows in the order :func:`uccl_fused_dispatch` received them.
        group: the expert-parallel process group.
        handle: the handle returned by that dispatch (the combine runs with its SM count).
        async_finish, allocate_on_comm_stream: as in :func:`uccl_fused_dispatch`.

    Returns:
        ``(combined_x [num_tokens, hidden], None)``.
    """
    UCCL_EP.require("uccl_fused_combine")
    return UCCLFusedCombine.apply(x, group, handle, async_finish, allocate_on_comm_stream)


# the uccl backend of fused_a2a.dispatch: DeepEP's knobs (UCCL-EP runs DeepEP's kernels and Config rules)
KNOBS = tuple(
    replace(knob, default=DEFAULT_NUM_SMS if knob.name == "num_sms" else knob.default,
            help=knob.help.replace("DeepEP", "UCCL-EP"))
    for knob in deepep.KNOBS
)


def uccl_configs(
    dispatch_knobs: dict[str, Any], combine_knobs: dict[str, Any], num_ranks: int
) -> tuple[DeepEPConfig, DeepEPConfig]:
    """The checked ``(dispatch, combine)`` configs of two full knob dicts on ``num_ranks`` ranks.

    A chunk knob of ``0`` takes UCCL-EP's default for ``num_ranks`` and that operation; the rest are
    DeepEP's rules (:func:`~fused_a2a.backends.deepep.configs_from_knobs`).

    Raises:
        ValueError: a group this adapter cannot run on (more than one node's ranks, or a size the
            kernels do not exist for), no UCCL-EP default for ``num_ranks``, or a config UCCL-EP rejects.
    """
    problem = rank_problem(num_ranks)
    if problem is not None:
        raise ValueError(problem)
    if num_ranks > NVL_PEERS:
        raise ValueError(f"{num_ranks} ranks span nodes: {INTERNODE_ERROR}")
    filled = []
    for knobs, table in ((dispatch_knobs, DEFAULT_DISPATCH), (combine_knobs, DEFAULT_COMBINE)):
        defaults = dict(zip(CHUNK_KNOBS, table[num_ranks]))
        filled.append({**knobs, **{name: knobs[name] or defaults[name] for name in CHUNK_KNOBS}})
    return configs_from_knobs(filled[0], filled[1], num_ranks)


def unavailable() -> str | None:
    """``None`` if ``uccl.ep`` imports, else why not."""
    return None if HAVE_UCCL_EP else UCCL_EP.reason


def invalid_knobs(knobs: dict[str, Any], world_size: int) -> str | None:
    """Why ``knobs`` (for dispatch and combine alike) cannot run on ``world_size`` ranks, or ``None``. Pure."""
    full = {**{knob.name: knob.default for knob in KNOBS}, **knobs}
    try:
        uccl_configs(full, full, world_size)
    except ValueError as err:
        return str(err)
    return None


def make_uccl_comm(dispatch_knobs: dict[str, Any], combine_knobs: dict[str, Any], num_ranks: int | None = None) -> Comm:
    """The :class:`Comm` of the ``uccl`` backend for two full knob dicts.

    Args:
        dispatch_knobs, combine_knobs: every knob of :data:`KNOBS` (a chunk size of 0: UCCL-EP's default).
        num_ranks: the group size the configs are for (default: the default process group's); the
            Comm's ``get_buffer`` refuses a group of another size.

    Returns:
        a Comm whose configs are ``uccl.ep.Config`` objects and whose ``get_buffer(group, hidden_bytes)``
        sizes the process-wide buffer for both.

    Raises:
        ValueError: see :func:`uccl_configs`.
        RuntimeError: ``uccl.ep`` is missing, or no ``num_ranks`` and no process group.
    """
    if num_ranks is None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("the uccl backend needs an initialised process group to size its configs")
        num_ranks = dist.get_world_size()
    try:
        dispatch, combine = uccl_configs(dispatch_knobs, combine_knobs, num_ranks)
    except ValueError as err:
        raise ValueError(f"uccl: {err}") from None
    ep = UCCL_EP.require("the uccl backend")
    configs = tuple(ep.Config(c.num_sms, c.nvl_send, c.nvl_recv, c.rdma_send, c.rdma_recv) for c in (dispatch, combine))

    def get_buffer_for(group: dist.ProcessGroup | None, hidden_bytes: int) -> UCCLBuffer:
        group = _group_or_world(group)
        if group.size() != num_ranks:
            raise ValueError(f"uccl: these configs were resolved for {num_ranks} ranks, but the group has {group.size()}")
        return _ensure_buffer(group, hidden_bytes, configs)

    return Comm(
        name="uccl", get_buffer=get_buffer_for, dispatch_config=configs[0], combine_config=configs[1],
        new_event=EventOverlap.capture,
    )


def uccl_backend_spec() -> BackendSpec:
    """The ``uccl`` :class:`~fused_a2a.backends.BackendSpec` (for ``fused_a2a.backends.BACKENDS``); bf16
    only (UCCL-EP's combine kernel exists for bf16 alone)."""
    return BackendSpec(
        name="uccl", knobs=KNOBS, make_comm=make_uccl_comm, unavailable=unavailable, invalid=invalid_knobs,
        dtypes=("bf16",),
    )
