"""The ``hybridep`` backend: NVIDIA's HybridEP (``deep_ep.HybridEPBuffer``, DeepEP's ``hybrid-ep`` branch).

**Which HybridEP API.** The backend-neutral path runs HybridEP's plain ``dispatch``/``combine``: it
delivers each token once to every rank that holds one of its experts, in source-rank-then-token
order (DeepEP's layout), with a dense ``[R, local experts]`` routing map and probabilities, and its
combine sums the copies in float32. ``dispatch_with_permute`` instead returns expert-major rows, which
we would have to un-permute (a gather of every row) to give the same contract: slower, no more
faithful. The seed functions (:mod:`fused_a2a.seed.hybridep`) run the permute path, as Automodel and
Megatron call it.

**Top-k slots.** HybridEP moves a dense per-expert map, not the top-k slots: each received row lists
its local experts in ascending order, then ``-1`` (:attr:`BackendSpec.keeps_topk_slots` is ``False``);
an expert named twice in a token's top-k receives the sum of its weights.

**Limits** (checked before any GPU work,
:func:`~fused_a2a.backends.hybridep_adapter.shape_problem`): at least one token on every rank
(0 tokens hang HybridEP's kernels); the same token count on every rank (HybridEP all-gathers the
routing map; the group checks it at a shape's first call); tokens × ranks per NVLink domain divisible
by 4 (its TMA loads move 16-byte multiples: 7 tokens on 2 ranks fail); hidden a multiple of 16; local
experts × ranks per domain divisible by 4; bf16 tokens.

**Buffers.** One process-wide ``HybridEPBuffer`` per set of construction knobs; changing a knob makes a
new one, and a handle keeps the buffer that made it alive, so a combine or a backward never runs on
another buffer. Chunk sizes are environment variables HybridEP reads at construction and at every call:
the backend sets them before each call.
"""

from __future__ import annotations

from typing import Any

from fused_a2a.autograd import Comm
from fused_a2a.backends.base import BackendSpec
from fused_a2a.backends.direct import BufferSlot
from fused_a2a.backends.frameworks import ForeignNames
from fused_a2a.backends.hybridep_adapter import HybridEPAdapter, shape_problem
from fused_a2a.backends.hybridep_buffer import (
    CHUNK_ENV_VARS,
    DEFAULT_CHUNK,
    HAVE_HYBRIDEP,
    HYBRID_EP,
    Settings,
    current_buffer,
    free_buffers,
    has_fused_permute,
    require,
    set_current_buffer,
    unavailable,
)
from fused_a2a.backends.hybridep_direct import hybridep_calls, hybridep_seed_path
from fused_a2a.backends.hybridep_knobs import KNOBS, with_defaults
from fused_a2a.backends.optional import distribution_version
from fused_a2a.groups import GroupMap, group_or_world

SMS_KNOBS = ("num_sms_dispatch_api", "num_sms_combine_api")


def invalid_knobs(knobs: dict[str, Any], world_size: int) -> str | None:
    """Why ``knobs`` cannot run (a fused permute without equal chunk sizes, or on a build without it), or ``None``."""
    full = with_defaults(knobs)
    if full["fused"]:
        dispatch, combine = (full[name] or DEFAULT_CHUNK for name in CHUNK_ENV_VARS)
        if dispatch != combine:
            return f"a fused permute needs equal chunk sizes, got dispatch {dispatch} and combine {combine}"
        if HAVE_HYBRIDEP and not has_fused_permute():
            return "the installed HybridEP has no fused permute (no fuse_permute_dispatch)"
    return None


def version() -> str | None:
    """The installed DeepEP build that holds HybridEP (``1.2.1+<commit>``), else ``None``."""
    return distribution_version(HYBRID_EP, ("deep_ep", "deep-ep")) if HAVE_HYBRIDEP else None


def make_hybridep_comm(dispatch_knobs: dict[str, Any], combine_knobs: dict[str, Any], num_ranks: int | None = None) -> Comm:
    """The :class:`Comm` of the ``hybridep`` backend for two full knob dicts.

    Raises:
        RuntimeError: deep_ep without HybridEP.
    """
    require("the hybridep backend")
    settings = Settings.from_knobs(dispatch_knobs, combine_knobs)
    adapters: GroupMap[HybridEPAdapter] = GroupMap()

    def get_buffer_for(group, tokens) -> HybridEPAdapter:
        adapter = adapters.get(group)
        return adapter if adapter is not None else adapters.set(group, HybridEPAdapter(group_or_world(group), settings))

    return Comm(name="hybridep", get_buffer=get_buffer_for, dispatch_config=settings, combine_config=settings)


SPEC = BackendSpec(
    name="hybridep",
    knobs=KNOBS,
    make_comm=make_hybridep_comm,
    unavailable=unavailable,
    invalid=invalid_knobs,
    shape_problem=shape_problem,
    teardown=free_buffers,
    version=version,
    dtypes=("bf16",),
    keeps_topk_slots=False,
    sms_knobs=SMS_KNOBS,
    install_hint=HYBRID_EP.install_hint,
    buffer_slot=BufferSlot(lambda group: current_buffer(), lambda group, buffer: set_current_buffer(buffer)),
    direct_calls=hybridep_calls,
    seed_path=hybridep_seed_path,
    names=ForeignNames(
        env=tuple(CHUNK_ENV_VARS.items()),
        megatron=(("num_sms_dispatch_api", "moe_flex_dispatcher_num_sms"),
                  ("num_sms_preprocessing_api", "moe_hybridep_num_sms_preprocessing"),
                  ("num_blocks_permute", "moe_hybridep_num_blocks_permute"),
                  ("num_blocks_unpermute", "moe_hybridep_num_blocks_unpermute"),
                  ("fused", "moe_permute_fusion_into_hybridep")),
        automodel_sms="num_sms_dispatch_api",
        automodel=(("enable_custom_allgather", "dispatcher_hybridep_enable_custom_allgather"),),
        combine_sms="num_sms_combine_api",
        frameworks=("automodel", "megatron"),
    ),
)
