"""A sweep makes each workload's inputs and torch reference once for all its knob settings, and drops
them on every rank after a failed point (on 2 real gloo ranks)."""

from __future__ import annotations

import prepared_workers
from ranks import spawn


def test_a_workloads_inputs_serve_all_its_points_and_a_failure_resets_them_everywhere() -> None:
    spawn(prepared_workers.reuse_and_reset, 2)
