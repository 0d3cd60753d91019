"""The coordinate search: near the exhaustive best, with a fraction of the timings."""

from __future__ import annotations

import itertools
import math

import pytest

from a2a_bench.engine.search import coordinate_search, groups, search_size
from a2a_bench.engine.spec import Point
from a2a_bench.engine.workload import WorkloadSpec

SMS = (8, 16, 24, 32, 48, 64)
SEND = (4, 8, 12, 16, 24, 32)
RECV = (128, 256, 512)
W = WorkloadSpec(num_tokens=4096, hidden=7168, topk=8, num_experts=64)


def grid(workload: WorkloadSpec = W) -> list[Point]:
    return [Point("x", (("num_sms", s), ("send", a), ("recv", b)), workload, 2)
            for s, a, b in itertools.product(SMS, SEND, RECV)]


def dispatch_like(point: Point) -> float:
    """A DeepEP-shaped cost: faster with SMs up to a knee, a best chunk size, a mild interaction."""
    k = dict(point.knobs)
    sms_term = 950.0 / min(k["num_sms"], 52) ** 0.9 + 0.4 * k["num_sms"]
    send_term = 1.0 + 0.02 * (math.log2(k["send"]) - math.log2(16 if k["num_sms"] >= 32 else 8)) ** 2
    recv_term = {128: 1.06, 256: 1.0, 512: 1.02}[k["recv"]]
    return sms_term * send_term * recv_term


@pytest.mark.parametrize("cost_fn", [dispatch_like, lambda p: 1000.0 / dict(p.knobs)["num_sms"] + dict(p.knobs)["send"]])
def test_search_is_within_3_percent_with_at_most_a_third_of_the_points(cost_fn) -> None:
    points = grid()
    timed = []

    def cost(point: Point) -> float:
        timed.append(point.point_id)
        return cost_fn(point)

    best = coordinate_search(points, {"num_sms": 24, "send": 8, "recv": 256}, cost, "num_sms")
    exhaustive = min(cost_fn(p) for p in points)
    assert cost_fn(best) <= 1.03 * exhaustive
    assert len(timed) == len(set(timed)) <= len(points) / 3
    assert len(timed) <= search_size(points, "num_sms")


def test_failed_points_are_never_chosen() -> None:
    points = grid()
    failing = {p.point_id for p in points if dict(p.knobs)["num_sms"] == 64}
    best = coordinate_search(points, {}, lambda p: math.inf if p.point_id in failing else dispatch_like(p), "num_sms")
    assert best.point_id not in failing


def test_a_single_knob_grid_times_every_value() -> None:
    points = [Point("torch", (("impl", v),), W, 2) for v in ("all_to_all", "p2p")]
    timed = []
    coordinate_search(points, {"impl": "all_to_all"}, lambda p: timed.append(p) or 1.0)
    assert timed == points and search_size(points) == 2


def test_groups_split_by_backend_and_workload() -> None:
    other = WorkloadSpec(num_tokens=512, hidden=7168, topk=8, num_experts=64)
    split = groups(grid() + grid(other))
    assert [len(g) for g in split] == [108, 108] and split[1][0].workload == other


def test_a_grid_of_one_point_times_it() -> None:
    points = [Point("torch", (("impl", "p2p"),), W, 2)]
    timed = []
    assert coordinate_search(points, {"impl": "all_to_all"}, lambda p: timed.append(p) or 1.0) == points[0]
    assert timed == points
