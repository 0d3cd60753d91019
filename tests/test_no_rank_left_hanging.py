"""No rank is left hanging (issue 19), on real gloo ranks (DeepEP and UCCL-EP through the fakes): the
crashes the issue found, one rank's bad expert id or wrong tensor raised as the same ``ValueError`` on
every rank (each call under a watchdog: a hang fails the test instead of blocking it), ranks calling
with different shapes, inputs in any memory layout, UCCL-EP with an empty rank on a warm call, and
destroyed groups freed."""

from __future__ import annotations

import hanging_workers as workers
from ranks import spawn

FAKES = workers.FAKES
SEED_AND_API = (("deepep", False), ("deepep", True), ("uccl", False), ("uccl", True))


def test_top1_with_an_empty_rank_and_odd_topk_with_one_received_row() -> None:
    """``stride(-1) must be 1 to view Long as Byte`` and ``stride(0) must be divisible by 8`` no more (the
    torch backend, and the fakes built on it)."""
    spawn(workers.issue_crashes, 2, ("torch", "deepep", "uccl"), sys_path=FAKES)


def test_a_bad_id_on_one_rank_raises_on_every_rank() -> None:
    spawn(workers.bad_id_on_one_rank, 2, (("torch", False), *SEED_AND_API), sys_path=FAKES)


def test_a_wrong_tensor_on_one_rank_raises_on_every_rank() -> None:
    spawn(workers.wrong_input_on_one_rank, 2, ("torch", "deepep"), sys_path=FAKES)


def test_ranks_calling_with_different_shapes_raise_the_same_error() -> None:
    spawn(workers.different_shapes, 2)


def test_non_contiguous_routing_reaches_the_fused_libraries_contiguous() -> None:
    """``Assertion error topk_idx is a contiguous [N, K] int64 tensor`` no more."""
    spawn(workers.non_contiguous_routing, 2, SEED_AND_API, sys_path=FAKES)


def test_rows_off_a_16_byte_boundary_reach_the_fused_libraries_aligned() -> None:
    """``CUDA error: misaligned address`` (the GPU property run: a one-row slice of a wider buffer is
    contiguous, DeepEP took it) no more, in dispatch, combine and both backwards."""
    spawn(workers.misaligned_rows, 2, (*SEED_AND_API, ("hybridep", False)), sys_path=FAKES)


def test_uccl_with_an_empty_rank_on_a_warm_call() -> None:
    """uccl 0.1.1 asserts num_tokens > 0: the adapter dispatches a placeholder row instead (the empty
    rank raised alone before, and its peer crashed in gloo)."""
    spawn(workers.uccl_empty_rank_warm, 2, sys_path=FAKES)


def test_a_destroyed_group_is_not_kept_alive() -> None:
    spawn(workers.destroyed_groups_are_freed, 2, sys_path=FAKES)


def test_sanitized_ids_lie_in_range_and_flag_exactly_the_bad_ones() -> None:
    """What DeepEP and UCCL-EP see of the ids (any layout in, contiguous ids in ``[-1, E)`` out) and the
    flag that makes every rank raise: set by an id below -1, of E or more, or the placeholder's."""
    import torch

    from fused_a2a.shared_errors import POISON_ID, sanitize_topk

    good = torch.tensor([[0, 7], [-1, 3], [5, -1]])
    ids, bad = sanitize_topk(good.t().contiguous().t(), 8)
    assert ids.is_contiguous() and torch.equal(ids, good) and not bad
    for wrong in (-2, 8, 1 << 40, POISON_ID):
        given = good.clone()
        given[1, 0] = wrong
        ids, bad = sanitize_topk(given, 8)
        assert bad and ids.min() >= -1 and ids.max() < 8 and torch.equal(ids[[0, 2]], good[[0, 2]])
