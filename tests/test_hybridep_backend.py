"""The ``hybridep`` backend and the HybridEP seed functions on 2 gloo ranks over the CPU fake of
``deep_ep.HybridEPBuffer``."""

from __future__ import annotations

import pytest

import hybridep_workers
from ranks import spawn


@pytest.mark.parametrize("world_size", [2, 4])
def test_neutral_path_matches_the_reference(world_size: int) -> None:
    spawn(hybridep_workers.neutral_path, world_size, sys_path=hybridep_workers.FAKES)


def test_seed_permute_path_matches_the_reference() -> None:
    spawn(hybridep_workers.seed_permute_path, 2, sys_path=hybridep_workers.FAKES)


def test_a_handle_is_served_by_the_buffer_that_made_it() -> None:
    spawn(hybridep_workers.handle_keeps_its_buffer, 2, sys_path=hybridep_workers.FAKES)


def test_limits_are_value_errors_before_hybridep_runs() -> None:
    spawn(hybridep_workers.limits, 2, sys_path=hybridep_workers.FAKES)


def test_a_bad_id_on_one_rank_raises_on_every_rank() -> None:
    spawn(hybridep_workers.bad_id_on_one_rank, 2, sys_path=hybridep_workers.FAKES)
