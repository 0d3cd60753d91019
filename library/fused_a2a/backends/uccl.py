"""The ``uccl`` backend: UCCL-EP (``uccl.ep``) through :class:`~fused_a2a.backends.uccl_buffer.UCCLBuffer`,
our own layer over its pointer-level API with DeepEP v1's ``Buffer`` interface.

**Intranode only**: a group whose ranks span hosts is refused (UCCL-EP's internode path needs RDMA NICs;
this adapter does not drive it, and it could not be run here).

Knobs: DeepEP's (``num_sms`` and the four chunk sizes of ``uccl.ep.Config``, checked with DeepEP's
``Config`` rules, :mod:`fused_a2a.backends.chunk_config`); a chunk size of ``0`` takes UCCL-EP's
default for the group size and the operation. The process-wide buffer lives here.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Mapping

import torch.distributed as dist

from fused_a2a.autograd import Comm
from fused_a2a.backends.base import BackendSpec, Knob, buffer_getter
from fused_a2a.backends.direct import BufferSlot
from fused_a2a.backends.frameworks import ForeignNames
from fused_a2a.backends.chunk_config import (
    NVL_PEERS,
    ChunkConfig,
    chunk_knobs,
    configs_from_knobs,
    invalid_chunk_knobs,
    rank_problem,
)
from fused_a2a.backends.optional import distribution_version
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

KNOBS: tuple[Knob, ...] = chunk_knobs("UCCL-EP", DEFAULT_NUM_SMS)


def current_buffer() -> UCCLBuffer | None:
    """The process-wide UCCL-EP buffer, or ``None``."""
    return _uccl_buffer


def set_current_buffer(buffer: UCCLBuffer | None) -> None:
    """Replace the process-wide buffer reference without destroying the old one."""
    global _uccl_buffer
    _uccl_buffer = buffer


def ensure_buffer(group: dist.ProcessGroup, hidden_bytes: int, configs_in_use: tuple) -> UCCLBuffer:
    """The process-wide buffer, (re)created for ``group`` when it lacks room for ``configs_in_use``
    (``uccl.ep.Config`` objects). Collective when it (re)creates."""
    global _uccl_buffer
    num_nvl_bytes = max(config.get_nvl_buffer_size_hint(hidden_bytes, group.size()) for config in configs_in_use)
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


def uccl_configs(
    dispatch_knobs: dict[str, Any], combine_knobs: dict[str, Any], num_ranks: int
) -> tuple[ChunkConfig, ChunkConfig]:
    """The checked ``(dispatch, combine)`` configs of two full knob dicts on ``num_ranks`` ranks.

    A chunk knob of ``0`` takes UCCL-EP's default for ``num_ranks`` and that operation; the rest are
    DeepEP's rules (:func:`~fused_a2a.backends.chunk_config.configs_from_knobs`).

    Raises:
        ValueError: a group this adapter cannot run on (more than one node's ranks, or a size the
            kernels do not exist for), no UCCL-EP default for ``num_ranks``, or a config UCCL-EP rejects.
    """
    problem = rank_problem(num_ranks)
    if problem is not None:
        raise ValueError(problem)
    if num_ranks > NVL_PEERS:
        raise ValueError(f"{num_ranks} ranks span nodes: {INTERNODE_ERROR}")
    return configs_from_knobs(dispatch_knobs, combine_knobs, num_ranks, DEFAULT_DISPATCH, DEFAULT_COMBINE, "UCCL-EP")


def unavailable() -> str | None:
    """``None`` if ``uccl.ep`` imports, else why not."""
    return None if HAVE_UCCL_EP else UCCL_EP.reason


def version() -> str | None:
    """The installed ``uccl`` package's version, else ``None``."""
    return distribution_version(UCCL_EP, ("uccl",)) if HAVE_UCCL_EP else None


def invalid_knobs(knobs: dict[str, Any], world_size: int) -> str | None:
    """Why ``knobs`` (for dispatch and combine alike) cannot run on ``world_size`` ranks, or ``None``
    (:func:`~fused_a2a.backends.chunk_config.invalid_chunk_knobs`). Pure."""
    return invalid_chunk_knobs(KNOBS, uccl_configs, knobs, world_size)


def make_uccl_comm(dispatch_knobs: dict[str, Any], combine_knobs: dict[str, Any], num_ranks: int | None = None) -> Comm:
    """The :class:`Comm` of the ``uccl`` backend for two full knob dicts.

    Args:
        dispatch_knobs, combine_knobs: every knob of :data:`KNOBS` (a chunk size of 0: UCCL-EP's default).
        num_ranks: the group size the configs are for (default: the default process group's); the
            Comm's ``get_buffer`` refuses a group of another size.

    Returns:
        a Comm whose configs are ``uccl.ep.Config`` objects and whose ``get_buffer(group, tokens)``
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
    configs = (ep.Config(*dispatch.args()), ep.Config(*combine.args()))
    get_buffer = buffer_getter("uccl", num_ranks, current_buffer,
                               lambda group, hidden_bytes: ensure_buffer(group, hidden_bytes, configs))
    return Comm(name="uccl", get_buffer=get_buffer, dispatch_config=configs[0], combine_config=configs[1],
                new_event=EventOverlap.capture)


SPEC = BackendSpec(
    name="uccl",
    knobs=KNOBS,
    make_comm=make_uccl_comm,
    unavailable=unavailable,
    invalid=invalid_knobs,
    teardown=free_uccl_buffer,
    version=version,
    dtypes=("bf16",),  # UCCL-EP's combine kernel exists for bf16 alone
    sms_knobs=("num_sms",),
    install_hint=UCCL_EP.install_hint,
    buffer_slot=BufferSlot(lambda group: current_buffer(), lambda group, buffer: set_current_buffer(buffer)),
    names=ForeignNames(
        env=(("num_sms", SM_ENV_VARS[0]),),
        megatron=(("num_sms", "moe_flex_dispatcher_num_sms"),),
        automodel_sms="num_sms",
        frameworks=("automodel",),
    ),
)
