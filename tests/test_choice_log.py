"""``FUSED_A2A_LOG``: the library says once per key, on rank 0, which backend, knobs and table entry a call
uses; a value that is not a level gives one warning and changes nothing."""

from __future__ import annotations

import io
import logging
import os
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from fused_a2a import log
from fused_a2a.tuning.table import SCHEMA, TuningEntry, TuningTable, write_table
from ranks import spawn

CLUSTER = "logs-x2"


def _worker(rank: int, world_size: int, table_dir: str) -> None:
    os.environ.update(FUSED_A2A_TUNING_DIR=table_dir, FUSED_A2A_CLUSTER_ID=CLUSTER, FUSED_A2A_LOG="info")
    import fused_a2a

    captured = io.StringIO()
    sys.stderr = captured  # the handler FUSED_A2A_LOG adds writes to the stderr of its first call
    try:
        x, idx, w = torch.randn(16, 32, dtype=torch.bfloat16), torch.randint(0, 8, (16, 2)), torch.rand(16, 2)
        for _ in range(3):  # one key, three calls
            fused_a2a.combine(*(lambda out: (out[0], out[4]))(fused_a2a.dispatch(x, idx, w, 8, backend="torch")))
        fused_a2a.dispatch(x.float(), idx, w, 8, backend="auto")  # a second key, without a table entry
    finally:
        sys.stderr = sys.__stderr__
    lines = [line for line in captured.getvalue().splitlines() if line.startswith("fused_a2a: ")]
    everyone = [None] * world_size
    dist.all_gather_object(everyone, lines)
    assert everyone[1] == [], everyone[1]  # rank 1 says nothing
    first, second = everyone[0]
    assert len(everyone[0]) == 2, everyone[0]
    assert first.startswith("fused_a2a: fused_a2a torch for bf16 hidden 32 top-2 8 experts on 2 ranks, uniform routing")
    assert "impl=p2p (table)" in first and f"table entry {table_dir}/{CLUSTER}/tuning.json: torch hidden 32, 64 tokens" in first
    assert "chosen by api mode" in first
    assert second.startswith("fused_a2a: fused_a2a auto -> torch (no table entry of an installed backend: torch) "
                             "for fp32 hidden 32")
    assert "impl=all_to_all (default)" in second and "no table entry" in second


def test_fused_a2a_log_info_says_each_keys_choice_once_on_rank_0(tmp_path: Path) -> None:
    entry = TuningEntry(backend="torch", world_size=2, dtype="bf16", hidden=32, num_tokens=64, topk=2, num_experts=8,
                        dispatch={"impl": "p2p"}, combine={"impl": "p2p"}, selected_by="api",
                        measured={"dispatch_us": 1.0, "combine_us": 1.0}, frontier=())
    write_table(tmp_path / CLUSTER / "tuning.json", TuningTable(SCHEMA, {"id": CLUSTER}, "t", "0.1.0", (entry,)))
    spawn(_worker, 2, str(tmp_path))


@pytest.fixture
def restore_logger(monkeypatch):
    monkeypatch.setattr(log, "_state", {"value": None, "handler": None, "warned": set()})
    yield
    if log._state["handler"] is not None:
        log.logger.removeHandler(log._state["handler"])
    log.logger.setLevel(logging.NOTSET)


def test_a_value_that_is_not_a_level_warns_once_and_changes_nothing(monkeypatch, restore_logger) -> None:
    monkeypatch.setenv("FUSED_A2A_LOG", "loud")
    handlers = list(log.logger.handlers)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            log.configure()
    assert [str(w.message) for w in caught] == [
        "fused_a2a: ignoring FUSED_A2A_LOG='loud': use one of debug, info, warning, error or off"]
    assert log.logger.handlers == handlers and log.logger.level == logging.NOTSET


def test_a_level_adds_one_handler_and_off_removes_it(monkeypatch, restore_logger) -> None:
    monkeypatch.setenv("FUSED_A2A_LOG", "DEBUG")
    log.configure()
    log.configure()
    ours = [h for h in log.logger.handlers if h is log._state["handler"]]
    assert len(ours) == 1 and log.logger.level == logging.DEBUG
    monkeypatch.setenv("FUSED_A2A_LOG", "off")
    log.configure()
    assert log._state["handler"] is None and ours[0] not in log.logger.handlers
