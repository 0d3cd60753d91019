"""Rank functions of ``tests/test_uccl_adapter.py``: they run fused_a2a on the CPU fake of ``uccl.ep``.

``spawn(worker, n, ..., sys_path=FAKES)`` puts ``tests/fakes`` first on each rank's ``sys.path`` before
the worker runs, and the workers import fused_a2a inside their bodies: fused_a2a detects ``uccl.ep`` when
it is imported, so it finds the fake. This module imports nothing that imports fused_a2a, because the
test process imports it to name the workers and must keep running without uccl.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from reference import BF16_CASES, check_case

FAKES = (str(Path(__file__).parent / "fakes"),)

CPU = torch.device("cpu")


def _fused_a2a():
    """fused_a2a as this rank imports it, checked to run on the fake uccl.ep."""
    import fused_a2a
    from uccl import ep

    assert fused_a2a.HAVE_UCCL_EP and ep.__file__.startswith(FAKES[0]), "fused_a2a did not find the fake uccl.ep"
    return fused_a2a


def _dispatch_inputs(rank: int, hidden: int = 32, num_tokens: int = 64, num_experts: int = 8):
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(num_tokens, hidden, generator=gen).to(torch.bfloat16)
    idx = torch.stack([torch.randperm(num_experts, generator=gen)[:2] for _ in range(num_tokens)])
    return x, idx, torch.rand(num_tokens, 2, generator=gen)


def _seed_calls(fused_a2a, group, **flags):
    def dispatch_fn(x, idx, weights, num_experts):
        return fused_a2a.uccl_fused_dispatch(x, idx, weights, num_experts, group, **flags)

    def combine_fn(y, handle):
        return fused_a2a.uccl_fused_combine(y, group, handle, **flags)[0]

    return dispatch_fn, combine_fn


def reference_cases(rank: int, world_size: int) -> None:
    """The seed functions (plain and async) and the ``uccl`` backend spec match the dense reference."""
    fused_a2a = _fused_a2a()
    from fused_a2a.backends import BACKENDS
    from fused_a2a.backends.uccl import SPEC, free_uccl_buffer

    group = dist.group.WORLD
    BACKENDS["uccl"] = SPEC  # registered in this rank only, as the lead engineer will

    def tuned_dispatch(x, idx, weights, num_experts):
        return fused_a2a.dispatch(x, idx, weights, num_experts, backend="uccl", num_sms=24, nvl_send=8, nvl_recv=128)

    for case in BF16_CASES:
        check_case(case, rank, world_size, CPU, *_seed_calls(fused_a2a, group))
        check_case(case, rank, world_size, CPU, tuned_dispatch, fused_a2a.combine)
    check_case(BF16_CASES[0], rank, world_size, CPU, *_seed_calls(fused_a2a, group, async_finish=True, allocate_on_comm_stream=True))
    free_uccl_buffer()


def _lives(ep) -> list[str]:
    """The fake's buffer lives in order: ``"create"`` / ``"destroy"``."""
    names = {"buffer": "create", "destroy": "destroy"}
    return [names[event[0]] for event in ep.EVENTS if event[0] in names]


def _teardown_events(ep, runtime) -> list[tuple]:
    """The events of destroying ``runtime`` and re-creating a buffer, from its ``destroy`` on."""
    start = ep.EVENTS.index(("destroy", id(runtime)))
    return [event[:2] for event in ep.EVENTS[start:]]


def buffer_lifecycle(rank: int, world_size: int) -> None:
    """Sizing from both configs' hints, reuse, reallocation (size, group), free and re-create; the old
    buffer is destroyed and its proxies unregistered before the new one registers its own."""
    fused_a2a = _fused_a2a()
    from uccl import ep

    from fused_a2a.backends import uccl
    from fused_a2a.backends.uccl_buffer import UCCLBuffer

    group = dist.group.WORLD
    hidden_bytes = 512
    size_hint = lambda config: config.get_nvl_buffer_size_hint(hidden_bytes, world_size)  # noqa: E731

    first = fused_a2a.get_uccl_buffer(group, hidden_bytes)
    defaults = (UCCLBuffer.get_dispatch_config(world_size), UCCLBuffer.get_combine_config(world_size))
    assert first.num_nvl_bytes == max(map(size_hint, defaults)) and first.num_rdma_bytes == 0
    assert first.group is group and first.explicitly_destroy and first.group_size == world_size and first.rank == rank
    assert fused_a2a.get_uccl_buffer(group, hidden_bytes) is first
    assert fused_a2a.get_uccl_buffer(None, hidden_bytes // 2) is first

    first_runtime = first.runtime
    larger = fused_a2a.get_uccl_buffer(group, 2 * hidden_bytes)
    assert larger is not first and larger.num_nvl_bytes > first.num_nvl_bytes and first.runtime is None
    assert _teardown_events(ep, first_runtime) == [
        ("destroy", id(first_runtime)), ("unregister", 0), ("register", 0), ("buffer", id(larger.runtime)),
        ("sync", id(larger.runtime)),
    ]

    # the larger of the two configs' hints, whichever operation it belongs to
    knobs = uccl.SPEC.defaults()
    for dispatch_recv, combine_recv in ((512, 128), (128, 1024)):
        comm = uccl.make_uccl_comm({**knobs, "nvl_recv": dispatch_recv}, {**knobs, "nvl_recv": combine_recv}, world_size)
        uccl.free_uccl_buffer()
        sized = comm.get_buffer(group, torch.empty(0, hidden_bytes // 2, dtype=torch.bfloat16))
        assert sized.num_nvl_bytes == max(size_hint(comm.dispatch_config), size_hint(comm.combine_config))
        assert sized.num_nvl_bytes == size_hint(ep.Config(20, 6, max(dispatch_recv, combine_recv), 6, 128))
        assert fused_a2a.get_uccl_buffer(group, hidden_bytes) is sized  # a smaller need keeps the buffer

    other_group = dist.new_group(list(range(world_size)))
    moved = fused_a2a.get_uccl_buffer(other_group, hidden_bytes)
    assert moved is not sized and moved.group is other_group and sized.runtime is None

    uccl.free_uccl_buffer()
    assert uccl._uccl_buffer is None and moved.runtime is None and not ep.has_proxy(0)
    uccl.free_uccl_buffer()  # nothing left: no second destroy
    again = fused_a2a.get_uccl_buffer(group, hidden_bytes)
    lives = _lives(ep)
    assert lives == ["create", "destroy"] * (len(lives) // 2) + ["create"], lives
    assert again.runtime.is_available()
    uccl.free_uccl_buffer()


def proxies_and_destroy(rank: int, world_size: int) -> None:
    """Construction follows UCCL-EP's order; the proxies are registered, intranode, never started (so never
    stopped: uccl 0.1.1 raises for that); destroy releases the runtime, then unregisters the proxies; it
    needs explicitly_destroy."""
    _fused_a2a()
    from uccl import ep

    from fused_a2a.backends.uccl_buffer import UCCLBuffer

    group = dist.group.WORLD
    buffer = UCCLBuffer(group, 1 << 24)
    runtime = buffer.runtime
    threads = ep.get_num_proxy_threads()
    assert ep.EVENTS == [("register", 0, threads), ("buffer", id(runtime)), ("sync", id(runtime))]
    assert ep.has_proxy(0) and runtime.is_available() and runtime.num_local_ranks == world_size
    assert len(buffer.proxies) == threads
    for thread, proxy in enumerate(buffer.proxies):
        assert proxy.thread_idx == thread and proxy.rank == rank and proxy.is_intranode and proxy.use_normal_mode()
        assert proxy.gpu_buffer_addr == buffer.scratch.data_ptr() and buffer.scratch.numel() == 1 and proxy.total_size == 0
        assert proxy.get_atomic_buffer_ptr() == buffer.proxies[0].get_atomic_buffer_ptr() != 0
    assert runtime.atomic_buffer_ptr == buffer.proxies[0].get_atomic_buffer_ptr()

    x, idx, weights = _dispatch_inputs(rank)
    layout = buffer.get_dispatch_layout(idx, 8)
    recv_x, _, _, _, handle, _ = buffer.dispatch(
        x, num_tokens_per_rank=layout[0], is_token_in_rank=layout[3], num_tokens_per_expert=layout[2],
        topk_idx=idx, topk_weights=weights,
    )
    buffer.combine(recv_x, handle)
    assert not any(proxy.started for proxy in buffer.proxies), "intranode: the proxies must never start"

    buffer.destroy()
    assert ep.EVENTS[3:] == [("destroy", id(runtime)), ("unregister", 0)]
    assert buffer.runtime is None and not ep.has_proxy(0)
    with pytest.raises(RuntimeError, match="Proxy already stopped"):
        buffer.proxies[0].stop()

    implicit = UCCLBuffer(group, 1 << 24, explicitly_destroy=False)
    with pytest.raises(AssertionError, match="`explicitly_destroy` flag must be set"):
        implicit.destroy()
    assert implicit.runtime.is_available()


def internode_is_refused(rank: int, world_size: int) -> None:
    """A group whose ranks are on different hosts raises the one internode error on every rank, before
    anything is allocated or registered."""
    fused_a2a = _fused_a2a()
    from uccl import ep

    from fused_a2a.backends.uccl_buffer import INTERNODE_ERROR

    if rank == world_size - 1:
        socket.gethostname = lambda: "another-host"
    with pytest.raises(RuntimeError, match=f"^{INTERNODE_ERROR}$"):
        fused_a2a.get_uccl_buffer(dist.group.WORLD, 512)
    assert ep.EVENTS == [] and not ep.has_proxy(0)


def num_sms_and_handles(rank: int, world_size: int) -> None:
    """set_uccl_num_sms sets UCCLBuffer.num_sms (even only); a handle keeps its dispatch's SM count, which
    its combine and cached dispatch use whatever the current setting; a config of another count is refused."""
    fused_a2a = _fused_a2a()
    from uccl import ep

    from fused_a2a.backends.uccl import free_uccl_buffer
    from fused_a2a.backends.uccl_buffer import UCCLBuffer

    group = dist.group.WORLD
    x, idx, weights = _dispatch_inputs(rank)
    assert UCCLBuffer.num_sms == 20
    default_result = fused_a2a.uccl_fused_dispatch(x, idx, weights, 8, group)
    fused_a2a.set_uccl_num_sms(24)
    assert UCCLBuffer.num_sms == 24 and UCCLBuffer.get_dispatch_config(world_size).num_sms == 24
    result = fused_a2a.uccl_fused_dispatch(x, idx, weights, 8, group)
    assert default_result[4].num_sms == 20 and result[4].num_sms == 24
    assert result[4].channel_prefix_matrix.shape == (world_size, 12)
    for odd in (25, 0, 2.0):
        with pytest.raises(ValueError, match="The SM count must be an even int"):
            fused_a2a.set_uccl_num_sms(odd)
    assert UCCLBuffer.num_sms == 24
    copies = result[4].is_token_in_rank.sum(dim=1, keepdim=True).float()
    for recv_x, handle in ((default_result[0], default_result[4]), (result[0], result[4])):
        out, event = fused_a2a.uccl_fused_combine(recv_x, group, handle)
        assert event is None and torch.equal(out.float(), (x.float() * copies).to(torch.bfloat16).float())

    buffer = fused_a2a.get_uccl_buffer(group, fused_a2a.get_hidden_bytes(x))
    with pytest.raises(ValueError, match="dispatched with num_sms=24 .* the config has num_sms=16"):
        buffer.combine(result[0], result[4], config=ep.Config(16, 8, 256, 6, 128))
    cached, none_idx, none_weights, none_counts, none_handle, _ = buffer.dispatch(x, handle=result[4])
    assert none_idx is None and none_weights is None and none_counts is None and none_handle is None
    assert torch.equal(cached, result[0])
    with pytest.raises(ValueError, match="combine input has 1 rows, but its dispatch received"):
        buffer.combine(result[0][:1], result[4])
    free_uccl_buffer()


def env_default(rank: int, world_size: int, environ: dict[str, str], expected: int) -> None:
    """At import, UCCLBuffer.num_sms comes from $UCCL_EP_SM_NUMS, else $DEEP_EP_SM_NUMS, else 20."""
    os.environ.update(environ)
    _fused_a2a()
    from fused_a2a.backends.uccl_buffer import UCCLBuffer

    assert UCCLBuffer.num_sms == expected


def comm_and_fake_contract(rank: int, world_size: int) -> None:
    """The spec's Comm (uccl.ep.Config objects at UCCL-EP's defaults, one num_sms, its group size) and the
    fake's enforcement of the contract (so the adapter tests above mean something)."""
    _fused_a2a()
    from uccl import ep

    from fused_a2a.backends import BackendSpec
    from fused_a2a.backends.uccl import SPEC, free_uccl_buffer, make_uccl_comm
    from fused_a2a.backends.uccl_buffer import EventOverlap, UCCLBuffer

    group = dist.group.WORLD
    spec = SPEC
    assert isinstance(spec, BackendSpec) and spec.unavailable() is None
    knobs = spec.defaults()
    with pytest.raises(ValueError, match="uccl: dispatch and combine must use the same num_sms"):
        spec.make_comm(knobs, {**knobs, "num_sms": 24})
    with pytest.raises(ValueError, match="uccl: combine config: nvl_send \\(300\\) must be smaller than nvl_recv \\(256\\)"):
        spec.make_comm(knobs, {**knobs, "nvl_send": 300})
    with pytest.raises(ValueError, match="resolved for 4 ranks, but the group has 2"):
        make_uccl_comm(knobs, knobs, 4).get_buffer(group, torch.empty(0, 32, dtype=torch.bfloat16))

    comm = spec.make_comm({**knobs, "num_sms": 24, "nvl_send": 8}, {**knobs, "num_sms": 24})
    dispatch, combine = comm.dispatch_config, comm.combine_config
    assert comm.name == "uccl" and isinstance(dispatch, ep.Config) and isinstance(combine, ep.Config)
    assert (dispatch.num_sms, dispatch.num_max_nvl_chunked_send_tokens, dispatch.num_max_nvl_chunked_recv_tokens) == (24, 8, 256)
    assert (combine.num_sms, combine.num_max_nvl_chunked_send_tokens, combine.num_max_rdma_chunked_send_tokens) == (24, 10, 6)
    assert comm.previous_event(False) is None
    event = comm.previous_event(True)
    assert isinstance(event, EventOverlap) and isinstance(event.event, ep.EventHandle)
    event.current_stream_wait()

    x, idx, weights = _dispatch_inputs(rank)
    buffer = comm.get_buffer(None, x)
    per_rank, per_rdma_rank, per_expert, in_rank, _ = buffer.get_dispatch_layout(idx, 8)
    assert per_rdma_rank is None and per_rank.dtype == per_expert.dtype == torch.int32 and in_rank.dtype == torch.bool
    layout = dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
                  topk_idx=idx, topk_weights=weights)
    with pytest.raises(RuntimeError, match="config.num_sms % 2 == 0"):
        buffer.dispatch(x, **layout, config=ep.Config(23, 8, 256, 6, 128))
    with pytest.raises(RuntimeError, match="NVL bytes"):
        buffer.dispatch(x, **layout, config=ep.Config(24, 8, 1024, 6, 128))
    with pytest.raises(AssertionError, match="allocate_on_comm_stream needs previous_event and async_finish"):
        buffer.dispatch(x, **layout, config=dispatch, allocate_on_comm_stream=True)
    with pytest.raises(ValueError, match="contiguous"):
        buffer.dispatch(x.t().contiguous().t(), **layout, config=dispatch)
    recv_x, _, _, counts, handle, after = buffer.dispatch(x, **layout, config=dispatch, expert_alignment=4)
    assert all(count % 4 == 0 for count in counts) and after.event is None
    with pytest.raises(AssertionError, match="a cached dispatch takes no top-k"):
        buffer.dispatch(x, handle=handle, topk_idx=idx, config=dispatch)
    with pytest.raises(RuntimeError, match="combine is compiled for bf16 only"):
        buffer.combine(recv_x.float(), handle, config=combine)
    bias = torch.ones_like(x)
    combined, combined_weights, _ = buffer.combine(recv_x, handle, topk_weights=torch.ones(recv_x.size(0), 2), bias=(bias, None))
    copies = in_rank.sum(dim=1, keepdim=True).float()
    assert torch.equal(combined, (x.float() * copies + 1).to(torch.bfloat16))
    assert torch.equal(combined_weights, copies.expand(-1, 2))
    # uccl 0.1.1 asserts num_tokens > 0: a rank without tokens dispatches a placeholder row that goes nowhere
    with pytest.raises(RuntimeError, match="num_tokens > 0"):
        buffer.runtime.intranode_prepare(per_rank.data_ptr(), in_rank.data_ptr(), per_expert.data_ptr(), 0, 8,
                                         0, 0, 1, 0, dispatch)
    empty = buffer.get_dispatch_layout(idx[:0], 8)
    assert empty[3].shape == (0, world_size) and not empty[0].any() and not empty[2].any()
    from_empty = buffer.dispatch(x[:0], num_tokens_per_rank=empty[0], is_token_in_rank=empty[3],
                                 num_tokens_per_expert=empty[2], topk_idx=idx[:0], topk_weights=weights[:0])
    assert from_empty[0].shape == (0, x.size(1)) and from_empty[1].shape == (0, 2) and from_empty[3] == [0] * 4
    assert from_empty[4].num_tokens == 0 and buffer.dispatch(x[:0], handle=from_empty[4])[0].shape == (0, x.size(1))
    back, back_weights, _ = buffer.combine(from_empty[0], from_empty[4], topk_weights=from_empty[2], bias=x[:0])
    assert back.shape == (0, x.size(1)) and back_weights.shape == (0, 2)
    free_uccl_buffer()

    # the fake's own contract
    with pytest.raises(RuntimeError, match="no UcclProxy registered for device 0"):
        ep.Buffer(rank, world_size, 1 << 24, 0, False, True, world_size)
    proxies = [ep.Proxy(thread_idx=0, gpu_buffer_addr=1, total_size=0, use_normal_mode=True)]
    ep.register_proxies(0, proxies)
    with pytest.raises(RuntimeError, match="overwriting existing proxies for device 0"):
        ep.register_proxies(0, proxies)
    runtime = ep.Buffer(rank, world_size, 1 << 24, 0, False, True, world_size)
    with pytest.raises(RuntimeError, match="is_available"):
        runtime.get_dispatch_layout(idx.data_ptr(), 64, 2, 8, per_rank.data_ptr(), 0, per_expert.data_ptr(), in_rank.data_ptr())
    with pytest.raises(RuntimeError, match="one device id per rank"):
        runtime.sync([0], [runtime.get_local_ipc_handle()])
    handles = [None] * world_size
    dist.all_gather_object(handles, runtime.get_local_ipc_handle())
    with pytest.raises(RuntimeError, match="the IPC handle of rank 0 at index 0"):
        runtime.sync([0] * world_size, handles[::-1])
    ep.unregister_proxy(0)
    with pytest.raises(RuntimeError, match="num_max_nvl_chunked_send_tokens < num_max_nvl_chunked_recv_tokens"):
        ep.Config(24, 256, 256, 6, 128)
    with pytest.raises(RuntimeError, match="num_max_rdma_chunked_send_tokens < num_max_rdma_chunked_recv_tokens"):
        ep.Config(24, 8, 256, 128, 128)
    assert ep.Config(24, 8, 256, 6, 128).num_max_rdma_chunked_recv_tokens == 132  # rounded up to rdma_send
    with pytest.raises(AttributeError):
        dispatch.num_sms = 2
    assert UCCLBuffer.get_combine_config(world_size).num_sms == UCCLBuffer.num_sms
