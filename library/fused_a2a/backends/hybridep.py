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

**Limits** (checked before any GPU work, :func:`shape_problem`): at least one token on every rank
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

import inspect
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

import fused_a2a.environment as environment
from fused_a2a.autograd import Comm
import fused_a2a.backends.hybridep_routing as routing
from fused_a2a.backends.base import BackendSpec, Knob, Shape
from fused_a2a.backends.direct import BufferSlot
from fused_a2a.backends.frameworks import ForeignNames
from fused_a2a.backends.optional import distribution_version, try_import
from fused_a2a.checks import check_topk_range, dtype_name
from fused_a2a.groups import GroupMap, GroupRef, group_or_world

HYBRID_EP = try_import("deep_ep", "build DeepEP's hybrid-ep branch: scripts/install_backends.sh --ref hybrid-ep (it holds "
                       "Buffer and HybridEPBuffer); some images also need LD_PRELOAD=/lib/x86_64-linux-gnu/libstdc++.so.6")
HAVE_HYBRIDEP = HYBRID_EP.available and hasattr(HYBRID_EP.module, "HybridEPBuffer")

# knob name -> the environment variable HybridEP reads it from
CHUNK_ENV_VARS: dict[str, str] = {
    "tokens_per_chunk_dispatch": "NUM_OF_TOKENS_PER_CHUNK_DISPATCH_API",
    "tokens_per_chunk_combine": "NUM_OF_TOKENS_PER_CHUNK_COMBINE_API",
}
DEFAULT_CHUNK = 64  # HybridEP's default for both variables
SMS_KNOBS = ("num_sms_dispatch_api", "num_sms_combine_api")


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


def shape_problem(shape: Shape, knobs: dict[str, Any] | None = None) -> str | None:
    """Why HybridEP's kernels cannot take a dispatch of ``shape``, or ``None`` (see the module doc).

    Pure. ``shape.tokens`` holds every rank's count (or just this rank's, for a per-call check);
    ``shape.ranks_per_node`` the ranks of one NVLink domain (``None``: the whole group).
    """
    ranks_per_node = shape.ranks_per_node or shape.world_size
    if shape.world_size % ranks_per_node:
        return f"HybridEP needs whole NVLink domains: {shape.world_size} ranks is not a multiple of {ranks_per_node}"
    if shape.dtype != "bf16":
        return f"HybridEP moves bf16 tokens (its combine reads bf16), not {shape.dtype}"
    if shape.hidden % 16:
        return f"HybridEP needs a hidden size divisible by 16 (16-byte rows), got {shape.hidden}"
    if shape.num_experts % shape.world_size:
        return f"num_experts ({shape.num_experts}) is not divisible by the group size ({shape.world_size})"
    local = shape.num_experts // shape.world_size
    if (local * ranks_per_node) % 4:
        return (f"HybridEP needs local experts x ranks per NVLink domain divisible by 4: "
                f"{local} x {ranks_per_node} = {local * ranks_per_node}")
    if min(shape.tokens) < 1:
        return "HybridEP needs at least 1 token on every rank (with 0 tokens its kernels hang)"
    if len(set(shape.tokens)) > 1:
        return (f"HybridEP needs the same number of tokens on every rank (it all-gathers the routing map), "
                f"got {', '.join(map(str, shape.tokens))}")
    tokens = shape.tokens[0]
    if (tokens * ranks_per_node) % 4:
        return (f"HybridEP needs tokens per rank x ranks per NVLink domain divisible by 4 (its TMA loads move "
                f"16-byte multiples): {tokens} x {ranks_per_node} = {tokens * ranks_per_node}")
    custom_allgather = (knobs or {}).get("enable_custom_allgather", True)
    if custom_allgather and shape.world_size == ranks_per_node and (tokens * shape.num_experts) % 16:
        return (f"HybridEP's custom allgather moves 16-byte multiples per rank: tokens per rank x experts = "
                f"{tokens} x {shape.num_experts} is not a multiple of 16 (or set enable_custom_allgather=false)")
    return None


def has_fused_permute() -> bool:
    """Whether the installed HybridEP takes ``fuse_permute_dispatch`` (the fused permute path)."""
    if not HAVE_HYBRIDEP:
        return False
    return "fuse_permute_dispatch" in inspect.signature(HYBRID_EP.module.HybridEPBuffer.dispatch_with_permute).parameters


def invalid_knobs(knobs: dict[str, Any], world_size: int) -> str | None:
    """Why ``knobs`` cannot run (a fused permute without equal chunk sizes, or on a build without it), or ``None``."""
    full = {**{knob.name: knob.default for knob in KNOBS}, **knobs}
    if full["fused"]:
        dispatch, combine = (full[name] or DEFAULT_CHUNK for name in CHUNK_ENV_VARS)
        if dispatch != combine:
            return f"a fused permute needs equal chunk sizes, got dispatch {dispatch} and combine {combine}"
        if HAVE_HYBRIDEP and not has_fused_permute():
            return "the installed HybridEP has no fused permute (no fuse_permute_dispatch)"
    return None


def unavailable() -> str | None:
    """``None`` if ``deep_ep.HybridEPBuffer`` imports, else why not."""
    if not HYBRID_EP.available:
        return HYBRID_EP.reason
    return None if HAVE_HYBRIDEP else "the installed deep_ep has no HybridEPBuffer (build DeepEP's hybrid-ep branch)"


def version() -> str | None:
    """The installed DeepEP build that holds HybridEP (``1.2.1+<commit>``), else ``None``."""
    return distribution_version(HYBRID_EP, ("deep_ep", "deep-ep")) if HAVE_HYBRIDEP else None


def require(what: str):
    reason = unavailable()
    if reason is not None:
        raise RuntimeError(f"{what} needs deep_ep.HybridEPBuffer, which is not available ({reason}); "
                           f"{HYBRID_EP.install_hint}")
    return HYBRID_EP.module


# ---------------------------------------------------------------------------------------------------
# the process-wide buffer


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
    if settings is _applied[0] and environment.values(_applied[1]) == _applied[2]:
        return  # the variables still hold what these settings set
    wanted = settings.environment()
    for var, value in wanted.items():
        if os.environ.get(var) != value:
            os.environ[var] = value
    names = environment.encode(tuple(wanted))
    _applied[:] = settings, names, environment.values(names)


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


# ---------------------------------------------------------------------------------------------------
# the backend-neutral path


def dense_routing(topk_idx: torch.Tensor, topk_weights: torch.Tensor | None, num_experts: int):
    """Top-k routing as HybridEP's dense map and probabilities (the seed API's map: one column per expert).

    Args:
        topk_idx: ``[N, K]`` int64 global expert ids, ``-1`` for "no expert" (ignored).
        topk_weights: ``[N, K]`` routing weights, any floating dtype, or ``None``.
        num_experts: total number of experts ``E``.

    Returns:
        ``(routing_map [N, E] bool, probs [N, E] float32 or None)`` on ``topk_idx``'s device; an
        expert named twice for one token gets the sum of its weights.
    """
    chosen = topk_idx >= 0
    columns = torch.where(chosen, topk_idx, num_experts)  # "no expert" goes to a spare column, dropped below
    routing_map = torch.zeros(topk_idx.size(0), num_experts + 1, dtype=torch.bool, device=topk_idx.device)
    routing_map.scatter_(1, columns, True)
    probs = None
    if topk_weights is not None:
        probs = torch.zeros(topk_idx.size(0), num_experts + 1, dtype=torch.float32, device=topk_idx.device)
        probs.scatter_add_(1, columns, topk_weights.float())
        probs = probs[:, :num_experts].contiguous()
    return routing_map[:, :num_experts].contiguous(), probs


def topk_to_routing_map(
    topk_idx: torch.Tensor, topk_weights: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn top-k routing into HybridEP's dense routing map and probabilities (for the seed API's
    :func:`fused_a2a.hybrid_ep_dispatch`, which takes a map).

    Args:
        topk_idx: ``[N, K]`` int64 global expert ids, ``-1`` for "no expert" (ignored).
        topk_weights: ``[N, K]`` routing weights, any floating dtype (differentiable).
        num_experts: total number of experts ``E``.

    Returns:
        routing_map: ``[N, E]`` bool, ``True`` where a token goes to an expert.
        probs: ``[N, E]`` float32, the weight of each (token, expert), ``0`` where not routed; an
            expert named twice for one token gets the sum of its weights. On ``topk_idx``'s device.

    Raises:
        ValueError: ``topk_idx`` not 2-D int64, ``topk_weights`` of another shape or not floating
            point, ``num_experts`` not positive, or an id outside ``[-1, num_experts)``.
    """
    if topk_idx.dim() != 2 or topk_idx.dtype != torch.int64:
        raise ValueError(f"topk_idx must be a 2-D int64 tensor [num_tokens, topk], got {topk_idx.dtype} {tuple(topk_idx.shape)}")
    if topk_weights.shape != topk_idx.shape or not topk_weights.is_floating_point():
        raise ValueError(
            f"topk_weights must be a floating-point tensor of topk_idx's shape {tuple(topk_idx.shape)}, "
            f"got {topk_weights.dtype} {tuple(topk_weights.shape)}"
        )
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts <= 0:
        raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
    check_topk_range(topk_idx, num_experts)
    return dense_routing(topk_idx, topk_weights, num_experts)


@dataclass(frozen=True)
class HybridEPHandle:
    """What a neutral-path dispatch leaves for its combine and its backward.

    Attributes:
        buffer: the ``HybridEPBuffer`` that made it (kept alive by the handle).
        raw: HybridEP's own 7-tuple handle.
        settings: the knobs it ran with.
        columns: where each expert sits in the routing map (real and phantom experts).
        num_tokens: ``N`` on this rank; num_recv: ``R``.
        first: the column of this rank's first expert in the received probabilities.
        topk_idx: ``[N, K]`` the dispatch's global expert ids (to place weight gradients).
        recv_topk_idx: ``[R, K]`` the local ids returned (to place weights for combine).
    """

    buffer: Any
    raw: tuple
    settings: Settings
    columns: routing.ExpertColumns
    num_tokens: int
    num_recv: int
    first: int
    topk_idx: torch.Tensor = field(repr=False)
    recv_topk_idx: torch.Tensor = field(repr=False)

    @property
    def num_recv_tokens(self) -> int:
        return self.num_recv

    @property
    def num_experts(self) -> int:
        return self.columns.num_experts


_PLACEHOLDER_ID = -2  # a bad expert id: a placeholder row's, which every rank reports


def _synchronize(device: torch.device) -> None:
    """Wait for the current stream of ``device`` (nothing to wait for on the CPU)."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def _bad_ids_error(num_experts: int, bad_rows: int) -> ValueError:
    return ValueError(f"hybridep: topk_idx values must lie in [-1, {num_experts}); {bad_rows} token(s) of the group "
                      "named other experts, or a rank's inputs failed another check (that rank's error says "
                      "which; the same error on every rank of the group)")


class HybridEPAdapter:
    """The ``deep_ep.Buffer``-shaped face of HybridEP's plain dispatch/combine that
    :mod:`fused_a2a.autograd` drives. It routes from top-k itself: it needs no layout call.

    An uncached dispatch runs HybridEP's own steps (``update_template_config``, the runtime's
    ``metadata_preprocessing`` and ``dispatch``) with one host synchronisation between them, the one
    HybridEP's ``dispatch`` makes itself; the routing conversion and the per-expert counts are kernels
    queued around it (:mod:`fused_a2a.backends.hybridep_routing`). Its buffer has the phantom experts
    of :class:`~fused_a2a.backends.hybridep_routing.ExpertColumns`.
    """

    needs_layout = False

    def __init__(self, group, settings: Settings) -> None:
        self._group = GroupRef(group)  # weak: the adapters' cache must not keep a destroyed group alive
        self.settings = settings
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self._checked: tuple | None = None  # the last (N, H, K, E) found fine
        self._columns: dict[int, routing.ExpertColumns] = {}

    def dispatch(self, x, handle: HybridEPHandle | None = None, topk_idx=None, topk_weights=None, num_experts=None,
                 config=None, previous_event=None, async_finish=False, allocate_on_comm_stream=False, **unused):
        """Dispatch ``x [N, H]`` bf16 (see :func:`fused_a2a.dispatch` for the returns); with ``handle``,
        a cached dispatch (no preprocessing, no host sync) returning ``(recv_x, None, None, None, None, None)``.

        Raises:
            ValueError: a shape HybridEP cannot take on this rank (:func:`shape_problem`), or an id
                outside ``[-1, E)`` on any rank of the group (raised on every rank, after the dispatch).
        """
        if handle is not None:
            apply_environment(handle.settings)
            recv_x = handle.buffer.dispatch(hidden=x.contiguous(), handle=handle.raw, num_of_experts=handle.num_experts,
                                            num_dispatched_tokens=handle.num_recv)[0]
            return recv_x, None, None, None, None, None
        num_tokens, hidden = x.shape
        columns = self._columns.get(num_experts)
        if columns is None:
            columns = self._columns[num_experts] = routing.ExpertColumns(num_experts, self.world)
        buffer = ensure_buffer(self._group(), hidden, columns.padded, num_tokens, self.settings)
        per_node = ranks_per_node(buffer)
        self._check_shape(num_tokens, hidden, topk_idx.size(1), num_experts, dtype_name(x.dtype), per_node)
        routing_map, probs = routing.dense_routing(topk_idx, topk_weights, columns)
        config = buffer.update_template_config(hidden_dim=hidden, num_of_tokens_per_rank=num_tokens)
        made = buffer.runtime.metadata_preprocessing(config=config, routing_map=routing_map,
                                                     num_of_tokens_per_rank=num_tokens, enable_permute=False,
                                                     non_blocking=False)
        local_map, num_rows = made.local_expert_routing_map, made.num_dispatched_tokens_tensor
        pending = routing.start_count(local_map, num_rows)
        _synchronize(x.device)
        num_recv = num_rows.item()
        recv_x, recv_probs, _ = buffer.runtime.dispatch(hidden=x, probs=probs, scaling_factor=None, handle=made,
                                                        with_probs=probs is not None)
        counts = (pending if pending is not None else routing.count_rows(local_map, num_recv)).tolist()
        bad_rows = sum(counts[columns.local:])
        if bad_rows:  # every rank counted the same phantom rows: every rank raises here
            raise _bad_ids_error(num_experts, bad_rows)
        raw = (made.sparse_to_dense_map, made.rdma_to_attn_map, made.attn_to_rdma_map, num_rows, local_map,
               made.num_of_tokens_per_rank, made.config)
        first = (self.rank % per_node) * columns.padded
        recv_idx, recv_weights = routing.ascending_topk(local_map, recv_probs, num_recv, columns, first, topk_idx.size(1))
        made = HybridEPHandle(buffer, raw, self.settings, columns, num_tokens, num_recv, first, topk_idx, recv_idx)
        return recv_x, recv_idx, recv_weights, counts[:columns.local], made, None

    def _check_shape(self, num_tokens: int, hidden: int, topk: int, num_experts: int, dtype: str, per_node: int) -> None:
        """``ValueError`` for a shape HybridEP cannot take, on every rank (a repeat of the last shape found
        fine is not checked).

        A key's first call was checked with every rank's token count by the group's agreement; a rule
        broken by this rank's token count at a later call is this rank's alone, so it joins its peers'
        dispatch with a placeholder of the group's last token count whose ids are bad: every rank then
        raises the phantom error (HybridEP needs the same count on every rank: peers that change their
        count at that very call break its rule themselves)."""
        key = (num_tokens, hidden, topk, num_experts, dtype, per_node)
        if key == self._checked:
            return
        shape = Shape(self.world, (num_tokens,), hidden, topk, num_experts, dtype, per_node)
        problem = shape_problem(shape)
        if problem is None:
            self._checked = key
            return
        last = self._checked
        if last is None or (hidden, topk, num_experts) != last[1:4]:
            raise ValueError(f"hybridep: {problem}")
        rows = last[0]
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        placeholder = torch.full((rows, topk), _PLACEHOLDER_ID, dtype=torch.int64, device=device)
        try:
            self.dispatch(torch.zeros(rows, hidden, dtype=torch.bfloat16, device=device), topk_idx=placeholder,
                          topk_weights=torch.zeros(rows, topk, dtype=torch.float32, device=device),
                          num_experts=num_experts)
        except ValueError as shared:
            raise ValueError(f"{shared}; this rank: hybridep: {problem}") from None
        raise ValueError(f"hybridep: {problem}")

    def combine(self, x, handle: HybridEPHandle, topk_weights=None, bias=None, config=None, previous_event=None,
                async_finish=False, allocate_on_comm_stream=False):
        """Combine ``x [R, H]`` bf16 back to ``[N, H]``; ``topk_weights [R, K]`` (in the dispatch's
        slots) are summed back to ``[N, K]`` too. Returns ``(combined, combined_weights or None, None)``."""
        if x.dtype != torch.bfloat16:
            raise ValueError(f"hybridep combines bf16 rows only, got {x.dtype}")
        apply_environment(handle.settings)
        probs = None
        columns = handle.columns
        if topk_weights is not None:
            per_node = ranks_per_node(handle.buffer)
            probs = torch.zeros(handle.num_recv, columns.padded * per_node, dtype=torch.float32, device=x.device)
            ids = handle.recv_topk_idx
            probs.scatter_add_(1, torch.where(ids >= 0, ids + handle.first, 0),
                               torch.where(ids >= 0, topk_weights.float(), 0.0))
        combined, combined_probs = handle.buffer.combine(hidden=x.contiguous(), probs=probs, handle=handle.raw)
        combined_weights = None
        if combined_probs is not None:
            chosen = handle.topk_idx >= 0
            where = columns.column_of(handle.topk_idx.clamp_min(0))
            combined_weights = torch.where(chosen, combined_probs.gather(1, where), 0.0)
        return combined, combined_weights, None

    def destroy(self) -> None:
        """Drop the process-wide buffer."""
        free_buffers()


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


# below the definitions it calls: HybridEP's own API on this module's buffer
from fused_a2a.backends.hybridep_direct import hybridep_calls, hybridep_seed_path  # noqa: E402

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
