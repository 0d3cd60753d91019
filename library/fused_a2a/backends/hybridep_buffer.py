"""HybridEP's library and its process-wide buffer: what one ``HybridEPBuffer`` is built and called with
(:class:`Settings`), the buffer itself (one per process and set of construction knobs, made and
replaced by :func:`ensure_buffer`) and the chunk variables HybridEP reads at every call
(:func:`apply_environment`).

A new set of knobs makes a new buffer; a handle keeps the buffer that made it alive
(:func:`remember_buffer`), so a combine or a backward never runs on another buffer.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

import fused_a2a.env_snapshot as env_snapshot
from fused_a2a.backends.optional import try_import

HYBRID_EP = try_import("deep_ep", "build DeepEP's hybrid-ep branch: scripts/install_backends.sh --ref hybrid-ep (it holds "
                       "Buffer and HybridEPBuffer); some images also need LD_PRELOAD=/lib/x86_64-linux-gnu/libstdc++.so.6")
HAVE_HYBRIDEP = HYBRID_EP.available and hasattr(HYBRID_EP.module, "HybridEPBuffer")
# knob name -> the environment variable HybridEP reads it from
CHUNK_ENV_VARS: dict[str, str] = {
    "tokens_per_chunk_dispatch": "NUM_OF_TOKENS_PER_CHUNK_DISPATCH_API",
    "tokens_per_chunk_combine": "NUM_OF_TOKENS_PER_CHUNK_COMBINE_API",
}
DEFAULT_CHUNK = 64  # HybridEP's default for both variables


@dataclass(frozen=True)
class Settings:
    """What one HybridEP buffer is built and called with (from a dispatch and a combine knob set).

    Attributes:
        sms_dispatch, sms_combine, sms_preprocessing: SM counts of the three kernel families.
        blocks_permute, blocks_unpermute: thread blocks of the (un)permute kernels, ``None``: HybridEP's.
        chunk_dispatch, chunk_combine: tokens per chunk, ``None``: the environment as set.
        fused: fuse (un)permute into dispatch/combine on the permute path.
        custom_allgather: gather routing maps with HybridEP's own allgather (else the process group's).
    """

    sms_dispatch: int = 24
    sms_combine: int = 24
    sms_preprocessing: int = 108
    blocks_permute: int | None = None
    blocks_unpermute: int | None = None
    chunk_dispatch: int | None = None
    chunk_combine: int | None = None
    fused: bool = False
    custom_allgather: bool = True

    @classmethod
    def from_knobs(cls, dispatch: dict[str, Any], combine: dict[str, Any]) -> Settings:
        """Dispatch-side knobs from ``dispatch``, combine-side ones from ``combine`` (full knob dicts)."""
        return cls(
            sms_dispatch=dispatch["num_sms_dispatch_api"],
            sms_combine=combine["num_sms_combine_api"],
            sms_preprocessing=dispatch["num_sms_preprocessing_api"],
            blocks_permute=dispatch["num_blocks_permute"] or None,
            blocks_unpermute=combine["num_blocks_unpermute"] or None,
            chunk_dispatch=dispatch["tokens_per_chunk_dispatch"] or None,
            chunk_combine=combine["tokens_per_chunk_combine"] or None,
            fused=bool(dispatch["fused"]),
            custom_allgather=bool(dispatch["enable_custom_allgather"]),
        )

    def environment(self) -> dict[str, str]:
        """The chunk variables to set (those this setting fixes)."""
        values = {"tokens_per_chunk_dispatch": self.chunk_dispatch, "tokens_per_chunk_combine": self.chunk_combine}
        return {CHUNK_ENV_VARS[name]: str(value) for name, value in values.items() if value}

    def constructor_kwargs(self) -> dict[str, Any]:
        """The keywords of ``HybridEPBuffer(...)`` these settings fix (``None`` values left out: HybridEP's
        defaults; ``enable_custom_allgather`` only where the installed HybridEP takes it)."""
        kwargs = dict(num_sms_dispatch_api=self.sms_dispatch, num_sms_combine_api=self.sms_combine,
                      num_sms_preprocessing_api=self.sms_preprocessing, num_blocks_permute=self.blocks_permute,
                      num_blocks_unpermute=self.blocks_unpermute)
        if constructor_takes("enable_custom_allgather"):
            kwargs["enable_custom_allgather"] = self.custom_allgather
        return {name: value for name, value in kwargs.items() if value is not None}


def constructor_takes(keyword: str) -> bool:
    """Whether the installed ``HybridEPBuffer`` constructor has ``keyword``."""
    return HAVE_HYBRIDEP and keyword in inspect.signature(HYBRID_EP.module.HybridEPBuffer).parameters


def chunk_sizes(environ=os.environ) -> tuple[int, int]:
    """``(dispatch, combine)`` tokens per chunk as HybridEP would read them from ``environ`` now."""
    values = []
    for var in CHUNK_ENV_VARS.values():
        text = environ.get(var, "")
        values.append(int(text) if text.strip().isdigit() else DEFAULT_CHUNK)
    return values[0], values[1]


def has_fused_permute() -> bool:
    """Whether the installed HybridEP takes ``fuse_permute_dispatch`` (the fused permute path)."""
    if not HAVE_HYBRIDEP:
        return False
    return "fuse_permute_dispatch" in inspect.signature(HYBRID_EP.module.HybridEPBuffer.dispatch_with_permute).parameters


def unavailable() -> str | None:
    """``None`` if ``deep_ep.HybridEPBuffer`` imports, else why not."""
    if not HYBRID_EP.available:
        return HYBRID_EP.reason
    return None if HAVE_HYBRIDEP else "the installed deep_ep has no HybridEPBuffer (build DeepEP's hybrid-ep branch)"


def require(what: str):
    reason = unavailable()
    if reason is not None:
        raise RuntimeError(f"{what} needs deep_ep.HybridEPBuffer, which is not available ({reason}); "
                           f"{HYBRID_EP.install_hint}")
    return HYBRID_EP.module


@dataclass
class _Current:
    """The process-wide buffer and what it was built with (``key``: group, hidden, local experts,
    fp8, :class:`Settings`)."""

    buffer: Any = None
    key: tuple | None = None

_current = _Current()
# the attribute of a raw handle's first tensor that holds the buffer that made it
_BUFFER_ATTRIBUTE = "_fused_a2a_hybridep_buffer"


def current_buffer():
    """The process-wide ``HybridEPBuffer`` (``None`` without one)."""
    return _current.buffer

_KEEP = object()


def set_current_buffer(buffer, key: Any = _KEEP) -> None:
    """Make ``buffer`` the process-wide one (``None``: drop it; HybridEP frees it when no handle holds it).

    ``key`` (what it was built for, see :func:`ensure_buffer`): omitted, the current key stays (a
    stand-in for the current buffer); ``None`` for a buffer no call should reuse."""
    _current.buffer = buffer
    if key is not _KEEP:
        _current.key = key

_applied: list = [None, (), ()]  # the settings applied last, their variables (encoded) and the values they got


def apply_environment(settings: Settings) -> None:
    """Set the chunk variables ``settings`` fixes (HybridEP reads them at every call)."""
    if settings is _applied[0] and env_snapshot.values(_applied[1]) == _applied[2]:
        return  # the variables still hold what these settings set
    wanted = settings.environment()
    for var, value in wanted.items():
        if os.environ.get(var) != value:
            os.environ[var] = value
    names = env_snapshot.encode(tuple(wanted))
    _applied[:] = settings, names, env_snapshot.values(names)


def ensure_buffer(group, hidden: int, num_local_experts: int, num_tokens: int, settings: Settings, fp8: bool = False):
    """The process-wide buffer for these settings, created (collectively) when there is none or the
    current one was built for another group, hidden size, expert count, fp8 flag or settings.

    Args:
        group: the expert-parallel process group (``None``: the default group).
        hidden: hidden size ``H``.
        num_local_experts: experts per rank.
        num_tokens: tokens per rank of the call (a new buffer's initial capacity; HybridEP grows it).
        settings: the knobs.
        fp8: a buffer for FP8 dispatch.
    """
    deep_ep = require("the hybridep backend")
    group = dist.group.WORLD if group is None else group
    key = (id(group), hidden, num_local_experts, fp8, settings)  # no reference: the buffer holds its group
    apply_environment(settings)
    if _current.buffer is None or _current.key != key or getattr(_current.buffer, "group", group) is not group:
        _current.buffer = None  # the old buffer lives on only while a handle holds it
        buffer = deep_ep.HybridEPBuffer(group=group, hidden_dim=hidden, max_num_of_tokens_per_rank=max(num_tokens, 1),
                                        num_local_experts=num_local_experts, use_fp8=fp8, **settings.constructor_kwargs(),
                                        **_reuse_kernels(deep_ep.HybridEPBuffer))
        set_current_buffer(buffer, key)
    return _current.buffer


def _reuse_kernels(buffer_class) -> dict[str, bool]:
    """``load_cached_kernels=True`` where HybridEP takes it: a new buffer of this process (a knob change)
    loads the kernels an earlier one compiled instead of compiling them again (HybridEP caches them per
    process)."""
    return {"load_cached_kernels": True} if "load_cached_kernels" in inspect.signature(buffer_class).parameters else {}


def ranks_per_node(buffer) -> int:
    """Ranks of one NVLink domain as ``buffer`` sees them."""
    return int(getattr(buffer, "num_of_hybrid_ep_ranks_per_nvlink_domain", buffer.group_size))


def remember_buffer(handle: tuple, buffer) -> None:
    """Note that ``buffer`` made the raw HybridEP ``handle``: the handle's first tensor holds it, so the
    buffer lives at least as long as the handle."""
    setattr(handle[0], _BUFFER_ATTRIBUTE, buffer)


def buffer_of(handle: tuple):
    """The buffer that made a raw ``handle`` (the process-wide one for a handle made elsewhere)."""
    return getattr(handle[0], _BUFFER_ATTRIBUTE, None) or _current.buffer


def free_buffers() -> None:
    """Drop the process-wide buffer (HybridEP frees its memory once no handle holds it)."""
    set_current_buffer(None, None)
