"""The ``hybridep`` backend and the HybridEP seed functions on 2 gloo ranks over the CPU fake of
``deep_ep.HybridEPBuffer``; the group's agreement on knobs (any backend)."""

from __future__ import annotations

from pathlib import Path

import pytest

import hybridep_workers
from fused_a2a.tuning.table import SCHEMA, TuningEntry, TuningTable, write_table
from ranks import spawn


@pytest.mark.parametrize("world_size", [2, 4])
def test_neutral_path_matches_the_reference(world_size: int) -> None:
    spawn(hybridep_workers.neutral_path, world_size, sys_path=hybridep_workers.FAKES)


def test_seed_permute_path_matches_the_reference() -> None:
    spawn(hybridep_workers.seed_permute_path, 2, sys_path=hybridep_workers.FAKES)


def test_a_handle_is_served_by_the_buffer_that_made_it() -> None:
    spawn(hybridep_workers.handle_keeps_its_buffer, 2, sys_path=hybridep_workers.FAKES)


def test_limits_are_value_errors_before_hybridep_runs() -> None:
    spawn(hybridep_workers.limits, 2, sys_path=hybridep_workers.FAKES)


def test_ranks_with_different_token_counts_agree_on_the_knobs(tmp_path: Path) -> None:
    cluster = "agree-x2"

    def entry(num_tokens: int, impl: str) -> TuningEntry:
        return TuningEntry(backend="torch", world_size=2, dtype="bf16", hidden=32, num_tokens=num_tokens, topk=2,
                           num_experts=8, dispatch={"impl": impl}, combine={"impl": impl},
                           measured={"dispatch_us": 1.0, "combine_us": 1.0}, frontier=())

    table = TuningTable(SCHEMA, {"id": cluster}, "2026-11-25T00:00:00Z", "0.1.0", (entry(64, "p2p"), entry(1024, "all_to_all")))
    write_table(tmp_path / cluster / "tuning.json", table)
    spawn(hybridep_workers.agreed_knobs, 2, str(tmp_path), cluster, sys_path=hybridep_workers.FAKES)
