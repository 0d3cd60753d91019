"""Check one backend against the reference backend (torch) on the same inputs: forward and gradients."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

import fused_a2a
from fused_a2a.fp8 import dequantize_fp8, is_fp8_pair
from a2a_bench.engine.spec import REFERENCE
from fused_a2a.backends import get_backend

# relative-norm tolerance of the combined output and the gradients, per token dtype
TOLERANCE = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}


@dataclass
class RoundTrip:
    """What one dispatch → expert → combine → backward produced on this rank."""

    recv_x: torch.Tensor | tuple[torch.Tensor, torch.Tensor]
    recv_topk_idx: torch.Tensor
    recv_topk_weights: torch.Tensor
    tokens_per_expert: torch.Tensor
    out: torch.Tensor
    grad_x: torch.Tensor | None
    grad_weights: torch.Tensor | None


def expert(recv_x: torch.Tensor, recv_topk_idx: torch.Tensor, recv_topk_weights: torch.Tensor) -> torch.Tensor:
    """A differentiable stand-in for the local experts: ``x * (1 + sum of the local routing weights)``."""
    scale = 1.0 + (recv_topk_weights * (recv_topk_idx >= 0)).sum(dim=1, keepdim=True)
    return (recv_x.float() * scale).to(recv_x.dtype)


def round_trip(backend: str, knobs: dict[str, Any], x, topk_idx, topk_weights, num_experts: int, grad_seed: int, group=None) -> RoundTrip:
    """Dispatch, run :func:`expert`, combine and back-propagate ``sum(out * g)`` with a seeded ``g``.

    An FP8 pair ``x`` is forward only: the experts see its dequantised bf16 rows, no gradients.
    """
    fp8 = is_fp8_pair(x)
    if not fp8:
        x = x.detach().clone().requires_grad_(True)
    weights = topk_weights.detach().clone().requires_grad_(not fp8)
    recv_x, recv_idx, recv_w, counts, handle = fused_a2a.dispatch(
        x, topk_idx, weights, num_experts, group, backend=backend, **knobs
    )
    rows = dequantize_fp8(*recv_x).to(torch.bfloat16) if fp8 else recv_x
    out = fused_a2a.combine(expert(rows, recv_idx, recv_w), handle)
    if fp8:
        return RoundTrip(recv_x, recv_idx, recv_w, counts, out, None, None)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed)).to(out.device)
    (out.float() * g).sum().backward()
    return RoundTrip(recv_x.detach(), recv_idx, recv_w.detach(), counts, out.detach(), x.grad, weights.grad)


def _same(a, b) -> bool:
    """Exact equality of two tensors or FP8 pairs (compared bit for bit)."""
    if isinstance(a, tuple):
        return isinstance(b, tuple) and len(a) == len(b) and all(_same(p, q) for p, q in zip(a, b))
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return torch.equal(a.cpu().view(torch.uint8), b.cpu().view(torch.uint8)) if a.dtype == torch.float8_e4m3fn \
        else torch.equal(a.cpu(), b.cpu())


def ascending_slots(topk_idx: torch.Tensor, topk_weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's ``[R, K]`` local expert ids in ascending order, then ``-1``, with their weights moved
    along: the layout of a backend that does not keep top-k slots (HybridEP)."""
    key = torch.where(topk_idx >= 0, topk_idx, torch.iinfo(topk_idx.dtype).max)
    order = torch.argsort(key, dim=1, stable=True)
    return topk_idx.gather(1, order), topk_weights.gather(1, order)


def compare(got: RoundTrip, ref: RoundTrip, dtype: torch.dtype, keeps_topk_slots: bool = True) -> str | None:
    """``None`` if ``got`` matches ``ref`` (dispatch exactly, the rest within tolerance), else what differs.

    ``keeps_topk_slots=False``: the reference's received ids and weights are compared in ascending
    order (:func:`ascending_slots`), as such a backend returns them.
    """
    if not keeps_topk_slots:
        idx, weights = ascending_slots(ref.recv_topk_idx, ref.recv_topk_weights)
        ref = RoundTrip(ref.recv_x, idx, weights, ref.tokens_per_expert, ref.out, ref.grad_x, ref.grad_weights)
    for name in ("recv_x", "recv_topk_idx", "recv_topk_weights", "tokens_per_expert"):
        if not _same(getattr(got, name), getattr(ref, name)):
            return f"{name} differs from the torch reference"
    for name in ("out", "grad_x", "grad_weights"):
        if getattr(ref, name) is None:
            continue
        a, b = getattr(got, name).double(), getattr(ref, name).double()
        if a.shape != b.shape:
            return f"{name} has shape {tuple(a.shape)}, reference {tuple(b.shape)}"
        err = ((a - b).norm() / b.norm().clamp_min(1e-12)).item()
        if not err <= TOLERANCE[dtype]:
            return f"{name} relative error {err:.1e} exceeds {TOLERANCE[dtype]:.0e}"
    return None


def reference_round_trip(x, topk_idx, topk_weights, num_experts: int, rng_seed: int, group=None) -> RoundTrip:
    """The torch reference's :func:`round_trip` of this rank's inputs (what :func:`verify` compares
    against; the same for every knob setting of a workload). Collective."""
    grad_seed = rng_seed * 7919 + dist.get_rank(group)
    return round_trip(REFERENCE, get_backend(REFERENCE).defaults(), x, topk_idx, topk_weights, num_experts, grad_seed, group)


def verify(backend: str, knobs: dict[str, Any], x, topk_idx, topk_weights, num_experts: int, rng_seed: int, group=None,
           reference: RoundTrip | None = None) -> str | None:
    """Compare ``backend`` with the torch reference on this rank's inputs; ``None`` when every rank agrees.

    Collective. ``reference``: the :func:`reference_round_trip` of these inputs if already computed
    (else it is computed here). Returns the first problem seen on any rank (the same string on every rank).
    """
    grad_seed = rng_seed * 7919 + dist.get_rank(group)
    ref = reference or reference_round_trip(x, topk_idx, topk_weights, num_experts, rng_seed, group)
    got = round_trip(backend, knobs, x, topk_idx, topk_weights, num_experts, grad_seed, group)
    problem = compare(got, ref, torch.bfloat16 if is_fp8_pair(x) else x.dtype, get_backend(backend).keeps_topk_slots)
    problems: list[str | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(problems, problem, group=group)
    return next((f"rank {r}: {p}" for r, p in enumerate(problems) if p is not None), None)
