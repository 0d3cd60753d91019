"""A ``deep_ep.Buffer``-shaped buffer over UCCL-EP's pointer-level API (``uccl.ep``, PyPI ``uccl``).

UCCL-EP's native module takes raw device pointers and integers, not tensors: :class:`UCCLBuffer`
allocates every tensor in Python, passes ``tensor.data_ptr()``, and returns what DeepEP v1's
``Buffer`` returns, so :mod:`fused_a2a.autograd` drives it the way it drives DeepEP.

**Intranode only.** Every rank of the group must run on one host (NVLink between the GPUs). UCCL-EP's
internode path moves tokens through CPU proxy threads and RDMA NICs (``Proxy.start_dual``,
``internode_prepare``/``internode_dispatch``/``internode_combine``); this adapter refuses such a group
with one clear ``RuntimeError`` (it cannot be run or tested here: no RDMA NIC).

Contract notes for ``uccl`` 0.1.1: its ``intranode_prepare``/``intranode_dispatch`` assert
``num_tokens > 0``, so a rank without tokens dispatches one placeholder row that goes nowhere (top-k
ids all ``-1``, in no rank's ``is_token_in_rank``) and its combine returns ``[0, H]``: callers may pass
0 tokens on any rank; combine is bf16-only; the channel count (``num_sms / 2``) of a dispatch is baked
into its handle, so its combine and cached dispatches run with the dispatch's ``num_sms``.
"""

from __future__ import annotations

import socket
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from fused_a2a.backends.optional import try_import

UCCL_EP = try_import("uccl.ep", "pip install uccl intervaltree nvidia-cuda-runtime-cu12 (scripts/install_backends.sh)")

INTERNODE_ERROR = "UCCL-EP internode needs RDMA NICs: not supported by this adapter yet"

# UCCL-EP's own defaults (ep/bench/buffer.py get_dispatch_config / get_combine_config, v0.1.1, without
# its EFA variant), per group size: (nvl_send, nvl_recv, rdma_send, rdma_recv) in tokens.
DEFAULT_DISPATCH: dict[int, tuple[int, int, int, int]] = {
    2: (24, 256, 6, 128), 4: (6, 256, 6, 128), 8: (6, 256, 6, 128), 16: (36, 288, 20, 128),
    24: (8, 288, 32, 128), 32: (32, 288, 32, 128), 64: (20, 288, 28, 128), 128: (20, 560, 32, 128),
    144: (32, 720, 12, 128), 160: (28, 720, 12, 128),
}
DEFAULT_COMBINE: dict[int, tuple[int, int, int, int]] = {
    2: (10, 256, 6, 128), 4: (9, 256, 6, 128), 8: (4, 256, 6, 128), 16: (4, 288, 12, 128),
    24: (1, 288, 8, 128), 32: (1, 288, 8, 128), 64: (1, 288, 20, 128), 128: (1, 560, 12, 128),
    144: (2, 720, 8, 128), 160: (2, 720, 8, 128),
}

# the dtype codes of uccl.ep's intranode_combine
DTYPE_CODES: dict[torch.dtype, int] = {
    torch.uint8: 0, torch.int8: 1, torch.int16: 2, torch.int32: 3, torch.int64: 4, torch.float16: 5,
    torch.bfloat16: 6, torch.float32: 7, torch.float64: 8, torch.bool: 9, torch.float8_e4m3fn: 10,
    torch.float8_e4m3fnuz: 10,
}


def _ep():
    return UCCL_EP.require("the UCCL-EP buffer")


def _stream_ptr(device: torch.device | None = None) -> int:
    """The current CUDA stream of ``device`` as an integer (``0`` off CUDA: the CPU fake of the tests)."""
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return int(torch.cuda.current_stream(device).cuda_stream) if device.type == "cuda" else 0


def _ptr(tensor: torch.Tensor | None) -> int:
    """``tensor.data_ptr()`` (``0`` for ``None``); the native kernels read dense rows, so it must be contiguous."""
    if tensor is None:
        return 0
    if not tensor.is_contiguous():
        raise ValueError(f"UCCL-EP takes contiguous tensors, got shape {tuple(tensor.shape)}, strides {tensor.stride()}")
    return tensor.data_ptr()


def _all_gather(group: dist.ProcessGroup, value: Any) -> list:
    values = [None] * group.size()
    dist.all_gather_object(values, value, group=group)
    return values


def local_world_size(group: dist.ProcessGroup) -> int:
    """How many ranks of ``group`` run on this host (host names gathered through the group; collective)."""
    return _all_gather(group, socket.gethostname()).count(socket.gethostname())


@dataclass(frozen=True, eq=False)  # holds tensors: compared by identity
class EventOverlap:
    """An optional ``uccl.ep.EventHandle`` plus the tensors its kernels use (``deep_ep``'s ``EventOverlap``).

    Attributes:
        event: the native event (``None`` when the call was not ``async_finish``).
        extra_tensors: tensors kept alive until the event is waited on.
    """

    event: Any = None
    extra_tensors: tuple | None = None

    @staticmethod
    def capture() -> EventOverlap:
        """An event recorded on the current stream (UCCL's ``EventHandle`` needs the stream pointer)."""
        return EventOverlap(_ep().EventHandle(_stream_ptr()))

    def current_stream_wait(self) -> None:
        """Make the current stream wait for the event."""
        assert self.event is not None
        self.event.current_stream_wait(_stream_ptr())

    def __enter__(self) -> EventOverlap:
        return self

    def __exit__(self, exc_type, exc_value, traceback) -> None:
        if self.event is not None:
            self.current_stream_wait()


@dataclass(frozen=True, eq=False)  # holds tensors: compared by identity
class UCCLHandle:
    """What an intranode dispatch leaves for its combine and for cached dispatches (opaque to callers).

    Attributes (``R`` ranks, ``C = num_sms / 2`` channels, ``N`` tokens sent, ``M`` tokens received):
        rank_prefix_matrix: ``[R, R]`` int32, inclusive prefix over source ranks of tokens sent to each rank.
        channel_prefix_matrix: ``[R, C]`` int32, per destination, prefix over this rank's channels (send side).
        recv_channel_prefix_matrix: ``[R, C]`` int32, per source, prefix over its channels (receive side).
        num_recv_tokens: ``M``.
        recv_src_idx: ``[max(M, 1)]`` int32, the source token index of each received row.
        is_token_in_rank: ``[max(N, 1), R]`` bool, which ranks received each token (with ``N = 0``, the
            placeholder row, sent nowhere).
        send_head: ``[max(N, 1), R]`` int32, where each token landed on each rank (``-1``: not sent there).
        num_tokens: ``N``, the tokens this rank dispatched.
    """

    rank_prefix_matrix: torch.Tensor
    channel_prefix_matrix: torch.Tensor
    recv_channel_prefix_matrix: torch.Tensor
    num_recv_tokens: int
    recv_src_idx: torch.Tensor
    is_token_in_rank: torch.Tensor
    send_head: torch.Tensor
    num_tokens: int

    @property
    def num_sms(self) -> int:
        """The SM count of the dispatch (two per channel)."""
        return 2 * self.channel_prefix_matrix.size(1)


def handle_layout(handle: UCCLHandle) -> tuple[int, int]:
    """``(num_sms, num_tokens)`` of the dispatch that returned ``handle``."""
    return handle.num_sms, handle.num_tokens


class UCCLBuffer:
    """UCCL-EP's normal-mode (high-throughput) buffer with DeepEP v1's ``Buffer`` interface. Intranode only.

    Construction is collective over ``group`` and follows UCCL's own order: an RDMA scratch buffer
    (``ep.get_rdma_buffer``, one byte when there are no RDMA bytes), CPU proxies built and registered
    (``ep.register_proxies``; the native buffer refuses to exist without them) but not started (an
    intranode group never uses them), the native ``ep.Buffer``, the device ids and CUDA IPC handles
    gathered through the group, ``sync``, and the proxies' atomic buffer connected.

    Args:
        group: the expert-parallel process group; all its ranks on this host.
        num_nvl_bytes: NVLink buffer bytes (a multiple of 128): the largest ``get_nvl_buffer_size_hint``
            of the configs it will run.
        num_rdma_bytes: RDMA buffer bytes; an intranode buffer keeps none (``0``), as NeMo's does.
        explicitly_destroy: release only in :meth:`destroy` (otherwise at garbage collection).

    Raises:
        RuntimeError: the group spans hosts (:data:`INTERNODE_ERROR`), or ``uccl.ep`` is missing.
    """

    num_sms: int = 20

    def __init__(
        self, group: dist.ProcessGroup, num_nvl_bytes: int, num_rdma_bytes: int = 0, explicitly_destroy: bool = True
    ) -> None:
        ep = _ep()
        num_local_ranks = local_world_size(group)
        if group.size() > num_local_ranks:
            raise RuntimeError(INTERNODE_ERROR)
        self.group = group
        self.group_size = group.size()
        self.rank = group.rank()
        self.num_nvl_bytes = num_nvl_bytes
        self.num_rdma_bytes = 0
        self.explicitly_destroy = explicitly_destroy
        self.device_index = torch.cuda.current_device() if torch.cuda.is_available() else 0

        capsule, host_allocated = ep.get_rdma_buffer(self.num_rdma_bytes, self.device_index)
        self.scratch = torch.utils.dlpack.from_dlpack(capsule)
        self.proxies = tuple(
            ep.Proxy(
                thread_idx=thread, gpu_buffer_addr=self.scratch.data_ptr(), total_size=self.num_rdma_bytes,
                rank=self.rank, node_idx=0, local_rank=self.device_index, num_experts=0,
                num_ranks=self.group_size, num_nodes=1, use_normal_mode=True, is_intranode=True,
                gpu_buffer_is_host_allocated=host_allocated,
            )
            for thread in range(ep.get_num_proxy_threads())
        )
        ep.register_proxies(self.device_index, list(self.proxies))
        dist.barrier(group=group)

        self.runtime = ep.Buffer(
            self.rank, self.group_size, num_nvl_bytes, self.num_rdma_bytes, False, explicitly_destroy, num_local_ranks
        )
        device_ids = _all_gather(group, self.runtime.get_local_device_id())
        ipc_handles = _all_gather(group, self.runtime.get_local_ipc_handle())
        self.runtime.sync(device_ids, ipc_handles, None, [None] * self.group_size)
        assert self.runtime.is_available()
        ep.connect_atomic_buffer(self.proxies[0], self.runtime)
        for proxy in self.proxies:
            proxy.set_atomic_buffer_ptr(self.proxies[0].get_atomic_buffer_ptr())

    @staticmethod
    def set_num_sms(new_num_sms: int) -> None:
        """Set the SM count of the default configs (even: UCCL-EP runs one channel per 2 SMs)."""
        if isinstance(new_num_sms, bool) or not isinstance(new_num_sms, int) or new_num_sms < 2 or new_num_sms % 2:
            raise ValueError(f"The SM count must be an even int >= 2, got {new_num_sms!r}")
        UCCLBuffer.num_sms = new_num_sms

    @staticmethod
    def get_dispatch_config(num_ranks: int, num_sms: int | None = None):
        """UCCL-EP's default dispatch ``uccl.ep.Config`` for ``num_ranks`` (``num_sms``: default :attr:`num_sms`)."""
        assert num_ranks in DEFAULT_DISPATCH, f"Unsupported number of EP ranks: {num_ranks}"
        return _ep().Config(num_sms or UCCLBuffer.num_sms, *DEFAULT_DISPATCH[num_ranks])

    @staticmethod
    def get_combine_config(num_ranks: int, num_sms: int | None = None):
        """UCCL-EP's default combine ``uccl.ep.Config`` for ``num_ranks`` (``num_sms``: default :attr:`num_sms`)."""
        assert num_ranks in DEFAULT_COMBINE, f"Unsupported number of EP ranks: {num_ranks}"
        return _ep().Config(num_sms or UCCLBuffer.num_sms, *DEFAULT_COMBINE[num_ranks])

    def get_dispatch_layout(
        self,
        topk_idx: torch.Tensor,
        num_experts: int,
        previous_event: EventOverlap | None = None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ):
        """As :meth:`fused_a2a.autograd.BufferLike.get_dispatch_layout` (``num_tokens_per_rdma_rank``:
        ``None``, intranode; the event: an :class:`EventOverlap`, whose ``event`` is ``None`` unless
        ``async_finish``).
        """
        device, num_tokens = topk_idx.device, topk_idx.size(0)
        if not num_tokens:  # the kernels take no empty top-k: count a placeholder row of -1 instead
            topk_idx = _placeholder_rows(topk_idx, -1)
        with self._allocation_stream(previous_event, async_finish, allocate_on_comm_stream, device):
            num_tokens_per_rank = torch.empty(self.group_size, dtype=torch.int32, device=device)
            num_tokens_per_expert = torch.empty(num_experts, dtype=torch.int32, device=device)
            is_token_in_rank = torch.empty(topk_idx.size(0), self.group_size, dtype=torch.bool, device=device)
        event = self.runtime.get_dispatch_layout(
            _ptr(topk_idx), topk_idx.size(0), topk_idx.size(1), num_experts, _ptr(num_tokens_per_rank), 0,
            _ptr(num_tokens_per_expert), _ptr(is_token_in_rank),
            _native(previous_event), async_finish, allocate_on_comm_stream, _stream_ptr(device),
        )
        outputs = (num_tokens_per_rank, num_tokens_per_expert, is_token_in_rank)
        return (
            num_tokens_per_rank, None, num_tokens_per_expert, is_token_in_rank[:num_tokens],
            _overlap(event, async_finish, previous_event, (topk_idx, *outputs)),
        )

    def dispatch(
        self,
        x: torch.Tensor,
        handle: UCCLHandle | None = None,
        num_tokens_per_rank: torch.Tensor | None = None,
        num_tokens_per_rdma_rank: torch.Tensor | None = None,
        is_token_in_rank: torch.Tensor | None = None,
        num_tokens_per_expert: torch.Tensor | None = None,
        topk_idx: torch.Tensor | None = None,
        topk_weights: torch.Tensor | None = None,
        expert_alignment: int = 1,
        num_worst_tokens: int = 0,
        config=None,
        previous_event: EventOverlap | None = None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ):
        """As :meth:`fused_a2a.autograd.BufferLike.dispatch`, with these limits: ``x`` is a plain tensor
        (bf16 for a later combine; ``H * element_size`` a multiple of 16; ``N = 0`` dispatches a placeholder
        row that goes nowhere), not an FP8 pair; the layout is required without ``handle``;
        ``num_tokens_per_rdma_rank`` is ``None`` (intranode); ``topk_idx`` and ``topk_weights`` come together
        or not at all; with ``num_worst_tokens`` rows past the real count are garbage and the per-expert
        list is empty. ``config``: a ``uccl.ep.Config`` (default :meth:`get_dispatch_config`; with
        ``handle``, at the handle's SM count, which a given config must match). Returns the per-expert
        counts as a list, a :class:`UCCLHandle` and an :class:`EventOverlap`.
        """
        if isinstance(x, tuple):
            raise NotImplementedError("the UCCL-EP adapter dispatches plain tensors, not FP8 (x, scales) tuples")
        if handle is not None:
            assert topk_idx is None and topk_weights is None, "a cached dispatch takes no top-k"
            config = self._config_for(config, handle, self.get_dispatch_config)
            return self._cached_dispatch(x, handle, config, previous_event, async_finish, allocate_on_comm_stream)
        assert num_tokens_per_rank is not None and is_token_in_rank is not None and num_tokens_per_expert is not None
        assert (topk_idx is None) == (topk_weights is None), "give topk_idx and topk_weights together"
        num_tokens = x.size(0)
        if not num_tokens:  # uccl asserts num_tokens > 0: one placeholder row, in no rank, routed nowhere
            x, is_token_in_rank = _placeholder_rows(x, 0), _placeholder_rows(is_token_in_rank, False)
            if topk_idx is not None:
                topk_idx, topk_weights = _placeholder_rows(topk_idx, -1), _placeholder_rows(topk_weights, 0)
        config = config if config is not None else self.get_dispatch_config(self.group_size)
        size, channels, device = self.group_size, config.num_sms // 2, x.device
        with self._allocation_stream(previous_event, async_finish, allocate_on_comm_stream, device):
            rank_prefix_matrix = torch.empty(size, size, dtype=torch.int32, device=device)
            channel_prefix_matrix = torch.empty(size, channels, dtype=torch.int32, device=device)
        num_recv_tokens, per_expert, _ = self.runtime.intranode_prepare(
            _ptr(num_tokens_per_rank), _ptr(is_token_in_rank), _ptr(num_tokens_per_expert), x.size(0),
            num_tokens_per_expert.size(0), _ptr(rank_prefix_matrix), _ptr(channel_prefix_matrix),
            expert_alignment, num_worst_tokens, config, _native(previous_event), False, False, _stream_ptr(device),
        )
        rows, topk = max(num_recv_tokens, 1), 0 if topk_idx is None else topk_idx.size(1)
        with self._allocation_stream(previous_event, async_finish, allocate_on_comm_stream, device):
            recv_x = torch.empty(rows, x.size(1), dtype=x.dtype, device=device)
            recv_src_idx = torch.empty(rows, dtype=torch.int32, device=device)
            recv_channel_prefix_matrix = torch.empty(size, channels, dtype=torch.int32, device=device)
            send_head = torch.empty(x.size(0), size, dtype=torch.int32, device=device)
            recv_topk_idx = recv_topk_weights = None
            if topk_idx is not None:
                recv_topk_idx = torch.empty(rows, topk, dtype=topk_idx.dtype, device=device)
                recv_topk_weights = torch.empty(rows, topk, dtype=torch.float32, device=device)
        event = self.runtime.intranode_dispatch(
            _ptr(x), x.size(0), x.size(1), x.element_size(), 0, 0, 0, 0,
            _ptr(topk_idx), topk, _ptr(topk_weights), _ptr(is_token_in_rank), _ptr(rank_prefix_matrix),
            _ptr(channel_prefix_matrix), num_tokens_per_expert.size(0), num_worst_tokens, False, config,
            num_recv_tokens, _ptr(recv_x), 0, _ptr(recv_topk_idx), _ptr(recv_topk_weights),
            _ptr(recv_channel_prefix_matrix), _ptr(recv_src_idx), _ptr(send_head),
            None, async_finish, allocate_on_comm_stream, _stream_ptr(device),
        )
        handle = UCCLHandle(
            rank_prefix_matrix, channel_prefix_matrix, recv_channel_prefix_matrix, num_recv_tokens,
            recv_src_idx, is_token_in_rank, send_head, num_tokens,
        )
        used = (x, topk_idx, topk_weights, num_tokens_per_rank, num_tokens_per_expert, recv_x, recv_topk_idx,
                recv_topk_weights)
        return (
            recv_x[:num_recv_tokens],
            None if recv_topk_idx is None else recv_topk_idx[:num_recv_tokens],
            None if recv_topk_weights is None else recv_topk_weights[:num_recv_tokens],
            per_expert,
            handle,
            _overlap(event, async_finish, previous_event, (*used, handle)),
        )

    def combine(
        self,
        x: torch.Tensor,
        handle: UCCLHandle,
        topk_weights: torch.Tensor | None = None,
        bias: torch.Tensor | tuple[torch.Tensor | None, torch.Tensor | None] | None = None,
        config=None,
        previous_event: EventOverlap | None = None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ):
        """As :meth:`fused_a2a.autograd.BufferLike.combine`, with bf16 rows ``x`` (no weighting), a
        :class:`UCCLHandle` and a ``uccl.ep.Config`` with the handle's SM count (default:
        :meth:`get_combine_config` at it); returns an :class:`EventOverlap`.
        """
        if x.size(0) != handle.num_recv_tokens:
            raise ValueError(f"combine input has {x.size(0)} rows, but its dispatch received {handle.num_recv_tokens}")
        config = self._config_for(config, handle, self.get_combine_config)
        bias_0, bias_1 = bias if isinstance(bias, tuple) else (bias, None)
        if not handle.num_tokens:  # the placeholder row of the dispatch comes back too: its bias rows
            bias_0, bias_1 = (None if b is None else _placeholder_rows(b, 0) for b in (bias_0, bias_1))
        hidden, topk, device = x.size(1), 0 if topk_weights is None else topk_weights.size(1), x.device
        # the kernels take no null pointers: a rank that received nothing sends one unused row
        x_rows = x if x.size(0) else x.new_empty(1, hidden)
        weight_rows = topk_weights if topk_weights is None or topk_weights.size(0) else topk_weights.new_empty(1, topk)
        rows = handle.send_head.size(0)  # the dispatched rows, a placeholder row included
        with self._allocation_stream(previous_event, async_finish, allocate_on_comm_stream, device):
            combined_x = torch.empty(rows, hidden, dtype=x.dtype, device=device)
            combined_weights = None
            if topk_weights is not None:
                combined_weights = torch.empty(rows, topk, dtype=torch.float32, device=device)
        event = self.runtime.intranode_combine(
            _ptr(x_rows), x.size(0), hidden, DTYPE_CODES[x.dtype], x.element_size(), _ptr(weight_rows), topk,
            _ptr(bias_0), _ptr(bias_1), _ptr(handle.recv_src_idx), rows,
            _ptr(handle.rank_prefix_matrix), _ptr(handle.recv_channel_prefix_matrix), _ptr(handle.send_head),
            config, _ptr(combined_x), _ptr(combined_weights),
            _native(previous_event), async_finish, allocate_on_comm_stream, _stream_ptr(device),
        )
        used = (x_rows, weight_rows, bias_0, bias_1, combined_x, combined_weights, handle)
        return (
            combined_x[: handle.num_tokens],
            None if combined_weights is None else combined_weights[: handle.num_tokens],
            _overlap(event, async_finish, previous_event, used),
        )

    def destroy(self) -> None:
        """Release the buffer (collective: the native destroy barriers across the NVLink peers), then
        unregister the proxies. Needs ``explicitly_destroy``.

        The proxies were never started (intranode), so there is nothing to stop: ``Proxy.stop`` of an
        unstarted proxy raises "Proxy already stopped" in uccl 0.1.1.
        """
        assert self.explicitly_destroy, "`explicitly_destroy` flag must be set"
        self.runtime.destroy()
        self.runtime = None
        _ep().unregister_proxy(self.device_index)

    def _cached_dispatch(self, x, handle: UCCLHandle, config, previous_event, async_finish, allocate_on_comm_stream):
        """Dispatch ``x`` with the layout of ``handle``; returns DeepEP's cached 6-tuple."""
        device = x.device
        if not x.size(0):  # the dispatch of the handle sent a placeholder row: send one again
            x = _placeholder_rows(x, 0)
        with self._allocation_stream(previous_event, async_finish, allocate_on_comm_stream, device):
            recv_x = torch.empty(max(handle.num_recv_tokens, 1), x.size(1), dtype=x.dtype, device=device)
        event = self.runtime.intranode_dispatch(
            _ptr(x), x.size(0), x.size(1), x.element_size(), 0, 0, 0, 0, 0, 0, 0,
            _ptr(handle.is_token_in_rank), _ptr(handle.rank_prefix_matrix), _ptr(handle.channel_prefix_matrix),
            0, 0, True, config, handle.num_recv_tokens, _ptr(recv_x), 0, 0, 0,
            _ptr(handle.recv_channel_prefix_matrix), _ptr(handle.recv_src_idx), _ptr(handle.send_head),
            _native(previous_event), async_finish, allocate_on_comm_stream, _stream_ptr(device),
        )
        after = _overlap(event, async_finish, previous_event, (x, recv_x, handle))
        return recv_x[: handle.num_recv_tokens], None, None, None, None, after

    def _config_for(self, config, handle: UCCLHandle, default):
        """``config``, or ``default(group size, handle's SM count)``; a config must match the handle's SM count."""
        if config is None:
            return default(self.group_size, handle.num_sms)
        if config.num_sms != handle.num_sms:
            raise ValueError(
                f"the handle was dispatched with num_sms={handle.num_sms} (num_sms / 2 channels); "
                f"the config has num_sms={config.num_sms}"
            )
        return config

    def _allocation_stream(self, previous_event, async_finish: bool, allocate_on_comm_stream: bool, device: torch.device):
        """Where new tensors are allocated: the communication stream if asked (which needs
        ``previous_event`` and ``async_finish``, as in DeepEP), else the current stream."""
        if not allocate_on_comm_stream:
            return nullcontext()
        assert previous_event is not None and async_finish, (
            "allocate_on_comm_stream needs previous_event and async_finish"
        )
        if device.type != "cuda":
            return nullcontext()
        return torch.cuda.stream(torch.cuda.ExternalStream(int(self.runtime.get_comm_stream()), device=device))


def _placeholder_rows(tensor: torch.Tensor, value) -> torch.Tensor:
    """A ``[1, *tensor.shape[1:]]`` tensor like ``tensor`` (which has no rows), filled with ``value``."""
    return torch.full((1, *tensor.shape[1:]), value, dtype=tensor.dtype, device=tensor.device)


def _native(event: EventOverlap | None):
    """The native event inside ``event`` (what ``uccl.ep`` takes as ``previous_event``)."""
    return None if event is None else event.event


def _overlap(event, async_finish: bool, previous_event: EventOverlap | None, tensors: tuple) -> EventOverlap:
    """The :class:`EventOverlap` of a call: with ``async_finish`` it keeps the call's tensors (and the
    previous event's) alive until it is waited on."""
    if not async_finish:
        return EventOverlap(event)
    kept = () if previous_event is None or previous_event.extra_tensors is None else previous_event.extra_tensors
    return EventOverlap(event, kept + tensors)
