"""Run folders and tuning tables written the way the tool writes them, for tests that feed them to the CLI."""

from __future__ import annotations

import json
from pathlib import Path

from a2a_bench.engine.results import COLUMNS, RunInfo, append_row, column_kind, write_run_info
from a2a_bench.engine.spec import SweepSpec


def ok_row(**over) -> dict:
    """A complete ``ok`` row of a torch point on 2 ranks (every column of :data:`COLUMNS` filled)."""
    values = {"int": 1, "number": 10.0, "bool": True, "text": "x"}
    row = {name: values[column_kind(name)] for name in COLUMNS}
    row.update(point_id="p1", status="ok", backend="torch", knobs='{"impl": "all_to_all"}', num_sms="",
               world_size=2, cluster="cpu-gloo-x2", dtype="bf16", hidden=512, num_tokens=64, topk=2, num_experts=8,
               routing="uniform", skew=1.0, timestamp="2026-11-25T00:00:00Z")
    row.update(over)
    return row


def run_info(**cluster) -> RunInfo:
    return RunInfo(spec=SweepSpec().to_json(), cluster={"id": "cpu-gloo-x2", "gpu": None, **cluster}, world_size=2,
                   versions={"a2a_bench": "0.1.0"}, command=["a2a-bench", "sweep"], points=1, resumed_with_done=0)


def write_run(folder: Path, rows: list[dict] | None = None, info: dict | RunInfo | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for row in rows if rows is not None else [ok_row()]:
        append_row(folder / "results.csv", row)
    info = run_info() if info is None else info
    if isinstance(info, RunInfo):
        write_run_info(folder / "run.json", info)
    else:
        (folder / "run.json").write_text(json.dumps(info))


def tuning_json(folder: Path, **measured) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    entry = {"backend": "torch", "world_size": 2, "dtype": "bf16", "hidden": 512, "num_tokens": 64, "topk": 2,
             "num_experts": 8, "dispatch": {"impl": "p2p"}, "combine": {"impl": "p2p"},
             "measured": {"dispatch_us": 10.0, "combine_us": 12.0, "dispatch_algbw_gbps": 1.0,
                          "combine_algbw_gbps": 1.0, **measured}, "frontier": []}
    for key in [k for k, v in measured.items() if v is None]:
        del entry["measured"][key]
    (folder / "tuning.json").write_text(json.dumps({
        "schema": "a2a-bench/tuning/v1", "cluster": {"id": "cpu-gloo-x2"}, "created": "2026-11-25T00:00:00Z",
        "tool_version": "0.1.0", "entries": [entry]}))
