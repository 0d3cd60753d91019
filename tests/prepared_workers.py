"""Rank bodies of tests/test_prepared_inputs.py (spawned ranks import this module by name)."""

from __future__ import annotations

import importlib

import torch
import torch.distributed as dist

from a2a_bench.engine import runner
from a2a_bench.engine.runner import RunContext
from a2a_bench.engine.spec import SweepSpec, expand
from a2a_bench.engine.sweep import _measure


def reuse_and_reset(rank: int, world_size: int) -> None:
    """A workload's inputs and reference are made once for its knob settings, made again for the next
    workload, and after a failed point on every rank alike (the next point's collectives match)."""
    importlib.import_module("faulty_backend")  # registers the "faulty" backend, in the ranks only
    made = {"inputs": 0, "reference": 0}
    make_inputs, reference = runner.make_inputs, runner.reference_round_trip

    def counting_inputs(*args, **kwargs):
        made["inputs"] += 1
        return make_inputs(*args, **kwargs)

    def counting_reference(*args, **kwargs):
        made["reference"] += 1
        return reference(*args, **kwargs)

    runner.make_inputs, runner.reference_round_trip = counting_inputs, counting_reference
    ctx = RunContext(torch.device("cpu"), "cpu-gloo-x2", 0.0, 0, 1)
    grid = dict(backends=("torch", "faulty"), hidden=(64, 128), tokens=(16,), topk=(2,), experts=(4,), warmup=0, iters=1,
                knobs={"torch": {"impl": ("all_to_all", "p2p")}, "faulty": {"fault": ("none", "raise")}})
    points = expand(SweepSpec(**grid), world_size)
    torch_h64 = [p for p in points if p.backend == "torch" and p.workload.hidden == 64]
    rows = [_measure(p, ctx) for p in torch_h64]
    assert [r["status"] for r in rows] == ["ok", "ok"] and rows[0]["inputs_hash"] == rows[1]["inputs_hash"]
    assert made == {"inputs": 1, "reference": 1}, made
    other = next(p for p in points if p.backend == "torch" and p.workload.hidden == 128)
    assert _measure(other, ctx)["status"] == "ok" and made == {"inputs": 2, "reference": 2}, made
    faulty = [p for p in points if p.backend == "faulty" and p.workload.hidden == 128]
    failed = _measure(next(p for p in faulty if p.knob_dict["fault"] == "raise"), ctx)
    assert failed["status"] == "error: RuntimeError: injected failure" and ctx.prepared == {}
    fine = _measure(next(p for p in faulty if p.knob_dict["fault"] == "none"), ctx)
    assert fine["status"] == "ok" and made == {"inputs": 3, "reference": 3}, made
    hashes = [None] * world_size
    dist.all_gather_object(hashes, fine["inputs_hash"])
    assert len(set(hashes)) == 1
