"""The knobs a group agrees on: one entry for all ranks whatever their token counts, a cache hit on warm
calls, a rewritten table picked up, and one clear error on every rank where ranks disagree."""

from __future__ import annotations

from pathlib import Path

import agreement_workers
from fused_a2a.tuning.table import SCHEMA, TuningEntry, TuningTable, write_table
from ranks import spawn

CLUSTER = "agree-x2"


def entry(num_tokens: int, impl: str) -> TuningEntry:
    return TuningEntry(backend="torch", world_size=2, dtype="bf16", hidden=32, num_tokens=num_tokens, topk=2,
                       num_experts=8, dispatch={"impl": impl}, combine={"impl": impl},
                       measured={"dispatch_us": 1.0, "combine_us": 1.0}, frontier=())


def write(folder: Path, *entries: TuningEntry) -> None:
    write_table(folder / CLUSTER / "tuning.json",
                TuningTable(SCHEMA, {"id": CLUSTER}, "2026-11-25T00:00:00Z", "0.1.0", entries))


def test_ranks_with_different_token_counts_agree_on_the_knobs(tmp_path: Path) -> None:
    write(tmp_path, entry(64, "p2p"), entry(1024, "all_to_all"))
    spawn(agreement_workers.different_token_counts, 2, str(tmp_path), CLUSTER)


def test_a_rewritten_table_is_picked_up_on_every_rank(tmp_path: Path) -> None:
    write(tmp_path, entry(64, "p2p"))
    spawn(agreement_workers.table_rewrite, 2, str(tmp_path), CLUSTER)


def test_ranks_that_disagree_get_one_error_each() -> None:
    spawn(agreement_workers.disagreeing_arguments, 2)
