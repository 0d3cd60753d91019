"""The UCCL-EP adapter: config rules and knobs (pure), and its code paths on 2 gloo ranks over a CPU fake of
``uccl.ep`` that honours the real pointer-level contract.

The fake (``tests/fakes/uccl``) computes real results with the torch backend; only the spawned ranks import
it, so this process keeps running without uccl.
"""

from __future__ import annotations

import logging

import pytest

import uccl_workers
from fused_a2a.backends.chunk_config import ChunkConfig
from fused_a2a.backends.uccl import (
    KNOBS,
    invalid_knobs,
    make_uccl_comm,
    num_sms_from_env,
    SPEC,
    uccl_configs,
)
from fused_a2a.backends.uccl_buffer import DEFAULT_COMBINE, DEFAULT_DISPATCH, INTERNODE_ERROR, UCCL_EP
from ranks import spawn

WORLD = 2


def test_default_configs_are_uccls_tables() -> None:
    knobs = SPEC.defaults()
    assert uccl_configs(knobs, knobs, 2) == (ChunkConfig(20, 24, 256, 6, 128), ChunkConfig(20, 10, 256, 6, 128))
    assert uccl_configs(knobs, knobs, 8)[1] == ChunkConfig(20, 4, 256, 6, 128)
    assert set(DEFAULT_DISPATCH) == set(DEFAULT_COMBINE) and 48 not in DEFAULT_DISPATCH  # UCCL's table, not DeepEP's
    assert DEFAULT_DISPATCH[64] == (20, 288, 28, 128)
    custom = {**knobs, "num_sms": 24, "nvl_send": 8, "rdma_recv": 256}
    assert uccl_configs(custom, custom, 4) == (ChunkConfig(24, 8, 256, 6, 256), ChunkConfig(24, 8, 256, 6, 256))


def test_invalid_knobs_follow_deep_eps_config_rules_and_refuse_internode() -> None:
    assert invalid_knobs({}, 2) is None and invalid_knobs({"num_sms": 64, "nvl_send": 24, "nvl_recv": 512}, 8) is None
    assert invalid_knobs({"nvl_send": 256}, 2) == "dispatch config: nvl_send (256) must be smaller than nvl_recv (256)"
    assert invalid_knobs({"nvl_recv": 16}, 2) == "dispatch config: nvl_send (24) must be smaller than nvl_recv (16)"
    assert invalid_knobs({"nvl_recv": 16}, 8) is None  # 8 ranks: defaults 6 and 4
    assert invalid_knobs({"num_sms": 7}, 2).startswith("num_sms must be an even int >= 2")
    assert invalid_knobs({}, 3) == "DeepEP's intranode kernels run on 2, 4 or 8 ranks, not 3"
    assert invalid_knobs({}, 16) == f"16 ranks span nodes: {INTERNODE_ERROR}"


def test_knobs_and_spec() -> None:
    spec = SPEC
    assert spec.name == "uccl" and spec.knobs == KNOBS and spec.dtypes == ("bf16",)
    assert spec.defaults() == {"num_sms": 20, "nvl_send": 0, "nvl_recv": 0, "rdma_send": 0, "rdma_recv": 0}
    assert spec.knob("num_sms").check(3) and spec.knob("num_sms").check(24) is None
    assert spec.knob("nvl_send").check(-1) and spec.knob("nvl_send").check(0) is None
    assert all("DeepEP" not in knob.help for knob in spec.knobs)
    assert spec.invalid({"nvl_send": 300}, 2) == "dispatch config: nvl_send (300) must be smaller than nvl_recv (256)"


def test_make_comm_checks_knobs_before_needing_uccl() -> None:
    knobs = SPEC.defaults()
    with pytest.raises(ValueError, match=r"uccl: dispatch and combine must use the same num_sms .* got 20 and 24"):
        make_uccl_comm(knobs, {**knobs, "num_sms": 24}, 2)
    with pytest.raises(ValueError, match=f"uccl: 16 ranks span nodes: {INTERNODE_ERROR}"):
        make_uccl_comm(knobs, knobs, 16)


@pytest.mark.skipif(UCCL_EP.available, reason="uccl is installed here")
def test_spec_says_uccl_is_not_installed() -> None:
    spec = SPEC
    assert spec.unavailable().startswith("ModuleNotFoundError")
    with pytest.raises(RuntimeError, match="needs uccl.ep.*pip install uccl"):
        spec.make_comm(spec.defaults(), spec.defaults(), 2)


def test_num_sms_from_env(caplog) -> None:
    assert num_sms_from_env({}) == 20
    assert num_sms_from_env({"DEEP_EP_SM_NUMS": "16"}) == 16
    assert num_sms_from_env({"UCCL_EP_SM_NUMS": "32", "DEEP_EP_SM_NUMS": "16"}) == 32
    with caplog.at_level(logging.WARNING, logger="fused_a2a"):
        assert num_sms_from_env({"UCCL_EP_SM_NUMS": "25", "DEEP_EP_SM_NUMS": "16"}) == 16
        assert num_sms_from_env({"UCCL_EP_SM_NUMS": "many"}) == 20
    assert "ignoring UCCL_EP_SM_NUMS='25'" in caplog.text and "ignoring UCCL_EP_SM_NUMS='many'" in caplog.text


def test_seed_and_backend_spec_match_the_reference() -> None:
    spawn(uccl_workers.reference_cases, WORLD, sys_path=uccl_workers.FAKES)


def test_buffer_sizing_reuse_reallocation_and_free() -> None:
    spawn(uccl_workers.buffer_lifecycle, WORLD, sys_path=uccl_workers.FAKES)


def test_proxies_are_registered_never_started_and_destroy_order() -> None:
    spawn(uccl_workers.proxies_and_destroy, WORLD, sys_path=uccl_workers.FAKES)


def test_internode_group_is_refused_on_every_rank() -> None:
    spawn(uccl_workers.internode_is_refused, WORLD, sys_path=uccl_workers.FAKES)


def test_set_uccl_num_sms_and_handles_keep_their_sm_count() -> None:
    spawn(uccl_workers.num_sms_and_handles, WORLD, sys_path=uccl_workers.FAKES)


@pytest.mark.parametrize(
    "environ, expected",
    [({"UCCL_EP_SM_NUMS": "32", "DEEP_EP_SM_NUMS": "16"}, 32), ({"DEEP_EP_SM_NUMS": "16"}, 16), ({}, 20)],
)
def test_env_sets_the_default_sm_count_at_import(environ: dict, expected: int) -> None:
    spawn(uccl_workers.env_default, WORLD, environ, expected, sys_path=uccl_workers.FAKES)


def test_comm_and_the_fakes_contract() -> None:
    spawn(uccl_workers.comm_and_fake_contract, WORLD, sys_path=uccl_workers.FAKES)
