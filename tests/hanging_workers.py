"""Rank functions of ``tests/test_no_rank_left_hanging.py`` (real gloo ranks; DeepEP and UCCL-EP through the
fakes). Nothing here imports fused_a2a at import time: a rank chooses its fakes first."""

from __future__ import annotations

import gc
import os
import threading
import time
import weakref
from pathlib import Path

import torch
import torch.distributed as dist

from routing_cases import RoutingCase

FAKES = (str(Path(__file__).parent / "fakes"),)
WATCHDOG_S = 60  # a rank still inside one call after this long is hung: it fails instead of waiting


def _gathered(value) -> list:
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def _calls(backend: str, seed: bool = False):
    """``(dispatch, combine)`` of ``backend`` through ``fused_a2a.dispatch`` or (``seed``) the seed functions."""
    import fused_a2a

    group = dist.group.WORLD
    if seed:
        dispatch, combine = {"deepep": (fused_a2a.fused_dispatch, fused_a2a.fused_combine),
                             "uccl": (fused_a2a.uccl_fused_dispatch, fused_a2a.uccl_fused_combine)}[backend]
        return (lambda x, i, w, e: dispatch(x, i, w, e, group)), (lambda y, handle: combine(y, group, handle)[0])
    return (lambda x, i, w, e: fused_a2a.dispatch(x, i, w, e, group, backend=backend)), fused_a2a.combine


def _round_trip(backend: str, x, idx, weights, num_experts: int, seed: bool = False):
    """Dispatch + combine; ``(recv_x, recv_idx, recv_weights, tokens_per_expert, combined)``."""
    dispatch, combine = _calls(backend, seed)
    recv_x, recv_idx, recv_weights, counts, handle = dispatch(x, idx, weights, num_experts)
    return recv_x, recv_idx, recv_weights, counts, combine(recv_x, handle)


def _raise_unless_ok(outcome: str) -> None:
    if outcome != "ok":
        raise AssertionError(outcome)


def _hung() -> None:
    print(f"rank {dist.get_rank()}: a call did not return within {WATCHDOG_S} s (hung)", flush=True)
    os._exit(1)


def _outcome(fn) -> tuple[str, float]:
    """``("ok" | "ValueError: ..." | "<Type>: ...", seconds)`` of ``fn()``, run under a watchdog that
    fails the rank (exit status 1) when the call hangs."""
    watchdog = threading.Timer(WATCHDOG_S, _hung)
    watchdog.start()
    start = time.perf_counter()
    try:
        fn()
        result = "ok"
    except ValueError as error:
        result = f"ValueError: {error}"
    except Exception as error:  # noqa: BLE001 - reported, the test says it is wrong
        result = f"{type(error).__name__}: {error}"
    finally:
        watchdog.cancel()
    return result, time.perf_counter() - start


def check_case_passes(case: RoutingCase, backend: str, rank: int) -> None:
    """``case`` (no fault) on ``backend`` matches the reference on this rank, twice (first and warm call)."""
    import property_workers

    outcome, _ = _outcome(lambda: _raise_unless_ok(
        property_workers._run(case, 0, backend, rank, torch.device("cpu"), dist.group.WORLD)))
    assert outcome == "ok", f"{backend} {case.describe()}: {outcome}"


def issue_crashes(rank: int, world_size: int, backends: tuple[str, ...]) -> None:
    """The issue's first two crashes, on each of ``backends``: a rank without tokens at top-1; odd top-k
    with at most one received row (and an empty rank), at the first call (the routing outgrows the
    capacity) and warm."""
    cases = [
        RoutingCase(seed=1, world=2, tokens=(0, 5), topk=1, num_experts=4, hidden=16),
        RoutingCase(seed=2, world=2, tokens=(7, 0), topk=1, num_experts=8, hidden=16, layout="sliced"),
        *(RoutingCase(seed=10 + k, world=2, tokens=(1, 1), topk=k, num_experts=8, hidden=16) for k in (3, 5, 7)),
        *(RoutingCase(seed=20 + k, world=2, tokens=(0, 1), topk=k, num_experts=16, hidden=16, grad=False) for k in (3, 5, 7)),
        RoutingCase(seed=30, world=2, tokens=(1, 0), topk=3, num_experts=8, hidden=16, routing="one_rank"),
    ]
    for backend in backends:
        for case in cases:
            check_case_passes(case, backend, rank)


def bad_id_on_one_rank(rank: int, world_size: int, calls: tuple[tuple[str, bool], ...]) -> None:
    """For each ``(backend, seed functions?)`` of ``calls``: rank 1 passes one expert id outside ``[-1,
    E)``, on a first and on a warm call; both ranks raise ``ValueError`` (the same message; rank 1 may add
    its range) in the same call, nobody hangs or dies, and the next call works on every rank."""
    for backend, seed in calls:
        _bad_id_on_one_rank(rank, backend, seed)


def _bad_id_on_one_rank(rank: int, backend: str, seed: bool) -> None:
    x = torch.randn(12, 16).to(torch.bfloat16)
    idx = torch.randint(0, 8, (12, 2), generator=torch.Generator().manual_seed(rank))
    weights = torch.rand(12, 2)
    bad = idx.clone()
    bad[5, 1] = 8 if rank == 1 else bad[5, 1]
    reports = []
    for call in ("first", "warm"):
        if call == "warm":
            assert _outcome(lambda: _round_trip(backend, x, idx, weights, 8, seed))[0] == "ok"
        result, seconds = _outcome(lambda: _round_trip(backend, x, bad, weights, 8, seed))
        reports.append(_gathered((result, seconds)))
    for (result0, seconds0), (result1, seconds1) in reports:
        assert result0.startswith("ValueError: ") and result1.startswith("ValueError: "), (result0, result1)
        assert "[-1, 8)" in result0 and result1.startswith(result0), (result0, result1)
        assert seconds0 < WATCHDOG_S and seconds1 < WATCHDOG_S
    recv_x, _, _, _, combined = _round_trip(backend, x, idx, weights, 8, seed)  # the group still works
    assert combined.shape == x.shape


def wrong_input_on_one_rank(rank: int, world_size: int, backends: tuple[str, ...]) -> None:
    """On each of ``backends``: a tensor of the wrong dtype on rank 1 (float64 weights; then float64
    tokens; then int32 ids), at a shape's first call and at a warm one: every rank raises ``ValueError``,
    rank 1 naming the reason."""
    for backend in backends:
        _wrong_input_on_one_rank(rank, backend)


def _wrong_input_on_one_rank(rank: int, backend: str) -> None:
    x = torch.randn(12, 16).to(torch.bfloat16)
    idx = torch.randint(0, 8, (12, 2), generator=torch.Generator().manual_seed(rank))
    weights = torch.rand(12, 2)
    mistakes = {
        "topk_weights must be float32": (x, idx, weights.double()),
        "x must be bfloat16, float16 or float32": (x.double(), idx, weights),
        "topk_idx must be int64": (x, idx.int(), weights),
    }
    for reason, wrong in mistakes.items():
        for hidden in (16, 32):  # 16: the shape's first call (the first mistake), 32: a shape never run
            chosen = wrong if rank == 1 else (x, idx, weights)
            if hidden == 32:
                chosen = (torch.cat([chosen[0], chosen[0]], dim=1), *chosen[1:])
            results = _gathered(_outcome(lambda: _round_trip(backend, *chosen, 8))[0])
            assert all(r.startswith("ValueError: ") for r in results), results
            assert reason in results[1] and results[1].startswith(results[0]), results
        assert _outcome(lambda: _round_trip(backend, x, idx, weights, 8))[0] == "ok"  # warm again


def different_shapes(rank: int, world_size: int) -> None:
    """Ranks that call with different hidden sizes, or top-k, at a first call: the same ValueError."""
    for hidden, topk in ((16 if rank == 0 else 32, 2), (16, 1 if rank == 0 else 2)):
        x = torch.randn(4, hidden)
        idx = torch.zeros(4, topk, dtype=torch.int64)
        results = _gathered(_outcome(lambda: _round_trip("torch", x, idx, torch.rand(4, topk), 8))[0])
        assert results[0] == results[1] and "called dispatch with different arguments" in results[0], results


def non_contiguous_routing(rank: int, world_size: int, calls: tuple[tuple[str, bool], ...]) -> None:
    """For each ``(backend, seed functions?)`` of ``calls``: column-major ``topk_idx``, weights sliced from
    a padded buffer and strided tokens reach DeepEP / UCCL-EP contiguous (their "topk_idx is a contiguous
    [N, K] int64 tensor" assertion is never hit) and give what contiguous inputs give."""
    for backend, seed in calls:
        _non_contiguous_routing(rank, backend, seed)


def _non_contiguous_routing(rank: int, backend: str, seed: bool) -> None:
    case = RoutingCase(seed=40, world=2, tokens=(24, 24), topk=4, num_experts=16, hidden=32)
    clean = case.clean(rank)
    x = torch.zeros(48, 32, dtype=torch.bfloat16)
    x[::2] = clean.x
    padded = torch.zeros(24, 6)
    padded[:, 1:5] = clean.topk_weights
    recv_x, recv_idx, recv_weights, counts, combined = _round_trip(
        backend, x[::2], clean.topk_idx.t().contiguous().t(), padded[:, 1:5], 16, seed)
    expected = _round_trip(backend, clean.x, clean.topk_idx, clean.topk_weights, 16, seed)
    for got, want in zip((recv_x, recv_idx, recv_weights, counts, combined), expected):
        assert torch.equal(got, want)


def misaligned_rows(rank: int, world_size: int, calls: tuple[tuple[str, bool], ...]) -> None:
    """For each ``(backend, seed functions?)`` of ``calls``: tokens, a combine input and an output gradient
    that are contiguous views starting 2 bytes past a 16-byte boundary (a one-row slice of a wider
    buffer is one) give what fresh tensors give; the fused libraries load rows 16 bytes at a time and
    fault on such a pointer (``misaligned address``; the fakes raise it), so they must never see one."""
    case = RoutingCase(seed=41, world=2, tokens=(4, 4), topk=2, num_experts=16, hidden=32)
    clean = case.clean(rank)
    for backend, seed in calls:
        results = []
        for shifted in (False, True):
            dispatch, combine = _calls(backend, seed)
            x = _off_boundary(clean.x) if shifted else clean.x.clone()
            x.requires_grad_(True)
            recv_x, recv_idx, recv_weights, counts, handle = dispatch(x, clean.topk_idx, clean.topk_weights, 16)
            expert_out = recv_x * 2
            combined = combine(_off_boundary(expert_out) if shifted else expert_out, handle)
            grad = torch.ones_like(combined)
            combined.backward(_off_boundary(grad) if shifted else grad)
            results.append((recv_x.detach(), recv_idx, recv_weights, counts, combined.detach(), x.grad))
        for got, want in zip(*results):
            assert torch.equal(got, want), backend


def _off_boundary(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of ``tensor`` whose data starts 2 bytes past a 16-byte boundary (and keeps the
    graph: its gradient flows back to ``tensor``)."""
    flat = torch.zeros(tensor.numel() + 8 // tensor.element_size() + 1, dtype=tensor.dtype)
    start = (-flat.data_ptr() % 16 + 2) // tensor.element_size()
    shifted = torch.cat([flat[:start].detach(), tensor.reshape(-1), flat[start + tensor.numel():].detach()])
    view = shifted[start:start + tensor.numel()].view(tensor.shape)
    assert view.is_contiguous() and view.data_ptr() % 16 != 0
    return view


def uccl_empty_rank_warm(rank: int, world_size: int) -> None:
    """UCCL-EP with 0 tokens on rank 0 at a warm key (uccl 0.1.1 asserts num_tokens > 0): both ranks get
    the reference's result, through the API and the seed functions."""
    for seed in (False, True):
        case = RoutingCase(seed=50, world=2, tokens=(9, 9), topk=2, num_experts=8, hidden=16)
        empty = RoutingCase(seed=51, world=2, tokens=(0, 9), topk=2, num_experts=8, hidden=16)
        for current in (case, empty, empty, case):
            import property_workers

            dispatch, combine = _calls("uccl", seed)
            outcome, _ = _outcome(lambda: _raise_unless_ok(property_workers._one_call(
                current, rank, torch.device("cpu"), dispatch, combine, True, False) or "ok"))
            assert outcome == "ok", outcome


def destroyed_groups_are_freed(rank: int, world_size: int) -> None:
    """After ``destroy_process_group(group)`` and once the caller drops it, nothing of fused_a2a keeps the
    group (torch, DeepEP and UCCL-EP paths, the agreement's cache, the buffers' caches) alive."""
    import fused_a2a
    from fused_a2a.backends import torch_a2a
    from fused_a2a.teardown import free_all_buffers
    from fused_a2a.tuning import agreement

    group = dist.new_group([0, 1])
    x, idx, weights = torch.randn(6, 16).to(torch.bfloat16), torch.randint(0, 8, (6, 2)), torch.rand(6, 2)
    for backend in ("torch", "deepep", "uccl"):
        out = fused_a2a.dispatch(x, idx, weights, 8, group, backend=backend)
        fused_a2a.combine(out[0], out[4])
    assert torch_a2a._buffers.get(group) is not None and agreement._cache.get(group) is not None
    free_all_buffers()  # DeepEP's and UCCL-EP's buffers hold their group until destroyed (as DeepEP's own)
    ref = weakref.ref(group)
    dist.destroy_process_group(group)
    del group, out
    gc.collect()
    assert ref() is None, [type(r).__name__ for r in gc.get_referrers(ref())]
    assert len(torch_a2a._buffers._entries) == len(torch_a2a._buffers.groups())  # its entry went with it
