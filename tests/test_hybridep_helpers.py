"""HybridEP helpers: top-k → dense routing map, chunk variables, and when the buffer is re-created."""

from __future__ import annotations

import types

import pytest
import torch

from fused_a2a.backends import hybridep
from fused_a2a.backends.optional import OptionalModule

CHUNK_VARS = tuple(hybridep.CHUNK_ENV_VARS.values())


def test_routing_map_marks_each_chosen_expert_with_its_weight() -> None:
    idx = torch.tensor([[0, 3], [2, -1], [-1, -1], [1, 1]])
    weights = torch.tensor([[0.7, 0.3], [0.9, 0.5], [0.2, 0.1], [0.25, 0.5]])
    routing_map, probs = hybridep.topk_to_routing_map(idx, weights, 4)
    assert routing_map.dtype == torch.bool and probs.dtype == torch.float32
    assert routing_map.tolist() == [
        [True, False, False, True],
        [False, False, True, False],
        [False, False, False, False],
        [False, True, False, False],
    ]
    expected = torch.tensor([[0.7, 0.0, 0.0, 0.3], [0.0, 0.0, 0.9, 0.0], [0.0] * 4, [0.0, 0.75, 0.0, 0.0]])
    assert torch.equal(probs, expected)  # the two weights of expert 1 in the last row add up


def test_routing_map_agrees_with_the_top_k_and_carries_gradients() -> None:
    gen = torch.Generator().manual_seed(0)
    idx = torch.stack([torch.randperm(16, generator=gen)[:4] for _ in range(32)])
    idx[torch.rand(32, 4, generator=gen) < 0.2] = -1
    weights = torch.rand(32, 4, generator=gen, dtype=torch.float64).requires_grad_(True)
    routing_map, probs = hybridep.topk_to_routing_map(idx, weights, 16)
    assert torch.equal(routing_map.sum(dim=1), (idx >= 0).sum(dim=1))
    assert torch.allclose(probs.sum(dim=1), (weights * (idx >= 0)).sum(dim=1).float())
    assert torch.equal(routing_map, probs > 0)
    probs.sum().backward()
    assert torch.equal(weights.grad, (idx >= 0).double())


def test_routing_map_of_no_tokens() -> None:
    routing_map, probs = hybridep.topk_to_routing_map(torch.zeros(0, 2, dtype=torch.int64), torch.zeros(0, 2), 8)
    assert routing_map.shape == probs.shape == (0, 8)


@pytest.mark.parametrize(
    "idx, weights, num_experts, problem",
    [
        (torch.zeros(4, 2, dtype=torch.int32), torch.zeros(4, 2), 8, "topk_idx must be a 2-D int64 tensor"),
        (torch.zeros(4, dtype=torch.int64), torch.zeros(4), 8, "topk_idx must be a 2-D int64 tensor"),
        (torch.zeros(4, 2, dtype=torch.int64), torch.zeros(4, 3), 8, "topk_weights must be a floating-point tensor of topk_idx's shape"),
        (torch.zeros(4, 2, dtype=torch.int64), torch.zeros(4, 2, dtype=torch.int64), 8, "topk_weights must be a floating-point"),
        (torch.zeros(4, 2, dtype=torch.int64), torch.zeros(4, 2), 0, "num_experts must be a positive int"),
        (torch.full((4, 2), 8), torch.zeros(4, 2), 8, r"topk_idx values must lie in \[-1, 8\)"),
        (torch.full((4, 2), -2), torch.zeros(4, 2), 8, r"topk_idx values must lie in \[-1, 8\)"),
    ],
)
def test_routing_map_rejects_bad_inputs(idx, weights, num_experts, problem) -> None:
    with pytest.raises(ValueError, match=problem):
        hybridep.topk_to_routing_map(idx, weights, num_experts)


def test_knobs_and_chunk_variables() -> None:
    assert [k.name for k in hybridep.HYBRIDEP_KNOBS] == [
        "num_sms_dispatch_api", "num_sms_combine_api", "tokens_per_chunk_dispatch", "tokens_per_chunk_combine",
    ]
    for knob in hybridep.HYBRIDEP_KNOBS:
        assert knob.check(knob.default) is None and all(knob.check(v) is None for v in knob.choices)
        assert knob.check(-1) is not None
    assert hybridep.chunk_env({"tokens_per_chunk_dispatch": 128, "tokens_per_chunk_combine": 0}) == {
        "NUM_OF_TOKENS_PER_CHUNK_DISPATCH_API": "128"
    }
    assert hybridep.chunk_env({}) == {}


class StandInBuffer:
    """Records how it was built, with the chunk variables as they were then."""

    created: list[StandInBuffer] = []

    def __init__(self, **kwargs) -> None:
        import os

        self.kwargs = kwargs
        self.env = {var: os.environ.get(var) for var in CHUNK_VARS}
        StandInBuffer.created.append(self)

    def dispatch_with_permute(self, *, hidden, routing_map=None, probs=None, num_of_experts_per_rank=None, handle=None, **_):
        tokens = torch.tensor([hidden.size(0)] * num_of_experts_per_rank)
        return hidden * 1, probs[routing_map], None, tokens, ("handle", self)


@pytest.fixture
def stand_in(monkeypatch):
    """deep_ep with a recording HybridEPBuffer, no chunk variables set, no buffer."""
    StandInBuffer.created = []
    module = types.SimpleNamespace(HybridEPBuffer=StandInBuffer)
    monkeypatch.setattr(hybridep, "HYBRID_EP", OptionalModule("deep_ep", "", module, None))
    for var in CHUNK_VARS:
        monkeypatch.delenv(var, raising=False)
    hybridep.reset_hybrid_ep_buffer()
    yield StandInBuffer.created
    hybridep.reset_hybrid_ep_buffer()


def test_buffer_is_kept_while_nothing_changes(stand_in) -> None:
    group = object()
    first = hybridep.ensure_hybrid_ep_buffer(group, 1024, 512, 4, {})
    assert first.kwargs == dict(group=group, hidden_dim=1024, max_num_of_tokens_per_rank=512, num_local_experts=4,
                                use_fp8=False, num_sms_dispatch_api=24, num_sms_combine_api=24)
    assert hybridep.ensure_hybrid_ep_buffer(group, 1024, 4096, 4, {"num_sms_dispatch_api": 24}) is first
    assert len(stand_in) == 1


@pytest.mark.parametrize(
    "change",
    [
        dict(knobs={"num_sms_dispatch_api": 32}),
        dict(knobs={"num_sms_combine_api": 16}),
        dict(hidden_dim=2048),
        dict(num_local_experts=8),
        dict(group=object()),
    ],
)
def test_buffer_is_recreated_when_what_shapes_it_changes(stand_in, change) -> None:
    args = dict(group=object(), hidden_dim=1024, seq_len=512, num_local_experts=4, knobs={})
    first = hybridep.ensure_hybrid_ep_buffer(**args)
    second = hybridep.ensure_hybrid_ep_buffer(**{**args, **change})
    assert second is not first and len(stand_in) == 2
    assert hybridep.ensure_hybrid_ep_buffer(**{**args, **change}) is second


def test_chunk_knobs_set_their_variables_before_the_buffer_is_built(stand_in, monkeypatch) -> None:
    import os

    group = object()
    first = hybridep.ensure_hybrid_ep_buffer(group, 1024, 512, 4, {})
    assert first.env == {var: None for var in CHUNK_VARS}
    second = hybridep.ensure_hybrid_ep_buffer(group, 1024, 512, 4, {"tokens_per_chunk_combine": 128})
    assert second is not first
    assert second.env == {"NUM_OF_TOKENS_PER_CHUNK_DISPATCH_API": None, "NUM_OF_TOKENS_PER_CHUNK_COMBINE_API": "128"}
    assert os.environ["NUM_OF_TOKENS_PER_CHUNK_COMBINE_API"] == "128"
    # 0 leaves the variable as it is: same buffer
    assert hybridep.ensure_hybrid_ep_buffer(group, 1024, 512, 4, {"tokens_per_chunk_combine": 0}) is second
    monkeypatch.setenv("NUM_OF_TOKENS_PER_CHUNK_DISPATCH_API", "256")  # changed by hand
    third = hybridep.ensure_hybrid_ep_buffer(group, 1024, 512, 4, {})
    assert third is not second and third.env["NUM_OF_TOKENS_PER_CHUNK_DISPATCH_API"] == "256"
    with pytest.raises(ValueError, match="hybridep: tokens_per_chunk_dispatch must be an int >= 0"):
        hybridep.ensure_hybrid_ep_buffer(group, 1024, 512, 4, {"tokens_per_chunk_dispatch": -64})


def test_seed_dispatch_recreates_the_buffer_for_other_sms(stand_in) -> None:
    group = object()
    x = torch.randn(6, 16)
    idx = torch.tensor([[0, 1]] * 6)
    routing_map, probs = hybridep.topk_to_routing_map(idx, torch.full((6, 2), 0.5), 4)
    hybridep.init_hybrid_ep_buffer(group, 16, 6, 2, 32, 32, False)
    hybridep.hybrid_ep_dispatch(x, routing_map, probs, group, 2, 32, 32)
    assert len(stand_in) == 1  # the buffer init_hybrid_ep_buffer made
    out = hybridep.hybrid_ep_dispatch(x, routing_map, probs, group, 2)  # the seed's default 24 SMs
    assert len(stand_in) == 2 and stand_in[-1].kwargs["num_sms_dispatch_api"] == 24
    assert out[4] == ("handle", stand_in[-1]) and torch.equal(out[3], torch.tensor([6, 6]))
