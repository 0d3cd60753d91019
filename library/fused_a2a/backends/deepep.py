"""DeepEP (``deep_ep.Buffer``, normal mode): the seed's buffer management and autograd Functions,
DeepEP's ``Config`` as tunable knobs, and the ``deepep`` backend of the backend-neutral entry.

Knobs (:data:`KNOBS`): ``num_sms`` and the four chunk sizes of ``deep_ep.Config``. A chunk size of
``0`` means DeepEP's own default for the group size and the operation (dispatch and combine
defaults differ, :func:`default_configs`). Every call resolves its knobs with
:func:`fused_a2a.tuning.resolve.resolve` (argument > environment > tuning table > default);
:func:`set_deepep_num_sms` counts as an argument.

A DeepEP handle holds ``num_sms / 2`` channels, so the combine of a dispatch must run with the
dispatch's ``num_sms``: a :class:`~fused_a2a.autograd.Comm` never mixes SM counts, and the seed's
:func:`fused_combine` takes the SM count from the handle it is given.
"""

from __future__ import annotations

import atexit
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from fused_a2a.autograd import (
    Comm,
    combine_backward,
    combine_forward,
    dispatch_backward,
    dispatch_forward,
)

# fused_a2a.backends imports this module after defining Knob, to register the deepep backend
from fused_a2a.backends.base import Knob
from fused_a2a.backends.optional import try_import

DEEP_EP = try_import("deep_ep", "build DeepEP from its source (github.com/deepseek-ai/DeepEP) for your torch and CUDA")
HAVE_DEEP_EP = DEEP_EP.available

# deep_ep.Buffer.num_sms: the SM count DeepEP uses when none is set
DEFAULT_NUM_SMS: int = int(DEEP_EP.module.Buffer.num_sms) if HAVE_DEEP_EP else 20
CHUNK_KNOBS = ("nvl_send", "nvl_recv", "rdma_send", "rdma_recv")
# ranks of one NVLink domain (DeepEP's NUM_MAX_NVL_PEERS) and most RDMA ranks (NUM_MAX_RDMA_PEERS)
NVL_PEERS = 8
MAX_RDMA_RANKS = 20

# DeepEP's tuned defaults (Buffer.get_dispatch_config / get_combine_config, legacy v1 API on main),
# per group size: (nvl_send, nvl_recv, rdma_send, rdma_recv) in tokens.
DEFAULT_DISPATCH: dict[int, tuple[int, int, int, int]] = {
    2: (24, 256, 6, 128), 4: (6, 256, 6, 128), 8: (6, 256, 6, 128), 16: (36, 288, 20, 128),
    24: (32, 288, 8, 128), 32: (32, 288, 8, 128), 48: (32, 288, 8, 128), 64: (32, 288, 8, 128),
    96: (20, 480, 12, 128), 128: (20, 560, 12, 128), 144: (32, 720, 12, 128), 160: (28, 720, 12, 128),
}
DEFAULT_COMBINE: dict[int, tuple[int, int, int, int]] = {
    2: (10, 256, 6, 128), 4: (9, 256, 6, 128), 8: (4, 256, 6, 128), 16: (4, 288, 12, 128),
    24: (1, 288, 8, 128), 32: (1, 288, 8, 128), 48: (1, 288, 8, 128), 64: (1, 288, 8, 128),
    96: (1, 480, 8, 128), 128: (1, 560, 8, 128), 144: (2, 720, 8, 128), 160: (2, 720, 8, 128),
}

logger = logging.getLogger("fused_a2a")

_buffer = None
_nvshmem_available: bool | None = None
_num_sms: int | None = None  # set by set_deepep_num_sms: an explicit argument for every seed call
_exit_hook_registered = False


@dataclass(frozen=True)
class DeepEPConfig:
    """Our copy of one ``deep_ep.Config`` (whose values DeepEP does not expose to Python).

    Attributes:
        num_sms: SMs of the kernels; DeepEP runs ``num_sms / 2`` channels (even, > 0).
        nvl_send: tokens a channel sends over NVLink at once (``num_max_nvl_chunked_send_tokens``).
        nvl_recv: NVLink receive buffer of a channel, in tokens (``num_max_nvl_chunked_recv_tokens``).
        rdma_send: tokens a channel sends over RDMA at once (internode only).
        rdma_recv: RDMA receive buffer of a channel, in tokens (internode only).
    """

    num_sms: int = 20
    nvl_send: int = 6
    nvl_recv: int = 256
    rdma_send: int = 6
    rdma_recv: int = 256

    @property
    def rdma_recv_rounded(self) -> int:
        """``rdma_recv`` rounded up to a multiple of ``rdma_send``, as DeepEP's ``Config`` stores it."""
        return -(-self.rdma_recv // self.rdma_send) * self.rdma_send

    def problems(self, num_ranks: int, combine: bool = False) -> str | None:
        """Why DeepEP would reject this config on ``num_ranks`` ranks, or ``None`` if it runs.

        The rules are DeepEP's own asserts: the group sizes its kernels exist for, positive values,
        an even SM count (every kernel runs one channel per 2 SMs), ``nvl_send < nvl_recv``,
        ``rdma_send <= rdma_recv_rounded / 2``, and for an internode ``combine`` an ``nvl_recv``
        divisible by the RDMA ranks with ``nvl_send <= nvl_recv / rdma_ranks``.

        Args:
            num_ranks: ranks of the expert-parallel group.
            combine: check the extra rules of DeepEP's internode combine.
        """
        problem = rank_problem(num_ranks)
        if problem is not None:
            return problem
        for name in ("num_sms", *CHUNK_KNOBS):
            if getattr(self, name) <= 0:
                return f"{name} must be positive, got {getattr(self, name)}"
        if self.num_sms % 2:
            return f"num_sms must be even (DeepEP runs one channel per 2 SMs), got {self.num_sms}"
        if self.nvl_send >= self.nvl_recv:
            return f"nvl_send ({self.nvl_send}) must be smaller than nvl_recv ({self.nvl_recv})"
        if 2 * self.rdma_send > self.rdma_recv_rounded:
            return (
                f"rdma_send ({self.rdma_send}) must be at most half of rdma_recv rounded up to a multiple "
                f"of rdma_send ({self.rdma_recv_rounded})"
            )
        rdma_ranks = num_ranks // NVL_PEERS
        if combine and rdma_ranks > 1:
            if self.nvl_recv % rdma_ranks:
                return f"nvl_recv ({self.nvl_recv}) must be a multiple of the {rdma_ranks} RDMA ranks (internode combine)"
            if self.nvl_send > self.nvl_recv // rdma_ranks:
                return (
                    f"nvl_send ({self.nvl_send}) must be at most nvl_recv / RDMA ranks "
                    f"({self.nvl_recv // rdma_ranks}) (internode combine)"
                )
        return None

    def to_deep_ep(self):
        """The ``deep_ep.Config`` of these values (``RuntimeError`` without deep_ep)."""
        deep_ep = DEEP_EP.require("DeepEPConfig.to_deep_ep")
        return deep_ep.Config(self.num_sms, self.nvl_send, self.nvl_recv, self.rdma_send, self.rdma_recv)


def rank_problem(num_ranks: int) -> str | None:
    """Why DeepEP's normal mode cannot run on ``num_ranks`` ranks, or ``None``.

    Intranode (up to 8 ranks) kernels exist for 2, 4 and 8 ranks; beyond one node the group is whole
    nodes of 8 ranks, at most 20 of them.
    """
    if num_ranks <= NVL_PEERS and num_ranks not in (2, 4, 8):
        return f"DeepEP's intranode kernels run on 2, 4 or 8 ranks, not {num_ranks}"
    if num_ranks > NVL_PEERS and num_ranks % NVL_PEERS:
        return f"DeepEP spans nodes of 8 ranks: {num_ranks} ranks is not a multiple of 8"
    if num_ranks > NVL_PEERS * MAX_RDMA_RANKS:
        return f"DeepEP runs on at most {NVL_PEERS * MAX_RDMA_RANKS} ranks (20 nodes of 8), not {num_ranks}"
    return None


def default_configs(num_ranks: int, num_sms: int = DEFAULT_NUM_SMS) -> tuple[DeepEPConfig, DeepEPConfig]:
    """DeepEP's default ``(dispatch, combine)`` configs for a group of ``num_ranks`` with ``num_sms``.

    Raises:
        ValueError: DeepEP has no default for this group size.
    """
    if num_ranks not in DEFAULT_DISPATCH:
        raise ValueError(
            f"DeepEP has no default config for {num_ranks} ranks (it has {', '.join(map(str, DEFAULT_DISPATCH))}); "
            f"give {', '.join(CHUNK_KNOBS)}"
        )
    return DeepEPConfig(num_sms, *DEFAULT_DISPATCH[num_ranks]), DeepEPConfig(num_sms, *DEFAULT_COMBINE[num_ranks])


def configs_from_knobs(
    dispatch_knobs: dict[str, Any], combine_knobs: dict[str, Any], num_ranks: int
) -> tuple[DeepEPConfig, DeepEPConfig]:
    """The checked ``(dispatch, combine)`` configs of two full knob dicts on ``num_ranks`` ranks.

    A chunk knob of ``0`` takes DeepEP's default for ``num_ranks`` and that operation.

    Raises:
        ValueError: a knob value DeepEP rejects (the message names the operation), ``num_sms``
            differing between dispatch and combine (a handle holds ``num_sms / 2`` channels), or a
            group size DeepEP does not run on.
    """
    for knobs in (dispatch_knobs, combine_knobs):
        for knob in KNOBS:
            problem = knob.check(knobs[knob.name])
            if problem is not None:
                raise ValueError(problem)
    if dispatch_knobs["num_sms"] != combine_knobs["num_sms"]:
        raise ValueError(
            f"dispatch and combine must use the same num_sms (a DeepEP handle holds num_sms / 2 channels), "
            f"got {dispatch_knobs['num_sms']} and {combine_knobs['num_sms']}"
        )
    problem = rank_problem(num_ranks)
    if problem is not None:
        raise ValueError(problem)
    uses_defaults = not all(knobs[name] for knobs in (dispatch_knobs, combine_knobs) for name in CHUNK_KNOBS)
    defaults = default_configs(num_ranks, dispatch_knobs["num_sms"]) if uses_defaults else (None, None)
    configs = []
    for op, knobs, default in zip(("dispatch", "combine"), (dispatch_knobs, combine_knobs), defaults):
        config = DeepEPConfig(knobs["num_sms"], *(knobs[name] or getattr(default, name) for name in CHUNK_KNOBS))
        problem = config.problems(num_ranks, combine=op == "combine")
        if problem is not None:
            raise ValueError(f"{op} config: {problem}")
        configs.append(config)
    return configs[0], configs[1]


def _check_num_sms(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 2 or value % 2:
        return f"num_sms must be an even int >= 2 (DeepEP runs one channel per 2 SMs), got {value!r}"
    return None


def _check_chunk(name: str):
    def check(value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            return f"{name} must be an int >= 0 (0: DeepEP's default for the group size), got {value!r}"
        return None

    return check


KNOBS: tuple[Knob, ...] = (
    Knob("num_sms", DEFAULT_NUM_SMS, (8, 16, 20, 24, 32, 48, 64),
         "SMs of the normal-mode kernels (even: one channel per 2 SMs); dispatch and combine share it",
         check=_check_num_sms),
    Knob("nvl_send", 0, (4, 8, 12, 16, 24, 32),
         "tokens a channel sends over NVLink at once (0: DeepEP's default)", check=_check_chunk("nvl_send")),
    Knob("nvl_recv", 0, (128, 256, 512),
         "NVLink receive buffer per channel, tokens (0: DeepEP's default)", check=_check_chunk("nvl_recv")),
    Knob("rdma_send", 0, (4, 8, 12, 16, 20, 32),
         "tokens a channel sends over RDMA at once, internode only (0: DeepEP's default)",
         check=_check_chunk("rdma_send")),
    Knob("rdma_recv", 0, (128, 256, 512),
         "RDMA receive buffer per channel, tokens, internode only (0: DeepEP's default)",
         check=_check_chunk("rdma_recv")),
)


def unavailable() -> str | None:
    """``None`` if ``deep_ep`` imports, else why not."""
    return None if HAVE_DEEP_EP else DEEP_EP.reason


def invalid_knobs(knobs: dict[str, Any], world_size: int) -> str | None:
    """Why ``knobs`` (used for dispatch and combine alike, as a sweep point does) cannot run on
    ``world_size`` ranks, or ``None``. Pure: needs no deep_ep."""
    full = {**{knob.name: knob.default for knob in KNOBS}, **knobs}
    try:
        configs_from_knobs(full, full, world_size)
    except ValueError as err:
        return str(err)
    return None


def make_deepep_comm(dispatch_knobs: dict[str, Any], combine_knobs: dict[str, Any], num_ranks: int | None = None) -> Comm:
    """The :class:`Comm` of the ``deepep`` backend for two full knob dicts.

    Args:
        dispatch_knobs, combine_knobs: every knob of :data:`KNOBS` (a chunk size of 0: DeepEP's default).
        num_ranks: the expert-parallel group size the configs are for (default: the default
            process group's). The Comm's ``get_buffer`` refuses a group of another size.

    Returns:
        a Comm whose ``dispatch_config``/``combine_config`` are ``deep_ep.Config`` objects and whose
        ``get_buffer(group, hidden_bytes)`` sizes the buffer for both.

    Raises:
        ValueError: see :func:`configs_from_knobs`.
        RuntimeError: deep_ep is missing, or no ``num_ranks`` and no process group.
    """
    if num_ranks is None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("the deepep backend needs an initialised process group to size its configs")
        num_ranks = dist.get_world_size()
    try:
        dispatch, combine = configs_from_knobs(dispatch_knobs, combine_knobs, num_ranks)
    except ValueError as err:
        raise ValueError(f"deepep: {err}") from None
    deep_dispatch, deep_combine = dispatch.to_deep_ep(), combine.to_deep_ep()

    def get_buffer_for(group: dist.ProcessGroup | None, hidden_bytes: int):
        group = _group_or_world(group)
        if group.size() != num_ranks:
            raise ValueError(
                f"deepep: these configs were resolved for {num_ranks} ranks, but the group has {group.size()}"
            )
        return _ensure_buffer(group, hidden_bytes, (deep_dispatch, deep_combine))

    return Comm(
        name="deepep",
        get_buffer=get_buffer_for,
        dispatch_config=deep_dispatch,
        combine_config=deep_combine,
        new_event=_new_event,
    )


def _group_or_world(group: dist.ProcessGroup | None) -> dist.ProcessGroup:
    return dist.group.WORLD if group is None else group


def is_nvshmem_available() -> bool:
    """Whether DeepEP was compiled with NVSHMEM (``Buffer.is_sm90_compiled()`` stands in for it).

    DeepEP's build disables NVSHMEM whenever it disables its SM90 features, so the two agree.
    """
    global _nvshmem_available
    if _nvshmem_available is None:
        _nvshmem_available = bool(DEEP_EP.require("is_nvshmem_available").Buffer.is_sm90_compiled())
    return _nvshmem_available


def _ensure_buffer(group: dist.ProcessGroup, hidden_bytes: int, configs: tuple) -> Any:
    """The process-wide buffer, (re)created for ``group`` when it lacks room for ``configs``.

    Collective when it (re)creates: every rank of ``group`` must ask for the same sizes.
    """
    global _buffer
    deep_ep = DEEP_EP.require("get_buffer")
    size = group.size()
    nvshmem = is_nvshmem_available()
    if not nvshmem and size > NVL_PEERS:
        raise RuntimeError(
            f"DeepEP was compiled without NVSHMEM, but an expert-parallel group of {size} ranks needs internode "
            "RDMA: rebuild DeepEP with NVSHMEM or keep the group within one node (at most 8 GPUs)"
        )
    num_nvl_bytes = max(config.get_nvl_buffer_size_hint(hidden_bytes, size) for config in configs)
    num_rdma_bytes = max(config.get_rdma_buffer_size_hint(hidden_bytes, size) for config in configs) if nvshmem else 0
    if _buffer is not None and _buffer.group is group:
        if _buffer.num_nvl_bytes >= num_nvl_bytes and _buffer.num_rdma_bytes >= num_rdma_bytes:
            return _buffer
        num_nvl_bytes = max(num_nvl_bytes, _buffer.num_nvl_bytes)
        num_rdma_bytes = max(num_rdma_bytes, _buffer.num_rdma_bytes)
    free_buffer()
    _buffer = deep_ep.Buffer(
        group=group, num_nvl_bytes=num_nvl_bytes, num_rdma_bytes=num_rdma_bytes, explicitly_destroy=True
    )
    _register_exit_hook()
    return _buffer


def get_buffer(group: torch.distributed.ProcessGroup, hidden_bytes: int):
    """Get or create the process-wide DeepEP buffer for ``group``.

    The NVL (and, with NVSHMEM, RDMA) sizes are the largest of the size hints of the dispatch and
    combine configs in use: ``num_sms`` from :func:`set_deepep_num_sms`, else
    ``$FUSED_A2A_DEEPEP_NUM_SMS``, else DeepEP's default (likewise for the chunk knobs; without a call
    shape there is no tuning-table entry). A new buffer (``explicitly_destroy=True``) is created only
    when there is none, the group changed, or a larger one is needed; the old one is destroyed first.

    Args:
        group: the expert-parallel process group.
        hidden_bytes: bytes of one token row (:func:`get_hidden_bytes`).

    Returns:
        deep_ep.Buffer: the communication buffer.
    """
    DEEP_EP.require("get_buffer")
    knobs = _untuned_knobs()
    return make_deepep_comm(knobs, knobs, _group_or_world(group).size()).get_buffer(group, hidden_bytes)


def free_buffer() -> None:
    """Destroy the process-wide DeepEP buffer, if any. Collective over the buffer's group.

    Call it before ``torch.distributed.destroy_process_group``: DeepEP's buffer holds NCCL
    sub-groups and NVSHMEM state, and ``destroy_process_group`` hangs while it is alive.
    """
    global _buffer
    if _buffer is not None:
        buffer, _buffer = _buffer, None
        buffer.destroy()


def _free_at_exit() -> None:
    """:func:`free_buffer` at interpreter exit while the process group is still up; never raises."""
    if _buffer is None or not (dist.is_available() and dist.is_initialized()):
        return
    try:
        free_buffer()
    except Exception as exc:  # at exit nobody can handle it: report and let the interpreter finish
        logger.warning("fused_a2a: destroying the DeepEP buffer at exit failed: %s", exc)


def _register_exit_hook() -> None:
    global _exit_hook_registered
    if not _exit_hook_registered:
        atexit.register(_free_at_exit)
        _exit_hook_registered = True


def _new_event():
    deep_ep = DEEP_EP.require("async_finish")
    return deep_ep.EventOverlap(deep_ep.utils.EventHandle())


def _explicit_knobs() -> dict[str, Any]:
    return {} if _num_sms is None else {"num_sms": _num_sms}


def _untuned_knobs() -> dict[str, Any]:
    """Every knob from :func:`set_deepep_num_sms`, else its environment variable, else its default."""
    from fused_a2a.tuning.resolve import env_var  # resolve imports fused_a2a.backends, which imports this module

    knobs = {}
    for knob in KNOBS:
        name = env_var("deepep", knob.name)
        try:
            knobs[knob.name] = knob.parse(os.environ[name]) if name in os.environ else knob.default
        except ValueError as err:
            raise ValueError(f"environment variable {name}: {err}") from None
    return {**knobs, **_explicit_knobs()}


def _tuned_comm(
    group: dist.ProcessGroup | None,
    dtype: torch.dtype,
    hidden: int,
    num_tokens: int,
    topk: int | None = None,
    num_experts: int | None = None,
    num_sms: int | None = None,
) -> Comm:
    """The Comm of a seed call of this shape, its knobs resolved (argument > environment > table >
    default); ``num_sms`` (when given) overrides every source. A table entry DeepEP would reject is
    dropped with a :class:`~fused_a2a.tuning.resolve.TuningWarning`."""
    # both import fused_a2a.backends, which imports this module
    from fused_a2a.api import DTYPE_NAMES
    from fused_a2a.tuning.resolve import tuned_comm

    explicit = _explicit_knobs() if num_sms is None else {"num_sms": num_sms}
    return tuned_comm("deepep", _group_or_world(group).size(), DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch.")),
                      hidden, num_tokens, explicit, topk=topk, num_experts=num_experts)


def handle_layout(handle: tuple) -> tuple[int, int]:
    """``(num_sms, num_tokens)`` of the dispatch that returned a DeepEP normal-mode ``handle``.

    DeepEP's intranode handle (a 6-tuple) and internode handle (a 10-tuple) both hold a
    ``[*, num_sms / 2]`` int32 channel prefix matrix at index 1; ``is_token_in_rank``
    (``[num_tokens, num_ranks]`` bool) is at index 4 of the first and index 0 of the second.
    """
    is_token_in_rank = handle[4] if len(handle) == 6 else handle[0]
    return 2 * handle[1].size(1), is_token_in_rank.size(0)


class FusedDispatch(torch.autograd.Function):
    """Fused dispatch operation for MoE routing combining computation and communication."""

    @staticmethod
    def forward(ctx, x, token_indices, token_probs, num_experts, group, async_finish=False, allocate_on_comm_stream=False):
        """Forward pass of fused dispatch (see :func:`fused_dispatch`)."""
        comm = _tuned_comm(group, x.dtype, x.size(1), x.size(0), token_indices.size(1), num_experts)
        return dispatch_forward(
            ctx, comm, x, token_indices, token_probs, num_experts, group, async_finish, allocate_on_comm_stream
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
        num_sms, num_tokens = handle_layout(handle)
        comm = _tuned_comm(group, x.dtype, x.size(1), num_tokens, num_sms=num_sms)
        return combine_forward(ctx, comm, x, group, handle, async_finish, allocate_on_comm_stream), None

    @staticmethod
    def backward(ctx, grad_output, previous_event=None):
        """Backward pass of fused combine: a cached dispatch of the gradient."""
        return combine_backward(ctx, grad_output), None, None, None, None


def fused_dispatch(x, token_indices, token_probs, num_experts, group, async_finish=False, allocate_on_comm_stream=False):
    """Dispatch tokens to the ranks holding their experts, with DeepEP.

    The configs come from :func:`set_deepep_num_sms`, ``$FUSED_A2A_DEEPEP_<KNOB>``, this cluster's
    tuning table for this shape, or DeepEP's defaults, in that order.

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

    The combine runs with the SM count of the dispatch that returned ``handle``; its chunk sizes
    come from the same sources as :func:`fused_dispatch`'s.

    Args:
        x: ``[R, hidden]`` bf16 rows in the order :func:`fused_dispatch` received them.
        group: the expert-parallel process group.
        handle: the handle returned by that dispatch.
        async_finish, allocate_on_comm_stream: as in :func:`fused_dispatch`.

    Returns:
        ``(combined_x [num_tokens, hidden], None)``.
    """
    DEEP_EP.require("fused_combine")
    return FusedCombine.apply(x, group, handle, async_finish, allocate_on_comm_stream)


def set_deepep_num_sms(num_sms: int) -> None:
    """Set the number of SMs DeepEP's normal-mode kernels use (``deep_ep.Buffer.set_num_sms``).

    It also counts as an explicit ``num_sms`` argument for every later seed call: it wins over
    ``$FUSED_A2A_DEEPEP_NUM_SMS`` and the tuning table.
    """
    global _num_sms
    DEEP_EP.require("set_deepep_num_sms").Buffer.set_num_sms(num_sms)
    _num_sms = num_sms
