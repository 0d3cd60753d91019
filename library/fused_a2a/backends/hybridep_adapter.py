"""HybridEP's plain dispatch/combine behind the ``deep_ep.Buffer`` interface
(:class:`~fused_a2a.autograd.BufferLike`) that :mod:`fused_a2a.autograd` drives, and the shapes its
kernels take (:func:`shape_problem`; the rules: :mod:`fused_a2a.backends.hybridep`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

import fused_a2a.backends.hybridep_routing as routing
from fused_a2a.backends.hybridep_buffer import Settings, apply_environment, ensure_buffer, free_buffers, ranks_per_node
from fused_a2a.checks import dtype_name
from fused_a2a.groups import GroupRef
from fused_a2a.shape import CallShape


def shape_problem(shape: CallShape, knobs: dict[str, Any] | None = None) -> str | None:
    """Why HybridEP's kernels cannot take a dispatch of ``shape``, or ``None`` (the rules: :mod:`fused_a2a.backends.hybridep`).

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
    """HybridEP's plain dispatch/combine as a :class:`~fused_a2a.autograd.BufferLike` (``needs_layout`` is
    ``False``), what :mod:`fused_a2a.autograd` drives. It routes from top-k itself: it needs no layout call.

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
            recv_x = handle.buffer.dispatch(hidden=x, handle=handle.raw, num_of_experts=handle.num_experts,
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
        shape = CallShape(dtype, hidden, topk, num_experts, world_size=self.world, tokens=(num_tokens,),
                          ranks_per_node=per_node)
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
        combined, combined_probs = handle.buffer.combine(hidden=x, probs=probs, handle=handle.raw)
        combined_weights = None
        if combined_probs is not None:
            chosen = handle.topk_idx >= 0
            where = columns.column_of(handle.topk_idx.clamp_min(0))
            combined_weights = torch.where(chosen, combined_probs.gather(1, where), 0.0)
        return combined, combined_weights, None

    def destroy(self) -> None:
        """Drop the process-wide buffer."""
        free_buffers()
