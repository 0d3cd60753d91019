"""How good the default search is on a real grid: the points it timed against an ``--exhaustive`` run
of the same knob grid, and whether the config it chose is within a tolerance (3%) of the exhaustive best.

Two run folders: one swept with the default (coordinate) search, one with ``--exhaustive``; their
(backend, shape) groups are compared where both runs hold them (the exhaustive run may cover a few
shapes of the default run's grid), and each compared backend must have the same knob grid in both
runs. The cost is the search's own (:func:`a2a_bench.engine.sweep.search_cost`: the dispatch +
combine api medians of a verified ``ok`` row, kernel where api was not timed). The search's choice is judged by its time in the exhaustive run, next to that run's best: both
come from one run, so run-to-run drift of the machine does not enter the ratio.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from rich.table import Table

from a2a_bench.engine.results import RESULTS_FILE, RUN_FILE, ResultsError, read_results, read_run_info
from a2a_bench.engine.workload import routing_key
from a2a_bench.engine.spec import SweepSpec, knob_grid
from a2a_bench.engine.sweep import search_cost

GROUP = ["backend", "world_size", "dtype", "routing_key", "hidden", "num_tokens", "topk", "num_experts"]


@dataclass(frozen=True)
class GroupCheck:
    """One (backend, shape) group of both runs.

    Attributes:
        group: the values of :data:`GROUP`.
        grid: settings in the group's knob grid.
        timed: points the default search timed (rows of the default run, any status).
        exhaustive_timed: rows of the exhaustive run (``< grid``: it did not finish the group).
        chosen: the default search's best config (``None``: it found no verified ``ok`` point).
        chosen_us: that config's dispatch + combine µs in the exhaustive run (``None``: not ``ok`` there).
        best: the exhaustive run's best config (``None``: no verified ``ok`` point).
        best_us: its dispatch + combine µs.
        searched: the knobs with more than one value in the grid (what tables show of a config).
    """

    group: tuple
    grid: int
    timed: int
    exhaustive_timed: int
    chosen: dict | None
    chosen_us: float | None
    best: dict | None
    best_us: float | None
    searched: tuple[str, ...] = ()

    @property
    def ratio(self) -> float | None:
        """The chosen config's time over the exhaustive best's (1.0: the search found the best)."""
        if self.chosen_us is None or self.best_us is None:
            return None
        return self.chosen_us / self.best_us

    def within(self, tolerance: float) -> bool | None:
        """The choice is at most ``tolerance`` (0.03: 3%) slower than the best; ``None`` when it
        cannot be judged (no choice, or the exhaustive run did not time the whole group)."""
        if self.ratio is None or self.exhaustive_timed < self.grid:
            return None
        return self.ratio <= 1.0 + tolerance


def spec_of(run_dir: Path) -> SweepSpec:
    """The sweep spec a run folder's ``run.json`` records."""
    return SweepSpec.from_json(read_run_info(run_dir / RUN_FILE).spec)


def check_search(default_dir: Path, exhaustive_dir: Path) -> list[GroupCheck]:
    """Compare the groups both runs hold (see the module's docstring), in the exhaustive run's order.

    Raises:
        ResultsError: a run folder is not readable, the first run is exhaustive or the second is not,
            they ran on different clusters, a compared backend has another knob grid in each, or no
            (backend, shape) group is in both.
    """
    specs = {"default": spec_of(default_dir), "exhaustive": spec_of(exhaustive_dir)}
    if specs["default"].exhaustive:
        raise ResultsError(f"{default_dir} is an --exhaustive run: pass a default-search run first")
    if not specs["exhaustive"].exhaustive:
        raise ResultsError(f"{exhaustive_dir} is not an --exhaustive run: pass one second")
    clusters = [read_run_info(d / RUN_FILE).cluster["id"] for d in (default_dir, exhaustive_dir)]
    if clusters[0] != clusters[1]:
        raise ResultsError(f"the runs are of different clusters ({clusters[0]} and {clusters[1]})")
    default, exhaustive = (_keyed(read_results(d / RESULTS_FILE)) for d in (default_dir, exhaustive_dir))
    common = [key for key in dict.fromkeys(map(tuple, exhaustive[GROUP].itertuples(index=False)))
              if key in set(map(tuple, default[GROUP].itertuples(index=False)))]
    if not common:
        raise ResultsError(f"no (backend, shape) of {exhaustive_dir} is in {default_dir}: nothing to compare")
    grids = {}
    for backend in dict.fromkeys(key[0] for key in common):
        grids[backend] = knob_grid(specs["exhaustive"], backend)
        other = knob_grid(specs["default"], backend)
        if other != grids[backend]:
            differs = next(name for name in grids[backend] if grids[backend][name] != other.get(name))
            raise ResultsError(f"the runs search different knob grids for {backend}: {differs} "
                               f"{list(other.get(differs, ()))} in {default_dir}, "
                               f"{list(grids[backend][differs])} in {exhaustive_dir}")
    by_group_default = dict(iter(default.groupby(GROUP, sort=False)))
    by_group_exhaustive = dict(iter(exhaustive.groupby(GROUP, sort=False)))
    checks = []
    for key in common:
        rows, full = by_group_default[key], by_group_exhaustive[key]
        chosen, best = _best(rows), _best(full)
        chosen_us = None
        if chosen is not None:
            same = full[(full["point_id"] == chosen["point_id"]) & _usable(full)]
            chosen_us = float(same["cost"].min()) if len(same) else None
        checks.append(GroupCheck(
            group=key, grid=math.prod(len(values) for values in grids[key[0]].values()),
            timed=int(rows["point_id"].nunique()), exhaustive_timed=int(full["point_id"].nunique()),
            chosen=None if chosen is None else json.loads(chosen["knobs"]), chosen_us=chosen_us,
            best=None if best is None else json.loads(best["knobs"]),
            best_us=None if best is None else float(best["cost"]),
            searched=tuple(name for name, values in grids[key[0]].items() if len(values) > 1),
        ))
    return checks


def _keyed(results: pd.DataFrame) -> pd.DataFrame:
    """``results`` with the group's routing key and each row's cost as the search ranks it (µs)."""
    return results.assign(
        routing_key=[routing_key(r, s) for r, s in zip(results["routing"], results["skew"])],
        cost=[search_cost(row) for _, row in results.iterrows()],
    )


def _usable(rows: pd.DataFrame) -> pd.Series:
    return (rows["status"] == "ok") & (rows["verified"].astype(str).str.lower() == "true") & (rows["cost"] < math.inf)


def _best(rows: pd.DataFrame) -> pd.Series | None:
    usable = rows[_usable(rows)]
    return None if usable.empty else usable.loc[usable["cost"].idxmin()]


def _knobs(knobs: dict | None, shown: tuple[str, ...]) -> str:
    if knobs is None:
        return "-"
    return " ".join(f"{k}={v}" for k, v in sorted(knobs.items()) if k in shown or not shown) or "-"


def _us(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def search_table(checks: list[GroupCheck], tolerance: float) -> Table:
    """One row per compared group: points timed of the grid, the search's choice and the exhaustive
    best (their searched knobs) with their times in the exhaustive run, their ratio, and whether it is
    within ``tolerance``."""
    table = Table(title="default search vs --exhaustive: dispatch + combine µs as the search ranks points (api "
                        "mode), both taken from the exhaustive run")
    for column in ("backend", "shape", "timed / grid", "search's choice", "its µs", "exhaustive best", "best µs",
                   "choice / best", f"within {tolerance:.0%}"):
        table.add_column(column, justify="right" if "µs" in column or "/" in column else "left")
    for c in checks:
        backend, world, dtype, routing, hidden, tokens, topk, experts = c.group
        verdict = {True: "yes", False: "no", None: "n/a"}[c.within(tolerance)]
        if c.exhaustive_timed < c.grid:
            verdict += f" (exhaustive timed {c.exhaustive_timed} of {c.grid})"
        table.add_row(backend, f"{dtype} h{hidden} n{tokens} k{topk} e{experts} {routing} w{world}",
                      f"{c.timed} / {c.grid}", _knobs(c.chosen, c.searched), _us(c.chosen_us),
                      _knobs(c.best, c.searched), _us(c.best_us),
                      "-" if c.ratio is None else f"{c.ratio:.3f}", verdict)
    return table


def summary(checks: list[GroupCheck], tolerance: float) -> str:
    """One line: points the default search timed of the grids (the share), and in how many groups its
    choice is within ``tolerance`` of the exhaustive best (with the worst ratio)."""
    timed, grid = sum(c.timed for c in checks), sum(c.grid for c in checks)
    judged = [c for c in checks if c.within(tolerance) is not None]
    good = sum(bool(c.within(tolerance)) for c in judged)
    worst = max((c.ratio for c in judged), default=None)
    line = (f"default search timed {timed} of {grid} grid points ({timed / grid:.1%}) in {len(checks)} groups; "
            f"its choice is within {tolerance:.0%} of the exhaustive best in {good} of {len(judged)} judged groups")
    if worst is not None:
        line += f" (worst: {(worst - 1):+.1%})"
    return line
