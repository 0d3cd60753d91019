"""Rank functions of ``tests/test_agreement.py``: the knobs a group agrees on (torch backend, gloo ranks)."""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist

from a2a_bench.engine.workload import WorkloadSpec
from reference import Case


def _inputs(rank: int, world_size: int, num_tokens: int):
    return Case(WorkloadSpec(num_tokens=num_tokens, hidden=32, topk=2, num_experts=8, rng_seed=3)).inputs(rank, world_size)


def _gathered(value) -> list:
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def different_token_counts(rank: int, world_size: int, table_dir: str, cluster: str) -> None:
    """Ranks holding 48 and 896 tokens under a table whose entries differ by tokens (64: p2p, 1024:
    all_to_all) use identical knobs, the group's largest count's entry; knobs gathered to prove it."""
    os.environ["FUSED_A2A_TUNING_DIR"] = table_dir
    os.environ["FUSED_A2A_CLUSTER_ID"] = cluster
    import fused_a2a
    from fused_a2a.tuning import agreement

    mine = _inputs(rank, world_size, 48 if rank == 0 else 896)
    out = fused_a2a.dispatch(mine.x, mine.topk_idx, mine.topk_weights, 8, backend="torch")
    fused_a2a.combine(out[0], out[4])
    chosen = _gathered(out[4].comm.dispatch_config)
    assert chosen[0] == chosen[1] and chosen[0].impl == "all_to_all", chosen
    stats = agreement.cache_stats()
    assert stats["agreements"] == 1
    for _ in range(3):
        fused_a2a.dispatch(mine.x, mine.topk_idx, mine.topk_weights, 8, backend="torch")
    assert agreement.cache_stats() == {**stats, "hits": stats["hits"] + 3}


def table_rewrite(rank: int, world_size: int, table_dir: str, cluster: str) -> None:
    """Warm calls hit the cache; a rewritten table is picked up (within STAT_EVERY calls) on every rank."""
    os.environ["FUSED_A2A_TUNING_DIR"] = table_dir
    os.environ["FUSED_A2A_CLUSTER_ID"] = cluster
    import fused_a2a
    from fused_a2a.tuning import agreement
    from fused_a2a.tuning.table import read_table, write_table

    mine = _inputs(rank, world_size, 64)

    def impl() -> str:
        return fused_a2a.dispatch(mine.x, mine.topk_idx, mine.topk_weights, 8, backend="torch")[4].comm.dispatch_config.impl

    assert impl() == "p2p"
    path = f"{table_dir}/{cluster}/tuning.json"
    if rank == 0:
        table = read_table(path)
        entries = tuple(type(e)(**{**e.__dict__, "dispatch": {"impl": "all_to_all"}, "combine": {"impl": "all_to_all"}})
                        for e in table.entries)
        time.sleep(0.01)  # a distinct modification time
        write_table(path, type(table)(**{**table.__dict__, "entries": entries}))
    dist.barrier()
    seen = [impl() for _ in range(agreement.STAT_EVERY + 1)]
    assert seen[-1] == "all_to_all" and agreement.cache_stats()["refreshes"] == 1, seen
    assert _gathered(seen.index("all_to_all")) == [seen.index("all_to_all")] * world_size  # the same call on every rank


def disagreeing_arguments(rank: int, world_size: int) -> None:
    """Explicit knobs or FUSED_A2A_* overrides that differ between ranks: the same ValueError on every rank."""
    import fused_a2a

    mine = _inputs(rank, world_size, 16)
    impl = "p2p" if rank == 0 else "all_to_all"
    with pytest.raises(ValueError, match=r"the ranks of the group have different knob arguments \(rank 0: impl=p2p; "
                                         r"rank 1: impl=all_to_all\)"):
        fused_a2a.dispatch(mine.x, mine.topk_idx, mine.topk_weights, 8, backend="torch", impl=impl)
    os.environ["FUSED_A2A_TORCH_IMPL"] = impl
    with pytest.raises(ValueError, match="different FUSED_A2A_\\* environment overrides .*FUSED_A2A_TORCH_IMPL=p2p"):
        fused_a2a.dispatch(mine.x.to(torch.float32), mine.topk_idx, mine.topk_weights, 8, backend="torch")
