"""The ``deepep`` backend: DeepEP's v1 ``deep_ep.Buffer`` in normal mode.

Knobs (:data:`KNOBS`): ``num_sms`` and the four chunk sizes of ``deep_ep.Config``. A chunk size of
``0`` means DeepEP's own default for the group size and the operation (dispatch and combine defaults
differ): the installed DeepEP's ``Config`` of ``Buffer.get_dispatch_config``/``get_combine_config``
where it has one (:func:`installed_default`); the copy in this module checks knob combinations and
serves where DeepEP has no default.

A DeepEP handle holds ``num_sms / 2`` channels, so the combine of a dispatch must run with the
dispatch's ``num_sms``: a :class:`~fused_a2a.autograd.Comm` never mixes SM counts.

The process-wide buffer (one per process, as in the seed module) lives here: :func:`ensure_buffer`
(re)creates it, :func:`free_buffer` destroys it. Creating and destroying are collective.
"""

from __future__ import annotations

import atexit
import logging
from typing import Any, NamedTuple

import torch.distributed as dist

from fused_a2a.autograd import Comm
from fused_a2a.backends.base import BackendSpec, Knob, buffer_getter
from fused_a2a.backends.direct import BufferSlot
from fused_a2a.backends.frameworks import ForeignNames, SGLangConfig
from fused_a2a.backends.chunk_config import (
    NVL_PEERS,
    CHUNK_KNOBS,
    ChunkConfig,
    chunk_knobs,
    configs_from_knobs,
    invalid_chunk_knobs,
)
from fused_a2a.backends.optional import distribution_version, try_import
from fused_a2a.groups import GroupMap

DEEP_EP = try_import("deep_ep", "build DeepEP from source: scripts/install_backends.sh (or TORCH_CUDA_ARCH_LIST=9.0 pip "
                     "install --no-build-isolation <DeepEP checkout>)")
HAVE_DEEP_EP = DEEP_EP.available

# deep_ep.Buffer.num_sms: the SM count DeepEP uses when none is set
DEFAULT_NUM_SMS: int = int(getattr(getattr(DEEP_EP.module, "Buffer", None), "num_sms", 20)) if HAVE_DEEP_EP else 20

# DeepEP's tuned defaults (Buffer.get_dispatch_config / get_combine_config of its v1 API on main), per
# group size: (nvl_send, nvl_recv, rdma_send, rdma_recv) in tokens. Checks knob combinations and stands
# in where the installed DeepEP has no default (its hybrid-ep branch differs at 24, 32, 64 and 128 ranks).
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
_exit_hook_registered = False

KNOBS: tuple[Knob, ...] = chunk_knobs("DeepEP", DEFAULT_NUM_SMS)


def installed_default(op: str, num_ranks: int, num_sms: int):
    """The installed DeepEP's own default ``deep_ep.Config`` of ``op`` (``dispatch``/``combine``) for
    ``num_ranks`` ranks with ``num_sms`` SMs (``Buffer.get_dispatch_config``/``get_combine_config``), or
    ``None`` where it has none (no such method, no default for that group size).

    DeepEP builds these from its class attribute ``Buffer.num_sms``; it is set for the call and restored.
    """
    buffer_class = DEEP_EP.module.Buffer
    getter = getattr(buffer_class, f"get_{op}_config", None)
    if getter is None:
        return None
    saved = buffer_class.num_sms
    try:
        buffer_class.num_sms = num_sms
        return getter(num_ranks)
    except (AssertionError, RuntimeError, ValueError):  # DeepEP asserts on a group size without a default
        return None
    finally:
        buffer_class.num_sms = saved


def configs(dispatch_knobs: dict[str, Any], combine_knobs: dict[str, Any], num_ranks: int) -> tuple[ChunkConfig, ChunkConfig]:
    """The checked ``(dispatch, combine)`` configs of two full knob dicts on ``num_ranks`` ranks (a
    chunk knob of 0: DeepEP's default for the group size, from :data:`DEFAULT_DISPATCH` /
    :data:`DEFAULT_COMBINE`; DeepEP's ``Config`` does not show its values to Python).

    Raises:
        ValueError: see :func:`~fused_a2a.backends.chunk_config.configs_from_knobs`.
    """
    return configs_from_knobs(dispatch_knobs, combine_knobs, num_ranks, DEFAULT_DISPATCH, DEFAULT_COMBINE, library="DeepEP")


def unavailable() -> str | None:
    """``None`` if ``deep_ep`` imports, else why not."""
    return None if HAVE_DEEP_EP else DEEP_EP.reason


def version() -> str | None:
    """The installed DeepEP's version (with its git commit when the build recorded one), else ``None``."""
    return distribution_version(DEEP_EP, ("deep_ep", "deep-ep")) if HAVE_DEEP_EP else None


def invalid_knobs(knobs: dict[str, Any], world_size: int) -> str | None:
    """Why ``knobs`` (used for dispatch and combine alike, as a sweep point does) cannot run on
    ``world_size`` ranks, or ``None`` (:func:`~fused_a2a.backends.chunk_config.invalid_chunk_knobs`). Pure:
    needs no deep_ep."""
    return invalid_chunk_knobs(KNOBS, configs, knobs, world_size)


def make_deepep_comm(dispatch_knobs: dict[str, Any], combine_knobs: dict[str, Any], num_ranks: int | None = None) -> Comm:
    """The :class:`Comm` of the ``deepep`` backend for two full knob dicts.

    Args:
        dispatch_knobs, combine_knobs: every knob of :data:`KNOBS` (a chunk size of 0: DeepEP's default).
        num_ranks: the expert-parallel group size the configs are for (default: the default
            process group's). The Comm's ``get_buffer`` refuses a group of another size.

    Returns:
        a Comm whose ``dispatch_config``/``combine_config`` are those of :func:`deep_configs` and whose
        ``get_buffer(group, tokens)`` sizes the process-wide buffer for both.

    Raises:
        ValueError: see :func:`configs`.
        RuntimeError: deep_ep is missing, or no ``num_ranks`` and no process group.
    """
    if num_ranks is None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("the deepep backend needs an initialised process group to size its configs")
        num_ranks = dist.get_world_size()
    in_use, values = deep_configs(dispatch_knobs, combine_knobs, num_ranks)
    get_buffer = buffer_getter("deepep", num_ranks, current_buffer,
                               lambda group, hidden_bytes: ensure_buffer(group, hidden_bytes, in_use, values))
    return Comm(name="deepep", get_buffer=get_buffer, dispatch_config=in_use[0], combine_config=in_use[1],
                new_event=new_event)


def deep_configs(dispatch_knobs: dict[str, Any], combine_knobs: dict[str, Any], num_ranks: int) -> tuple[tuple, tuple]:
    """The ``deep_ep.Config`` objects of two full knob dicts, and their values.

    Returns:
        ``((dispatch, combine) deep_ep.Config, (dispatch, combine) ChunkConfig)``; an operation whose
        chunk knobs are all 0 gets the installed DeepEP's own default (:func:`installed_default`).

    Raises:
        ValueError: see :func:`configs` (prefixed ``deepep:``).
        RuntimeError: deep_ep is missing.
    """
    try:
        dispatch, combine = configs(dispatch_knobs, combine_knobs, num_ranks)
    except ValueError as err:
        raise ValueError(f"deepep: {err}") from None
    deep_ep = DEEP_EP.require("the deepep backend")
    in_use = tuple(
        (all(knobs[name] == 0 for name in CHUNK_KNOBS) and installed_default(op, num_ranks, config.num_sms))
        or deep_ep.Config(*config.args())
        for op, knobs, config in (("dispatch", dispatch_knobs, dispatch), ("combine", combine_knobs, combine))
    )
    return in_use, (dispatch, combine)


def is_nvshmem_available() -> bool:
    """Whether DeepEP was compiled with NVSHMEM (``Buffer.is_sm90_compiled()`` stands in for it).

    DeepEP's build disables NVSHMEM whenever it disables its SM90 features, so the two agree.
    """
    global _nvshmem_available
    if _nvshmem_available is None:
        _nvshmem_available = bool(DEEP_EP.require("is_nvshmem_available").Buffer.is_sm90_compiled())
    return _nvshmem_available


def current_buffer():
    """The process-wide ``deep_ep.Buffer``, or ``None``."""
    return _buffer


def set_current_buffer(buffer) -> None:
    """Replace the process-wide buffer reference without destroying the old one (what code that
    assigns the seed module's ``_buffer`` does)."""
    global _buffer
    _buffer = buffer


def ensure_buffer(group: dist.ProcessGroup, hidden_bytes: int, configs_in_use: tuple, values: tuple) -> Any:
    """The process-wide buffer, (re)created for ``group`` when it lacks room for ``configs_in_use``.

    Collective when it (re)creates: every rank of ``group`` must ask for the same sizes.

    Args:
        group: the expert-parallel process group.
        hidden_bytes: bytes of one token row.
        configs_in_use: ``deep_ep.Config`` objects the buffer must hold (their size hints).
        values: their :class:`~fused_a2a.backends.chunk_config.ChunkConfig` values (what the sizes are
            remembered by).
    """
    global _buffer
    deep_ep = DEEP_EP.require("the DeepEP buffer")
    num_nvl_bytes, num_rdma_bytes = _needed_bytes(group, hidden_bytes, configs_in_use, values)
    if _buffer is not None and _buffer.group is group:
        if _buffer.num_nvl_bytes >= num_nvl_bytes and _buffer.num_rdma_bytes >= num_rdma_bytes:
            return _buffer
        num_nvl_bytes = max(num_nvl_bytes, _buffer.num_nvl_bytes)
        num_rdma_bytes = max(num_rdma_bytes, _buffer.num_rdma_bytes)
    free_buffer()
    _buffer = deep_ep.Buffer(group=group, num_nvl_bytes=num_nvl_bytes, num_rdma_bytes=num_rdma_bytes, explicitly_destroy=True)
    _register_exit_hook()
    return _buffer


_sizes: GroupMap[dict[tuple, tuple[int, int]]] = GroupMap()  # per group: an entry goes with its group


def _needed_bytes(group: dist.ProcessGroup, hidden_bytes: int, configs_in_use: tuple, values: tuple) -> tuple[int, int]:
    """``(NVLink bytes, RDMA bytes)`` the configs need for rows of ``hidden_bytes`` (DeepEP's size hints,
    remembered per group, row size and config values: a warm call asks DeepEP nothing)."""
    sizes = _sizes.get(group)
    if sizes is None:
        sizes = _sizes.set(group, {})
    key = (hidden_bytes, values)
    if key not in sizes:
        size = group.size()
        nvshmem = is_nvshmem_available()
        if not nvshmem and size > NVL_PEERS:
            raise RuntimeError(
                f"DeepEP was compiled without NVSHMEM, but an expert-parallel group of {size} ranks needs internode "
                "RDMA: rebuild DeepEP with NVSHMEM or keep the group within one node (at most 8 GPUs)"
            )
        nvl = max(config.get_nvl_buffer_size_hint(hidden_bytes, size) for config in configs_in_use)
        rdma = max(config.get_rdma_buffer_size_hint(hidden_bytes, size) for config in configs_in_use) if nvshmem else 0
        sizes[key] = (nvl, rdma)
    return sizes[key]


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


def new_event():
    """An ``EventOverlap`` capturing the current stream (DeepEP's ``previous_event``)."""
    deep_ep = DEEP_EP.require("async_finish")
    return deep_ep.EventOverlap(deep_ep.utils.EventHandle())


class IntranodeHandle(NamedTuple):
    """The fields of DeepEP's intranode normal-mode handle, a plain 6-tuple (``R`` ranks, ``C = num_sms / 2``
    channels, ``N`` tokens sent, ``M`` received). DeepEP takes back the tuple it returned: these names
    only read it (``IntranodeHandle._make(handle)``)."""

    rank_prefix_matrix: Any  # [R, R] int32
    channel_prefix_matrix: Any  # [R, C] int32
    recv_channel_prefix_matrix: Any  # [R, C] int32
    recv_src_idx: Any  # [M] int32
    is_token_in_rank: Any  # [N, R] bool
    send_head: Any  # [N, R] int32


class InternodeHandle(NamedTuple):
    """The fields of DeepEP's internode normal-mode handle, a plain 10-tuple (read as
    :class:`IntranodeHandle`; ``C = num_sms / 2`` channels)."""

    is_token_in_rank: Any  # [N, R] bool
    rdma_channel_prefix_matrix: Any  # [RDMA ranks, C] int32
    gbl_channel_prefix_matrix: Any
    recv_rdma_channel_prefix_matrix: Any
    recv_rdma_rank_prefix_sum: Any
    recv_gbl_channel_prefix_matrix: Any
    recv_gbl_rank_prefix_sum: Any
    recv_src_meta: Any
    send_rdma_head: Any
    send_nvl_head: Any


def handle_layout(handle: tuple) -> tuple[int, int]:
    """``(num_sms, num_tokens)`` of the dispatch that returned a DeepEP normal-mode ``handle`` (either
    kind): two SMs per channel of its channel prefix matrix, a row of ``is_token_in_rank`` per token."""
    if len(handle) == len(IntranodeHandle._fields):
        intranode = IntranodeHandle._make(handle)
        return 2 * intranode.channel_prefix_matrix.size(1), intranode.is_token_in_rank.size(0)
    internode = InternodeHandle._make(handle)
    return 2 * internode.rdma_channel_prefix_matrix.size(1), internode.is_token_in_rank.size(0)


SPEC = BackendSpec(
    name="deepep",
    knobs=KNOBS,
    make_comm=make_deepep_comm,
    unavailable=unavailable,
    invalid=invalid_knobs,
    teardown=free_buffer,
    version=version,
    dtypes=("bf16", "fp8"),
    sms_knobs=("num_sms",),
    install_hint=DEEP_EP.install_hint,
    buffer_slot=BufferSlot(lambda group: current_buffer(), lambda group, buffer: set_current_buffer(buffer)),
    names=ForeignNames(
        env=(("num_sms", "DEEP_EP_SM_NUMS"),),  # NeMo's
        megatron=(("num_sms", "moe_flex_dispatcher_num_sms"),),
        automodel_sms="num_sms",
        frameworks=("automodel", "megatron"),
        # our knob -> its keyword in deep_ep.Config(...), which SGLang splats each section into
        sglang=SGLangConfig(kwargs=(("num_sms", "num_sms"), ("nvl_send", "num_max_nvl_chunked_send_tokens"),
                                    ("nvl_recv", "num_max_nvl_chunked_recv_tokens"),
                                    ("rdma_send", "num_max_rdma_chunked_send_tokens"),
                                    ("rdma_recv", "num_max_rdma_chunked_recv_tokens")),
                            configs=configs),
    ),
)
