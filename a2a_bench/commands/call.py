"""A library call described on the command line (``a2a-bench show``), checked by the library's own code.

``show`` has no tensors, so the call is given to the library's checks as tensors on the ``meta``
device (shape and dtype, no storage): :func:`fused_a2a.checks.check_dispatch_inputs` (what
``fused_a2a.dispatch`` runs first), then the backend's dtypes and shape limits (what the library
checks when the group agrees on a call). Sizes a tensor cannot have (a zero or negative hidden size,
negative tokens) and a group of no ranks are refused before.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from a2a_bench.engine.spec import SpecError
from fused_a2a.backends import get_backend
from fused_a2a.checks import check_dispatch_inputs
from fused_a2a.fp8 import BLOCK as FP8_BLOCK
from fused_a2a.shape import CallShape
from fused_a2a.tuning.table import DTYPES

TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class Call:
    """One ``fused_a2a.dispatch`` call as ``show`` describes it.

    Attributes:
        backend: a backend name.
        world_size: ranks of the expert-parallel group.
        dtype: ``bf16``, ``fp16``, ``fp32`` or ``fp8``.
        hidden: hidden size.
        num_tokens: tokens of this rank.
        topk: experts per token (``None``: not given, checked as 1).
        num_experts: experts of the group (``None``: not given, checked as one per rank).
    """

    backend: str
    world_size: int
    dtype: str
    hidden: int
    num_tokens: int
    topk: int | None = None
    num_experts: int | None = None


def check_call(call: Call) -> None:
    """Raise one ``ValueError`` (or ``SpecError`` for an option out of range) where the library
    would refuse ``call``."""
    for option, value, least in (("--world-size", call.world_size, 1), ("--hidden", call.hidden, 1),
                                 ("--tokens", call.num_tokens, 0), ("--topk", call.topk, 1),
                                 ("--experts", call.num_experts, 1)):
        if value is not None and value < least:
            raise SpecError(f"{option} must be >= {least}, got {value}")
    if call.dtype not in DTYPES:
        raise SpecError(f"unknown dtype {call.dtype!r}; choose from {', '.join(DTYPES)}")
    if call.dtype == "fp8" and call.hidden % FP8_BLOCK:
        raise SpecError(f"fp8 dispatch needs a hidden size divisible by {FP8_BLOCK}, got {call.hidden}")
    spec = get_backend(call.backend)
    topk = call.topk or 1
    num_experts = call.num_experts or call.world_size
    check_dispatch_inputs(_tokens(call), _meta((call.num_tokens, topk), torch.int64),
                          _meta((call.num_tokens, topk), torch.float32), num_experts, call.world_size)
    if call.dtype not in spec.dtypes:
        raise ValueError(f"{call.backend} moves {', '.join(spec.dtypes)} tokens, not {call.dtype}")
    shape = CallShape(call.dtype, call.hidden, topk, num_experts, world_size=call.world_size, tokens=(call.num_tokens,))
    problem = spec.shape_problem(shape, {})
    if problem is not None:
        raise ValueError(f"{call.backend}: {problem}")


def _tokens(call: Call):
    if call.dtype == "fp8":
        return (_meta((call.num_tokens, call.hidden), torch.float8_e4m3fn),
                _meta((call.num_tokens, call.hidden // FP8_BLOCK), torch.float32))
    return _meta((call.num_tokens, call.hidden), TORCH_DTYPES[call.dtype])


def _meta(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")
