"""Which knob settings of one (backend, shape) group to time: all of them, or a coordinate search.

The search times the SM counts coarsely (every other value and the last) with the other knobs at
their defaults, then the neighbours of the best SM count, then each other knob in turn over its
values with the rest fixed at the best so far. On a grid of 6 SM counts × 6 × 3 chunk sizes it times
about 14 of 108 settings. Every rank runs the same search on the same (rank-agreed) times, so the
ranks choose the same points without talking.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Sequence

from a2a_bench.engine.spec import Point

Cost = Callable[[Point], float]


def coordinate_search(points: Sequence[Point], defaults: dict[str, Any], cost: Cost, sms_knob: str | None = None) -> Point:
    """Time a subset of ``points`` (one backend and workload, a full knob grid) and return the best.

    Args:
        points: every knob combination of the group (the full grid; knobs tied to another, equal to
            it at every point, are not searched on their own).
        defaults: the backend's default knobs, the search's starting point where the grid has them.
        cost: times one point (µs, ``inf`` for a point that failed); called once per point at most.
        sms_knob: the knob counting SMs (searched first, coarsely), ``None`` when the backend has none.

    Returns:
        the point with the lowest cost among those timed.
    """
    grid = _grid(points)
    by_knobs = {tuple((name, dict(p.knobs)[name]) for name in grid): p for p in points}
    seen: dict[tuple, float] = {}
    sms_axis = sms_knob if sms_knob in grid else None

    def time(knobs: dict[str, Any]) -> float:
        key = tuple((name, knobs[name]) for name in grid)
        if key not in seen:
            seen[key] = cost(by_knobs[key])
        return seen[key]

    current = {name: defaults.get(name) if defaults.get(name) in values else values[0] for name, values in grid.items()}
    time(current)
    if sms_axis is not None and len(grid[sms_axis]) > 1:
        sms = grid[sms_axis]
        coarse = sorted(set(range(0, len(sms), 2)) | {len(sms) - 1})
        best = min(coarse, key=lambda i: time({**current, sms_axis: sms[i]}))
        best = min((i for i in (best - 1, best, best + 1) if 0 <= i < len(sms)),
                   key=lambda i: time({**current, sms_axis: sms[i]}))
        current[sms_axis] = sms[best]
    for name, values in grid.items():
        if name != sms_axis and len(values) > 1:
            current[name] = min(values, key=lambda v: time({**current, name: v}))
    return by_knobs[min(seen, key=seen.get)]


def search_size(points: Sequence[Point], sms_knob: str | None = None) -> int:
    """An upper bound on the points :func:`coordinate_search` times in this group."""
    grid = _grid(points)
    sms_axis = sms_knob if sms_knob in grid else None
    sms = len(grid.get(sms_axis, ()))
    size = (math.ceil(sms / 2) + (sms % 2 == 0) + 2) if sms > 1 else 1
    size += sum(len(v) for name, v in grid.items() if name != sms_axis and len(v) > 1)
    return min(size, len(points))


def groups(points: Iterable[Point]) -> list[list[Point]]:
    """``points`` split by (backend, workload), each group in grid order."""
    out: dict[tuple, list[Point]] = {}
    for p in points:
        out.setdefault((p.backend, p.workload), []).append(p)
    return list(out.values())


def _grid(points: Sequence[Point]) -> dict[str, tuple]:
    """Each searched knob with its values, in grid order; a knob equal to an earlier one at every
    point (an SM knob tied to the first) is left out."""
    names = [name for name, _ in points[0].knobs]
    knobs = [dict(p.knobs) for p in points]
    grid: dict[str, tuple] = {}
    for name in names:
        values = tuple(dict.fromkeys(k[name] for k in knobs))
        tied = len(values) > 1 and any(all(k[name] == k[other] for k in knobs) for other in grid)
        if not tied:
            grid[name] = values
    return grid
