"""Seeded MoE workloads: the tokens and routing one rank dispatches at one sweep point."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

# the token dtype before dispatch; "fp8" tokens are bf16 sent as (x_fp8, scales) pairs, combined in bf16
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp8": torch.bfloat16}
ROUTINGS = ("uniform", "zipf", "hot")


@dataclass(frozen=True)
class WorkloadSpec:
    """The shape and routing of one point, identical on every rank.

    Attributes:
        num_tokens: tokens per rank ``N``.
        hidden: hidden size ``H``.
        topk: experts per token ``K``.
        num_experts: experts in the whole group ``E``.
        dtype: ``bf16``, ``fp16``, ``fp32``, or ``fp8`` (bf16 tokens dispatched as FP8 pairs,
            :func:`dispatch_input`; combined in bf16).
        routing: ``uniform`` (K distinct experts, uniformly), ``zipf`` (expert popularity
            ``1/(i+1)^skew`` over a seeded expert order) or ``hot`` (a fraction ``skew`` of the
            tokens include one hot expert; the others are uniform).
        skew: the Zipf exponent (``zipf``) or the hot fraction in ``[0, 1]`` (``hot``).
        drop: fraction of top-k slots set to ``-1`` ("no expert"), in ``[0, 1)``.
        rng_seed: base seed of the random draws; rank ``r`` draws from ``rng_seed`` and ``r`` (results
            and ``point_id`` call it ``seed``).
    """

    num_tokens: int
    hidden: int
    topk: int
    num_experts: int
    dtype: str = "bf16"
    routing: str = "uniform"
    skew: float = 1.0
    drop: float = 0.0
    rng_seed: int = 0

    def __post_init__(self) -> None:
        if self.num_tokens < 0 or self.hidden <= 0 or self.topk <= 0 or self.num_experts <= 0:
            raise ValueError(f"tokens must be >= 0 and hidden, topk, experts > 0: {self}")
        if self.topk > self.num_experts:
            raise ValueError(f"topk ({self.topk}) is larger than the number of experts ({self.num_experts})")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.dtype == "fp8" and self.hidden % 128:
            raise ValueError(f"fp8 dispatch needs a hidden size divisible by 128, got {self.hidden}")
        if self.routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {', '.join(ROUTINGS)}, got {self.routing!r}")
        if self.routing == "hot" and not 0.0 <= self.skew <= 1.0:
            raise ValueError(f"hot routing needs a skew (hot fraction) in [0, 1], got {self.skew}")
        if self.routing == "zipf" and self.skew < 0:
            raise ValueError(f"zipf routing needs a skew >= 0, got {self.skew}")
        if not 0.0 <= self.drop < 1.0:
            raise ValueError(f"drop must lie in [0, 1), got {self.drop}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def routing_key(self) -> str:
        """The routing as tables key it (:func:`routing_key`)."""
        return routing_key(self.routing, self.skew)


def routing_key(routing: str, skew: float) -> str:
    """The routing as results, tables and tuning entries key it: ``uniform``, ``zipf:<skew>`` or
    ``hot:<fraction>`` (``skew`` in its shortest form)."""
    return routing if routing == "uniform" else f"{routing}:{skew:g}"


@dataclass(frozen=True)
class Inputs:
    """One rank's dispatch inputs (on the CPU).

    Attributes:
        x: ``[N, H]`` tokens in the spec's dtype, standard normal values.
        topk_idx: ``[N, K]`` int64 distinct global expert ids per token, ``-1`` where dropped.
        topk_weights: ``[N, K]`` float32 softmax weights (``0`` where dropped).
    """

    x: torch.Tensor
    topk_idx: torch.Tensor
    topk_weights: torch.Tensor

    def digest(self) -> str:
        """A short SHA-256 of the three tensors' bytes: identifies the inputs across runs."""
        sha = hashlib.sha256()
        for tensor in (self.x, self.topk_idx, self.topk_weights):
            sha.update(tensor.contiguous().view(torch.uint8).numpy().tobytes())
        return sha.hexdigest()[:16]


def dispatch_input(spec: WorkloadSpec, x: torch.Tensor):
    """What a dispatch sends for tokens ``x``: ``x`` itself, or for ``fp8`` its ``(x_fp8, scales)`` pair
    (128-column blocks, :func:`fused_a2a.fp8.quantize_fp8`)."""
    # imported here: test workers import this module before they choose which fused_a2a backends exist
    from fused_a2a.fp8 import quantize_fp8

    return quantize_fp8(x) if spec.dtype == "fp8" else x


def make_inputs(spec: WorkloadSpec, rank: int) -> Inputs:
    """Rank ``rank``'s inputs for ``spec``: the same on every call, different on every rank."""
    gen = torch.Generator().manual_seed(spec.rng_seed * 1_000_003 + rank)
    n, k = spec.num_tokens, spec.topk
    x = torch.randn(n, spec.hidden, generator=gen).to(spec.torch_dtype)
    scores = _routing_scores(spec, gen)
    topk_idx = scores.topk(k, dim=1).indices if n else torch.empty(0, k, dtype=torch.int64)
    weights = torch.softmax(torch.randn(n, k, generator=gen), dim=1)
    if spec.drop > 0:
        dropped = torch.rand(n, k, generator=gen) < spec.drop
        topk_idx = topk_idx.masked_fill(dropped, -1)
        weights = weights.masked_fill(dropped, 0.0)
    return Inputs(x, topk_idx.to(torch.int64), weights.to(torch.float32))


def _routing_scores(spec: WorkloadSpec, gen: torch.Generator) -> torch.Tensor:
    """``[N, E]`` scores whose top-k per row is a sample of K distinct experts (Gumbel top-k)."""
    n, e = spec.num_tokens, spec.num_experts
    gumbel = -torch.log(-torch.log(torch.rand(n, e, generator=gen).clamp_min(1e-20)))
    if spec.routing == "uniform":
        return gumbel
    order = torch.randperm(e, generator=torch.Generator().manual_seed(spec.rng_seed))
    if spec.routing == "zipf":
        popularity = torch.empty(e)
        popularity[order] = 1.0 / torch.arange(1, e + 1, dtype=torch.float32) ** spec.skew
        return gumbel + popularity.log()
    hot = order[0]
    takes_hot = torch.rand(n, generator=gen) < spec.skew
    gumbel[takes_hot, hot] = float("inf")
    return gumbel
