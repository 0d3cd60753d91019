"""A CPU fake of ``deep_ep`` (v1 ``Buffer`` API, normal mode, intranode: 2, 4 or 8 ranks). Tests only.

It computes real results with fused_a2a's torch backend over gloo, and enforces the parts of the real
library's contract an adapter must honour (``RuntimeError`` where DeepEP's C++ asserts, ``AssertionError``
where its Python asserts):

* ``Config``: the constructor asserts; no readable fields; the buffer size hints of ``csrc/config.hpp``;
* ``Buffer``: construction and ``destroy`` are collective; ``destroy`` needs ``explicitly_destroy``, runs
  once, and needs the process group alive (the real one barriers across NVLink peers, so it hangs after
  ``destroy_process_group``); every dispatch/combine checks an even SM count, 16-byte rows, a buffer at
  least as large as the config's size hint, and the comm-stream flags; a cached dispatch takes no top-k;
  a handle's channel count must match the config's; combine takes bf16 only;
* ``num_recv_tokens_per_expert_list`` is what ``notify_dispatch`` computes: each local expert's entries
  of the senders' ``num_tokens_per_expert`` summed (int32), aligned up; expert ids outside ``[-1, E)``
  stop the rank (DeepEP would read out of bounds);
* handles are DeepEP's intranode 6-tuple ``(rank_prefix_matrix [R, R], channel_prefix_matrix [R, C],
  recv_channel_prefix_matrix [R, C], recv_src_idx [M], is_token_in_rank [N, R], send_head [N, R])`` with
  ``C = num_sms / 2``.

:data:`EVENTS` records buffers' lives as ``("create", id(buffer))`` and ``("destroy", id(buffer))``; with
``$FAKE_DEEP_EP_EVENTS`` naming a file, each event is also appended there as ``"<pid> <event> <id>"``
(for tests that run the CLI in other processes).
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from .hybrid_ep_buffer import HybridEPBuffer, rows_aligned
from .utils import EventHandle, EventOverlap

__all__ = ["Buffer", "Config", "EventOverlap", "EVENTS", "HybridEPBuffer"]

EVENTS: list[tuple[str, int]] = []
EVENTS_FILE_ENV = "FAKE_DEEP_EP_EVENTS"
COLLECTIVE_TIMEOUT = timedelta(seconds=60)

# csrc/kernels/configs.cuh
NUM_MAX_NVL_PEERS = 8
NUM_MAX_TOPK = 128
NUM_MAX_SCALES = 128

# deep_ep/buffer.py (legacy v1 API on main): (nvl_send, nvl_recv, rdma_send, rdma_recv) per group size
_DISPATCH_TABLE = {
    2: (24, 256, 6, 128), 4: (6, 256, 6, 128), 8: (6, 256, 6, 128), 16: (36, 288, 20, 128),
    24: (32, 288, 8, 128), 32: (32, 288, 8, 128), 48: (32, 288, 8, 128), 64: (32, 288, 8, 128),
    96: (20, 480, 12, 128), 128: (20, 560, 12, 128), 144: (32, 720, 12, 128), 160: (28, 720, 12, 128),
}
_COMBINE_TABLE = {
    2: (10, 256, 6, 128), 4: (9, 256, 6, 128), 8: (4, 256, 6, 128), 16: (4, 288, 12, 128),
    24: (1, 288, 8, 128), 32: (1, 288, 8, 128), 48: (1, 288, 8, 128), 64: (1, 288, 8, 128),
    96: (1, 480, 8, 128), 128: (1, 560, 8, 128), 144: (2, 720, 8, 128), 160: (2, 720, 8, 128),
}


def _check(condition: bool, message: str) -> None:
    """DeepEP's ``EP_HOST_ASSERT``: a C++ exception, which pybind raises as ``RuntimeError``."""
    if not condition:
        raise RuntimeError(f"Failed: Assertion error {message}")


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _record(event: str, buffer: Buffer) -> None:
    EVENTS.append((event, id(buffer)))
    path = os.environ.get(EVENTS_FILE_ENV)
    if path:
        with open(path, "a") as log:
            log.write(f"{os.getpid()} {event} {id(buffer)}\n")


def _cpp_data_ptr(tensor: torch.Tensor) -> int:
    """The address C++'s ``tensor.data_ptr<T>()`` gives DeepEP: storage plus offset, so an empty view of
    a non-empty buffer has one (Python's ``data_ptr()`` says 0 for every empty tensor)."""
    base = tensor.untyped_storage().data_ptr()
    return base + tensor.storage_offset() * tensor.element_size() if base else 0


class Config:
    """``deep_ep.Config``: the SM count and chunk sizes of one normal-mode kernel (values not readable).

    Args (positional or keyword, as the pybind class takes them):
        num_sms, num_max_nvl_chunked_send_tokens, num_max_nvl_chunked_recv_tokens,
        num_max_rdma_chunked_send_tokens, num_max_rdma_chunked_recv_tokens.
    """

    def __init__(
        self,
        num_sms: int = 20,
        num_max_nvl_chunked_send_tokens: int = 6,
        num_max_nvl_chunked_recv_tokens: int = 256,
        num_max_rdma_chunked_send_tokens: int = 6,
        num_max_rdma_chunked_recv_tokens: int = 256,
    ) -> None:
        nvl_send, nvl_recv = num_max_nvl_chunked_send_tokens, num_max_nvl_chunked_recv_tokens
        rdma_send, rdma_recv = num_max_rdma_chunked_send_tokens, num_max_rdma_chunked_recv_tokens
        _check(num_sms >= 0, "num_sms >= 0")
        _check(nvl_send > 0 and nvl_recv > 0, "num_max_nvl_chunked_send_tokens > 0 and num_max_nvl_chunked_recv_tokens > 0")
        _check(nvl_send < nvl_recv, "num_max_nvl_chunked_send_tokens < num_max_nvl_chunked_recv_tokens")
        _check(rdma_send > 0 and rdma_recv > 0, "num_max_rdma_chunked_send_tokens > 0 and num_max_rdma_chunked_recv_tokens > 0")
        rdma_recv = _round_up(rdma_recv, rdma_send)
        _check(rdma_send < rdma_recv, "num_max_rdma_chunked_send_tokens < num_max_rdma_chunked_recv_tokens")
        _check(rdma_send <= rdma_recv / 2, "num_max_rdma_chunked_send_tokens <= num_max_rdma_chunked_recv_tokens / 2")
        self._num_sms = num_sms
        self._nvl_recv = nvl_recv
        self._rdma_recv = rdma_recv

    def get_nvl_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """Bytes of NVLink buffer the kernels of this config need for rows of ``hidden_bytes`` (compiled
        without NVSHMEM: no source metadata per token)."""
        _check(num_ranks < NUM_MAX_NVL_PEERS or num_ranks % NUM_MAX_NVL_PEERS == 0, "num_ranks < 8 or num_ranks % 8 == 0")
        _check(num_ranks <= NUM_MAX_NVL_PEERS or self._num_sms % 2 == 0, "num_sms % 2 == 0")
        channels = self._num_sms // 2
        nvl_ranks = min(num_ranks, NUM_MAX_NVL_PEERS)
        rdma_ranks = max(num_ranks // NUM_MAX_NVL_PEERS, 1)
        per_token = hidden_bytes + NUM_MAX_TOPK * 8 + NUM_MAX_TOPK * 4 + NUM_MAX_SCALES * 4
        num_bytes = channels * nvl_ranks * ((2 * rdma_ranks + 3) * 4 + self._nvl_recv * per_token)
        return _round_up(num_bytes, 128)

    def get_rdma_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """Bytes of RDMA buffer: none within one node; this build has no NVSHMEM for more."""
        if num_ranks <= NUM_MAX_NVL_PEERS:
            return 0
        raise RuntimeError("Failed: Assertion error NVSHMEM is disabled during compilation")


class Buffer:
    """``deep_ep.Buffer`` in normal intranode mode, over fused_a2a's ``TorchBuffer``.

    Args: as the real constructor (v1.2.1 order); ``group`` is required (no mpi4py ``comm``) and the
    fake runs neither low-latency nor internode mode.
    """

    num_sms: int = 20

    def __init__(
        self,
        group: dist.ProcessGroup,
        num_nvl_bytes: int = 0,
        num_rdma_bytes: int = 0,
        low_latency_mode: bool = False,
        num_qps_per_rank: int = 24,
        allow_nvlink_for_low_latency_mode: bool = True,
        allow_mnnvl: bool = False,
        explicitly_destroy: bool = False,
        comm=None,
    ) -> None:
        from fused_a2a.backends.torch_a2a import TorchBuffer

        if group is None:
            raise ValueError("the fake deep_ep.Buffer needs a process group (no mpi4py comm)")
        size = group.size()
        _check(num_nvl_bytes % 128 == 0 and num_rdma_bytes % 128 == 0, "buffer sizes are multiples of 128")
        _check(size < NUM_MAX_NVL_PEERS or size % NUM_MAX_NVL_PEERS == 0, "num_ranks < 8 or num_ranks % 8 == 0")
        _check(num_rdma_bytes == 0 or size > NUM_MAX_NVL_PEERS or low_latency_mode, "RDMA bytes need internode or low-latency mode")
        if low_latency_mode or size not in (2, 4, 8):
            raise NotImplementedError(f"the fake runs intranode normal mode on 2, 4 or 8 ranks, not {size} (low latency {low_latency_mode})")
        self.rank = group.rank()
        self.group = group
        self.group_size = size
        self.num_nvl_bytes = num_nvl_bytes
        self.num_rdma_bytes = num_rdma_bytes
        self.low_latency_mode = low_latency_mode
        self.explicitly_destroy = explicitly_destroy
        self.runtime = TorchBuffer(group)
        dist.monitored_barrier(group=group, timeout=COLLECTIVE_TIMEOUT)
        _record("create", self)

    @staticmethod
    def set_num_sms(new_num_sms: int) -> None:
        assert new_num_sms % 2 == 0, "The SM count must be even"
        Buffer.num_sms = new_num_sms

    @staticmethod
    def is_sm90_compiled() -> bool:
        return False

    @staticmethod
    def get_dispatch_config(num_ranks: int) -> Config:
        assert num_ranks in _DISPATCH_TABLE, f"Unsupported number of EP ranks: {num_ranks}"
        return Config(Buffer.num_sms, *_DISPATCH_TABLE[num_ranks])

    @staticmethod
    def get_combine_config(num_ranks: int) -> Config:
        assert num_ranks in _COMBINE_TABLE, f"Unsupported number of EP ranks: {num_ranks}"
        return Config(Buffer.num_sms, *_COMBINE_TABLE[num_ranks])

    def destroy(self) -> None:
        """Release the buffer. Collective; needs ``explicitly_destroy`` and the process group alive."""
        assert self.explicitly_destroy, "`explicitly_destroy` flag must be set"
        _check(self.runtime is not None, "the buffer is not destroyed yet")
        _check(dist.is_initialized(), "destroy runs before destroy_process_group (it barriers across NVLink peers)")
        dist.monitored_barrier(group=self.group, timeout=COLLECTIVE_TIMEOUT)
        _record("destroy", self)
        self.runtime = None

    def get_dispatch_layout(self, topk_idx, num_experts, previous_event=None, async_finish=False, allocate_on_comm_stream=False):
        """``(num_tokens_per_rank [R] int32, None, num_tokens_per_expert [E] int32, is_token_in_rank [N, R] bool, event)``."""
        self._check_call(previous_event, async_finish, allocate_on_comm_stream)
        _check(topk_idx.dim() == 2 and topk_idx.is_contiguous() and topk_idx.dtype == torch.int64, "topk_idx is a contiguous [N, K] int64 tensor")
        _check_ids(topk_idx, num_experts)
        per_rank, _, per_expert, in_rank, _ = self.runtime.get_dispatch_layout(topk_idx, num_experts)
        return per_rank, None, per_expert, in_rank, _event(async_finish)

    def dispatch(
        self,
        x,
        handle=None,
        num_tokens_per_rank=None,
        num_tokens_per_rdma_rank=None,
        is_token_in_rank=None,
        num_tokens_per_expert=None,
        topk_idx=None,
        topk_weights=None,
        expert_alignment=1,
        num_worst_tokens=0,
        config=None,
        previous_event=None,
        async_finish=False,
        allocate_on_comm_stream=False,
    ):
        """DeepEP's normal dispatch; returns ``(recv_x, recv_topk_idx, recv_topk_weights,
        num_recv_tokens_per_expert_list, handle, event)`` (``recv_x, None, None, None, None, event`` if cached)."""
        if isinstance(x, tuple):
            raise NotImplementedError("the fake does not dispatch FP8 (x, scales) tuples")
        config = config if config is not None else self.get_dispatch_config(self.group_size)
        self._check_call(previous_event, async_finish, allocate_on_comm_stream)
        self._check_kernel(x, config)
        if handle is not None:
            assert topk_idx is None and topk_weights is None
            self._check_handle(handle, config)
            recv_x = self.runtime.dispatch(x, handle=self._torch_handle(handle))[0]
            return recv_x, None, None, None, None, _event(async_finish)
        assert num_tokens_per_rank is not None and is_token_in_rank is not None and num_tokens_per_expert is not None
        if topk_idx is None or topk_weights is None or num_worst_tokens:
            raise NotImplementedError("the fake dispatches with topk_idx and topk_weights, without num_worst_tokens")
        _check(num_tokens_per_expert.dtype == torch.int32 and num_tokens_per_expert.dim() == 1
               and num_tokens_per_expert.is_contiguous(), "num_tokens_per_expert is a contiguous [E] int32 tensor")
        _check(num_tokens_per_expert.size(0) % self.group_size == 0, "num_tokens_per_expert->size(0) % num_ranks == 0")
        _check(topk_idx.is_contiguous() and topk_weights.is_contiguous(), "topk_idx and topk_weights are contiguous")
        if (_cpp_data_ptr(topk_idx) == 0) != (_cpp_data_ptr(topk_weights) == 0):  # a device assertion in DeepEP's kernel
            raise RuntimeError("CUDA error: unspecified launch failure (fake DeepEP: device assertion "
                               "(topk_idx == nullptr) == (topk_weights == nullptr))")
        _check_ids(topk_idx, num_tokens_per_expert.size(0))
        counts = self._received_per_expert(num_tokens_per_expert, expert_alignment)
        recv_x, recv_idx, recv_weights, _, torch_handle, _ = self.runtime.dispatch(
            x,
            num_tokens_per_rank=num_tokens_per_rank,
            is_token_in_rank=is_token_in_rank,
            num_tokens_per_expert=num_tokens_per_expert,
            topk_idx=topk_idx,
            topk_weights=topk_weights,
            expert_alignment=expert_alignment,
        )
        return recv_x, recv_idx, recv_weights, counts, self._handle(torch_handle, config), _event(async_finish)

    def combine(self, x, handle, topk_weights=None, bias=None, config=None, previous_event=None, async_finish=False, allocate_on_comm_stream=False):
        """DeepEP's normal combine (bf16 only); returns ``(combined_x [N, H], combined_topk_weights or None, event)``."""
        config = config if config is not None else self.get_combine_config(self.group_size)
        self._check_call(previous_event, async_finish, allocate_on_comm_stream)
        _check(x.dtype == torch.bfloat16, f"combine supports bfloat16 only, got {x.dtype}")
        self._check_kernel(x, config)
        self._check_handle(handle, config)
        _check(x.size(0) == handle[3].size(0), "x.size(0) == num_recv_tokens of the handle")
        _check(topk_weights is None or topk_weights.dtype == torch.float32, "topk_weights are float32")
        combined, combined_weights, _ = self.runtime.combine(x, self._torch_handle(handle), topk_weights=topk_weights, bias=bias)
        return combined, combined_weights, _event(async_finish)

    def _received_per_expert(self, num_tokens_per_expert: torch.Tensor, expert_alignment: int) -> list[int]:
        """``notify_dispatch``: each local expert's count summed over the senders' ``num_tokens_per_expert``
        (only returned, never used for sizes), rounded up to ``expert_alignment`` (collective)."""
        every = [torch.empty_like(num_tokens_per_expert) for _ in range(self.group_size)]
        dist.all_gather(every, num_tokens_per_expert, group=self.group)
        local = num_tokens_per_expert.size(0) // self.group_size
        mine = torch.stack(every)[:, self.rank * local:(self.rank + 1) * local].sum(0, dtype=torch.int32)
        return ((mine + expert_alignment - 1) // expert_alignment * expert_alignment).tolist()

    def _check_call(self, previous_event, async_finish: bool, allocate_on_comm_stream: bool) -> None:
        _check(self.runtime is not None, "the buffer is alive (not destroyed)")
        if allocate_on_comm_stream:
            _check(previous_event is not None and async_finish, "allocate_on_comm_stream needs previous_event and async_finish")

    def _check_kernel(self, x: torch.Tensor, config: Config) -> None:
        _check(config._num_sms % 2 == 0, f"config.num_sms % 2 == 0 (got {config._num_sms})")
        _check(x.dim() == 2 and x.is_contiguous(), "x is a contiguous [N, H] tensor")
        rows_aligned(x, "DeepEP")
        row_bytes = x.size(1) * x.element_size()
        _check(row_bytes % 16 == 0, f"hidden * element_size % 16 == 0 (got {row_bytes} bytes)")
        needed = config.get_nvl_buffer_size_hint(row_bytes, self.group_size)
        _check(needed <= self.num_nvl_bytes, f"the config needs {needed} NVL bytes, the buffer has {self.num_nvl_bytes}")

    def _check_handle(self, handle: tuple, config: Config) -> None:
        _check(isinstance(handle, tuple) and len(handle) == 6, "an intranode handle is a 6-tuple")
        _check(handle[1].size(1) == config._num_sms // 2, f"the handle has {handle[1].size(1)} channels, the config {config._num_sms // 2}")

    def _handle(self, torch_handle, config: Config) -> tuple:
        """DeepEP's intranode handle of a torch-backend dispatch (collective)."""
        size, rank, channels = self.group_size, self.rank, config._num_sms // 2
        in_rank, num_tokens = torch_handle.is_token_in_rank, torch_handle.num_tokens
        send_counts = torch.tensor(torch_handle.send_counts, dtype=torch.int64)
        all_counts = [torch.empty_like(send_counts) for _ in range(size)]
        dist.all_gather(all_counts, send_counts, group=self.group)
        rank_prefix_matrix = torch.stack(all_counts).cumsum(0)
        tokens_per_channel = max(1, -(-num_tokens // channels))
        channel = torch.nn.functional.one_hot(torch.arange(num_tokens) // tokens_per_channel, channels)
        channel_prefix_matrix = (in_rank.t().long() @ channel.long()).cumsum(1)
        recv_channel_prefix_matrix = torch.empty_like(channel_prefix_matrix)
        dist.all_to_all_single(recv_channel_prefix_matrix, channel_prefix_matrix, group=self.group)
        recv_src_idx = torch.empty(sum(torch_handle.recv_counts), dtype=torch.int64)
        dist.all_to_all_single(
            recv_src_idx, torch_handle.send_token_idx, list(torch_handle.recv_counts), list(torch_handle.send_counts), group=self.group
        )
        first_slot = rank_prefix_matrix[rank - 1] if rank else torch.zeros(size, dtype=torch.int64)
        send_head = torch.full((num_tokens, size), -1, dtype=torch.int32)
        for dest in range(size):
            tokens = in_rank[:, dest].nonzero().squeeze(1)
            send_head[tokens, dest] = (first_slot[dest] + torch.arange(tokens.numel())).to(torch.int32)
        return (
            rank_prefix_matrix.to(torch.int32),
            channel_prefix_matrix.to(torch.int32),
            recv_channel_prefix_matrix.to(torch.int32),
            recv_src_idx.to(torch.int32),
            in_rank,
            send_head,
        )

    def _torch_handle(self, handle: tuple):
        """The torch-backend handle that a DeepEP intranode handle stands for."""
        from fused_a2a.backends.torch_a2a import TorchHandle

        rank_prefix_matrix, _, _, _, in_rank, _ = handle
        column = rank_prefix_matrix[:, self.rank].long()
        recv_counts = torch.diff(column, prepend=column.new_zeros(1))
        return TorchHandle(
            group=self.group,
            send_token_idx=in_rank.t().nonzero(as_tuple=True)[1],
            send_counts=tuple(in_rank.sum(dim=0).tolist()),
            recv_counts=tuple(recv_counts.tolist()),
            num_tokens=in_rank.size(0),
        )


def _check_ids(topk_idx: torch.Tensor, num_experts: int) -> None:
    """DeepEP reads an expert id outside ``[-1, num_experts)`` out of bounds (undefined behaviour on that
    rank alone): the fake stops that rank instead, so a caller that lets one through fails here."""
    _check(topk_idx.numel() == 0 or bool(((topk_idx >= -1) & (topk_idx < num_experts)).all()),
           f"topk_idx values lie in [-1, {num_experts}) (DeepEP reads others out of bounds)")


def _event(async_finish: bool) -> EventOverlap:
    return EventOverlap(EventHandle() if async_finish else None)
