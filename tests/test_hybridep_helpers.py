"""HybridEP backend helpers (pure, no GPU): routing maps, knobs, limits, ascending top-k, and buffer lives."""

from __future__ import annotations

import os
import types

import pytest
import torch

from fused_a2a.backends import hybridep, hybridep_adapter, hybridep_buffer, hybridep_routing
from fused_a2a.backends.optional import OptionalModule
from fused_a2a.shape import CallShape

CHUNK_VARS = tuple(hybridep_buffer.CHUNK_ENV_VARS.values())


def Shape(world_size: int, tokens: tuple[int, ...], hidden: int, topk: int, num_experts: int, dtype: str = "bf16",
          ranks_per_node: int | None = None) -> CallShape:
    return CallShape(dtype, hidden, topk, num_experts, world_size=world_size, tokens=tokens, ranks_per_node=ranks_per_node)


def test_routing_map_marks_each_chosen_expert_with_its_weight() -> None:
    idx = torch.tensor([[0, 3], [2, -1], [-1, -1], [1, 1]])
    weights = torch.tensor([[0.7, 0.3], [0.9, 0.5], [0.2, 0.1], [0.25, 0.5]])
    routing_map, probs = hybridep_routing.topk_to_routing_map(idx, weights, 4)
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
    routing_map, probs = hybridep_routing.topk_to_routing_map(idx, weights, 16)
    assert torch.equal(routing_map.sum(dim=1), (idx >= 0).sum(dim=1))
    assert torch.allclose(probs.sum(dim=1), (weights * (idx >= 0)).sum(dim=1).float())
    assert torch.equal(routing_map, probs > 0)
    probs.sum().backward()
    assert torch.equal(weights.grad, (idx >= 0).double())


def test_routing_map_of_no_tokens() -> None:
    routing_map, probs = hybridep_routing.topk_to_routing_map(torch.zeros(0, 2, dtype=torch.int64), torch.zeros(0, 2), 8)
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
        hybridep_routing.topk_to_routing_map(idx, weights, num_experts)


def test_knobs_defaults_and_checks() -> None:
    spec = hybridep.SPEC
    assert [k.name for k in spec.knobs] == [
        "num_sms_dispatch_api", "num_sms_combine_api", "num_sms_preprocessing_api", "num_blocks_permute",
        "num_blocks_unpermute", "tokens_per_chunk_dispatch", "tokens_per_chunk_combine", "fused",
        "enable_custom_allgather",
    ]
    assert spec.defaults()["enable_custom_allgather"] is True
    assert "true or false" in spec.knob("enable_custom_allgather").check(1)
    assert spec.defaults()["num_sms_dispatch_api"] == 24 and spec.defaults()["num_sms_preprocessing_api"] == 108
    for knob in spec.knobs:
        assert knob.check(knob.default) is None and all(knob.check(v) is None for v in knob.choices)
    assert spec.knob("num_sms_dispatch_api").check(0) and spec.knob("num_blocks_permute").check(-1)
    assert "multiple of 16" in spec.knob("tokens_per_chunk_dispatch").check(40)
    assert spec.knob("fused").check(1) and spec.sms_knobs == ("num_sms_dispatch_api", "num_sms_combine_api")
    assert spec.dtypes == ("bf16",) and not spec.keeps_topk_slots


def test_settings_take_each_side_from_its_knobs() -> None:
    dispatch = {**hybridep.SPEC.defaults(), "num_sms_dispatch_api": 16, "tokens_per_chunk_dispatch": 128,
                "num_blocks_permute": 64}
    combine = {**hybridep.SPEC.defaults(), "num_sms_combine_api": 32, "num_blocks_unpermute": 0}
    settings = hybridep_buffer.Settings.from_knobs(dispatch, combine)
    assert (settings.sms_dispatch, settings.sms_combine, settings.blocks_permute, settings.blocks_unpermute) == (16, 32, 64, None)
    assert settings.environment() == {"NUM_OF_TOKENS_PER_CHUNK_DISPATCH_API": "128"}
    assert settings.constructor_kwargs() == dict(num_sms_dispatch_api=16, num_sms_combine_api=32,
                                                 num_sms_preprocessing_api=108, num_blocks_permute=64)


@pytest.mark.parametrize(
    "shape, problem",
    [
        (Shape(2, (7, 7), 1024, 8, 16), r"tokens per rank x ranks per NVLink domain divisible by 4 .*: 7 x 2 = 14"),
        (Shape(2, (513, 0), 1024, 8, 16), "at least 1 token on every rank"),
        (Shape(2, (512, 256), 1024, 8, 16), "the same number of tokens on every rank .* got 512, 256"),
        (Shape(1, (6,), 1024, 8, 16), r"6 x 1 = 6"),
        (Shape(2, (8, 8), 1000, 8, 16), "hidden size divisible by 16"),
        (Shape(2, (8, 8), 1024, 8, 6), r"local experts x ranks per NVLink domain divisible by 4: 3 x 2 = 6"),
        (Shape(2, (8, 8), 1024, 8, 16, "fp16"), "bf16 tokens"),
        (Shape(4, (8,), 1024, 8, 16, "bf16", 3), "whole NVLink domains"),
        (Shape(2, (6, 6), 1024, 2, 4), r"custom allgather .* 6 x 4 is not a multiple of 16"),
    ],
)
def test_shape_problems_name_the_rule(shape: CallShape, problem: str) -> None:
    import re

    found = hybridep_adapter.shape_problem(shape)
    assert found is not None and re.search(problem, found), found


@pytest.mark.parametrize("shape", [Shape(2, (8, 8), 7168, 8, 64), Shape(2, (4096, 4096), 2048, 2, 16),
                                   Shape(8, (7,), 1024, 8, 64), Shape(1, (128,), 512, 2, 4)])
def test_shapes_hybridep_takes(shape: CallShape) -> None:
    assert hybridep_adapter.shape_problem(shape) is None


def test_fused_needs_equal_chunks() -> None:
    assert hybridep.invalid_knobs({}, 2) is None
    problem = hybridep.invalid_knobs({"fused": True, "tokens_per_chunk_dispatch": 128}, 2)
    assert problem == "a fused permute needs equal chunk sizes, got dispatch 128 and combine 64"


def test_custom_allgather_rule_is_lifted_by_the_knob() -> None:
    shape = Shape(2, (6, 6), 1024, 2, 4)
    assert hybridep_adapter.shape_problem(shape, {"enable_custom_allgather": False}) is None
    assert hybridep_buffer.Settings.from_knobs(hybridep.SPEC.defaults(), hybridep.SPEC.defaults()).custom_allgather


class StandInBuffer:
    """Records how it was built, with the chunk variables as they were then."""

    created: list[StandInBuffer] = []

    def __init__(self, **kwargs) -> None:
        self.kwargs = kwargs
        self.env = {var: os.environ.get(var) for var in CHUNK_VARS}
        StandInBuffer.created.append(self)


@pytest.fixture
def stand_in(monkeypatch):
    """deep_ep with a recording HybridEPBuffer, no chunk variables set, no buffer."""
    StandInBuffer.created = []
    module = types.SimpleNamespace(HybridEPBuffer=StandInBuffer)
    monkeypatch.setattr(hybridep_buffer, "HYBRID_EP", OptionalModule("deep_ep", "", module, None))
    monkeypatch.setattr(hybridep_buffer, "HAVE_HYBRIDEP", True)
    for var in CHUNK_VARS:
        monkeypatch.delenv(var, raising=False)
    hybridep_buffer.free_buffers()
    yield StandInBuffer.created
    hybridep_buffer.free_buffers()
    for var in CHUNK_VARS:  # set by ensure_buffer, not through monkeypatch: ranks spawned later would inherit them
        os.environ.pop(var, None)


SETTINGS = hybridep_buffer.Settings()


def test_buffer_is_kept_while_nothing_changes(stand_in) -> None:
    group = object()
    first = hybridep_buffer.ensure_buffer(group, 1024, 4, 512, SETTINGS)
    assert first.kwargs == dict(group=group, hidden_dim=1024, max_num_of_tokens_per_rank=512, num_local_experts=4,
                                use_fp8=False, num_sms_dispatch_api=24, num_sms_combine_api=24,
                                num_sms_preprocessing_api=108)
    assert hybridep_buffer.ensure_buffer(group, 1024, 4, 4096, SETTINGS) is first  # HybridEP grows its own capacity
    assert len(stand_in) == 1


@pytest.mark.parametrize(
    "change",
    [
        dict(settings=hybridep_buffer.Settings(sms_dispatch=32)),
        dict(settings=hybridep_buffer.Settings(sms_combine=16)),
        dict(settings=hybridep_buffer.Settings(chunk_combine=128)),
        dict(hidden=2048),
        dict(num_local_experts=8),
        dict(group=object()),
    ],
)
def test_buffer_is_recreated_when_what_shapes_it_changes(stand_in, change) -> None:
    args = dict(group=object(), hidden=1024, num_local_experts=4, num_tokens=512, settings=SETTINGS)
    first = hybridep_buffer.ensure_buffer(**args)
    second = hybridep_buffer.ensure_buffer(**{**args, **change})
    assert second is not first and len(stand_in) == 2
    assert hybridep_buffer.ensure_buffer(**{**args, **change}) is second


def test_a_handle_keeps_the_buffer_that_made_it(stand_in) -> None:
    import gc
    import weakref

    group = object()
    first = hybridep_buffer.ensure_buffer(group, 1024, 4, 512, SETTINGS)
    handle = (torch.zeros(1),)
    hybridep_buffer.remember_buffer(handle, first)
    alive = weakref.ref(first)
    del first
    stand_in.clear()  # the recording list would keep it alive too
    second = hybridep_buffer.ensure_buffer(group, 1024, 4, 512, hybridep_buffer.Settings(sms_dispatch=8))
    gc.collect()
    assert alive() is not None and hybridep_buffer.buffer_of(handle) is alive() and alive() is not second
    del handle
    gc.collect()
    assert alive() is None  # the old buffer goes with its last handle


def test_chunk_settings_set_their_variables_before_the_buffer_is_built(stand_in) -> None:
    group = object()
    first = hybridep_buffer.ensure_buffer(group, 1024, 4, 512, SETTINGS)
    assert first.env == {var: None for var in CHUNK_VARS}
    second = hybridep_buffer.ensure_buffer(group, 1024, 4, 512, hybridep_buffer.Settings(chunk_combine=128))
    assert second.env == {"NUM_OF_TOKENS_PER_CHUNK_DISPATCH_API": None, "NUM_OF_TOKENS_PER_CHUNK_COMBINE_API": "128"}
    assert os.environ["NUM_OF_TOKENS_PER_CHUNK_COMBINE_API"] == "128"
    assert hybridep_buffer.chunk_sizes() == (64, 128)
