"""The seed module's public API exists, and missing optional backends fail clearly."""

from __future__ import annotations

import inspect

import pytest
import torch

import fused_a2a

SEED_NAMES = [
    "FusedDispatch", "FusedCombine", "HybridEPDispatch", "HybridEPCombine", "UCCLFusedDispatch",
    "UCCLFusedCombine", "fused_dispatch", "fused_combine", "hybrid_ep_dispatch", "hybrid_ep_combine",
    "uccl_fused_dispatch", "uccl_fused_combine", "get_buffer", "get_uccl_buffer", "get_hidden_bytes",
    "init_hybrid_ep_buffer", "reset_hybrid_ep_buffer", "set_deepep_num_sms", "set_uccl_num_sms",
    "free_buffer", "is_nvshmem_available", "HAVE_DEEP_EP", "HAVE_HYBRIDEP", "HAVE_UCCL_EP",
]


def test_every_seed_name_is_exported() -> None:
    missing = [name for name in SEED_NAMES if not hasattr(fused_a2a, name)]
    assert missing == []


@pytest.mark.parametrize(
    "fn, params",
    [
        (fused_a2a.fused_dispatch, ["x", "token_indices", "token_probs", "num_experts", "group", "async_finish", "allocate_on_comm_stream"]),
        (fused_a2a.fused_combine, ["x", "group", "handle", "async_finish", "allocate_on_comm_stream"]),
        (fused_a2a.uccl_fused_dispatch, ["x", "token_indices", "token_probs", "num_experts", "group", "async_finish", "allocate_on_comm_stream"]),
        (fused_a2a.uccl_fused_combine, ["x", "group", "handle", "async_finish", "allocate_on_comm_stream"]),
        (fused_a2a.hybrid_ep_dispatch, ["x", "routing_map", "probs", "group", "num_local_experts", "num_sms_dispatch_api", "num_sms_combine_api", "num_permuted_tokens", "pad_multiple"]),
        (fused_a2a.hybrid_ep_combine, ["x", "handle", "num_permuted_tokens", "pad_multiple"]),
        (fused_a2a.init_hybrid_ep_buffer, ["group", "hidden_dim", "seq_len", "num_local_experts", "num_sms_dispatch_api", "num_sms_combine_api", "fp8_dispatch"]),
    ],
)
def test_seed_signatures(fn, params) -> None:
    """The seed's parameters, in its order; Megatron-LM's extra HybridEP arguments are keyword-only."""
    parameters = inspect.signature(fn).parameters.values()
    assert [p.name for p in parameters if p.kind is not inspect.Parameter.KEYWORD_ONLY] == params


def test_megatron_hybridep_keywords_are_accepted() -> None:
    extra = {p.name for p in inspect.signature(fused_a2a.hybrid_ep_dispatch).parameters.values()
             if p.kind is inspect.Parameter.KEYWORD_ONLY}
    assert extra == {"num_blocks_permute", "num_blocks_unpermute", "fused", "num_sms_preprocessing_api"}
    assert "fused" in inspect.signature(fused_a2a.hybrid_ep_combine).parameters


def test_hidden_bytes_counts_at_least_two_bytes_per_element() -> None:
    assert fused_a2a.get_hidden_bytes(torch.zeros(3, 7168, dtype=torch.bfloat16)) == 14336
    assert fused_a2a.get_hidden_bytes(torch.zeros(3, 7168, dtype=torch.float32)) == 28672
    assert fused_a2a.get_hidden_bytes(torch.zeros(3, 7168, dtype=torch.uint8)) == 14336


@pytest.mark.skipif(fused_a2a.HAVE_DEEP_EP, reason="deep_ep is installed here")
@pytest.mark.parametrize(
    "call",
    [
        lambda: fused_a2a.fused_dispatch(torch.zeros(2, 4), torch.zeros(2, 1, dtype=torch.int64), torch.ones(2, 1), 2, None),
        lambda: fused_a2a.fused_combine(torch.zeros(2, 4), None, None),
        lambda: fused_a2a.get_buffer(None, 8),
        lambda: fused_a2a.set_deepep_num_sms(24),
        lambda: fused_a2a.is_nvshmem_available(),
        lambda: fused_a2a.hybrid_ep_dispatch(torch.zeros(2, 4), None, None, None, 1),
        lambda: fused_a2a.init_hybrid_ep_buffer(None, 4, 2, 1, 8, 8, False),
    ],
)
def test_missing_deep_ep_raises_runtime_error_naming_it(call) -> None:
    assert not fused_a2a.HAVE_DEEP_EP and not fused_a2a.HAVE_HYBRIDEP
    with pytest.raises(RuntimeError, match="needs deep_ep.*DeepEP"):
        call()


@pytest.mark.skipif(fused_a2a.HAVE_UCCL_EP, reason="uccl is installed here")
@pytest.mark.parametrize(
    "call",
    [
        lambda: fused_a2a.uccl_fused_dispatch(torch.zeros(2, 4), torch.zeros(2, 1, dtype=torch.int64), torch.ones(2, 1), 2, None),
        lambda: fused_a2a.uccl_fused_combine(torch.zeros(2, 4), None, None),
        lambda: fused_a2a.get_uccl_buffer(None, 8),
        lambda: fused_a2a.set_uccl_num_sms(24),
    ],
)
def test_missing_uccl_raises_runtime_error_naming_it(call) -> None:
    with pytest.raises(RuntimeError, match="needs uccl.ep.*pip install uccl"):
        call()


def test_unknown_backend_and_knob_are_value_errors() -> None:
    from fused_a2a.backends import make_comm

    with pytest.raises(ValueError, match="unknown backend 'nccl'; choose from torch"):
        make_comm("nccl", {})
    with pytest.raises(ValueError, match="backend 'torch' has no knob num_sms"):
        make_comm("torch", {"num_sms": 24})
    with pytest.raises(ValueError, match="impl must be one of all_to_all, p2p"):
        make_comm("torch", {"impl": "ring"})
