"""Rank functions of the routing property tests (``tests/test_routing_property.py`` on CPU ranks with the
fakes, ``tests/test_gpu_routing_property.py`` on GPUs with the real libraries).

Every rank runs the same cases (:mod:`routing_cases`) on each backend, twice (the first call of a shape,
then a warm one), and gathers every rank's outcome after each run: a run must succeed on every rank and
match the dense reference (received rows, local ids, weights, per-expert counts, combine, gradients),
or raise ``ValueError`` on every rank with one message (the rank at fault may add its reason), when the
case has a fault or the backend cannot take it. A rank that hangs stops itself after
:data:`HANG_S` seconds (its traceback printed), so a hang fails the test instead of blocking it.

This module imports nothing that imports fused_a2a at import time (a rank chooses its fakes first).
"""

from __future__ import annotations

import faulthandler
import json
import os
import sys
import threading
import traceback
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist

from reference import TOLERANCE, assert_close, dense_output, expected_dispatch, expert_op, grad_seed
from routing_cases import RoutingCase, generate, hybridep_shape_ok, hybridep_tokens_ok

FAKES = (str(Path(__file__).parent / "fakes"),)
HANG_S = 120  # one run (dispatch, combine, backward, twice) that takes longer on a rank counts as a hang
# HybridEP on ids outside [-1, E), other faults and the shapes it does not take (same ValueError on every
# rank), with the same legal token count on every rank: HybridEP needs one count on every rank, which the
# group checks at a shape's first call only (a count that differs between ranks at a later call hangs it)
HYBRIDEP_BAD_INPUT_CASES = True
TRACE = os.environ.get("FUSED_A2A_PROPERTY_TRACE") == "1"  # print each run before it starts and what went wrong


def _backend_calls(name: str, case_index: int, group):
    """``(dispatch_fn, combine_fn, keeps_topk_slots)`` of a backend label: the backend-neutral entry, or
    (every third case of DeepEP and UCCL-EP) the seed functions."""
    import fused_a2a

    if name == "torch":
        impl = ("all_to_all", "p2p")[case_index % 2]
        return (lambda x, i, w, e: fused_a2a.dispatch(x, i, w, e, group, backend="torch", impl=impl),
                fused_a2a.combine, True)
    if name in ("deepep", "uccl") and case_index % 3 == 2:
        seed_dispatch, seed_combine = ((fused_a2a.fused_dispatch, fused_a2a.fused_combine) if name == "deepep"
                                       else (fused_a2a.uccl_fused_dispatch, fused_a2a.uccl_fused_combine))
        return (lambda x, i, w, e: seed_dispatch(x, i, w, e, group),
                lambda y, handle: seed_combine(y, group, handle)[0], True)
    return (lambda x, i, w, e: fused_a2a.dispatch(x, i, w, e, group, backend=name),
            fused_a2a.combine, name != "hybridep")


def expected_error(case: RoutingCase, backend: str) -> str | None:
    """A fragment of the ``ValueError`` every rank must raise for ``case`` on ``backend`` (``""``: any
    message), or ``None`` when the run must succeed."""
    cannot = _cannot(case, backend)
    if cannot is not None:
        return "" if case.fault != "none" else cannot  # either error may be the one raised
    if case.fault == "bad_id":
        return f"[-1, {case.num_experts})"
    if case.fault == "bad_dtype":
        return ""
    return None


def _cannot(case: RoutingCase, backend: str) -> str | None:
    """Why ``backend`` cannot take ``case`` whatever the fault (``""``: HybridEP's shape rules), or ``None``."""
    from fused_a2a.backends import BACKENDS
    from fused_a2a.backends.chunk_config import rank_problem

    spec = BACKENDS[backend]
    if case.dtype not in spec.dtypes:
        return f"moves {', '.join(spec.dtypes)} tokens, not {case.dtype}"
    if backend in ("deepep", "uccl") and rank_problem(case.world) is not None:
        return rank_problem(case.world)
    if backend == "hybridep" and not hybridep_shape_ok(case):
        return ""
    return None


def runs_on(case: RoutingCase, backend: str) -> bool:
    """Whether the property run tries ``case`` on ``backend``. HybridEP: cases with distinct experts per
    token (it merges a repeated expert's slots, which the reference does not model); of those, the ones
    with a legal shape and no fault, and with :data:`HYBRIDEP_BAD_INPUT_CASES` also faults and illegal
    shapes whose token counts keep its rules."""
    if backend != "hybridep":
        return True
    if case.duplicates:
        return False
    if HYBRIDEP_BAD_INPUT_CASES:
        return hybridep_tokens_ok(case)
    return case.fault == "none" and hybridep_shape_ok(case)


def _run(case: RoutingCase, index: int, backend: str, rank: int, device: torch.device, group) -> str:
    """Two dispatch + combine (+ backward) calls of ``case`` on ``backend``, each checked against the
    reference; ``"ok"`` or what went wrong (``"ValueError: ..."`` for the error the backend raised)."""
    dispatch_fn, combine_fn, keeps_slots = _backend_calls(backend, index, group)
    failures = []
    try:
        # the first call of the shape, then a warm one (both run whatever the first found); a fault comes
        # with one of them (the first call raises then, and there is no second)
        for call in range(2):
            faulty = case.fault != "none" and (call == 0) == case.fault_on_first_call
            failures.append(_one_call(case, rank, device, dispatch_fn, combine_fn, keeps_slots, faulty))
    except ValueError as error:
        return f"ValueError: {error}"
    except Exception as error:  # noqa: BLE001 - any other failure is reported with the case
        if TRACE:
            traceback.print_exc()
        return f"{type(error).__name__}: {error}"
    return next((failure for failure in failures if failure), "ok")


def _one_call(case: RoutingCase, rank: int, device: torch.device, dispatch_fn, combine_fn, keeps_slots: bool,
              faulty: bool) -> str:
    """One call (with the case's fault if ``faulty``): every collective first (a check that fails on one
    rank must not skip a collective), then the comparisons. Returns ``""`` or the first difference."""
    x, idx, weights = case.inputs(rank, device, faulty)
    if case.grad:
        x, weights = x.detach().requires_grad_(True), weights.detach().requires_grad_(True)
    with torch.set_grad_enabled(case.grad):
        recv_x, recv_idx, recv_weights, per_expert, handle = dispatch_fn(x, idx, weights, case.num_experts)
        out = combine_fn(expert_op(recv_x, recv_idx, recv_weights, rank), handle)
        if case.grad:
            g = grad_seed(case.clean(rank), rank)
            (out.float() * g.to(device, torch.float32)).sum().backward()

    every = [case.clean(r) for r in range(case.world)]
    exp_x, exp_idx, exp_weights, exp_counts = expected_dispatch(every, rank, case.num_experts)
    if not keeps_slots:
        from a2a_bench.engine.verify import ascending_slots

        exp_idx, exp_weights = ascending_slots(exp_idx, exp_weights)
    for name, got, want in (("recv_x", recv_x, exp_x), ("recv_topk_idx", recv_idx, exp_idx),
                            ("recv_topk_weights", recv_weights, exp_weights), ("tokens_per_expert", per_expert, exp_counts)):
        if not torch.equal(got.detach().cpu(), want):
            return f"{name} differs from the reference on rank {rank}"
    mine = every[rank]
    ref_x, ref_w = mine.x.double().requires_grad_(True), mine.topk_weights.double().requires_grad_(True)
    ref_out = dense_output(mine, case.world, case.num_experts, ref_x, ref_w)
    try:
        if out.dtype != case.torch_dtype or out.shape != mine.x.shape:
            return f"combine returned {out.dtype} {tuple(out.shape)} on rank {rank}"
        assert_close(out.detach(), ref_out.detach(), case.torch_dtype, f"combine on rank {rank}")
        if case.grad:
            (ref_out * grad_seed(mine, rank)).sum().backward()
            assert_close(x.grad, ref_x.grad, case.torch_dtype, f"grad x on rank {rank}")
            _check_weights_grad(weights.grad, ref_w.grad, case, rank)
    except AssertionError as error:
        return str(error)
    return ""


def _check_weights_grad(actual: torch.Tensor, expected: torch.Tensor, case: RoutingCase, rank: int) -> None:
    """``topk_weights``' gradient within the dtype's tolerance of the sum of its summands' magnitudes: each
    entry sums ``x * g`` over the hidden size, which cancels, so a few tokens' relative error says nothing."""
    mine = case.clean(rank)
    magnitude_x = mine.x.double().abs()
    weights = mine.topk_weights.double().requires_grad_(True)
    bound = dense_output(mine, case.world, case.num_experts, magnitude_x, weights)
    (bound * grad_seed(mine, rank).abs()).sum().backward()
    actual, expected = actual.double().cpu(), expected.double().cpu()
    assert actual.shape == expected.shape, f"grad topk_weights on rank {rank}: shape {tuple(actual.shape)}"
    assert torch.isfinite(actual).all(), f"grad topk_weights on rank {rank}: non-finite values"
    err = ((actual - expected).norm() / weights.grad.norm().clamp_min(1e-12)).item()
    assert err <= TOLERANCE[case.torch_dtype], f"grad topk_weights on rank {rank}: error {err:.2e} of the summands' size"


def judge(case: RoutingCase, backend: str, outcomes: list[str]) -> str | None:
    """``None`` if every rank's outcome is what the case asks, else why not."""
    expected = expected_error(case, backend)
    if expected is None:
        wrong = {rank: o for rank, o in enumerate(outcomes) if o != "ok"}
        return f"expected success: {wrong}" if wrong else None
    if not all(o.startswith("ValueError: ") for o in outcomes):
        return f"expected a ValueError on every rank: {outcomes}"
    if expected and not all(expected in o for o in outcomes):
        return f"expected {expected!r} in every rank's error: {outcomes}"
    # one message on every rank; a rank with a reason of its own (its fault, or a call the backend cannot
    # take on every rank) may add it ("; this rank: ..."), no other rank
    shared = {o.split("; this rank: ")[0] for o in outcomes}
    if len(shared) > 1:
        return f"the ranks raised different errors: {outcomes}"
    everyone = _cannot(case, backend) is not None
    added = [rank for rank, o in enumerate(outcomes) if "; this rank: " in o]
    if not everyone and any(rank != case.fault_rank for rank in added):
        return f"a rank without a fault gave a reason of its own: {outcomes}"
    if not everyone and case.fault == "bad_dtype" and "topk_weights must be float32" not in outcomes[case.fault_rank]:
        return f"the rank at fault did not name its reason: {outcomes}"
    return None


def property_run(rank: int, world_size: int, count: int, seed: int, backends: tuple[str, ...], summary: str,
                 device: torch.device = torch.device("cpu")) -> dict:
    """Run :func:`generate`'s ``count`` cases on ``backends`` with tensors on ``device`` (a CUDA device:
    the ``gpu`` profile of cases); rank 0 writes the tally to ``summary`` (JSON). Returns the tally;
    raises ``AssertionError`` (every rank) listing the runs that went wrong."""
    group = dist.group.WORLD
    tally: dict[str, Counter] = {backend: Counter() for backend in backends}
    failures = []
    profile = "gpu" if device.type == "cuda" else "cpu"
    for index, case in enumerate(generate(count, world_size, seed, profile=profile)):
        for backend in backends:
            if not runs_on(case, backend):
                continue
            run = f"{backend} #{index} {case.describe()}"
            if TRACE:
                print(f"rank {rank}: {run}", file=sys.stderr, flush=True)
            watchdog = threading.Timer(HANG_S, _hung, (run,))
            watchdog.start()
            outcome = _run(case, index, backend, rank, device, group)
            if TRACE and outcome != "ok":
                print(f"rank {rank}: {run}: {outcome}", file=sys.stderr, flush=True)
            outcomes = [None] * world_size
            dist.all_gather_object(outcomes, outcome, group=group)
            watchdog.cancel()
            verdict = judge(case, backend, outcomes)
            tally[backend]["ok" if outcomes[0] == "ok" else "same ValueError on every rank"] += verdict is None
            tally[backend]["failed"] += verdict is not None
            if verdict is not None:
                failures.append(f"{backend} #{index} {case.describe()}: {verdict}")
    result = {"world": world_size, "cases": count, "failures": failures, "runs": {b: dict(c) for b, c in tally.items()}}
    if rank == 0:
        Path(summary).write_text(json.dumps(result, indent=1))
    assert not failures, f"{len(failures)} runs went wrong:\n" + "\n".join(failures[:20])
    return result


def _hung(run: str) -> None:
    """End this rank: ``run`` has not finished within :data:`HANG_S` (a hang); print it and every thread's stack."""
    print(f"rank {dist.get_rank()}: no result after {HANG_S} s in {run}", file=sys.stderr, flush=True)
    faulthandler.dump_traceback(all_threads=True)
    os._exit(1)


def fake_backends() -> tuple[str, ...]:
    """The backends a CPU rank runs: torch, and DeepEP, UCCL-EP and HybridEP through the fakes."""
    import deep_ep
    import fused_a2a
    from uccl import ep

    assert deep_ep.__file__.startswith(FAKES[0]) and ep.__file__.startswith(FAKES[0]), "the fakes were not found"
    assert fused_a2a.HAVE_DEEP_EP and fused_a2a.HAVE_UCCL_EP and fused_a2a.HAVE_HYBRIDEP
    return ("torch", "deepep", "uccl", "hybridep")


def cpu_property_run(rank: int, world_size: int, count: int, seed: int, summary: str) -> None:
    """:func:`property_run` on CPU ranks with the fakes (``$FAKE_DEEP_EP_EVENTS`` and HybridEP's chunk
    variables left as the test set them)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    property_run(rank, world_size, count, seed, fake_backends(), summary)
