"""The tuning.json format: round trip, validation messages, atomic and locked writes, lookup rules."""

from __future__ import annotations

import json
import multiprocessing

import pytest

from fused_a2a.shape import CallShape
from fused_a2a.tuning.table import (
    SCHEMA,
    TuningEntry,
    TuningFileError,
    TuningTable,
    best_within_budget,
    lookup,
    merge_entries,
    parse_table,
    read_table,
    update_table,
    write_table,
)

CLUSTER = {"id": "cpu-gloo-x2", "gpu": None, "gpus_per_node": 2, "nodes": 1, "intranode_link": None, "internode": None}


def entry(hidden=4096, num_tokens=1024, impl="p2p", world_size=2, dtype="bf16", topk=8, num_experts=64, **kw):
    fields = dict(
        backend="torch",
        world_size=world_size,
        dtype=dtype,
        hidden=hidden,
        num_tokens=num_tokens,
        topk=topk,
        num_experts=num_experts,
        dispatch={"impl": impl},
        combine={"impl": impl},
        measured={"dispatch_us": 100.0, "combine_us": 120.0},
        frontier=((8, 300.0, 320.0), (16, 150.0, 170.0), (24, 100.0, 120.0)),
    )
    return TuningEntry(**{**fields, **kw})


def table(*entries, cluster=CLUSTER):
    return TuningTable(SCHEMA, dict(cluster), "2026-11-24T22:00:00Z", "0.1.0", tuple(entries))


def test_round_trip(tmp_path) -> None:
    path = tmp_path / "tuning.json"
    original = table(entry(hidden=7168), entry(hidden=4096, impl="all_to_all"))
    write_table(path, original)
    assert read_table(path) == original
    data = json.loads(path.read_text())
    assert list(data) == ["schema", "cluster", "created", "tool_version", "entries"]
    assert data["entries"][0]["frontier"] == [[8, 300.0, 320.0], [16, 150.0, 170.0], [24, 100.0, 120.0]]


def test_write_is_atomic_and_leaves_no_temp_file(tmp_path) -> None:
    path = tmp_path / "sub" / "tuning.json"
    write_table(path, table(entry()))
    write_table(path, table(entry(), entry(hidden=7168)))
    assert [p.name for p in path.parent.iterdir()] == ["tuning.json"]
    assert len(read_table(path).entries) == 2


def test_invalid_table_is_not_written(tmp_path) -> None:
    path = tmp_path / "tuning.json"
    with pytest.raises(TuningFileError, match="entries.0..hidden must be a positive int, got -1"):
        write_table(path, table(entry(hidden=-1)))
    assert list(tmp_path.iterdir()) == []


def good_json() -> dict:
    return table(entry()).to_json()


def changed(path: str, value) -> dict:
    """``good_json()`` with the value at a dotted ``path`` replaced (``...`` deletes the key)."""
    data = good_json()
    *parents, last = path.split(".")
    node = data
    for part in parents:
        node = node[int(part)] if part.isdigit() else node[part]
    if value is ...:
        del node[last]
    else:
        node[last] = value
    return data


@pytest.mark.parametrize(
    "data, message",
    [
        (changed("schema", "a2a-bench/tuning/v2"), "schema must be 'a2a-bench/tuning/v1', got 'a2a-bench/tuning/v2'"),
        (changed("cluster", ...), "missing key cluster"),
        (changed("cluster.id", ""), r"cluster.id must be a name \(letters, digits, '.', '_', '-'\), got ''"),
        (changed("cluster.id", "../../etc"), r"cluster.id must be a name .*, got '../../etc'"),
        (changed("entries.0.routing", "zipf"), r"entries\[0\].routing must be uniform, zipf:<skew> or hot:<fraction>, got 'zipf'"),
        (changed("entries.0.build", 5), r"entries\[0\].build must be a non-empty string, got 5"),
        (changed("entries", {}), "entries must be a list, got {}"),
        (changed("entries.0.num_tokens", ...), r"missing key entries\[0\].num_tokens"),
        (changed("entries.0.hidden", "4096"), r"entries\[0\].hidden must be a positive int, got '4096'"),
        (changed("entries.0.hidden", -7168), r"entries\[0\].hidden must be a positive int, got -7168"),
        (changed("entries.0.topk", True), r"entries\[0\].topk must be a positive int, got True"),
        (changed("entries.0.dtype", "int8"), r"entries\[0\].dtype must be one of bf16, fp16, fp32, fp8, got 'int8'"),
        (changed("entries.0.backend", "nope"), r"entries\[0\].backend 'nope' is unknown \(backends: torch, deepep, hybridep, uccl\)"),
        (changed("entries.0.dispatch.num_sms", 24), r"entries\[0\].dispatch has unknown knob 'num_sms' for backend 'torch'"),
        (changed("entries.0.combine.impl", "ring"), r"entries\[0\].combine.impl must be one of all_to_all, p2p, got 'ring'"),
        (changed("entries.0.combine", {}), r"entries\[0\].dispatch and entries\[0\].combine must name the same knobs"),
        (changed("entries.0.measured.dispatch_us", "fast"), r"entries\[0\].measured.dispatch_us must be a number"),
        (changed("entries.0.frontier", [[8, 1.0]]), r"entries\[0\].frontier\[0\] must be \[num_sms, dispatch_us, combine_us\]"),
        (changed("entries", [good_json()["entries"][0]] * 2), r"entries\[1\] has the same key as entries\[0\]"),
        ([1, 2], "must hold a JSON object, got list"),
    ],
)
def test_each_problem_gets_one_clear_line(tmp_path, data, message) -> None:
    path = tmp_path / "tuning.json"
    path.write_text(json.dumps(data))
    with pytest.raises(TuningFileError, match=message) as info:
        read_table(path)
    assert str(info.value).startswith(f"tuning file {path}: ")
    assert "\n" not in str(info.value)


def test_truncated_json(tmp_path) -> None:
    path = tmp_path / "tuning.json"
    path.write_text(json.dumps(good_json(), indent=2)[:200])
    with pytest.raises(TuningFileError, match=r"tuning file .*tuning.json: is not valid JSON \(.* at line \d+ column \d+\)"):
        read_table(path)


def test_missing_file(tmp_path) -> None:
    with pytest.raises(TuningFileError, match=r"tuning file .*absent.json: no such file"):
        read_table(tmp_path / "absent.json")


def test_parse_names_the_source() -> None:
    with pytest.raises(TuningFileError, match="^tuning file <memory>: missing key schema$"):
        parse_table({}, "<memory>")


def test_merge_replaces_same_key_and_sorts() -> None:
    old = table(entry(hidden=7168, impl="p2p"), entry(hidden=2048))
    new = table(entry(hidden=7168, impl="all_to_all"), entry(hidden=4096))
    merged = merge_entries(old, new)
    assert [(e.hidden, e.dispatch["impl"]) for e in merged.entries] == [(2048, "p2p"), (4096, "p2p"), (7168, "all_to_all")]
    assert merge_entries(None, new).entries == (entry(hidden=4096), entry(hidden=7168, impl="all_to_all"))


def test_update_table_merges(tmp_path) -> None:
    path = tmp_path / "tuning.json"
    update_table(path, table(entry(hidden=2048), entry(hidden=4096)))
    merged = update_table(path, table(entry(hidden=4096, impl="all_to_all")))
    assert read_table(path) == merged
    assert [(e.hidden, e.dispatch["impl"]) for e in merged.entries] == [(2048, "p2p"), (4096, "all_to_all")]


def test_update_table_refuses_another_cluster(tmp_path) -> None:
    path = tmp_path / "tuning.json"
    update_table(path, table(entry()))
    before = path.read_text()
    other = {**CLUSTER, "id": "h200-x2-nv18"}
    with pytest.raises(TuningFileError, match="is for cluster 'cpu-gloo-x2', not 'h200-x2-nv18'"):
        update_table(path, table(entry(hidden=64), cluster=other))
    assert path.read_text() == before


def add_entries(path: str, first_hidden: int, start) -> None:
    start.wait()
    for hidden in range(first_hidden, first_hidden + 60, 2):
        update_table(path, table(entry(hidden=hidden)))


def test_concurrent_updates_lose_nothing(tmp_path) -> None:
    path = str(tmp_path / "tuning.json")
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(2)
    workers = [context.Process(target=add_entries, args=(path, first, start)) for first in (1000, 1001)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    assert [worker.exitcode for worker in workers] == [0, 0]
    assert [e.hidden for e in read_table(path).entries] == list(range(1000, 1060))


LOOKUP = table(
    entry(hidden=2048, num_tokens=512),
    entry(hidden=2048, num_tokens=4096),
    entry(hidden=4096, num_tokens=512),
    entry(hidden=4096, num_tokens=4096),
    entry(hidden=7168, num_tokens=1024, topk=8),
    entry(hidden=7168, num_tokens=1024, topk=2, impl="all_to_all"),
    entry(hidden=4096, num_tokens=512, dtype="fp16", impl="all_to_all"),
)


@pytest.mark.parametrize(
    "hidden, tokens, expected",
    [
        (4096, 512, (4096, 512)),  # exact
        (4096, 100, (4096, 512)),  # smallest num_tokens >= 100
        (4096, 513, (4096, 4096)),
        (4096, 9999, (4096, 4096)),  # none large enough: the largest
        (3000, 512, (2048, 512)),  # nearest hidden
        (3072, 512, (4096, 512)),  # equally near: the larger hidden
        (100_000, 1, (7168, 1024)),
    ],
)
def test_lookup_shape_rules(hidden, tokens, expected) -> None:
    found = lookup(LOOKUP, "torch", CallShape("bf16", hidden, world_size=2, tokens=(tokens,)))
    assert (found.hidden, found.num_tokens) == expected


def test_lookup_prefers_exact_topk_and_experts() -> None:
    assert lookup(LOOKUP, "torch", CallShape("bf16", 7168, topk=2, world_size=2, tokens=(1024,))).dispatch == {"impl": "all_to_all"}
    assert lookup(LOOKUP, "torch", CallShape("bf16", 7168, topk=8, world_size=2, tokens=(1024,))).dispatch == {"impl": "p2p"}
    assert lookup(LOOKUP, "torch", CallShape("bf16", 4096, topk=4, num_experts=7, world_size=2, tokens=(512,))).hidden == 4096


def test_lookup_dtype_world_size_backend_match_exactly() -> None:
    assert lookup(LOOKUP, "torch", CallShape("fp16", 7168, world_size=2, tokens=(99,))).dispatch == {"impl": "all_to_all"}
    assert lookup(LOOKUP, "torch", CallShape("fp32", 4096, world_size=2, tokens=(512,))) is None
    assert lookup(LOOKUP, "torch", CallShape("bf16", 4096, world_size=4, tokens=(512,))) is None
    assert lookup(LOOKUP, "deepep", CallShape("bf16", 4096, world_size=2, tokens=(512,))) is None


def test_best_within_budget() -> None:
    point = entry(frontier=((8, 300.0, 320.0), (16, 150.0, 170.0), (24, 160.0, 160.0), (32, 100.0, 120.0)))
    assert best_within_budget(point, 64) == 32
    assert best_within_budget(point, 31) == 16  # 16 and 24 tie at 320 us: the fewer SMs
    assert best_within_budget(point, 8) == 8
    assert best_within_budget(point, 7) is None
    assert best_within_budget(entry(frontier=()), 64) is None


def test_to_json_is_a_deep_copy() -> None:
    original = table(entry())
    data = original.to_json()
    data["entries"][0]["dispatch"]["impl"] = "all_to_all"
    assert original.entries[0].dispatch == {"impl": "p2p"}
