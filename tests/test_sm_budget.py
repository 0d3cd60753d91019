"""An SM budget picks the best measured config within it (argument or environment)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fused_a2a.backends import BACKENDS, BackendSpec, Knob
from fused_a2a import tuning
from fused_a2a.tuning.resolve import resolve
from fused_a2a.shape import CallShape

SPEC = BackendSpec(
    name="smsy",
    knobs=(Knob("num_sms", 20, (8, 16, 24, 32, 48, 64), "SMs"), Knob("chunk", 8, (4, 8, 16), "chunk")),
    make_comm=lambda d, c: None,
)
ENTRY = {"backend": "smsy", "world_size": 2, "dtype": "bf16", "hidden": 7168, "num_tokens": 4096, "topk": 8,
         "num_experts": 64, "dispatch": {"num_sms": 64, "chunk": 16}, "combine": {"num_sms": 64, "chunk": 4},
         "measured": {"dispatch_us": 237.0, "combine_us": 238.0},
         "frontier": [[16, 511.0, 599.0], [24, 350.0, 424.0], [32, 300.0, 336.0], [64, 237.0, 238.0]]}


@pytest.fixture
def table(tmp_path: Path, monkeypatch):
    monkeypatch.setitem(BACKENDS, "smsy", SPEC)
    folder = tmp_path / "h200-x2-nv18"
    folder.mkdir()
    (folder / "tuning.json").write_text(json.dumps({
        "schema": "a2a-bench/tuning/v1", "cluster": {"id": "h200-x2-nv18"}, "created": "2026-11-24T00:00:00Z",
        "tool_version": "0.1.0", "entries": [ENTRY]}))
    monkeypatch.setenv("FUSED_A2A_TUNING_DIR", str(tmp_path))
    monkeypatch.delenv("FUSED_A2A_NUM_SMS_BUDGET", raising=False)
    tuning.clear()
    yield
    tuning.clear()


def call(**kwargs):
    shape = CallShape("bf16", 7168, world_size=2, tokens=(4096,))
    return resolve("smsy", shape, kwargs.pop("explicit", {}), cluster="h200-x2-nv18", **kwargs)


def test_no_budget_takes_the_table(table) -> None:
    res = call()
    assert res.dispatch == {"num_sms": 64, "chunk": 16} and res.sources["num_sms"] == "table"


@pytest.mark.parametrize("budget, sms, source", [(64, 64, "table"), (40, 32, "table (SM budget)"),
                                                 (24, 24, "table (SM budget)"), (12, 12, "budget")])
def test_budget_argument_picks_the_best_frontier_point_within_it(table, budget, sms, source) -> None:
    res = call(num_sms_budget=budget)
    assert res.dispatch["num_sms"] == res.combine["num_sms"] == sms and res.sources["num_sms"] == source
    assert res.dispatch["chunk"] == 16 and res.combine["chunk"] == 4


def test_budget_from_environment(table, monkeypatch) -> None:
    monkeypatch.setenv("FUSED_A2A_NUM_SMS_BUDGET", "30")
    assert call().dispatch["num_sms"] == 24


def test_budget_keeps_a_default_that_fits(table) -> None:
    res = resolve("smsy", CallShape("bf16", 7168, world_size=4, tokens=(4096,)), {}, cluster="h200-x2-nv18", num_sms_budget=24)
    assert res.dispatch["num_sms"] == 20 and res.sources["num_sms"] == "default"


def test_explicit_sms_beat_the_budget(table) -> None:
    res = call(explicit={"num_sms": 64}, num_sms_budget=16)
    assert res.dispatch["num_sms"] == 64 and res.sources["num_sms"] == "argument"


@pytest.mark.parametrize("text", ["many", "0", "-8"])
def test_bad_budget_environment_is_ignored_with_one_warning_or_refused_when_strict(table, monkeypatch, text) -> None:
    from fused_a2a.tuning.resolve import TuningWarning

    monkeypatch.setenv("FUSED_A2A_NUM_SMS_BUDGET", text)
    with pytest.warns(TuningWarning, match="ignoring environment variable FUSED_A2A_NUM_SMS_BUDGET must be a positive integer"):
        res = call()
    assert res.dispatch["num_sms"] == 64 and res.sources["num_sms"] == "table"  # no budget applied
    monkeypatch.setenv("FUSED_A2A_TUNING_STRICT", "1")
    with pytest.raises(ValueError, match="FUSED_A2A_NUM_SMS_BUDGET must be a positive integer"):
        call()


def test_knee_is_the_fewest_sms_within_5_percent_of_the_best() -> None:
    from a2a_bench.reports.report import knee

    assert knee([(16, 511.0, 599.0), (24, 350.0, 424.0), (32, 300.0, 336.0), (48, 240.0, 257.0), (64, 237.0, 238.0)]) == 48
    assert knee([(32, 300.0, 336.0), (48, 243.0, 261.0), (64, 237.0, 238.0)]) == 64
    assert knee([(64, 237.0, 238.0)]) == 64
    assert knee(()) is None
