"""Every routing a framework can send, on every backend that runs on the CPU (torch; DeepEP, UCCL-EP and
HybridEP through the fakes), on 2 and 3 real gloo ranks, against the dense reference
(:mod:`property_workers`); and the issue's crashes as regression tests.

``pytest -m slow tests/test_routing_property.py`` runs the long version.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import property_workers
from ranks import spawn

# (world size, cases, seed): a few hundred runs in CI
CI_RUNS = [(2, 150, 1), (3, 80, 2)]
SLOW_RUNS = [(2, 1000, 11), (3, 400, 12), (4, 150, 13)]


def _property(world: int, count: int, seed: int, tmp_path: Path) -> dict:
    summary = tmp_path / f"summary-{world}.json"
    spawn(property_workers.cpu_property_run, world, count, seed, str(summary), sys_path=property_workers.FAKES)
    tally = json.loads(summary.read_text())
    print(f"\n{world} ranks, {count} cases: {json.dumps(tally['runs'])}")
    return tally


def _check(tally: dict, world: int) -> None:
    runs = tally["runs"]
    assert tally["failures"] == []
    assert all(counts.get("failed", 0) == 0 for counts in runs.values())
    assert runs["torch"]["ok"] >= tally["cases"] * 0.7  # most cases are valid, and the torch backend takes them all
    assert runs["torch"]["same ValueError on every rank"] >= 1  # the faults were exercised
    assert runs["hybridep"]["ok"] >= 5  # HybridEP's legal shapes are generated often enough
    if world in (2, 4, 8):
        assert runs["deepep"]["ok"] >= tally["cases"] * 0.3 and runs["uccl"]["ok"] >= tally["cases"] * 0.3
    else:  # DeepEP's and UCCL-EP's kernels do not exist for this group size: the same error on every rank
        assert runs["deepep"].get("ok", 0) == 0 and runs["deepep"]["same ValueError on every rank"] == tally["cases"]


@pytest.mark.parametrize("world,count,seed", CI_RUNS)
def test_every_routing_on_every_backend(world: int, count: int, seed: int, tmp_path: Path) -> None:
    _check(_property(world, count, seed, tmp_path), world)


@pytest.mark.slow
@pytest.mark.parametrize("world,count,seed", SLOW_RUNS)
def test_every_routing_on_every_backend_long(world: int, count: int, seed: int, tmp_path: Path) -> None:
    _check(_property(world, count, seed, tmp_path), world)
