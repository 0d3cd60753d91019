"""Rank functions of ``tests/test_deepep_adapter.py``: they run fused_a2a on the CPU fake of deep_ep.

``spawn(worker, n, ..., sys_path=FAKES)`` puts ``tests/fakes`` first on each rank's ``sys.path`` before
the worker runs, and the workers import fused_a2a inside their bodies: fused_a2a detects deep_ep when it
is imported, so it finds the fake. This module imports nothing that imports fused_a2a, because the test
process imports it to name the workers and must keep running without deep_ep.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from reference import BF16_CASES, check_case

FAKES = (str(Path(__file__).parent / "fakes"),)
CPU = torch.device("cpu")


def _fused_a2a():
    """fused_a2a as this rank imports it, checked to run on the fake deep_ep."""
    import deep_ep
    import fused_a2a

    assert fused_a2a.HAVE_DEEP_EP and deep_ep.__file__.startswith(FAKES[0]), "fused_a2a did not find the fake deep_ep"
    return fused_a2a


def _knobs(**changes) -> dict:
    from fused_a2a.backends import BACKENDS

    return {**BACKENDS["deepep"].defaults(), **changes}


def _dispatch_inputs(rank: int, hidden: int = 32, num_tokens: int = 64, num_experts: int = 8):
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(num_tokens, hidden, generator=gen).to(torch.bfloat16)
    idx = torch.stack([torch.randperm(num_experts, generator=gen)[:2] for _ in range(num_tokens)])
    return x, idx, torch.rand(num_tokens, 2, generator=gen)


def reference_cases(rank: int, world_size: int) -> None:
    """The seed functions and ``fused_a2a.dispatch(backend="deepep")`` match the dense reference."""
    fused_a2a = _fused_a2a()
    group = dist.group.WORLD

    def seed_dispatch(x, idx, weights, num_experts):
        return fused_a2a.fused_dispatch(x, idx, weights, num_experts, group)

    def seed_combine(y, handle):
        return fused_a2a.fused_combine(y, group, handle)[0]

    def seed_dispatch_async(x, idx, weights, num_experts):
        return fused_a2a.fused_dispatch(x, idx, weights, num_experts, group, async_finish=True, allocate_on_comm_stream=True)

    def seed_combine_async(y, handle):
        return fused_a2a.fused_combine(y, group, handle, async_finish=True, allocate_on_comm_stream=True)[0]

    def tuned_dispatch(x, idx, weights, num_experts):
        return fused_a2a.dispatch(x, idx, weights, num_experts, backend="deepep", num_sms=24, nvl_send=8, nvl_recv=128)

    for case in BF16_CASES:
        check_case(case, rank, world_size, CPU, seed_dispatch, seed_combine)
        check_case(case, rank, world_size, CPU, tuned_dispatch, fused_a2a.combine)
    check_case(BF16_CASES[0], rank, world_size, CPU, seed_dispatch_async, seed_combine_async)
    fused_a2a.free_buffer()


def buffer_lifecycle(rank: int, world_size: int) -> None:
    """Sizing from both configs' hints, reuse, reallocation (size, group), free and re-create."""
    fused_a2a = _fused_a2a()
    import deep_ep

    from fused_a2a.backends import deepep

    group = dist.group.WORLD
    hidden_bytes = 512
    size_hint = lambda config: config.get_nvl_buffer_size_hint(hidden_bytes, world_size)  # noqa: E731

    first = fused_a2a.get_buffer(group, hidden_bytes)
    defaults = (deep_ep.Buffer.get_dispatch_config(world_size), deep_ep.Buffer.get_combine_config(world_size))
    assert first.num_nvl_bytes == max(map(size_hint, defaults)) and first.num_rdma_bytes == 0
    assert first.group is group and first.explicitly_destroy
    assert deep_ep.EVENTS == [("create", id(first))]
    assert fused_a2a.get_buffer(group, hidden_bytes) is first
    assert fused_a2a.get_buffer(group, hidden_bytes // 2) is first

    larger = fused_a2a.get_buffer(group, 2 * hidden_bytes)
    assert larger is not first and deep_ep.EVENTS[-2:] == [("destroy", id(first)), ("create", id(larger))]

    # the larger of the two configs' hints, whichever operation it belongs to
    for dispatch_recv, combine_recv in ((512, 128), (128, 1024)):
        comm = deepep.make_deepep_comm(_knobs(nvl_recv=dispatch_recv), _knobs(nvl_recv=combine_recv), world_size)
        fused_a2a.free_buffer()
        sized = comm.get_buffer(group, torch.empty(0, hidden_bytes // 2, dtype=torch.bfloat16))
        assert sized.num_nvl_bytes == max(size_hint(comm.dispatch_config), size_hint(comm.combine_config))
        assert sized.num_nvl_bytes == size_hint(deep_ep.Config(20, 6, max(dispatch_recv, combine_recv), 6, 128))
        # a smaller need keeps the buffer
        assert fused_a2a.get_buffer(group, hidden_bytes) is sized

    other_group = dist.new_group(list(range(world_size)))
    moved = fused_a2a.get_buffer(other_group, hidden_bytes)
    assert moved is not sized and moved.group is other_group
    assert deep_ep.EVENTS[-2:] == [("destroy", id(sized)), ("create", id(moved))]

    fused_a2a.free_buffer()
    assert deep_ep.EVENTS[-1] == ("destroy", id(moved)) and deepep._buffer is None
    fused_a2a.free_buffer()  # nothing left: no second destroy
    again = fused_a2a.get_buffer(group, hidden_bytes)
    assert deep_ep.EVENTS[-1] == ("create", id(again))
    created = [i for event, i in deep_ep.EVENTS if event == "create"]
    destroyed = [i for event, i in deep_ep.EVENTS if event == "destroy"]
    assert created[:-1] == destroyed  # every buffer but the live one destroyed, each once, in order
    fused_a2a.free_buffer()


def knob_precedence(rank: int, world_size: int, table_dir: str, cluster_id: str) -> None:
    """num_sms: set_deepep_num_sms > $FUSED_A2A_DEEPEP_NUM_SMS > tuning table > default, and the seed
    combine runs with the SM count of its dispatch's handle whatever the sources say by then."""
    os.environ["FUSED_A2A_CLUSTER_ID"] = cluster_id
    fused_a2a = _fused_a2a()
    import deep_ep

    from fused_a2a.backends.deepep import handle_layout
    from fused_a2a.tuning.resolve import TuningWarning

    group = dist.group.WORLD
    x, idx, weights = _dispatch_inputs(rank)

    def dispatched_sms() -> tuple[int, tuple]:
        result = fused_a2a.fused_dispatch(x, idx, weights, 8, group)
        return handle_layout(result[4])[0], result

    sms, default_result = dispatched_sms()
    assert sms == 20
    os.environ["FUSED_A2A_TUNING_DIR"] = table_dir
    sms, table_result = dispatched_sms()
    assert sms == 16
    # the table's entry for hidden 64 is one DeepEP rejects: dropped with a warning, defaults used
    wide = torch.cat([x, x], dim=1)
    with pytest.warns(TuningWarning, match="deepep rejected the knobs of tuning table .* nvl_send \\(300\\)"):
        rejected = fused_a2a.fused_dispatch(wide, idx, weights, 8, group)
    assert handle_layout(rejected[4])[0] == 20
    # the same entry serving another routing (source "table (uniform routing)") is dropped the same way
    with pytest.warns(TuningWarning, match="deepep rejected the knobs of tuning table"):
        skewed = fused_a2a.dispatch(wide, idx, weights, 8, group, backend="deepep", routing="zipf:1.2")
    assert handle_layout(skewed[4].raw)[0] == 20
    os.environ["FUSED_A2A_DEEPEP_NUM_SMS"] = "32"
    sms, env_result = dispatched_sms()
    assert sms == 32
    fused_a2a.set_deepep_num_sms(24)
    assert deep_ep.Buffer.num_sms == 24
    sms, explicit_result = dispatched_sms()
    assert sms == 24
    for result in (default_result, table_result, env_result, explicit_result):
        out, _ = fused_a2a.fused_combine(result[0], group, result[4])
        assert out.shape == x.shape
    with pytest.raises(AssertionError, match="The SM count must be even"):
        fused_a2a.set_deepep_num_sms(25)
    fused_a2a.free_buffer()


def exit_hook(rank: int, world_size: int) -> None:
    """The atexit hook: registered once with the first buffer; frees it while the process group is up;
    does nothing once the group is gone; never raises."""
    import atexit

    fused_a2a = _fused_a2a()
    import deep_ep

    from fused_a2a.backends import deepep

    group = dist.group.WORLD
    registered = []
    register, atexit.register = atexit.register, registered.append
    try:
        first = fused_a2a.get_buffer(group, 256)
        fused_a2a.get_buffer(group, 1024)
        assert registered == [deepep._free_at_exit]
    finally:
        atexit.register = register
    live = deepep._buffer
    assert live is not first
    deepep._free_at_exit()
    assert deepep._buffer is None and deep_ep.EVENTS[-1] == ("destroy", id(live))

    kept = fused_a2a.get_buffer(group, 256)
    is_initialized, dist.is_initialized = dist.is_initialized, lambda: False
    try:
        deepep._free_at_exit()
    finally:
        dist.is_initialized = is_initialized
    assert deepep._buffer is kept and deep_ep.EVENTS[-1] == ("create", id(kept))

    def failing_destroy() -> None:
        raise RuntimeError("destroy failed")

    kept.destroy = failing_destroy
    deepep._free_at_exit()
    assert deepep._buffer is None


def comm_and_fake_contract(rank: int, world_size: int) -> None:
    """The backend's Comm (real deep_ep.Config objects, one num_sms, its group size) and the fake's
    enforcement of DeepEP's contract (so the adapter tests above mean something)."""
    fused_a2a = _fused_a2a()
    import deep_ep

    from fused_a2a.backends import make_comm
    from fused_a2a.backends.deepep import make_deepep_comm

    group = dist.group.WORLD
    with pytest.raises(ValueError, match="dispatch and combine must use the same num_sms"):
        make_comm("deepep", {"num_sms": 20}, {"num_sms": 24})
    with pytest.raises(ValueError, match="num_sms must be an even int >= 2"):
        make_comm("deepep", {"num_sms": 21})
    with pytest.raises(ValueError, match="dispatch config: nvl_send \\(300\\) must be smaller than nvl_recv \\(256\\)"):
        make_comm("deepep", {"nvl_send": 300})
    with pytest.raises(ValueError, match="resolved for 4 ranks, but the group has 2"):
        make_deepep_comm(_knobs(), _knobs(), 4).get_buffer(group, torch.empty(0, 32, dtype=torch.bfloat16))

    # an operation whose chunk knobs are all 0 runs the installed DeepEP's own default Config, at our SM count
    calls = []
    real_getter = deep_ep.Buffer.get_dispatch_config

    def recording(num_ranks: int):
        config = real_getter(num_ranks)
        calls.append((num_ranks, deep_ep.Buffer.num_sms, config))
        return config

    before = deep_ep.Buffer.num_sms
    deep_ep.Buffer.get_dispatch_config = staticmethod(recording)
    try:
        defaults = make_deepep_comm(_knobs(num_sms=24), _knobs(num_sms=24), world_size)
        make_deepep_comm(_knobs(num_sms=24, nvl_send=8), _knobs(num_sms=24), world_size)
    finally:
        deep_ep.Buffer.get_dispatch_config = staticmethod(real_getter)
    assert calls == [(world_size, 24, defaults.dispatch_config)] and deep_ep.Buffer.num_sms == before

    comm = make_comm("deepep", {"num_sms": 24, "nvl_send": 8})
    assert isinstance(comm.dispatch_config, deep_ep.Config) and isinstance(comm.combine_config, deep_ep.Config)
    assert comm.name == "deepep" and comm.previous_event(False) is None
    assert isinstance(comm.previous_event(True), deep_ep.EventOverlap)

    x, idx, weights = _dispatch_inputs(rank)
    buffer = comm.get_buffer(None, x)
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(idx, 8)
    layout = dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
                  topk_idx=idx, topk_weights=weights)
    with pytest.raises(RuntimeError, match="config.num_sms % 2 == 0"):
        buffer.dispatch(x, **layout, config=deep_ep.Config(23, 8, 256, 6, 128))
    with pytest.raises(RuntimeError, match="NVL bytes"):
        buffer.dispatch(x, **layout, config=deep_ep.Config(24, 8, 1024, 6, 128))
    with pytest.raises(RuntimeError, match="allocate_on_comm_stream needs previous_event and async_finish"):
        buffer.dispatch(x, **layout, config=comm.dispatch_config, allocate_on_comm_stream=True)
    with pytest.raises(RuntimeError, match="num_max_nvl_chunked_send_tokens < num_max_nvl_chunked_recv_tokens"):
        deep_ep.Config(24, 256, 256, 6, 128)
    with pytest.raises(RuntimeError, match="num_max_rdma_chunked_send_tokens < num_max_rdma_chunked_recv_tokens"):
        deep_ep.Config(24, 8, 256, 128, 128)
    assert not hasattr(comm.dispatch_config, "num_sms")

    recv_x, _, _, _, handle, _ = buffer.dispatch(x, **layout, config=comm.dispatch_config)
    with pytest.raises(AssertionError):
        buffer.dispatch(x, handle=handle, topk_idx=idx, config=comm.dispatch_config)
    with pytest.raises(RuntimeError, match="combine supports bfloat16 only"):
        buffer.combine(recv_x.float(), handle, config=comm.combine_config)
    with pytest.raises(RuntimeError, match="the handle has 12 channels, the config 10"):
        buffer.combine(recv_x, handle, config=deep_ep.Config(20, 8, 256, 6, 128))
    combined, _, _ = buffer.combine(recv_x, handle, config=comm.combine_config)
    assert torch.equal(combined.float(), (x.float() * in_rank.sum(dim=1, keepdim=True)).to(torch.bfloat16).float())

    fused_a2a.free_buffer()
    with pytest.raises(RuntimeError, match="the buffer is alive"):
        buffer.combine(recv_x, handle, config=comm.combine_config)
    with pytest.raises(RuntimeError, match="the buffer is not destroyed yet"):
        buffer.destroy()
    implicit = deep_ep.Buffer(group, buffer.num_nvl_bytes)
    with pytest.raises(AssertionError, match="`explicitly_destroy` flag must be set"):
        implicit.destroy()
