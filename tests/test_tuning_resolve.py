"""Where knobs come from: argument > environment > tuning table > default, and unusable tables."""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import replace
from pathlib import Path

import pytest

import fused_a2a
from fused_a2a.backends import BACKENDS, BackendSpec, Knob
from fused_a2a.shape import CallShape
from fused_a2a import tuning
from fused_a2a.tuning.resolve import TuningWarning, best_backend, choose_backend, load_cluster_table, resolve, tuning_dirs
from fused_a2a.tuning.table import SCHEMA, TuningEntry, TuningFileError, TuningTable, write_table

CLUSTER_ID = "test-box-x2"


def table(impl: str = "p2p", cluster: str = CLUSTER_ID) -> TuningTable:
    point = TuningEntry(
        backend="torch",
        world_size=2,
        dtype="bf16",
        hidden=4096,
        num_tokens=1024,
        topk=8,
        num_experts=64,
        dispatch={"impl": impl},
        combine={"impl": impl},
        measured={"dispatch_us": 100.0, "combine_us": 120.0},
        frontier=(),
    )
    return TuningTable(SCHEMA, {"id": cluster}, "2026-11-24T22:00:00Z", "0.1.0", (point,))


@pytest.fixture
def tuning_dir(tmp_path, monkeypatch) -> Path:
    """An empty FUSED_A2A_TUNING_DIR, this cluster's id set, no overrides, empty caches."""
    monkeypatch.setenv("FUSED_A2A_TUNING_DIR", str(tmp_path))
    monkeypatch.setenv("FUSED_A2A_CLUSTER_ID", CLUSTER_ID)
    monkeypatch.delenv("FUSED_A2A_TORCH_IMPL", raising=False)
    monkeypatch.delenv("FUSED_A2A_TUNING_STRICT", raising=False)
    tuning.clear()
    yield tmp_path
    tuning.clear()


def table_file(folder: Path) -> Path:
    return folder / CLUSTER_ID / "tuning.json"


def call(explicit=None, **kw):
    facts = {**dict(backend="torch", world_size=2, dtype="bf16", hidden=4096, num_tokens=1024, topk=8, num_experts=64), **kw}
    return resolve(facts.pop("backend"), call_shape(facts), explicit or {}, **facts)


def call_shape(facts: dict) -> CallShape:
    """The CallShape of the shape facts in ``facts`` (removed from it)."""
    return CallShape(facts.pop("dtype"), facts.pop("hidden"), facts.pop("topk", None), facts.pop("num_experts", None),
                     facts.pop("routing", None), world_size=facts.pop("world_size"), tokens=(facts.pop("num_tokens"),))


def test_search_dirs(tuning_dir) -> None:
    packaged = Path(fused_a2a.__file__).resolve().parents[2] / "tuning_results"
    assert tuning_dirs() == [tuning_dir, packaged]


def test_default_without_table(tuning_dir) -> None:
    got = call()
    assert (got.dispatch, got.combine, got.sources) == ({"impl": "all_to_all"}, {"impl": "all_to_all"}, {"impl": "default"})
    assert got.table_path is None and got.entry is None


def test_table_beats_default(tuning_dir) -> None:
    write_table(table_file(tuning_dir), table("p2p"))
    got = call()
    assert (got.dispatch, got.combine, got.sources) == ({"impl": "p2p"}, {"impl": "p2p"}, {"impl": "table"})
    assert got.table_path == str(table_file(tuning_dir))
    assert got.entry.hidden == 4096


def test_table_without_a_matching_entry(tuning_dir) -> None:
    write_table(table_file(tuning_dir), table("p2p"))
    got = call(dtype="fp32")
    assert got.sources == {"impl": "default"} and got.entry is None
    assert got.table_path == str(table_file(tuning_dir))


def test_environment_beats_table(tuning_dir, monkeypatch) -> None:
    write_table(table_file(tuning_dir), table("p2p"))
    monkeypatch.setenv("FUSED_A2A_TORCH_IMPL", "all_to_all")
    got = call()
    assert (got.dispatch, got.sources) == ({"impl": "all_to_all"}, {"impl": "environment"})


def test_argument_beats_environment(tuning_dir, monkeypatch) -> None:
    write_table(table_file(tuning_dir), table("all_to_all"))
    monkeypatch.setenv("FUSED_A2A_TORCH_IMPL", "all_to_all")
    got = call({"impl": "p2p"})
    assert (got.dispatch, got.combine, got.sources) == ({"impl": "p2p"}, {"impl": "p2p"}, {"impl": "argument"})


def test_unknown_knob_argument(tuning_dir) -> None:
    with pytest.raises(ValueError, match="backend 'torch' has no knob num_sms; its knobs: impl"):
        call({"num_sms": 24})


def test_explicit_cluster_argument(tuning_dir) -> None:
    write_table(tuning_dir / "other-box" / "tuning.json", table("p2p", cluster="other-box"))
    assert call().sources == {"impl": "default"}
    assert call(cluster="other-box").sources == {"impl": "table"}


def test_user_dir_before_packaged(tuning_dir, tmp_path_factory, monkeypatch) -> None:
    packaged = tmp_path_factory.mktemp("packaged")
    write_table(table_file(packaged), table("all_to_all"))
    write_table(table_file(tuning_dir), table("p2p"))
    monkeypatch.setattr("fused_a2a.tuning.resolve.tuning_dirs", lambda: [tuning_dir, packaged])
    assert call().dispatch == {"impl": "p2p"}
    table_file(tuning_dir).unlink()
    tuning.clear()
    assert call().dispatch == {"impl": "all_to_all"}


def corrupt(path: Path) -> str:
    path.write_text(path.read_text()[:100])
    return "is not valid JSON"


def other_schema(path: Path) -> str:
    path.write_text(json.dumps({**json.loads(path.read_text()), "schema": "a2a-bench/tuning/v0"}))
    return "schema must be 'a2a-bench/tuning/v1'"


def other_cluster(path: Path) -> str:
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "cluster": {"id": "h200-x2-nv18"}}))
    return "is for cluster 'h200-x2-nv18', not 'test-box-x2'"


@pytest.mark.parametrize("spoil", [corrupt, other_schema, other_cluster])
def test_unusable_table_warns_once_and_uses_defaults(tuning_dir, spoil) -> None:
    path = table_file(tuning_dir)
    write_table(path, table("p2p"))
    problem = spoil(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first, second = call(), call(hidden=7168)
    assert [str(w.message) for w in caught if w.category is TuningWarning] == [
        f"tuning file {path}: {problem}" + str(caught[0].message).split(problem, 1)[1]
    ]
    assert str(caught[0].message).endswith("; ignored") and "\n" not in str(caught[0].message)
    assert first.sources == second.sources == {"impl": "default"}
    assert first.table_path is None


@pytest.mark.parametrize("spoil", [corrupt, other_schema, other_cluster])
def test_strict_mode_raises(tuning_dir, monkeypatch, spoil) -> None:
    path = table_file(tuning_dir)
    write_table(path, table("p2p"))
    problem = spoil(path)
    with pytest.raises(TuningFileError, match=problem):
        load_cluster_table(CLUSTER_ID, strict=True)
    monkeypatch.setenv("FUSED_A2A_TUNING_STRICT", "1")
    with pytest.raises(TuningFileError, match=problem):
        call()


@pytest.fixture
def fake_backend(monkeypatch):
    """A second backend ``fake`` with an int knob ``num_sms`` (default 20), installed."""
    spec = BackendSpec("fake", (Knob("num_sms", 20, (16, 24), "SMs"),), make_comm=lambda d, c: None)
    monkeypatch.setitem(BACKENDS, "fake", spec)
    return spec


def fake_entry(dispatch_us: float) -> TuningEntry:
    point = table().entries[0]
    return replace(point, backend="fake", dispatch={"num_sms": 24}, combine={"num_sms": 24},
                   measured={"dispatch_us": dispatch_us, "combine_us": 100.0})


def test_environment_value_takes_the_knob_type(tuning_dir, monkeypatch, fake_backend) -> None:
    monkeypatch.setenv("FUSED_A2A_FAKE_NUM_SMS", "24")
    assert call(backend="fake").dispatch == {"num_sms": 24}
    monkeypatch.setenv("FUSED_A2A_FAKE_NUM_SMS", "many")
    with pytest.warns(TuningWarning, match="ignoring environment variable FUSED_A2A_FAKE_NUM_SMS: knob num_sms takes int values"):
        assert call(backend="fake").sources == {"num_sms": "default"}
    monkeypatch.setenv("FUSED_A2A_TUNING_STRICT", "1")
    with pytest.raises(ValueError, match="environment variable FUSED_A2A_FAKE_NUM_SMS: knob num_sms takes int values"):
        call(backend="fake")


def test_best_backend(tuning_dir, monkeypatch, fake_backend) -> None:
    shape = call_shape(dict(world_size=2, dtype="bf16", hidden=4096, num_tokens=1024, topk=8, num_experts=64))
    assert best_backend(shape) == "torch"  # no table
    base = table("p2p")  # torch: 100 + 120 us
    write_table(table_file(tuning_dir), replace(base, entries=(*base.entries, fake_entry(10.0))))
    tuning.clear()
    assert best_backend(shape) == "fake"
    monkeypatch.setitem(BACKENDS, "fake", replace(fake_backend, unavailable=lambda: "not installed"))
    assert best_backend(shape) == "torch"
    write_table(table_file(tuning_dir), replace(base, entries=(*base.entries, fake_entry(500.0))))
    tuning.clear()
    assert best_backend(shape) == "torch"


def step_entry(backend: str, kernel_us: float, api_us: float, selected_by: str = "api") -> TuningEntry:
    """An entry of a table tuned after issue 23: every mode's times recorded, chosen by ``selected_by``."""
    point = table().entries[0]
    knobs = {"impl": "p2p"} if backend == "torch" else {"num_sms": 24}
    chosen = api_us if selected_by == "api" else kernel_us
    return replace(point, backend=backend, dispatch=knobs, combine=knobs, selected_by=selected_by, measured={
        "dispatch_us": chosen, "combine_us": chosen, "dispatch_kernel_us": kernel_us, "combine_kernel_us": kernel_us,
        "dispatch_api_us": api_us, "combine_api_us": api_us})


def test_auto_ranks_backends_by_the_api_round_trip_a_step_pays(tuning_dir, fake_backend) -> None:
    shape = call_shape(dict(world_size=2, dtype="bf16", hidden=4096, num_tokens=1024, topk=8, num_experts=64))
    # fake's cached kernels are 3x faster than torch's, its full call 2x slower: a step pays the full call
    base = table()
    write_table(table_file(tuning_dir), replace(base, entries=(step_entry("torch", 300.0, 400.0),
                                                               step_entry("fake", 100.0, 800.0, selected_by="kernel"))))
    tuning.clear()
    choice = choose_backend(shape)
    assert (choice.backend, choice.mode, choice.costs) == ("torch", "api", (("torch", 800.0), ("fake", 1600.0)))
    # an older table: fake's entry holds kernel times only, so both are compared on kernel times
    old_fake = replace(fake_entry(50.0), measured={"dispatch_us": 50.0, "combine_us": 50.0})
    write_table(table_file(tuning_dir), replace(base, entries=(step_entry("torch", 300.0, 400.0), old_fake)))
    tuning.clear()
    choice = choose_backend(shape)
    assert (choice.backend, choice.mode, choice.costs) == ("fake", "kernel", (("fake", 100.0), ("torch", 600.0)))


def test_resolution_logged_once_at_debug(tuning_dir, caplog) -> None:
    write_table(table_file(tuning_dir), table("p2p"))
    with caplog.at_level(logging.DEBUG, logger="fused_a2a"):
        call(num_tokens=1000)
        call(num_tokens=900)  # the same entry and sources: not logged again
        call({"impl": "all_to_all"})
    lines = [r.getMessage() for r in caplog.records if r.name == "fused_a2a"]
    assert len(lines) == 2
    assert "torch" in lines[0] and "'impl': 'table'" in lines[0] and str(table_file(tuning_dir)) in lines[0]
    assert "'impl': 'argument'" in lines[1]
