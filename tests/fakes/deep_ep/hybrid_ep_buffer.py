"""A CPU fake of ``deep_ep.HybridEPBuffer`` (DeepEP branch ``hybrid-ep`` @ 94a9f8f). Tests only.

It moves real data between gloo ranks with plain ``torch.distributed`` calls (``all_gather`` of the routing
maps, ``all_to_all_single`` of the rows) and returns what the real buffer returns, in the real layouts:

* ``dispatch`` → ``(rows [R, H], probs [R, E_loc*RPN] fp32 | None, scales [R, H/128] | None, handle)``; rows
  in global token order (source rank, then source token), one per token per rank that holds ≥ 1 of its
  experts; the 7-tuple handle ``(sparse_to_dense_map, rdma_to_attn_map, attn_to_rdma_map,
  num_dispatched_tokens_tensor, local_expert_routing_map, num_of_tokens_per_rank, config)``;
* ``combine`` sums each token's copies in fp32 and rounds once (per node first when there are several);
  tokens routed nowhere come back as zeros;
* ``dispatch_with_permute`` / ``combine_with_unpermute``: expert-major rows (within an expert: source rank,
  then token), zero padding rows per expert, the 11-tuple handle;
* ``runtime`` (the C++ ``hybrid_ep_cpp.HybridEPBuffer`` the Python methods drive): ``metadata_preprocessing``
  (non-permute: the :class:`HandleImpl` of a plain dispatch) and ``dispatch`` (``hidden``, ``probs``,
  ``scaling_factor``, ``handle``, ``with_probs`` keywords; returns the rows, probs and scales).

The contract the real library imposes (and what it does when broken) is enforced with the real exception
types: ``AssertionError`` where its Python asserts, ``RuntimeError`` where its C++ raises (``TORCH_CHECK``,
``std::runtime_error``) and also where it would abort (C ``assert``), hang or return garbage:

* construction: ``W % RPN == 0`` (assert); ``hidden_dim % 16`` (bf16) or ``% 512`` (fp8), ``(E_loc*RPN) % 4``,
  the chunk variables (multiples of 16, ``(C_d*RPN) % 4 == 0``; several nodes: multiples of 32 and at most
  21844 padded tokens per rank) → ``RuntimeError("The buffer config is not valid.")``;
* every call: N ≥ 1 and the same N on every rank (checked collectively); the TMA rule ``r = N % C_d``,
  ``r * RPN * 4 % 16 == 0`` with ``C_d`` read from the environment at call time; 2-byte hidden for a bf16
  buffer, uint8 hidden plus fp32 ``[N, H/128]`` scales for an fp8 one; routing-map columns ``== E_loc * W``;
  combine takes bf16 only.

Before any data moves, each call runs one small ``all_gather`` of "did my checks pass" plus N: a rank whose
checks fail raises its own error and its peers raise a ``RuntimeError`` naming it, instead of hanging as
the real library's peers would.

Differences from the real buffer, all deliberate:

* handle tensors hold the fake's own (consistent) content: ``sparse_to_dense_map[n*N + t, j]`` is the row of
  this rank's token ``t`` in the output of rank ``n*RPN + j`` (or -1); ``dense_to_expert_map[r, k]`` the
  permuted row of received row ``r`` for local expert ``k`` (or -1); ``dense_chunk_layout`` the inclusive
  running count of received rows per (source rank, preprocessing chunk); ``local_expert_routing_map`` is
  all False after ``dispatch_with_permute`` (the real one leaves it uninitialised there);
* everything lives on the CPU: ``num_dispatched_tokens_tensor`` (pinned CPU in the real one),
  ``padded_tokens_per_expert`` (CUDA in the real one when ``non_blocking=True``), ``overflow_flag``;
* rows the real buffer leaves uninitialised (past the real total with ``non_blocking``) are zeros;
* with ``non_blocking=True`` tokens past ``num_permuted_tokens`` are dropped (``overflow_flag`` = 1) whether or
  not the permute is fused (the real one drops only when fused; unfused it would write past the output);
  with ``non_blocking=False`` a ``num_permuted_tokens`` too small for the rows raises;
* a cached ``dispatch_with_permute`` (``handle=``) needs ``num_permuted_tokens`` (the real one fails assigning
  ``None`` to the C++ handle) and returns ``None`` for ``padded_tokens_per_expert`` (an undefined tensor in the
  real one);
* several NVLink domains (``NUM_OF_HYBRID_EP_RANKS_PER_NVLINK_DOMAIN`` < W) run as in a ``HYBRID_EP_MULTINODE``
  build; no SM count is checked (there is no GPU).

:data:`LIVE` holds the live buffers (a ``WeakSet``); creation is logged in ``deep_ep.EVENTS`` as
``("hybrid_create", id(buffer))`` (and in ``$FAKE_DEEP_EP_EVENTS``).
"""

from __future__ import annotations

import os
import warnings
import weakref
from dataclasses import dataclass, fields
from datetime import timedelta

import torch
import torch.distributed as dist

__all__ = ["HandleImpl", "HybridEPBuffer", "HybridEpConfigInstance", "LIVE"]

LIVE: "weakref.WeakSet[HybridEPBuffer]" = weakref.WeakSet()
COLLECTIVE_TIMEOUT = timedelta(seconds=60)

# csrc/hybrid_ep/config.cuh
DEFAULT_SMS_DISPATCH = {True: 24, False: 8}  # one node / several
DEFAULT_SMS_COMBINE = {True: 24, False: 8}
DEFAULT_SMS_PREPROCESSING = 108
DEFAULT_BLOCKS = -1
DEFAULT_CHUNK = 64
MIN_MAX_TOKENS = 512
MULTINODE_MAX_TOKENS = 21844
MAX_RANKS_PER_NODE = 72
CHUNK_ENV = {
    "dispatch": "NUM_OF_TOKENS_PER_CHUNK_DISPATCH_API",
    "combine": "NUM_OF_TOKENS_PER_CHUNK_COMBINE_API",
    "preprocessing": "NUM_OF_TOKENS_PER_CHUNK_PREPROCESSING_API",
}
UINT8, UINT16 = "UINT8", "UINT16"  # hybrid_ep_cpp.UINT8 / UINT16 (token data types)
ZERO_TOKENS = "fake HybridEP: 0 tokens on this rank would hang the real library"


def _chunks() -> dict[str, int]:
    """The three chunk sizes from the environment, as the real Configurer reads them (``atoi``; unset → 64)."""
    return {name: int(os.environ.get(var, DEFAULT_CHUNK)) for name, var in CHUNK_ENV.items()}


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


@dataclass
class HybridEpConfigInstance:
    """The per-call template config (``hybrid_ep_cpp.HybridEpConfigInstance``), the subset the fake uses."""

    hidden_dim: int
    max_num_of_tokens_per_rank: int
    num_of_experts_per_rank: int
    num_of_ranks_per_node: int
    num_of_nodes: int
    token_data_type: str
    pad_multiple: int
    num_of_tokens_per_chunk_dispatch_api: int
    num_of_tokens_per_chunk_combine_api: int
    num_of_tokens_per_chunk_preprocessing_api: int
    num_of_blocks_dispatch_api: int
    num_of_blocks_combine_api: int
    num_of_blocks_preprocessing_api: int
    num_of_blocks_permute: int
    num_of_blocks_unpermute: int
    fuse_permute_dispatch: bool = False

    def __setattr__(self, name, value):  # a pybind object: unknown attributes fail
        if name not in {f.name for f in fields(self)}:
            raise AttributeError(f"'HybridEpConfigInstance' object has no attribute '{name}'")
        super().__setattr__(name, value)

    def problems(self, fuse: bool) -> str | None:
        """What ``is_valid`` refuses (``None`` if valid)."""
        rpn, nodes = self.num_of_ranks_per_node, self.num_of_nodes
        align = 512 if self.token_data_type == UINT8 else 16
        c_d, c_c, c_pre = (self.num_of_tokens_per_chunk_dispatch_api, self.num_of_tokens_per_chunk_combine_api,
                           self.num_of_tokens_per_chunk_preprocessing_api)
        if self.hidden_dim <= 0 or self.hidden_dim % align:
            return f"hidden_dim {self.hidden_dim} must be a positive multiple of {align}"
        if self.num_of_experts_per_rank <= 0 or (self.num_of_experts_per_rank * rpn) % 4:
            return f"num_of_experts_per_rank * ranks_per_node ({self.num_of_experts_per_rank} * {rpn}) must be a multiple of 4"
        if (c_d * rpn) % 4:
            return f"chunk_dispatch * ranks_per_node ({c_d} * {rpn}) must be a multiple of 4"
        if fuse and not c_d == c_c == c_pre:
            return f"fused permute needs equal chunk sizes, got dispatch {c_d}, combine {c_c}, preprocessing {c_pre}"
        if nodes > 1 and self.max_num_of_tokens_per_rank > MULTINODE_MAX_TOKENS:
            return f"max_num_of_tokens_per_rank {self.max_num_of_tokens_per_rank} > {MULTINODE_MAX_TOKENS} across nodes"
        return None


def _indices_to_map(topk_idx: torch.Tensor, topk_weights, num_tokens: int, num_experts: int):
    """``routing_map [N, E]`` bool and ``probs [N, E]`` fp32 (or ``None``) by scatter, as the real helper does:
    a -1 (or any index out of range) makes the scatter raise, and the weights must be fp32."""
    index = topk_idx.to(torch.int64)
    routing_map = torch.zeros(num_tokens, num_experts, dtype=torch.bool).scatter(1, index, True)
    if topk_weights is None:
        return routing_map, None
    return routing_map, torch.zeros(num_tokens, num_experts, dtype=torch.float32).scatter(1, index, topk_weights)


class HandleImpl:
    """``hybrid_ep_cpp.HandleImpl``: the fields of a plain (non-permute) dispatch's metadata."""

    sparse_to_dense_map: torch.Tensor
    rdma_to_attn_map: torch.Tensor
    attn_to_rdma_map: torch.Tensor
    num_dispatched_tokens_tensor: torch.Tensor
    local_expert_routing_map: torch.Tensor
    num_of_tokens_per_rank: int
    config: HybridEpConfigInstance


class _Runtime:
    """The C++ buffer's ``metadata_preprocessing`` / ``dispatch`` (what ``HybridEPBuffer.dispatch`` calls)."""

    def __init__(self, buffer: "HybridEPBuffer") -> None:
        self._buffer = weakref.ref(buffer)

    def metadata_preprocessing(self, config, routing_map, num_of_tokens_per_rank, num_permuted_tokens=None,
                               pad_multiple=None, enable_permute=False, fuse_permute_dispatch=False,
                               non_blocking=False) -> HandleImpl:
        """Collective: all-gather the routing maps and build a plain dispatch's metadata (the permute
        variant is not faked: ``dispatch_with_permute`` covers it)."""
        buffer = self._buffer()
        buffer.calls.append("runtime.metadata_preprocessing")
        if enable_permute:
            raise NotImplementedError("fake HybridEP: runtime.metadata_preprocessing(enable_permute=True) is not faked")
        problem = None
        try:
            _check(routing_map.is_contiguous() and routing_map.dtype == torch.bool, "fake HybridEP: routing_map must be a contiguous bool tensor")
            _check(num_of_tokens_per_rank > 0, ZERO_TOKENS)
            buffer._check_routing(config, routing_map, num_of_tokens_per_rank)
        except Exception as exc:  # noqa: BLE001 - re-raised after the peers heard of it
            problem = exc
        buffer._gate(problem, num_of_tokens_per_rank)
        buffer.last_template_config = config
        impl = HandleImpl()
        (impl.sparse_to_dense_map, impl.rdma_to_attn_map, impl.attn_to_rdma_map, impl.num_dispatched_tokens_tensor,
         impl.local_expert_routing_map) = buffer._preprocess(config, routing_map, num_of_tokens_per_rank, permute=None)
        impl.num_of_tokens_per_rank, impl.config = num_of_tokens_per_rank, config
        return impl

    def dispatch(self, *, hidden, probs=None, scaling_factor=None, handle: HandleImpl, with_probs: bool):
        """Move the rows of a preprocessed dispatch (collective). Returns ``(rows, probs or None, scales or None)``."""
        buffer = self._buffer()
        buffer.calls.append("runtime.dispatch")
        problem = None
        try:
            _check(not with_probs or probs is not None, "fake HybridEP: with_probs needs probs")
            buffer._check_tokens(handle.config, hidden, probs if with_probs else None, scaling_factor,
                                 handle.num_of_tokens_per_rank)
        except Exception as exc:  # noqa: BLE001
            problem = exc
        buffer._gate(problem, handle.num_of_tokens_per_rank)
        return buffer._dispatch_rows(handle.config, handle.sparse_to_dense_map, int(handle.num_dispatched_tokens_tensor.item()),
                                     hidden, probs if with_probs else None, scaling_factor)


class HybridEPBuffer:
    """``deep_ep.HybridEPBuffer`` on the CPU over gloo.

    Args: as the real constructor (``num_of_hybrid_ep_ranks_per_nvlink_domain`` and ``use_mnnvl`` are
    deprecated and ignored there as here). Construction is collective.

    Attributes for tests: ``group, rank, group_size, num_of_hybrid_ep_ranks_per_nvlink_domain, local_rank,
    node_rank, num_of_nodes``; ``config`` (dict: what the buffer was built with, real defaults filled in,
    ``max_num_of_tokens_per_rank`` padded as the real one pads it and grown by calls as the real one grows
    it); ``last_template_config`` (the :class:`HybridEpConfigInstance` of the latest fresh dispatch);
    ``calls`` (the names of the public calls made, in order).
    """

    def __init__(
        self,
        group: dist.ProcessGroup,
        hidden_dim: int,
        max_num_of_tokens_per_rank: int,
        num_local_experts: int,
        use_fp8: bool = False,
        num_sms_dispatch_api: int = None,
        num_sms_combine_api: int = None,
        num_sms_preprocessing_api: int = None,
        num_blocks_permute: int = None,
        num_blocks_unpermute: int = None,
        load_cached_kernels: bool = False,
        use_shared_buffer: bool = True,
        enable_custom_allgather: bool = False,
        num_of_hybrid_ep_ranks_per_nvlink_domain: int = None,
        use_mnnvl: bool = None,
    ) -> None:
        self.group = group
        self.rank = group.rank()
        self.group_size = group.size()
        detected = self.group_size  # every rank of a CPU test runs on this host
        env_value = os.getenv("NUM_OF_HYBRID_EP_RANKS_PER_NVLINK_DOMAIN")
        if env_value is not None:
            self.num_of_hybrid_ep_ranks_per_nvlink_domain = int(env_value)
            if self.num_of_hybrid_ep_ranks_per_nvlink_domain != detected:
                warnings.warn(
                    f"[Warning] NUM_OF_HYBRID_EP_RANKS_PER_NVLINK_DOMAIN={self.num_of_hybrid_ep_ranks_per_nvlink_domain} "
                    f"differs from detected value {detected}. Using environment variable."
                )
        else:
            self.num_of_hybrid_ep_ranks_per_nvlink_domain = detected
        rpn = self.num_of_hybrid_ep_ranks_per_nvlink_domain
        assert rpn > 0 and self.group_size % rpn == 0, (
            f"The number of ranks {self.group_size} should be divisible by the number of ranks per node {rpn} at rank={self.rank}."
        )
        self.local_rank = self.rank % rpn
        self.node_rank = self.rank // rpn
        self.num_of_nodes = self.group_size // rpn
        one_node = self.num_of_nodes == 1

        chunks = _chunks()
        self.config = {
            "hidden_dim": hidden_dim,
            "max_num_of_tokens_per_rank": _round_up(max(max_num_of_tokens_per_rank, MIN_MAX_TOKENS), max(chunks["combine"], 1)),
            "num_local_experts": num_local_experts,
            "use_fp8": use_fp8,
            "num_sms_dispatch_api": DEFAULT_SMS_DISPATCH[one_node] if num_sms_dispatch_api is None else num_sms_dispatch_api,
            "num_sms_combine_api": DEFAULT_SMS_COMBINE[one_node] if num_sms_combine_api is None else num_sms_combine_api,
            "num_sms_preprocessing_api": DEFAULT_SMS_PREPROCESSING if num_sms_preprocessing_api is None else num_sms_preprocessing_api,
            "num_blocks_permute": DEFAULT_BLOCKS if num_blocks_permute is None else num_blocks_permute,
            "num_blocks_unpermute": DEFAULT_BLOCKS if num_blocks_unpermute is None else num_blocks_unpermute,
            "num_of_tokens_per_chunk_dispatch_api": chunks["dispatch"],
            "num_of_tokens_per_chunk_combine_api": chunks["combine"],
            "num_of_tokens_per_chunk_preprocessing_api": chunks["preprocessing"],
            "load_cached_kernels": load_cached_kernels,
            "use_shared_buffer": use_shared_buffer,
            "enable_custom_allgather": enable_custom_allgather,
            "num_of_ranks_per_node": rpn,
            "num_of_nodes": self.num_of_nodes,
        }
        if not self._buffer_config_valid():
            raise RuntimeError("The buffer config is not valid.")
        self.last_template_config: HybridEpConfigInstance | None = None
        self.calls: list[str] = []
        self.runtime = _Runtime(self)
        dist.monitored_barrier(group=group, timeout=COLLECTIVE_TIMEOUT)
        from . import _record  # the package is fully imported by the time a buffer is built

        _record("hybrid_create", self)
        LIVE.add(self)

    def _buffer_config_valid(self) -> bool:
        """``BufferConfig::is_valid`` plus the chunk sizes' static asserts (which the real one hits at its first compile)."""
        c = self.config
        rpn, nodes = c["num_of_ranks_per_node"], c["num_of_nodes"]
        c_d, c_c = c["num_of_tokens_per_chunk_dispatch_api"], c["num_of_tokens_per_chunk_combine_api"]
        chunk_multiple = 32 if nodes > 1 else 16
        align = 512 if c["use_fp8"] else 16
        return (
            c["hidden_dim"] > 0 and c["hidden_dim"] % align == 0
            and c["num_local_experts"] > 0 and (c["num_local_experts"] * rpn) % 4 == 0
            and c_d > 0 and c_c > 0 and c_d % chunk_multiple == 0 and c_c % chunk_multiple == 0
            and (c_d * rpn) % 4 == 0
            and rpn <= MAX_RANKS_PER_NODE
            and (nodes == 1 or c["max_num_of_tokens_per_rank"] <= MULTINODE_MAX_TOKENS)
        )

    # ----------------------------------------------------------------------------------------------- config

    def empty_jit_cache(self) -> None:
        """The real one removes a directory its kernels never use; there are no kernels here."""

    def update_template_config(
        self,
        hidden_dim: int = None,
        num_of_tokens_per_rank: int = None,
        num_local_experts: int = None,
        pad_multiple: int = None,
        use_fp8: bool = None,
        fuse_permute_dispatch: bool = False,
        **kwargs,
    ) -> HybridEpConfigInstance:
        """The per-call template config: the environment's chunk sizes now, the buffer's settings, these
        overrides; grows the buffer's max tokens per rank (never shrinks it). ``AssertionError`` if invalid."""
        c, chunks = self.config, _chunks()
        config = HybridEpConfigInstance(
            hidden_dim=c["hidden_dim"],
            max_num_of_tokens_per_rank=c["max_num_of_tokens_per_rank"],
            num_of_experts_per_rank=c["num_local_experts"],
            num_of_ranks_per_node=self.num_of_hybrid_ep_ranks_per_nvlink_domain,
            num_of_nodes=self.num_of_nodes,
            token_data_type=UINT8 if c["use_fp8"] else UINT16,
            pad_multiple=1,
            num_of_tokens_per_chunk_dispatch_api=chunks["dispatch"],
            num_of_tokens_per_chunk_combine_api=chunks["combine"],
            num_of_tokens_per_chunk_preprocessing_api=chunks["preprocessing"],
            num_of_blocks_dispatch_api=c["num_sms_dispatch_api"],
            num_of_blocks_combine_api=c["num_sms_combine_api"],
            num_of_blocks_preprocessing_api=c["num_sms_preprocessing_api"],
            num_of_blocks_permute=c["num_blocks_permute"],
            num_of_blocks_unpermute=c["num_blocks_unpermute"],
            fuse_permute_dispatch=fuse_permute_dispatch,
        )
        if hidden_dim is not None:
            config.hidden_dim = hidden_dim
        if num_of_tokens_per_rank is not None:
            grown = max(_round_up(num_of_tokens_per_rank, 16), c["max_num_of_tokens_per_rank"])
            config.max_num_of_tokens_per_rank = c["max_num_of_tokens_per_rank"] = grown
        if num_local_experts is not None:
            config.num_of_experts_per_rank = num_local_experts
        if pad_multiple is not None and pad_multiple > 0:
            config.pad_multiple = pad_multiple
        if use_fp8 is not None:
            config.token_data_type = UINT8 if use_fp8 else UINT16
        for key, value in kwargs.items():
            setattr(config, key, value)
        # chunk sizes that are not multiples of 16 (32 across nodes) fail the JIT compile's static asserts
        chunk_multiple = 32 if self.num_of_nodes > 1 else 16
        for name in ("dispatch", "combine"):
            size = getattr(config, f"num_of_tokens_per_chunk_{name}_api")
            if size <= 0 or size % chunk_multiple:
                raise RuntimeError(
                    f"fake HybridEP: the {name} kernel does not compile with {CHUNK_ENV[name]}={size} "
                    f"(must be a positive multiple of {chunk_multiple})"
                )
        problem = config.problems(fuse_permute_dispatch)
        assert problem is None, "The config is not valid."
        return config

    # ----------------------------------------------------------------------------------------------- dispatch

    def dispatch(
        self,
        hidden: torch.Tensor,
        scaling_factor: torch.Tensor = None,
        topk_idx: torch.Tensor = None,
        topk_weights: torch.Tensor = None,
        num_of_experts: int = None,
        probs: torch.Tensor = None,
        routing_map: torch.Tensor = None,
        num_dispatched_tokens_tensor: torch.Tensor = None,
        num_dispatched_tokens: int = None,
        handle: tuple = None,
    ):
        """Send each token once to every rank holding ≥ 1 of its experts. ``handle=`` reuses a layout (no
        preprocessing). ``num_dispatched_tokens`` / ``num_dispatched_tokens_tensor`` are unused (as in the real one).

        Returns ``(dispatched_token [R, H], dispatched_probs [R, E_loc*RPN] fp32 or None,
        dispatched_scaling_factor [R, H/128] or None, handle)``."""
        self.calls.append("dispatch")
        problem, num_tokens, config = None, None, None
        try:
            num_tokens, hidden_dim = hidden.shape
            if routing_map is not None:
                assert routing_map.dtype == torch.bool
                num_of_experts = routing_map.size(-1)
            else:
                assert num_of_experts is not None, "The number of experts should be provided on index-based routing."
                if topk_idx is not None:
                    routing_map, probs = _indices_to_map(topk_idx, topk_weights, num_tokens, num_of_experts)
            assert handle is not None or routing_map is not None, "The handle and routing_map should not be both None"
            _check(num_tokens > 0, ZERO_TOKENS)
            if handle is None:
                config = self.update_template_config(hidden_dim=hidden_dim, num_of_tokens_per_rank=num_tokens)
                self._check_routing(config, routing_map, num_tokens)
            else:
                _check(isinstance(handle, tuple) and len(handle) == 7, "fake HybridEP: a dispatch handle is a 7-tuple")
                config = handle[6]
                _check(handle[5] == num_tokens, f"fake HybridEP: the handle is for {handle[5]} tokens per rank, hidden has {num_tokens}")
            self._check_tokens(config, hidden, probs, scaling_factor, num_tokens)
        except Exception as exc:  # noqa: BLE001 - re-raised after the peers heard of it
            problem = exc
        self._gate(problem, num_tokens)
        if handle is None:
            self.last_template_config = config
            layout = self._preprocess(config, routing_map, num_tokens, permute=None)
            handle = (*layout[:5], num_tokens, config)
        rows, row_probs, row_scales = self._dispatch_rows(handle[6], handle[0], int(handle[3].item()), hidden, probs, scaling_factor)
        return rows, row_probs, row_scales, handle

    def combine(self, hidden: torch.Tensor, probs: torch.Tensor = None, handle: tuple = None):
        """Sum each token's copies (fp32, rounded once) back on its source rank.

        Returns ``(combined [N, H] in hidden.dtype, combined_probs [N, E] fp32 or None)``."""
        self.calls.append("combine")
        problem = None
        try:
            assert handle is not None, "The handle is necessary for combine."
            _check(isinstance(handle, tuple) and len(handle) == 7, "fake HybridEP: a dispatch handle is a 7-tuple")
            config, num_rows = handle[6], int(handle[3].item())
            self._check_combine_input(config, hidden, num_rows)
            if probs is not None:
                e_node = config.num_of_experts_per_rank * config.num_of_ranks_per_node
                _check(probs.dtype == torch.float32 and probs.is_contiguous(), "fake HybridEP: combine probs must be contiguous float32")
                _check(tuple(probs.shape) == (num_rows, e_node), f"fake HybridEP: combine probs must be [{num_rows}, {e_node}], got {list(probs.shape)}")
        except Exception as exc:  # noqa: BLE001
            problem = exc
        self._gate(problem, None)
        return self._combine_rows(config, handle[0], handle[5], hidden, probs)

    # ----------------------------------------------------------------------------------------------- permute

    def dispatch_with_permute(
        self,
        *,
        hidden: torch.Tensor,
        topk_idx: torch.Tensor = None,
        topk_weights: torch.Tensor = None,
        num_of_experts_per_rank: int = None,
        num_of_experts: int = None,
        use_fp8: bool = None,
        routing_map: torch.Tensor = None,
        probs: torch.Tensor = None,
        scaling_factor: torch.Tensor = None,
        num_permuted_tokens: int = None,
        pad_multiple: int = None,
        handle: tuple = None,
        non_blocking: bool = False,
        fuse_permute_dispatch: bool = False,
        num_dispatched_tokens: int = None,
        use_host_meta: bool = None,
    ):
        """Dispatch, then lay the rows out expert-major (each expert's segment padded to ``pad_multiple``
        with zero rows).

        Returns ``(dispatched_token [P, H], dispatched_probs [P] fp32 or None, scaling_factor [P, H/128] or None,
        padded_tokens_per_expert (int64 [E_loc] CPU; None on a cached call), handle 11-tuple)``. P is the
        padded total with ``non_blocking=False`` (or ``num_permuted_tokens`` if given), ``num_permuted_tokens``
        with ``non_blocking=True`` (rows past it dropped, ``overflow_flag`` set)."""
        self.calls.append("dispatch_with_permute")
        if num_dispatched_tokens is not None:
            warnings.warn("The num_dispatched_tokens is deprecated, it will be removed in the future.")
        if use_host_meta is not None:
            warnings.warn("The use_host_meta is deprecated, it will be removed in the future.")
            non_blocking = not use_host_meta
        if isinstance(num_permuted_tokens, torch.Tensor):
            num_permuted_tokens = int(num_permuted_tokens)
        problem, num_tokens, config = None, None, None
        try:
            num_tokens, hidden_dim = hidden.shape
            if routing_map is not None:
                assert routing_map.dtype == torch.bool
                num_of_experts = routing_map.size(-1)
            elif topk_idx is not None:
                assert num_of_experts is not None, "The number of experts should be provided on index-based routing."
                routing_map, probs = _indices_to_map(topk_idx, topk_weights, num_tokens, num_of_experts)
            if non_blocking:
                assert num_permuted_tokens is not None and num_permuted_tokens >= 0, \
                    "The num_permuted_tokens is required for non-blocking mode."
                if pad_multiple is not None and pad_multiple > 0:
                    assert num_permuted_tokens % pad_multiple == 0, (
                        f"num_permuted_tokens ({num_permuted_tokens}) must be a multiple of pad_multiple ({pad_multiple}) in non-blocking mode."
                    )
            _check(num_tokens > 0, ZERO_TOKENS)
            if handle is None:
                assert hidden.size(0) == routing_map.size(0), "The hidden and the routing_map should have the same row number."
                config = self.update_template_config(
                    hidden_dim=hidden_dim, num_of_tokens_per_rank=num_tokens, num_local_experts=num_of_experts_per_rank,
                    pad_multiple=pad_multiple, use_fp8=use_fp8, fuse_permute_dispatch=fuse_permute_dispatch,
                )
                self._check_routing(config, routing_map, num_tokens)
            else:
                _check(isinstance(handle, tuple) and len(handle) == 11, "fake HybridEP: a permute handle is an 11-tuple")
                if num_permuted_tokens is None:
                    raise TypeError("fake HybridEP: a cached dispatch_with_permute needs num_permuted_tokens (the real one "
                                    "assigns it to the C++ handle, which refuses None)")
                if handle[8] != num_tokens:
                    warnings.warn("This handle could be invalid.")
                config = handle[9]
                positions = handle[6][: int(handle[3].item())]
                _check(positions.numel() == 0 or int(positions.max()) < num_permuted_tokens,
                       f"fake HybridEP: the handle places rows up to {int(positions.max()) if positions.numel() else -1}, past "
                       f"num_permuted_tokens={num_permuted_tokens} (the real kernel would write out of bounds)")
            self._check_tokens(config, hidden, probs, scaling_factor, num_tokens)
        except Exception as exc:  # noqa: BLE001
            problem = exc
        self._gate(problem, num_tokens)

        padded_tokens_per_expert = None
        if handle is None:
            self.last_template_config = config
            capacity = num_permuted_tokens if non_blocking else None
            layout = self._preprocess(config, routing_map, num_tokens, permute=(pad_multiple or 0, capacity))
            (s2d, r2a, a2r, count, local_map, chunk_layout, d2e, tokens_per_expert, overflow) = layout
            padded_tokens_per_expert = _padded(tokens_per_expert.long(), pad_multiple or 0)
            needed = int(padded_tokens_per_expert.sum())
            if num_permuted_tokens is None or num_permuted_tokens < 0:
                num_permuted_tokens = needed
            elif not non_blocking and num_permuted_tokens < needed:
                raise RuntimeError(f"fake HybridEP: num_permuted_tokens={num_permuted_tokens} < the {needed} permuted rows "
                                   "(without non_blocking there is no token drop: the real kernel writes out of bounds)")
            handle = (s2d, r2a, a2r, count, local_map, chunk_layout, d2e, tokens_per_expert, num_tokens, config, overflow)
        config, d2e, tokens_per_expert = handle[9], handle[6], handle[7]
        num_rows = int(handle[3].item())
        rows, row_probs, row_scales = self._dispatch_rows(config, handle[0], num_rows, hidden, probs, scaling_factor)

        # expert-major layout: scatter each (row, local expert) to its position; padding and the rest stay zero
        positions = d2e[:num_rows]
        row_idx, expert_idx = (positions >= 0).nonzero(as_tuple=True)
        dest = positions[row_idx, expert_idx].long()
        out = torch.zeros(num_permuted_tokens, *rows.shape[1:], dtype=rows.dtype)
        out[dest] = rows[row_idx]
        out_probs = out_scales = None
        if row_probs is not None:
            out_probs = torch.zeros(num_permuted_tokens, dtype=torch.float32)
            out_probs[dest] = row_probs[row_idx, self.local_rank * config.num_of_experts_per_rank + expert_idx]
        if row_scales is not None:
            out_scales = torch.zeros(num_permuted_tokens, row_scales.size(1), dtype=torch.float32)
            out_scales[dest] = row_scales[row_idx]
        return out, out_probs, out_scales, padded_tokens_per_expert, handle

    def combine_with_unpermute(
        self,
        *,
        hidden: torch.Tensor,
        probs: torch.Tensor = None,
        handle: tuple = None,
        pad_multiple: int = None,
        fuse_unpermute_combine: bool = False,
        num_dispatched_tokens: int = None,
    ):
        """Sum each received row's local-expert outputs (fp32, rounded to bf16), then combine as :meth:`combine`.

        Returns ``(combined [N, H], combined_probs [N, E] fp32 or None)``."""
        self.calls.append("combine_with_unpermute")
        if num_dispatched_tokens is not None:
            warnings.warn("The num_dispatched_tokens is deprecated, it will be removed in the future.")
        problem = None
        try:
            assert handle is not None, "The handle is necessary in the combine pass."
            _check(isinstance(handle, tuple) and len(handle) == 11, "fake HybridEP: a permute handle is an 11-tuple")
            config, num_rows = handle[9], int(handle[3].item())
            positions = handle[6][:num_rows]
            _check(hidden.dtype == torch.bfloat16, f"fake HybridEP: combine_with_unpermute supports bfloat16 only, got {hidden.dtype}")
            _check(hidden.dim() == 2 and hidden.is_contiguous() and hidden.size(1) == config.hidden_dim,
                   f"fake HybridEP: hidden must be a contiguous [P, {config.hidden_dim}] tensor, got {list(hidden.shape)}")
            rows_aligned(hidden, "HybridEP")
            top = int(positions.max()) if positions.numel() else -1
            _check(top < hidden.size(0), f"fake HybridEP: the handle reads permuted row {top}, hidden has {hidden.size(0)} rows")
            if probs is not None:
                _check(probs.dtype == torch.float32 and probs.is_contiguous() and probs.dim() == 1 and probs.size(0) == hidden.size(0),
                       f"fake HybridEP: unpermute probs must be a contiguous float32 [{hidden.size(0)}] tensor")
        except Exception as exc:  # noqa: BLE001
            problem = exc
        self._gate(problem, None)
        row_idx, expert_idx = (positions >= 0).nonzero(as_tuple=True)
        source = positions[row_idx, expert_idx].long()
        acc = torch.zeros(num_rows, config.hidden_dim, dtype=torch.float32)
        acc.index_add_(0, row_idx, hidden[source].float())
        rows = acc.to(torch.bfloat16)
        row_probs = None
        if probs is not None:
            e_loc = config.num_of_experts_per_rank
            row_probs = torch.zeros(num_rows, e_loc * config.num_of_ranks_per_node, dtype=torch.float32)
            row_probs[row_idx, self.local_rank * e_loc + expert_idx] = probs[source]
        return self._combine_rows(config, handle[0], handle[8], rows, row_probs)

    # ----------------------------------------------------------------------------------------------- internals

    def _gate(self, problem: BaseException | None, num_tokens: int | None) -> None:
        """Collective: every rank learns whether any rank's checks failed, and every rank's N. Raises this
        rank's own problem, else a peer's failure, else an N that is 0 or differs between ranks."""
        mine = torch.tensor([0 if problem is None else 1, -1 if num_tokens is None else num_tokens], dtype=torch.int64)
        every = [torch.empty_like(mine) for _ in range(self.group_size)]
        dist.all_gather(every, mine, group=self.group)
        if problem is not None:
            raise problem
        failed = [rank for rank, got in enumerate(every) if got[0]]
        if failed:
            raise RuntimeError(f"fake HybridEP: rank(s) {failed} failed this call's checks; the real library's peers would hang waiting for them")
        if num_tokens is not None:
            counts = [int(got[1]) for got in every]
            if len(set(counts)) > 1:
                raise RuntimeError(
                    f"fake HybridEP: every rank must pass the same number of tokens, got {counts}; the real library hangs "
                    "(its routing-map all_gather and kernels assume one N on every rank)"
                )

    def _check_routing(self, config: HybridEpConfigInstance, routing_map: torch.Tensor, num_tokens: int) -> None:
        expected = config.num_of_experts_per_rank * config.num_of_ranks_per_node * config.num_of_nodes
        _check(routing_map.dim() == 2 and routing_map.size(0) == num_tokens,
               f"fake HybridEP: routing_map must be [{num_tokens}, E], got {list(routing_map.shape)}")
        _check(routing_map.size(1) == expected,
               f"fake HybridEP: routing_map has {routing_map.size(1)} experts, the buffer needs num_local_experts * group size = {expected}")
        if self.config["enable_custom_allgather"] and self.num_of_nodes == 1:
            _check((num_tokens * expected) % 16 == 0, f"fake HybridEP: custom allgather needs N * E % 16 == 0, got {num_tokens} * {expected}")

    def _check_tokens(self, config: HybridEpConfigInstance, hidden, probs, scaling_factor, num_tokens: int) -> None:
        _check(hidden.dim() == 2 and hidden.is_contiguous(), "fake HybridEP: hidden must be a contiguous [N, H] tensor")
        rows_aligned(hidden, "HybridEP")
        _check(hidden.size(1) == config.hidden_dim, f"fake HybridEP: hidden has {hidden.size(1)} columns, the config {config.hidden_dim}")
        if config.token_data_type == UINT8:
            _check(hidden.element_size() == 1, f"fake HybridEP: an fp8 buffer dispatches 1-byte tokens, got {hidden.dtype}")
            _check(scaling_factor is not None and scaling_factor.dtype == torch.float32 and scaling_factor.is_contiguous()
                   and tuple(scaling_factor.shape) == (num_tokens, config.hidden_dim // 128),
                   f"fake HybridEP: fp8 needs a contiguous float32 scaling_factor [{num_tokens}, {config.hidden_dim // 128}]")
        else:
            _check(hidden.element_size() == 2 and hidden.dtype != torch.uint8,
                   f"fake HybridEP: a bf16 buffer dispatches 2-byte (bf16) tokens, got {hidden.dtype}")
        if probs is not None:
            e = config.num_of_experts_per_rank * config.num_of_ranks_per_node * config.num_of_nodes
            _check(probs.dtype == torch.float32 and probs.is_contiguous() and tuple(probs.shape) == (num_tokens, e),
                   f"fake HybridEP: probs must be a contiguous float32 [{num_tokens}, {e}] tensor")

    def _check_combine_input(self, config: HybridEpConfigInstance, hidden: torch.Tensor, num_rows: int) -> None:
        _check(hidden.dtype == torch.bfloat16, f"fake HybridEP: combine supports bfloat16 only, got {hidden.dtype}")
        _check(hidden.dim() == 2 and hidden.is_contiguous(), "fake HybridEP: hidden must be a contiguous [R, H] tensor")
        _check(tuple(hidden.shape) == (num_rows, config.hidden_dim),
               f"fake HybridEP: combine takes the [{num_rows}, {config.hidden_dim}] dispatched rows, got {list(hidden.shape)}")

    def _preprocess(self, config: HybridEpConfigInstance, routing_map: torch.Tensor, num_tokens: int, permute):
        """The real ``metadata_preprocessing`` (collective): all-gather the routing maps, check the TMA rule,
        build the handle tensors. ``permute`` is ``None`` or ``(pad_multiple, capacity or None)``."""
        world, rank, rpn, nodes = self.group_size, self.rank, config.num_of_ranks_per_node, config.num_of_nodes
        e_loc = config.num_of_experts_per_rank
        gathered = [torch.empty(num_tokens, routing_map.size(1), dtype=torch.uint8) for _ in range(world)]
        dist.all_gather(gathered, routing_map.to(torch.uint8).contiguous(), group=self.group)
        global_map = torch.cat(gathered).bool()  # [W*N, E], global token order
        remainder = num_tokens % config.num_of_tokens_per_chunk_dispatch_api
        if remainder:
            size = remainder * rpn * 4
            if size % 16:
                raise RuntimeError(
                    f"TMA 16B alignment error: tma_load_size = remainder_chunk({remainder}) * ranks_per_node({rpn}) * 4 = "
                    f"{size}B, must be multiple of 16B."
                )
        needed = global_map.view(world * num_tokens, world, e_loc).any(2)  # [W*N, W]: token needed by rank
        dense = torch.where(needed, needed.long().cumsum(0) - 1, -1)  # row of each token in each rank's output
        mine = dense[rank * num_tokens:(rank + 1) * num_tokens]  # [N, W]
        s2d = mine.view(num_tokens, nodes, rpn).permute(1, 0, 2).reshape(nodes * num_tokens, rpn).to(torch.int32).contiguous()
        to_node = (mine >= 0).view(num_tokens, nodes, rpn).any(2)
        r2a = torch.zeros(_round_up(num_tokens, 16), nodes, dtype=torch.bool)
        r2a[:num_tokens] = to_node
        a2r = to_node[:, [n for n in range(nodes) if n != self.node_rank]].contiguous()
        received = needed[:, rank]
        num_rows = int(received.sum())
        count = torch.tensor([num_rows], dtype=torch.int32)
        local_map = torch.zeros(world * num_tokens, e_loc, dtype=torch.bool)
        rows_map = global_map[received][:, rank * e_loc:(rank + 1) * e_loc]
        if permute is None:
            local_map[:num_rows] = rows_map
            return s2d, r2a, a2r, count, local_map
        pad_multiple, capacity = permute
        c_pre = config.num_of_tokens_per_chunk_preprocessing_api
        chunks = -(-num_tokens // c_pre)
        per_chunk = torch.zeros(world, chunks * c_pre, dtype=torch.int64)
        per_chunk[:, :num_tokens] = received.view(world, num_tokens).long()
        chunk_layout = per_chunk.view(world, chunks, c_pre).sum(2).flatten().cumsum(0).to(torch.int32)
        counts = rows_map.long().sum(0)
        starts = _padded(counts, pad_multiple).cumsum(0) - _padded(counts, pad_multiple)
        positions = torch.where(rows_map, starts + rows_map.long().cumsum(0) - 1, -1)
        overflow = torch.zeros(1, dtype=torch.int32)
        if capacity is not None and bool((positions >= capacity).any()):
            positions = torch.where(positions >= capacity, -1, positions)
            overflow.fill_(1)
            counts = (positions >= 0).long().sum(0)
        d2e = torch.full((world * num_tokens, e_loc), -1, dtype=torch.int32)
        d2e[:num_rows] = positions.to(torch.int32)
        return s2d, r2a, a2r, count, local_map, chunk_layout, d2e, counts.to(torch.int32), overflow

    def _destinations(self, config: HybridEpConfigInstance, s2d: torch.Tensor, num_tokens: int) -> torch.Tensor:
        """``[N, W]``: each token's row in each rank's output, or -1 (the fake's sparse_to_dense_map, unfolded)."""
        nodes, rpn = config.num_of_nodes, config.num_of_ranks_per_node
        return s2d.view(nodes, num_tokens, rpn).permute(1, 0, 2).reshape(num_tokens, nodes * rpn)

    def _exchange(self, tensor: torch.Tensor, send_counts: list[int], recv_counts: list[int]) -> torch.Tensor:
        width = 1
        for size in tensor.shape[1:]:
            width *= size
        flat = tensor.reshape(tensor.size(0), width)
        # gloo handles these types; any other (bf16, fp16, fp8) travels as its raw bytes, bit-exactly
        wire = flat if flat.dtype in (torch.float32, torch.int64, torch.int32, torch.uint8) else flat.view(torch.uint8)
        out = torch.empty(sum(recv_counts), wire.size(1), dtype=wire.dtype)
        dist.all_to_all_single(out, wire.contiguous(), recv_counts, send_counts, group=self.group)
        if wire is not flat:
            out = out.view(flat.dtype)
        return out.view(sum(recv_counts), *tensor.shape[1:])

    def _counts(self, send_counts: list[int]) -> list[int]:
        recv = torch.empty(self.group_size, dtype=torch.int64)
        dist.all_to_all_single(recv, torch.tensor(send_counts, dtype=torch.int64), group=self.group)
        return recv.tolist()

    def _dispatch_rows(self, config, s2d, num_rows: int, hidden, probs, scaling_factor):
        """Move this rank's tokens to the ranks that need them (collective); rows in global token order."""
        num_tokens = hidden.size(0)
        dest = self._destinations(config, s2d, num_tokens)
        send = [(dest[:, j] >= 0).nonzero().squeeze(1) for j in range(self.group_size)]
        send_counts = [int(t.numel()) for t in send]
        recv_counts = self._counts(send_counts)
        if sum(recv_counts) != num_rows:
            raise RuntimeError(f"fake HybridEP: the handle expects {num_rows} rows, the peers sent {sum(recv_counts)} (handles of different dispatches?)")
        order = torch.cat(send)
        rows = self._exchange(hidden[order], send_counts, recv_counts)
        row_probs = row_scales = None
        if probs is not None:
            e_node = config.num_of_experts_per_rank * config.num_of_ranks_per_node
            node_of = [j // config.num_of_ranks_per_node for j in range(self.group_size)]
            sent = torch.cat([probs[send[j], node_of[j] * e_node:(node_of[j] + 1) * e_node] for j in range(self.group_size)])
            row_probs = self._exchange(sent, send_counts, recv_counts)
        if config.token_data_type == UINT8:
            row_scales = self._exchange(scaling_factor[order], send_counts, recv_counts)
        return rows, row_probs, row_scales

    def _combine_rows(self, config, s2d, num_tokens: int, rows: torch.Tensor, row_probs):
        """Send each received row back to its source rank and sum the copies there (collective)."""
        world, rpn = self.group_size, config.num_of_ranks_per_node
        dest = self._destinations(config, s2d, num_tokens)
        tokens_at = [(dest[:, j] >= 0).nonzero().squeeze(1) for j in range(world)]
        back_counts = [int(t.numel()) for t in tokens_at]  # what each rank returns to this one
        send_counts = self._counts(back_counts)  # rows of this rank's output that came from each source
        back = self._exchange(rows, send_counts, back_counts).float()
        offsets = [0, *torch.tensor(back_counts).cumsum(0).tolist()]
        acc = torch.zeros(num_tokens, config.hidden_dim, dtype=torch.float32)
        for node in range(config.num_of_nodes):
            partial = torch.zeros_like(acc)
            for j in range(node * rpn, (node + 1) * rpn):
                partial.index_add_(0, tokens_at[j], back[offsets[j]:offsets[j + 1]])
            # a remote node's partial sum crosses RDMA as bf16
            acc += partial if node == self.node_rank else partial.to(torch.bfloat16).float()
        combined = acc.to(rows.dtype)
        combined_probs = None
        if row_probs is not None:
            e_node = config.num_of_experts_per_rank * rpn
            back_probs = self._exchange(row_probs, send_counts, back_counts)
            combined_probs = torch.zeros(num_tokens, e_node * config.num_of_nodes, dtype=torch.float32)
            for j in range(world):
                node = j // rpn
                combined_probs[tokens_at[j], node * e_node:(node + 1) * e_node] += back_probs[offsets[j]:offsets[j + 1]]
        return combined, combined_probs


def _padded(counts: torch.Tensor, pad_multiple: int) -> torch.Tensor:
    """Per-expert counts rounded up to ``pad_multiple`` (unchanged if it is 0 or less), int64."""
    counts = counts.long()
    if pad_multiple and pad_multiple > 0:
        return (counts + pad_multiple - 1) // pad_multiple * pad_multiple
    return counts


def rows_aligned(rows: torch.Tensor, library: str) -> None:
    """DeepEP and HybridEP move rows with 16-byte loads and TMA and check no alignment on the host: rows
    off a 16-byte boundary fault on the device, which the fakes raise as the error CUDA gives."""
    if rows.data_ptr() % 16:
        raise RuntimeError(f"CUDA error: misaligned address (fake {library}: rows off a 16-byte boundary)")


def _check(condition: bool, message: str) -> None:
    """A check the real library makes in C++ (or one whose breach aborts, hangs or corrupts there)."""
    if not condition:
        raise RuntimeError(message)
