"""Rank functions of ``tests/test_compat_modules.py``: the stand-ins of :mod:`fused_a2a.compat`, registered
under the frameworks' module names and driven the way NeMo Automodel's and Megatron-LM's token dispatchers
call them, on the CPU fakes of ``deep_ep`` (with ``HybridEPBuffer``) and ``uccl.ep``, against dense
references (forward and gradients).

Like the other worker modules, this one imports nothing that imports fused_a2a: the test process names
the workers without importing deep_ep, and :func:`absent` blocks the libraries before fused_a2a sees them.
"""

from __future__ import annotations

import importlib.abc
import inspect
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from reference import BF16_CASES, assert_close, check_case

FAKES = (str(Path(__file__).parent / "fakes"),)
CPU = torch.device("cpu")
AUTOMODEL = "nemo_automodel.components.moe.megatron.fused_a2a"
MEGATRON = "megatron.core.transformer.moe.fused_a2a"
# what each framework's token dispatcher imports from its module
AUTOMODEL_DISPATCHER_NAMES = ("fused_combine", "fused_dispatch", "hybrid_ep_combine", "hybrid_ep_dispatch",
                              "set_deepep_num_sms", "set_uccl_num_sms", "uccl_fused_combine", "uccl_fused_dispatch")
MEGATRON_DISPATCHER_NAMES = ("HYBRIDEP_TOKEN_ALIGNMENT", "alloc_ep_symm_buffer", "ensure_nccl_ep_bootstrapped",
                             "fused_combine", "fused_dispatch", "hybrid_ep_combine", "hybrid_ep_dispatch",
                             "is_nccl_ep_bootstrapped", "nccl_ep_combine", "nccl_ep_dispatch", "nccl_ep_finalize",
                             "new_nccl_ep_buffer", "set_deepep_num_sms")
NCCL_EP_OPTIONAL = ("alloc_ep_symm_buffer", "new_nccl_ep_buffer", "nccl_ep_dispatch", "nccl_ep_combine")

HIDDEN, LOCAL_EXPERTS, TOPK, TOKENS = 32, 4, 2, 64  # HybridEP: the same 64 tokens on every rank

# the frameworks' signatures of the functions that exist only with their library: (name, default)
E = inspect.Parameter.empty
_DEEPEP_DISPATCH = [("x", E), ("token_indices", E), ("token_probs", E), ("num_experts", E), ("group", E),
                    ("async_finish", False), ("allocate_on_comm_stream", False)]
_DEEPEP_COMBINE = [("x", E), ("group", E), ("handle", E), ("async_finish", False), ("allocate_on_comm_stream", False)]
_HYBRID_FIRST = [("x", E), ("routing_map", E), ("probs", E), ("group", E), ("num_local_experts", E)]
MEGATRON_HYBRID_DISPATCH = [
    *_HYBRID_FIRST, ("num_sms_dispatch_api", None), ("num_sms_combine_api", None), ("num_blocks_permute", None),
    ("num_blocks_unpermute", None), ("fused", False), ("num_permuted_tokens", None), ("pad_multiple", None),
    ("num_sms_preprocessing_api", 108)]
AUTOMODEL_SIGNATURES = {
    "fused_dispatch": _DEEPEP_DISPATCH, "fused_combine": _DEEPEP_COMBINE, "set_deepep_num_sms": [("num_sms", E)],
    "uccl_fused_dispatch": _DEEPEP_DISPATCH, "uccl_fused_combine": _DEEPEP_COMBINE, "set_uccl_num_sms": [("num_sms", E)],
    "hybrid_ep_dispatch": [*_HYBRID_FIRST, ("num_sms_dispatch_api", 24), ("num_sms_combine_api", 24),
                           ("num_permuted_tokens", None), ("pad_multiple", None)],
    "hybrid_ep_combine": [("x", E), ("handle", E), ("num_permuted_tokens", None), ("pad_multiple", None)],
}
MEGATRON_SIGNATURES = {
    "fused_dispatch": _DEEPEP_DISPATCH, "fused_combine": _DEEPEP_COMBINE, "set_deepep_num_sms": [("num_sms", E)],
    "hybrid_ep_dispatch": MEGATRON_HYBRID_DISPATCH,
    "hybrid_ep_combine": [("x", E), ("handle", E), ("num_permuted_tokens", E), ("pad_multiple", E), ("fused", False)],
}


def parameters(fn) -> list[tuple]:
    """``(name, default)`` of each parameter of ``fn``."""
    return [(p.name, p.default) for p in inspect.signature(fn).parameters.values()]


def _check_signatures(module, expected: dict) -> None:
    for name, params in expected.items():
        assert parameters(getattr(module, name)) == params, f"{name}{inspect.signature(getattr(module, name))}"


def _installed(framework: str):
    """Install the stand-in the way a training script does, then import it as the framework does."""
    import importlib

    import fused_a2a.compat

    assert fused_a2a.compat.install(framework) is None  # nothing was imported under that name yet
    name = AUTOMODEL if framework == "automodel" else MEGATRON
    names = AUTOMODEL_DISPATCHER_NAMES if framework == "automodel" else MEGATRON_DISPATCHER_NAMES
    module = importlib.import_module(name)
    namespace: dict = {}
    exec(f"from {name} import {', '.join(names)}", namespace)  # the dispatcher's own import statement
    assert all(namespace[n] is getattr(module, n) for n in names)
    assert module is sys.modules[name] and module.__name__ == f"fused_a2a.compat.{framework}"
    assert fused_a2a.compat.replaced()[framework] == name
    return module


def _check_fakes() -> None:
    import deep_ep
    from uccl import ep

    assert deep_ep.__file__.startswith(FAKES[0]) and ep.__file__.startswith(FAKES[0]), "not on the CPU fakes"


# ---------------------------------------------------------------------------------------------------
# DeepEP and UCCL-EP: fused_dispatch(hidden, token_indices, token_probs, num_experts, group, async_finish=…,
# allocate_on_comm_stream=…) -> 5-tuple with a CPU int64 tokens_per_expert; fused_combine -> 2-tuple


def _framework_calls(dispatch, combine, group, flag: bool):
    def dispatch_fn(x, token_indices, token_probs, num_experts):
        out = dispatch(x, token_indices, token_probs.float(), num_experts, group, async_finish=flag,
                       allocate_on_comm_stream=flag)
        assert isinstance(out, tuple) and len(out) == 5
        recv_x, recv_idx, _, tokens_per_expert, _ = out
        assert tokens_per_expert.dtype == torch.int64 and tokens_per_expert.device.type == "cpu"
        num_out_tokens = tokens_per_expert.sum().item()  # Automodel's and Megatron's permute size
        assert isinstance(num_out_tokens, int) and num_out_tokens == int((recv_idx >= 0).sum())
        assert all(isinstance(count, int) for count in tokens_per_expert.tolist())
        return out

    def combine_fn(y, handle):
        out = combine(y, group, handle, async_finish=flag, allocate_on_comm_stream=flag)
        assert isinstance(out, tuple) and len(out) == 2 and out[1] is None
        hidden, _ = out
        return hidden

    return dispatch_fn, combine_fn


def _channels(module, group) -> int:
    """The SM count (2 x channels) a DeepEP dispatch of this rank runs with, read from its handle."""
    x = torch.randn(8, HIDDEN).to(torch.bfloat16)
    idx = torch.arange(8).remainder(LOCAL_EXPERTS * dist.get_world_size()).unsqueeze(1)
    handle = module.fused_dispatch(x, idx, torch.ones(8, 1), LOCAL_EXPERTS * dist.get_world_size(), group)[4]
    return 2 * handle[1].size(1)


# ---------------------------------------------------------------------------------------------------
# HybridEP: routing map [T, E] bool + probs [T, E] float32 in, expert-major rows out


def _routing(rank: int, world: int, seed: int, device: torch.device = CPU, hidden: int = HIDDEN):
    """``x [T, H]`` bf16 and Automodel's masked top-k routing as HybridEP's dense map and probabilities (on ``device``)."""
    gen = torch.Generator().manual_seed(1000 * seed + rank)
    num_experts = LOCAL_EXPERTS * world
    x = torch.randn(TOKENS, hidden, generator=gen).to(torch.bfloat16)
    idx = torch.stack([torch.randperm(num_experts, generator=gen)[:TOPK] for _ in range(TOKENS)])
    idx = idx.masked_fill(torch.rand(TOKENS, TOPK, generator=gen) < 0.2, -1)  # masked slots, as Automodel's
    weights = torch.rand(TOKENS, TOPK, generator=gen)
    routing_map = torch.zeros(TOKENS, num_experts + 1, dtype=torch.bool)
    probs = torch.zeros(TOKENS, num_experts + 1)
    columns = torch.where(idx >= 0, idx, num_experts)
    routing_map.scatter_(1, columns, True)
    probs.scatter_(1, columns, weights)
    return x.to(device), routing_map[:, :num_experts].contiguous().to(device), probs[:, :num_experts].contiguous().to(device)


def _expert_rows(rows, row_probs, tokens_per_expert, rank: int):
    """Experts on expert-major rows: row of global expert ``e`` -> ``row * (1 + prob) * (e + 1)``."""
    counts = tokens_per_expert.tolist()
    expert = torch.repeat_interleave(torch.arange(len(counts)) + rank * len(counts) + 1, torch.tensor(counts))
    scale = torch.ones(rows.size(0))
    scale[: expert.numel()] = expert.float()
    scale = scale.to(rows.device)
    return (rows.float() * (1 + row_probs.unsqueeze(1)) * scale.unsqueeze(1)).to(torch.bfloat16)


def _dense(x, routing_map, probs):
    """What combine(experts(dispatch)) gives each token: ``x * sum_e map * (1 + p) * (e + 1)``."""
    experts = torch.arange(1, routing_map.size(1) + 1, dtype=x.dtype, device=x.device)
    return x * (routing_map * (1 + probs) * experts).sum(1, keepdim=True)


def _check_hybrid(rank: int, world: int, seed: int, dispatch_fn, combine_fn, dispatch_args: dict,
                  budget: int | None = None, device: torch.device = CPU, hidden: int = HIDDEN, **combine_args) -> tuple:
    """Dispatch, experts, combine, backward as the frameworks run them (every argument by keyword), against
    :func:`_dense`. ``budget``: ``num_permuted_tokens`` of the dispatch. Returns the handle."""
    x, routing_map, probs = _routing(rank, world, seed, device, hidden)
    x = x.requires_grad_(True)
    probs = probs.requires_grad_(True)
    hidden, row_probs, _, tokens_per_expert, handle = dispatch_fn(
        x=x, routing_map=routing_map, probs=probs, group=dist.group.WORLD, num_local_experts=LOCAL_EXPERTS,
        num_permuted_tokens=budget, pad_multiple=None, **dispatch_args)
    tokens_per_expert = tokens_per_expert.to(torch.int64)
    num_permuted_tokens = tokens_per_expert.sum() if budget is None else budget
    if budget is None:
        assert num_permuted_tokens.dim() == 0 and hidden.size(0) == int(num_permuted_tokens)
    y = _expert_rows(hidden, row_probs, tokens_per_expert, rank)
    out = combine_fn(x=y, handle=handle, num_permuted_tokens=num_permuted_tokens, pad_multiple=None, **combine_args)
    assert isinstance(out, torch.Tensor) and out.shape == x.shape and out.dtype == torch.bfloat16

    ref_x = x.detach().double().requires_grad_(True)
    ref_probs = probs.detach().double().requires_grad_(True)
    ref = _dense(ref_x, routing_map, ref_probs)
    assert_close(out.detach(), ref.detach(), torch.bfloat16, f"hybridep combine on rank {rank}")
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(77 + rank), dtype=torch.float64).to(device)
    (out.float() * g.float()).sum().backward()
    (ref * g).sum().backward()
    assert_close(x.grad, ref_x.grad, torch.bfloat16, f"hybridep grad x on rank {rank}")
    assert_close(probs.grad, ref_probs.grad, torch.bfloat16, f"hybridep grad probs on rank {rank}")
    return handle


# ---------------------------------------------------------------------------------------------------
# the rank functions


def automodel(rank: int, world_size: int) -> None:
    """Automodel's stand-in with DeepEP, HybridEP and UCCL-EP (the CPU fakes) present."""
    os.environ["FUSED_A2A_DEEPEP_NUM_SMS"] = "16"  # a tuned value: used until set_deepep_num_sms is called
    module = _installed("automodel")
    _check_fakes()
    import deep_ep

    from fused_a2a.backends import deepep, hybridep_buffer, uccl
    from fused_a2a.seed import deepep as seed_deepep

    group = dist.group.WORLD
    assert (module.HAVE_DEEP_EP, module.HAVE_HYBRIDEP, module.HAVE_UCCL_EP) == (True, True, True)
    assert module.fused_dispatch is seed_deepep.fused_dispatch  # Automodel checks identity
    _check_signatures(module, AUTOMODEL_SIGNATURES)
    assert module.Buffer is deep_ep.Buffer and module.HybridEPBuffer is deep_ep.HybridEPBuffer

    # experts.py pre-allocates the buffer; the module's state shows the live one
    buffer = module.get_buffer(group, HIDDEN * max(torch.empty((), dtype=torch.bfloat16).element_size(), 2))
    assert module._buffer is buffer is deepep.current_buffer() and module._nvshmem_available is False
    assert module._is_nvshmem_available() is False
    assert _channels(module, group) == 16  # the environment's (tuned) SM count
    module.set_deepep_num_sms(20)  # the frameworks' default count means "not set": the tuned count stays
    assert _channels(module, group) == 16
    module.set_deepep_num_sms(24)  # MoEFlexTokenDispatcher's call with a configured count: it wins
    assert _channels(module, group) == 24
    for case, flag in ((BF16_CASES[0], True), (BF16_CASES[2], False)):  # case 2 has -1 slots
        check_case(case, rank, world_size, CPU, *_framework_calls(module.fused_dispatch, module.fused_combine, group, flag))

    module.set_uccl_num_sms(20)
    assert module._uccl_buffer is None
    check_case(BF16_CASES[2], rank, world_size, CPU,
               *_framework_calls(module.uccl_fused_dispatch, module.uccl_fused_combine, group, False))
    assert module._uccl_buffer is uccl.current_buffer() is not None

    # HybridEP: _HybridEPManager passes every argument by keyword; num_permuted_tokens stays None
    sms = dict(num_sms_dispatch_api=16, num_sms_combine_api=16)
    _check_hybrid(rank, world_size, 1, module.hybrid_ep_dispatch, module.hybrid_ep_combine, sms)
    made = module._hybrid_ep_buffer
    assert made is hybridep_buffer.current_buffer() and made.config["num_sms_dispatch_api"] == 16
    _check_hybrid(rank, world_size, 2, module.hybrid_ep_dispatch, module.hybrid_ep_combine, sms)
    assert module._hybrid_ep_buffer is made  # the same knobs reuse the buffer
    module.init_hybrid_ep_buffer(group, HIDDEN, TOKENS, LOCAL_EXPERTS, 8, 8, False)
    mine = module._hybrid_ep_buffer
    assert mine is not made and mine.config["num_sms_dispatch_api"] == 8
    _check_hybrid(rank, world_size, 3, module.hybrid_ep_dispatch, module.hybrid_ep_combine, sms)
    assert module._hybrid_ep_buffer is mine  # a buffer of init_hybrid_ep_buffer is used as it is
    module.reset_hybrid_ep_buffer()
    assert module._hybrid_ep_buffer is None
    try:
        module.init_hybrid_ep_buffer(group, HIDDEN, TOKENS, LOCAL_EXPERTS, 8, 8, True)
        raise AssertionError("fp8_dispatch=True was accepted")
    except AssertionError as err:
        assert "fp8" in str(err)

    # init_utils.destroy_global_state: free_buffer destroys the DeepEP buffer (collectively) once
    live = module._buffer
    module.free_buffer()
    assert module._buffer is None and deepep.current_buffer() is None
    assert deep_ep.EVENTS.count(("destroy", id(live))) == 1
    module.free_buffer()  # nothing left: a no-op
    uccl.free_uccl_buffer()


def megatron(rank: int, world_size: int) -> None:
    """Megatron-LM's stand-in with DeepEP and HybridEP (the CPU fakes) present, TransformerEngine absent."""
    os.environ["FUSED_A2A_HYBRIDEP_NUM_SMS_PREPROCESSING_API"] = "64"  # a tuned value for Megatron's default 108
    module = _installed("megatron")
    _check_fakes()
    from fused_a2a.backends import deepep, hybridep_buffer

    group = dist.group.WORLD
    assert (module.HAVE_DEEP_EP, module.HAVE_HYBRIDEP, module.HAVE_TE_EP) == (True, True, False)
    assert module.HYBRIDEP_TOKEN_ALIGNMENT == 64
    _check_signatures(module, MEGATRON_SIGNATURES)
    _check_nccl_ep_absent(module)

    # _DeepepManager: set_deepep_num_sms(config or 20), then positional dispatch with async flags (True by default)
    module.set_deepep_num_sms(20)
    check_case(BF16_CASES[2], rank, world_size, CPU, *_framework_calls(module.fused_dispatch, module.fused_combine, group, True))
    assert module._buffer is deepep.current_buffer() is not None

    # _HybridEPManager: Megatron's keyword set, its defaults
    defaults = dict(num_sms_dispatch_api=None, num_sms_combine_api=None, num_blocks_permute=None, num_blocks_unpermute=None,
                    fused=False, num_sms_preprocessing_api=108)
    handle = _check_hybrid(rank, world_size, 4, module.hybrid_ep_dispatch, module.hybrid_ep_combine, defaults, fused=False)
    assert bool(handle[-1] != 0) is False  # the dispatcher's over-budget test
    config = module._hybrid_ep_buffer.config
    assert config["num_sms_preprocessing_api"] == 64 and config["num_blocks_permute"] == -1  # 108 = not set: tuned
    assert module._hybrid_ep_buffer is hybridep_buffer.current_buffer()

    # fused permute and block counts (moe_permute_fusion_into_hybridep, moe_hybridep_num_blocks_*)
    fused = dict(defaults, fused=True, num_blocks_permute=32, num_blocks_unpermute=32, num_sms_dispatch_api=16,
                 num_sms_combine_api=16, num_sms_preprocessing_api=32)
    _check_hybrid(rank, world_size, 5, module.hybrid_ep_dispatch, module.hybrid_ep_combine, fused, fused=True)
    config = module._hybrid_ep_buffer.config
    assert [config[k] for k in ("num_blocks_permute", "num_blocks_unpermute", "num_sms_dispatch_api",
                                "num_sms_preprocessing_api")] == [32, 32, 16, 32]
    assert module._hybrid_ep_buffer.last_template_config.fuse_permute_dispatch is True

    # a token budget (moe_expert_rank_capacity_factor): non-blocking, exactly `budget` rows, overflow flagged
    x, routing_map, probs = _routing(rank, world_size, 6)
    rows = module.hybrid_ep_dispatch(x=x, routing_map=routing_map, probs=probs, group=group,
                                     num_local_experts=LOCAL_EXPERTS, **defaults)[0].size(0)
    short = module.hybrid_ep_dispatch(x=x, routing_map=routing_map, probs=probs, group=group,
                                      num_local_experts=LOCAL_EXPERTS, num_permuted_tokens=rows - 2, **defaults)
    assert short[0].size(0) == rows - 2 and bool(short[4][-1] != 0) is True
    roomy = max(int(t) for t in _all_gather_int(rows)) + 8  # one budget for the group, as Megatron computes it
    handle = _check_hybrid(rank, world_size, 6, module.hybrid_ep_dispatch, module.hybrid_ep_combine,
                           defaults, budget=roomy, fused=False)
    assert bool(handle[-1] != 0) is False

    # init_hybrid_ep_buffer in Megatron's order; reset_hybrid_ep_buffer (test teardown)
    module.init_hybrid_ep_buffer(group, HIDDEN, TOKENS, LOCAL_EXPERTS, None, None, 8, 4)
    config = module._hybrid_ep_buffer.config
    assert (config["num_blocks_permute"], config["num_blocks_unpermute"], config["num_sms_dispatch_api"]) == (8, 4, 24)
    module.reset_hybrid_ep_buffer()
    assert module._hybrid_ep_buffer is None

    module.free_buffer()  # the extra free_buffer; Megatron itself never frees
    assert module._buffer is None


def _all_gather_int(value: int) -> list[int]:
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def _check_nccl_ep_absent(module) -> None:
    """Megatron's NCCL EP functions without TransformerEngine's EP module."""
    assert all(getattr(module, name) is None for name in NCCL_EP_OPTIONAL)
    assert module.is_nccl_ep_bootstrapped() is False
    assert module.nccl_ep_finalize() is None  # a no-op, never raises
    try:
        module.ensure_nccl_ep_bootstrapped(None, 8, 64, None, 32, 2)
        raise AssertionError("ensure_nccl_ep_bootstrapped did not raise")
    except RuntimeError as err:
        assert "transformer_engine.pytorch.ep" in str(err)


class _Blocker(importlib.abc.MetaPathFinder):
    """Makes the optional libraries unimportable, whatever is installed."""

    BLOCKED = ("deep_ep", "uccl", "transformer_engine")

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in self.BLOCKED:
            raise ModuleNotFoundError(f"No module named {fullname!r} (blocked by the test)", name=fullname)
        return None


def absent() -> None:
    """Both stand-ins in a process where deep_ep, uccl and TransformerEngine cannot be imported (run in a
    fresh interpreter: fused_a2a detects the libraries when it is first imported)."""
    assert "fused_a2a" not in sys.modules
    sys.meta_path.insert(0, _Blocker())
    automodel_module, megatron_module = _installed("automodel"), _installed("megatron")

    # Automodel: every library-specific name None (its dispatcher tests `is None`), flags False
    assert (automodel_module.HAVE_DEEP_EP, automodel_module.HAVE_HYBRIDEP, automodel_module.HAVE_UCCL_EP) == (False,) * 3
    assert all(getattr(automodel_module, name) is None for name in AUTOMODEL_DISPATCHER_NAMES)
    for name in ("Buffer", "EventHandle", "EventOverlap", "HybridEPBuffer", "UCCLBuffer"):
        assert not hasattr(automodel_module, name)
    for name in ("_buffer", "_uccl_buffer", "_hybrid_ep_buffer", "_nvshmem_available"):
        assert getattr(automodel_module, name) is None
    automodel_module.free_buffer()  # no buffer, no deep_ep: a no-op
    assert automodel_module._buffer is None

    # Megatron: the 13 names exist; the library ones are None; NCCL EP as without TransformerEngine
    assert (megatron_module.HAVE_DEEP_EP, megatron_module.HAVE_HYBRIDEP, megatron_module.HAVE_TE_EP) == (False,) * 3
    assert megatron_module.HYBRIDEP_TOKEN_ALIGNMENT == 64
    for name in ("fused_dispatch", "fused_combine", "set_deepep_num_sms", "hybrid_ep_dispatch", "hybrid_ep_combine"):
        assert getattr(megatron_module, name) is None
    _check_nccl_ep_absent(megatron_module)
    assert megatron_module._buffer is None and megatron_module._hybrid_ep_buffer is None
    megatron_module.free_buffer()
    print("absent: ok")

