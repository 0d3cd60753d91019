"""HybridEP's knobs: their names, defaults, the values a sweep tries and the check of each value, in one
place for the backend's spec (:mod:`fused_a2a.backends.hybridep`) and its direct calls
(:mod:`fused_a2a.backends.hybridep_direct`)."""

from __future__ import annotations

from typing import Any

from fused_a2a.backends.base import Knob
from fused_a2a.backends.hybridep_buffer import CHUNK_ENV_VARS, DEFAULT_CHUNK


def _positive_int(name: str):
    def check(value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            return f"{name} must be a positive int, got {value!r}"
        return None

    return check


def _blocks(name: str):
    def check(value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            return f"{name} must be an int >= 0 (0: HybridEP's default), got {value!r}"
        return None

    return check


def _chunk(name: str):
    def check(value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0 or value % 16:
            return (f"{name} must be 0 (${CHUNK_ENV_VARS[name]} as set, else {DEFAULT_CHUNK}) or a positive "
                    f"multiple of 16 (HybridEP moves 16-byte rows of chunk metadata), got {value!r}")
        return None

    return check


def _flag(name: str):
    def check(value: Any) -> str | None:
        return None if isinstance(value, bool) else f"{name} must be true or false, got {value!r}"

    return check


KNOBS: tuple[Knob, ...] = (
    Knob("num_sms_dispatch_api", 24, (8, 16, 24, 32, 48), "SMs of the dispatch kernels (HybridEP's default on one node: 24)",
         check=_positive_int("num_sms_dispatch_api")),
    Knob("num_sms_combine_api", 24, (8, 16, 24, 32, 48), "SMs of the combine kernels (HybridEP's default on one node: 24)",
         check=_positive_int("num_sms_combine_api")),
    Knob("num_sms_preprocessing_api", 108, (32, 64, 108), "SMs of the routing-metadata preprocessing kernel",
         check=_positive_int("num_sms_preprocessing_api")),
    Knob("num_blocks_permute", 0, (0, 32, 64, 108), "thread blocks of the permute kernel (0: HybridEP's default)",
         check=_blocks("num_blocks_permute")),
    Knob("num_blocks_unpermute", 0, (0, 32, 64, 108), "thread blocks of the unpermute kernel (0: HybridEP's default)",
         check=_blocks("num_blocks_unpermute")),
    Knob("tokens_per_chunk_dispatch", 0, (32, 64, 128),
         "tokens per dispatch chunk, $NUM_OF_TOKENS_PER_CHUNK_DISPATCH_API (0: the variable as set, else 64)",
         check=_chunk("tokens_per_chunk_dispatch")),
    Knob("tokens_per_chunk_combine", 0, (32, 64, 128),
         "tokens per combine chunk, $NUM_OF_TOKENS_PER_CHUNK_COMBINE_API (0: the variable as set, else 64)",
         check=_chunk("tokens_per_chunk_combine")),
    Knob("fused", False, (False, True),
         "fuse permute into dispatch and unpermute into combine (the seed's permute path; HybridEP builds that have it)",
         check=_flag("fused")),
    Knob("enable_custom_allgather", True, (True, False),
         "gather the routing maps with HybridEP's own NVLink allgather (true; measured 2.8x faster per uncached "
         "dispatch than the process group's, 2 ranks on one H200 under MPS) or the process group's (false)",
         check=_flag("enable_custom_allgather")),
)


def with_defaults(knobs: dict[str, Any]) -> dict[str, Any]:
    """A full knob dict: ``knobs`` over every knob's default."""
    return {**{knob.name: knob.default for knob in KNOBS}, **knobs}
