"""A CPU fake of ``uccl.ep`` (PyPI ``uccl`` 0.1.1): the pointer-level API, normal intranode mode. Tests only.

Every call takes integer addresses (``tensor.data_ptr()``) of CPU tensors, reads and writes the caller's
memory through tensor views at those addresses, and computes real results with fused_a2a's torch backend
over the default (gloo) process group. It enforces the parts of the contract an adapter must honour
(``RuntimeError`` where the C++ code asserts, ``TypeError`` where nanobind rejects an argument):

* ``Config``: the constructor's asserts, read-only fields, the size hints of ``ep_config.hpp``;
* proxies: the native ``Buffer`` refuses to exist unless proxies were registered for its device (and
  mode); registering a device twice raises (the real library aborts the process); ``Proxy`` records its
  ``start_*`` and ``stop`` calls, and ``stop`` of a proxy never started raises, as 0.1.1's does;
* ``Buffer``: ``sync`` needs one device id and one 64-byte IPC handle per rank, in rank order, and every
  kernel call needs it first; ``destroy`` needs ``explicitly_destroy``, runs once, is collective and
  needs the process group alive;
* ``intranode_prepare``'s per-expert counts are ``notify_dispatch``'s: each local expert's entries of the
  senders' ``num_tokens_per_expert`` summed, aligned up; expert ids outside ``[-1, E)`` stop the rank
  (the real kernels would read out of bounds);
* kernels: no null pointers where the real ones assert, ``num_tokens > 0`` (0.1.1), an even SM count,
  16-byte rows, an NVLink buffer at least as large as the config's size hint (stricter than the real
  kernels, which would overrun it), events as native ``EventHandle`` objects, combine bf16-only, and
  combine reads the handle the dispatch wrote (``send_head``, ``recv_src_idx``, the receive-side channel
  prefix matrix), so an adapter passing the wrong tensor fails here.

:data:`EVENTS` records ``("register", device, num_proxies)``, ``("buffer", id)``, ``("sync", id)``,
``("proxy_start", thread, method)``, ``("destroy", id)``, ``("proxy_stop", thread)`` and
``("unregister", device)`` in the order they happen.
"""

from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

EVENTS: list[tuple] = []
COLLECTIVE_TIMEOUT = timedelta(seconds=60)
NUM_MAX_NVL_PEERS = 8
NUM_MAX_LOCAL_EXPERTS = 1024
NUM_PROXY_THREADS = 4
IPC_HANDLE_SIZE = 64
SOURCE_META_BYTES = 8
BF16_CODE = 6

_proxies: dict[tuple[int, bool], list[Proxy]] = {}


def _check(condition: bool, message: str) -> None:
    """UCCL-EP's ``EP_HOST_ASSERT``: a C++ exception, which nanobind raises as ``RuntimeError``."""
    if not condition:
        raise RuntimeError(f"Assertion failed: {message}")


def _current_device() -> int:
    """``cudaGetDevice`` of this CPU process: one device, 0."""
    return 0


def _row_loads(ptr: int) -> None:
    """The kernels load rows with 16-byte vector loads and TMA and check no alignment on the host: a row
    pointer off a 16-byte boundary faults on the device, which this fake raises as the error CUDA gives."""
    if ptr % 16:
        raise RuntimeError("CUDA error: misaligned address (fake UCCL-EP: a row pointer off a 16-byte boundary)")


def _view(ptr: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """The ``shape`` tensor of ``dtype`` at address ``ptr`` (the caller's memory, not a copy)."""
    if not isinstance(ptr, int):
        raise TypeError(f"pointers are ints, got {type(ptr).__name__}")
    nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    _check(ptr != 0, "pointer != 0")
    return torch.frombuffer((ctypes.c_byte * nbytes).from_address(ptr), dtype=dtype).view(shape)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


@dataclass(frozen=True)
class Config:
    """``uccl.ep.Config``: SM count and chunk sizes (tokens) of one normal-mode kernel; fields read-only."""

    num_sms: int = 20
    num_max_nvl_chunked_send_tokens: int = 6
    num_max_nvl_chunked_recv_tokens: int = 256
    num_max_rdma_chunked_send_tokens: int = 6
    num_max_rdma_chunked_recv_tokens: int = 256

    def __post_init__(self) -> None:
        nvl_send, nvl_recv = self.num_max_nvl_chunked_send_tokens, self.num_max_nvl_chunked_recv_tokens
        rdma_send, rdma_recv = self.num_max_rdma_chunked_send_tokens, self.num_max_rdma_chunked_recv_tokens
        _check(self.num_sms >= 0, "num_sms >= 0")
        _check(nvl_send > 0 and nvl_recv > 0, "num_max_nvl_chunked_send_tokens > 0 and num_max_nvl_chunked_recv_tokens > 0")
        _check(nvl_send < nvl_recv, "num_max_nvl_chunked_send_tokens < num_max_nvl_chunked_recv_tokens")
        _check(rdma_send > 0 and rdma_recv > 0, "num_max_rdma_chunked_send_tokens > 0 and num_max_rdma_chunked_recv_tokens > 0")
        rdma_recv = _round_up(rdma_recv, rdma_send)
        object.__setattr__(self, "num_max_rdma_chunked_recv_tokens", rdma_recv)
        _check(rdma_send < rdma_recv, "num_max_rdma_chunked_send_tokens < num_max_rdma_chunked_recv_tokens")
        _check(rdma_send <= rdma_recv / 2, "num_max_rdma_chunked_send_tokens <= num_max_rdma_chunked_recv_tokens / 2")

    def get_nvl_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """NVLink buffer bytes the kernels of this config need for rows of ``hidden_bytes``."""
        _check(num_ranks < NUM_MAX_NVL_PEERS or num_ranks % NUM_MAX_NVL_PEERS == 0, "num_ranks < 8 or num_ranks % 8 == 0")
        _check(num_ranks <= NUM_MAX_NVL_PEERS or self.num_sms % 2 == 0, "num_sms % 2 == 0")
        channels, nvl_ranks = self.num_sms // 2, min(num_ranks, NUM_MAX_NVL_PEERS)
        rdma_ranks = max(num_ranks // NUM_MAX_NVL_PEERS, 1)
        per_token = hidden_bytes + SOURCE_META_BYTES + 128 * 8 + 128 * 4 + 128 * 4
        num_bytes = channels * nvl_ranks * ((2 * rdma_ranks + 3) * 4 + self.num_max_nvl_chunked_recv_tokens * per_token)
        return _round_up(num_bytes, 128)

    def get_rdma_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """RDMA buffer bytes: none within one node (the fake runs nothing else)."""
        if num_ranks <= NUM_MAX_NVL_PEERS:
            return 0
        raise NotImplementedError("the fake has no internode mode")


class EventHandle:
    """A CUDA event recorded on the stream ``stream_ptr`` (default: the legacy default stream)."""

    def __init__(self, stream_ptr: int = 0) -> None:
        if not isinstance(stream_ptr, int):
            raise TypeError(f"stream_ptr is an int, got {type(stream_ptr).__name__}")
        self.stream_ptr = stream_ptr

    def current_stream_wait(self, stream_ptr: int) -> None:
        """Make the stream ``stream_ptr`` wait for the event: nothing to wait for on the CPU."""
        if not isinstance(stream_ptr, int):
            raise TypeError(f"stream_ptr is an int, got {type(stream_ptr).__name__}")


class Proxy:
    """A CPU proxy thread of UCCL-EP (its 0.1.1 constructor); records ``start_*`` and ``stop`` in :data:`EVENTS`."""

    def __init__(
        self,
        thread_idx: int,
        gpu_buffer_addr: int,
        total_size: int,
        rank: int = 0,
        node_idx: int = -1,
        local_rank: int = 0,
        num_experts: int = -1,
        num_ranks: int = -1,
        num_nodes: int = 0,
        use_normal_mode: bool = False,
        is_intranode: bool = False,
        gpu_buffer_is_host_allocated: bool = False,
    ) -> None:
        _check(gpu_buffer_addr != 0, "gpu_buffer_addr != 0")
        self.thread_idx = thread_idx
        self.gpu_buffer_addr = gpu_buffer_addr
        self.total_size = total_size
        self.rank = rank
        self.is_intranode = is_intranode
        self.normal_mode = use_normal_mode
        self.started: list[str] = []
        self.atomic_buffer_ptr = 0x1000 * (rank + 1) if thread_idx == 0 else 0

    def use_normal_mode(self) -> bool:
        return self.normal_mode

    def _start(self, method: str) -> None:
        self.started.append(method)
        EVENTS.append(("proxy_start", self.thread_idx, method))

    def start_dual(self) -> None:
        self._start("start_dual")

    def start_sender(self) -> None:
        self._start("start_sender")

    def start_remote(self) -> None:
        self._start("start_remote")

    def start_local(self) -> None:
        self._start("start_local")

    def stop(self) -> None:
        """Stop the proxy's threads; uccl 0.1.1 raises for a proxy that was never started."""
        _check(bool(self.started), "Proxy already stopped")
        self.started.clear()
        EVENTS.append(("proxy_stop", self.thread_idx))

    def get_listen_port(self) -> int:
        return 0

    def get_atomic_buffer_ptr(self) -> int:
        return self.atomic_buffer_ptr

    def set_atomic_buffer_ptr(self, ptr: int) -> None:
        self.atomic_buffer_ptr = ptr

    def notify_proxy_thread_adaptive_sleeper(self) -> None:
        """Wake the proxy thread (internode calls only)."""


def register_proxies(device_index: int, proxies: list[Proxy]) -> None:
    """Register the proxies of ``device_index``; a second registration aborts the real process."""
    _check(len(proxies) > 0, f"register_proxies: empty proxy vector for device {device_index}")
    low_latency = not proxies[0].use_normal_mode()
    _check(all(p.use_normal_mode() != low_latency for p in proxies), "register_proxies: mixed-mode proxies")
    _check(not _proxies.get((device_index, low_latency)),
           f"overwriting existing proxies for device {device_index} (the real library aborts the process)")
    _proxies[(device_index, low_latency)] = list(proxies)
    EVENTS.append(("register", device_index, len(proxies)))


def register_proxy(device_index: int, proxy: Proxy) -> None:
    register_proxies(device_index, [proxy])


def unregister_proxy(device_index: int) -> None:
    for key in [key for key in _proxies if key[0] == device_index]:
        del _proxies[key]
    EVENTS.append(("unregister", device_index))


def has_proxy(device_index: int) -> bool:
    return any(key[0] == device_index and proxies for key, proxies in _proxies.items())


def stop_all_registered_proxies() -> None:
    for proxies in _proxies.values():
        for proxy in proxies:
            if proxy.started:
                proxy.stop()
    _proxies.clear()


def get_rdma_buffer(num_rdma_bytes: int, device_index: int):
    """The RDMA scratch buffer (at least one byte) as a DLPack capsule, and whether it is host memory."""
    return torch.zeros(max(num_rdma_bytes, 1), dtype=torch.uint8).__dlpack__(), False


def get_num_proxy_threads() -> int:
    return NUM_PROXY_THREADS


def is_sm90_compiled() -> bool:
    return False


def connect_atomic_buffer(proxy: Proxy, buffer: Buffer) -> None:
    buffer.atomic_buffer_ptr = proxy.get_atomic_buffer_ptr()


def _ipc_handle(rank: int) -> bytes:
    return f"fake-cuda-ipc-handle-of-rank-{rank}".encode().ljust(IPC_HANDLE_SIZE, b"\0")


class Buffer:
    """The native buffer: normal intranode mode over fused_a2a's ``TorchBuffer`` on the default group."""

    def __init__(
        self,
        rank: int,
        num_ranks: int,
        num_nvl_bytes: int = 0,
        num_rdma_bytes: int = 0,
        low_latency_mode: bool = False,
        explicitly_destroy: bool = False,
        num_local_ranks: int = -1,
    ) -> None:
        from fused_a2a.backends.torch_a2a import TorchBuffer

        device = _current_device()
        if not _proxies.get((device, low_latency_mode)):
            raise RuntimeError(
                f"ep.Buffer: no UcclProxy registered for device {device}. "
                "Call uccl.ep.register_proxies(device_index, proxies) first."
            )
        _check(num_nvl_bytes % 128 == 0 and num_rdma_bytes % 128 == 0, "buffer sizes are multiples of 128")
        _check(0 <= rank < num_ranks, "0 <= rank < num_ranks")
        max_nvl_peers = NUM_MAX_NVL_PEERS if num_local_ranks == -1 else num_local_ranks
        _check(num_ranks < max_nvl_peers or num_ranks % max_nvl_peers == 0, "num_ranks < max_nvl_peers or num_ranks % max_nvl_peers == 0")
        if low_latency_mode or num_ranks > max_nvl_peers:
            raise NotImplementedError("the fake runs normal intranode mode only")
        _check(rank == dist.get_rank() and num_ranks == dist.get_world_size(), "the fake runs on the default process group")
        self.rank, self.num_ranks = rank, num_ranks
        self.num_nvl_bytes, self.num_rdma_bytes = num_nvl_bytes, num_rdma_bytes
        self.explicitly_destroy = explicitly_destroy
        self.num_local_ranks = num_local_ranks
        self.atomic_buffer_ptr = 0
        self.available = False
        self.destroyed = False
        self.torch = TorchBuffer(None)
        EVENTS.append(("buffer", id(self)))

    def get_local_device_id(self) -> int:
        return _current_device()

    def get_local_ipc_handle(self) -> bytes:
        return _ipc_handle(self.rank)

    def get_num_rdma_ranks(self) -> int:
        return 1

    def get_comm_stream(self) -> int:
        return 0

    def is_available(self) -> bool:
        return self.available

    def sync(self, device_ids, all_gathered_handles, root_unique_id_opt=None, all_gathered_rdma_handles=None) -> None:
        """Open the peers' NVLink buffers: one device id and one IPC handle per rank, in rank order."""
        _check(not self.available, "not is_available()")
        _check(len(device_ids) == self.num_ranks, f"one device id per rank ({len(device_ids)} for {self.num_ranks} ranks)")
        _check(len(all_gathered_handles) == len(device_ids), "device_ids.size() == all_gathered_handles.size()")
        for rank, handle in enumerate(all_gathered_handles):
            _check(handle == _ipc_handle(rank), f"the IPC handle of rank {rank} at index {rank}")
        _check(all_gathered_rdma_handles is None or len(all_gathered_rdma_handles) == self.num_ranks, "one RDMA handle per rank")
        self.available = True
        EVENTS.append(("sync", id(self)))

    def destroy(self) -> None:
        """Release the buffer: once, collective (the real one barriers across NVLink peers)."""
        assert self.explicitly_destroy, "`explicitly_destroy` flag must be set"
        _check(not self.destroyed, "not destroyed")
        _check(dist.is_initialized(), "destroy runs before destroy_process_group (it barriers across NVLink peers)")
        dist.monitored_barrier(timeout=COLLECTIVE_TIMEOUT)
        self.destroyed = True
        self.available = False
        EVENTS.append(("destroy", id(self)))

    def get_dispatch_layout(
        self, topk_idx_ptr, num_tokens, num_topk, num_experts, num_tokens_per_rank_ptr, num_tokens_per_rdma_rank_ptr,
        num_tokens_per_expert_ptr, is_token_in_rank_ptr, previous_event=None, async_=False,
        allocate_on_comm_stream=False, compute_stream_ptr=0,
    ):
        """Write ``num_tokens_per_rank [R]``, ``num_tokens_per_expert [E]`` (int32) and ``is_token_in_rank [N, R]``."""
        self._check_call(previous_event, compute_stream_ptr)
        _check(num_experts > 0, "num_experts > 0")
        _check(num_tokens_per_rdma_rank_ptr == 0, "no RDMA ranks within one node")
        topk_idx = _view(topk_idx_ptr, (num_tokens, num_topk), torch.int64)
        _check_ids(topk_idx, num_experts)
        per_rank, _, per_expert, in_rank, _ = self.torch.get_dispatch_layout(topk_idx, num_experts)
        _view(num_tokens_per_rank_ptr, (self.num_ranks,), torch.int32).copy_(per_rank)
        _view(num_tokens_per_expert_ptr, (num_experts,), torch.int32).copy_(per_expert)
        _view(is_token_in_rank_ptr, (num_tokens, self.num_ranks), torch.bool).copy_(in_rank)
        return _event(async_, compute_stream_ptr)

    def intranode_prepare(
        self, num_tokens_per_rank_ptr, is_token_in_rank_ptr, num_tokens_per_expert_ptr, num_tokens, num_experts,
        rank_prefix_matrix_ptr, channel_prefix_matrix_ptr, expert_alignment, num_worst_tokens, config,
        previous_event=None, async_=False, allocate_on_comm_stream=False, compute_stream_ptr=0,
    ):
        """Exchange the counts (collective); write ``rank_prefix_matrix [R, R]`` and ``channel_prefix_matrix
        [R, num_sms / 2]`` (int32). Returns ``(num_recv_tokens, per-local-expert counts aligned up, event)``."""
        self._check_call(previous_event, compute_stream_ptr)
        _check(num_tokens > 0, "num_tokens > 0")
        _check(num_experts > 0, "num_experts > 0")
        _check(config.num_sms % 2 == 0, "config.num_sms % 2 == 0")
        size, channels, num_local = self.num_ranks, config.num_sms // 2, num_experts // self.num_ranks
        _check(num_local <= NUM_MAX_LOCAL_EXPERTS, "num_local_experts <= NUM_MAX_LOCAL_EXPERTS")
        _check(size * (size + num_local) * 4 <= self.num_nvl_bytes, "the counts fit the NVLink buffer")
        per_rank = _view(num_tokens_per_rank_ptr, (size,), torch.int32)
        in_rank = _view(is_token_in_rank_ptr, (num_tokens, size), torch.bool)
        per_expert = _view(num_tokens_per_expert_ptr, (num_experts,), torch.int32)
        sent = _all_gather(per_rank.long())
        _view(rank_prefix_matrix_ptr, (size, size), torch.int32).copy_(sent.cumsum(0))
        _view(channel_prefix_matrix_ptr, (size, channels), torch.int32).copy_(_channel_prefix(in_rank, channels))
        mine = _all_gather(per_expert.long())[:, self.rank * num_local : (self.rank + 1) * num_local].sum(0)
        aligned = (mine + expert_alignment - 1) // expert_alignment * expert_alignment
        if num_worst_tokens > 0:
            return num_worst_tokens, [], _event(async_, compute_stream_ptr)
        return int(sent[:, self.rank].sum()), aligned.tolist(), _event(async_, compute_stream_ptr)

    def intranode_dispatch(
        self, x_ptr, num_tokens, hidden, x_element_size, x_scales_ptr, num_scales, scale_token_stride,
        scale_hidden_stride, topk_idx_ptr, num_topk, topk_weights_ptr, is_token_in_rank_ptr, rank_prefix_matrix_ptr,
        channel_prefix_matrix_ptr, num_experts, num_worst_tokens, cached_mode, config, num_recv_tokens, recv_x_ptr,
        recv_x_scales_ptr, recv_topk_idx_ptr, recv_topk_weights_ptr, recv_channel_prefix_matrix_ptr,
        recv_src_idx_ptr, send_head_ptr, previous_event=None, async_=False, allocate_on_comm_stream=False,
        compute_stream_ptr=0,
    ):
        """Move the rows of ``x`` (raw bytes) to the ranks of ``is_token_in_rank``; non-cached, also the
        top-k (as local ids) and write the handle's receive side and ``send_head``. Collective."""
        self._check_call(previous_event, compute_stream_ptr)
        for name, ptr in (("x", x_ptr), ("is_token_in_rank", is_token_in_rank_ptr), ("channel_prefix_matrix", channel_prefix_matrix_ptr),
                          ("recv_x", recv_x_ptr), ("recv_channel_prefix_matrix", recv_channel_prefix_matrix_ptr),
                          ("recv_src_idx", recv_src_idx_ptr), ("send_head", send_head_ptr)):
            _check(ptr != 0, f"{name}_ptr != 0")
        _check(num_tokens > 0 and hidden > 0 and num_recv_tokens >= 0, "num_tokens > 0 and hidden > 0 and num_recv_tokens >= 0")
        row_bytes = hidden * x_element_size
        _check(row_bytes % 16 == 0, f"hidden * x_element_size % 16 == 0 (got {row_bytes})")
        _check(config.num_sms % 2 == 0, "config.num_sms % 2 == 0")
        _row_loads(x_ptr)
        self._check_nvl_bytes(config, row_bytes)
        if x_scales_ptr or num_worst_tokens:
            raise NotImplementedError("the fake dispatches without FP8 scales and without num_worst_tokens")
        size, channels = self.num_ranks, config.num_sms // 2
        # rows move as raw bytes: 32-bit words (the torch backend moves floats; copies keep every bit)
        x = _view(x_ptr, (num_tokens, row_bytes // 4), torch.float32)
        in_rank = _view(is_token_in_rank_ptr, (num_tokens, size), torch.bool)
        rank_prefix_matrix = _view(rank_prefix_matrix_ptr, (size, size), torch.int32)
        if cached_mode:
            _check(rank_prefix_matrix_ptr != 0, "rank_prefix_matrix_ptr != 0")
            recv_x = self.torch.dispatch(x, handle=self._torch_handle(rank_prefix_matrix, in_rank))[0]
            _check(recv_x.size(0) == num_recv_tokens, f"num_recv_tokens {num_recv_tokens} is the handle's ({recv_x.size(0)})")
            _view(recv_x_ptr, (num_recv_tokens, row_bytes // 4), torch.float32).copy_(recv_x)
            return _event(async_, compute_stream_ptr)
        if not (topk_idx_ptr and topk_weights_ptr and num_topk > 0):
            raise NotImplementedError("the fake dispatches with topk_idx and topk_weights")
        _check(torch.equal(_channel_prefix(in_rank, channels), _view(channel_prefix_matrix_ptr, (size, channels), torch.int32).long()),
               "channel_prefix_matrix is what intranode_prepare wrote")
        topk_idx = _view(topk_idx_ptr, (num_tokens, num_topk), torch.int64)
        _check_ids(topk_idx, num_experts)
        topk_weights = _view(topk_weights_ptr, (num_tokens, num_topk), torch.float32)
        recv_x, recv_idx, recv_weights, _, handle, _ = self.torch.dispatch(
            x, num_tokens_per_rank=in_rank.sum(0).int(), is_token_in_rank=in_rank,
            num_tokens_per_expert=torch.zeros(num_experts, dtype=torch.int32), topk_idx=topk_idx, topk_weights=topk_weights,
        )
        _check(recv_x.size(0) == num_recv_tokens, f"num_recv_tokens {num_recv_tokens} is what intranode_prepare returned ({recv_x.size(0)})")
        _view(recv_x_ptr, (num_recv_tokens, row_bytes // 4), torch.float32).copy_(recv_x)
        if recv_topk_idx_ptr:
            _view(recv_topk_idx_ptr, (num_recv_tokens, num_topk), torch.int64).copy_(recv_idx)
        if recv_topk_weights_ptr:
            _view(recv_topk_weights_ptr, (num_recv_tokens, num_topk), torch.float32).copy_(recv_weights)
        _view(recv_src_idx_ptr, (num_recv_tokens,), torch.int32).copy_(self._recv_src_idx(handle))
        _view(recv_channel_prefix_matrix_ptr, (size, channels), torch.int32).copy_(self._recv_channel_prefix(in_rank, channels))
        _view(send_head_ptr, (num_tokens, size), torch.int32).copy_(self._send_head(rank_prefix_matrix, in_rank))
        return _event(async_, compute_stream_ptr)

    def intranode_combine(
        self, x_ptr, num_tokens, hidden, x_dtype_code, x_element_size, topk_weights_ptr, num_topk, bias_0_ptr,
        bias_1_ptr, src_idx_ptr, num_recv_tokens, rank_prefix_matrix_ptr, channel_prefix_matrix_ptr, send_head_ptr,
        config, recv_x_ptr, recv_topk_weights_ptr, previous_event=None, async_=False, allocate_on_comm_stream=False,
        compute_stream_ptr=0,
    ):
        """Sum each token's ``num_tokens`` received rows (bf16) back on its source: write ``recv_x
        [num_recv_tokens, hidden]`` and, with top-k weights, ``recv_topk_weights``. Collective."""
        self._check_call(previous_event, compute_stream_ptr)
        for name, ptr in (("x", x_ptr), ("src_idx", src_idx_ptr), ("rank_prefix_matrix", rank_prefix_matrix_ptr),
                          ("channel_prefix_matrix", channel_prefix_matrix_ptr), ("send_head", send_head_ptr), ("recv_x", recv_x_ptr)):
            _check(ptr != 0, f"{name}_ptr != 0")
        _check(x_dtype_code == BF16_CODE and x_element_size == 2, f"combine is compiled for bf16 only (dtype code {x_dtype_code})")
        _check(hidden * x_element_size % 16 == 0, "hidden * x_element_size % 16 == 0")
        _check(config.num_sms % 2 == 0, "config.num_sms % 2 == 0")
        size, channels = self.num_ranks, config.num_sms // 2
        _check(channels * size * 4 * 2 <= self.num_nvl_bytes, "the combine counters fit the NVLink buffer")
        self._check_nvl_bytes(config, hidden * x_element_size)
        send_head = _view(send_head_ptr, (num_recv_tokens, size), torch.int32)
        in_rank = send_head >= 0
        handle = self._torch_handle(_view(rank_prefix_matrix_ptr, (size, size), torch.int32), in_rank)
        _check(torch.equal(_view(src_idx_ptr, (num_tokens,), torch.int32).long(), self._recv_src_idx(handle)),
               "src_idx is the dispatch's recv_src_idx")
        _check(torch.equal(_view(channel_prefix_matrix_ptr, (size, channels), torch.int32).long(), self._recv_channel_prefix(in_rank, channels)),
               "channel_prefix_matrix is the dispatch's receive-side (recv_channel_prefix_matrix) with the config's channels")
        _row_loads(x_ptr)
        x = _view(x_ptr, (num_tokens, hidden), torch.bfloat16)
        weights = _view(topk_weights_ptr, (num_tokens, num_topk), torch.float32) if topk_weights_ptr else None
        bias = tuple(_view(ptr, (num_recv_tokens, hidden), torch.bfloat16) for ptr in (bias_0_ptr, bias_1_ptr) if ptr)
        combined, combined_weights, _ = self.torch.combine(x, handle, topk_weights=weights, bias=bias)
        _view(recv_x_ptr, (num_recv_tokens, hidden), torch.bfloat16).copy_(combined)
        if recv_topk_weights_ptr and weights is not None:
            _view(recv_topk_weights_ptr, (num_recv_tokens, num_topk), torch.float32).copy_(combined_weights)
        return _event(async_, compute_stream_ptr)

    def _check_call(self, previous_event, compute_stream_ptr) -> None:
        _check(self.available and not self.destroyed, "is_available() (sync done, not destroyed)")
        if previous_event is not None and not isinstance(previous_event, EventHandle):
            raise TypeError(f"previous_event is an ep.EventHandle or None, got {type(previous_event).__name__}")
        if not isinstance(compute_stream_ptr, int):
            raise TypeError(f"compute_stream_ptr is an int, got {type(compute_stream_ptr).__name__}")

    def _check_nvl_bytes(self, config: Config, row_bytes: int) -> None:
        needed = config.get_nvl_buffer_size_hint(row_bytes, self.num_ranks)
        _check(needed <= self.num_nvl_bytes, f"the config needs {needed} NVL bytes, the buffer has {self.num_nvl_bytes}")

    def _torch_handle(self, rank_prefix_matrix: torch.Tensor, in_rank: torch.Tensor):
        """The torch-backend handle of a dispatch with this rank prefix matrix and ``is_token_in_rank``."""
        from fused_a2a.backends.torch_a2a import TorchHandle

        column = rank_prefix_matrix[:, self.rank].long()
        return TorchHandle(
            group=None,
            send_token_idx=in_rank.t().nonzero(as_tuple=True)[1],
            send_counts=tuple(in_rank.sum(dim=0).tolist()),
            recv_counts=tuple(torch.diff(column, prepend=column.new_zeros(1)).tolist()),
            num_tokens=in_rank.size(0),
        )

    def _recv_src_idx(self, handle) -> torch.Tensor:
        """``[M]`` int64: the source token index of each received row (collective)."""
        out = torch.empty(handle.num_recv_tokens, dtype=torch.int64)
        dist.all_to_all_single(out, handle.send_token_idx, list(handle.recv_counts), list(handle.send_counts))
        return out

    def _recv_channel_prefix(self, in_rank: torch.Tensor, channels: int) -> torch.Tensor:
        """``[R, C]`` int64: each source rank's channel prefix matrix row for this rank (collective)."""
        out = torch.empty(self.num_ranks, channels, dtype=torch.int64)
        dist.all_to_all_single(out, _channel_prefix(in_rank, channels))
        return out

    def _send_head(self, rank_prefix_matrix: torch.Tensor, in_rank: torch.Tensor) -> torch.Tensor:
        """``[N, R]`` int32: the slot of each token among each rank's received rows, ``-1`` if not sent there."""
        size = self.num_ranks
        first_slot = rank_prefix_matrix[self.rank - 1].long() if self.rank else torch.zeros(size, dtype=torch.int64)
        send_head = torch.full((in_rank.size(0), size), -1, dtype=torch.int32)
        for dest in range(size):
            tokens = in_rank[:, dest].nonzero().squeeze(1)
            send_head[tokens, dest] = (first_slot[dest] + torch.arange(tokens.numel())).to(torch.int32)
        return send_head


def _check_ids(topk_idx: torch.Tensor, num_experts: int) -> None:
    """UCCL-EP reads an expert id outside ``[-1, num_experts)`` out of bounds (undefined behaviour on
    that rank alone): the fake stops that rank instead, so a caller that lets one through fails here."""
    _check(topk_idx.numel() == 0 or bool(((topk_idx >= -1) & (topk_idx < num_experts)).all()),
           f"topk_idx values lie in [-1, {num_experts}) (UCCL-EP reads others out of bounds)")


def _channel_prefix(in_rank: torch.Tensor, channels: int) -> torch.Tensor:
    """``[R, C]`` int64: per destination rank, inclusive prefix over channels (contiguous token ranges of
    ``ceil(N / C)`` tokens) of the tokens sent to it."""
    per_channel = max(1, -(-in_rank.size(0) // channels))
    channel = torch.nn.functional.one_hot(torch.arange(in_rank.size(0)) // per_channel, channels)
    return (in_rank.t().long() @ channel.long()).cumsum(1)


def _all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """``[W, *tensor.shape]``: ``tensor`` of every rank of the default group."""
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor)
    return torch.stack(parts)


def _event(async_: bool, stream_ptr: int) -> EventHandle | None:
    return EventHandle(stream_ptr) if async_ else None
