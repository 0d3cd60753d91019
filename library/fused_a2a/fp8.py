"""FP8 dispatch inputs as DeepEP takes them: ``(x_fp8 [N, H] float8_e4m3fn, scales [N, H/128] float32)``."""

from __future__ import annotations

import torch

BLOCK = 128
FP8_MAX = 448.0  # largest finite float8_e4m3fn


def is_fp8_pair(x: object) -> bool:
    """Whether ``x`` is an ``(x_fp8, scales)`` pair rather than one tensor."""
    return isinstance(x, tuple)


def quantize_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token, per-128-column block scaling to float8_e4m3fn.

    Args:
        x: ``[N, H]`` floating tokens, ``H`` a multiple of 128.

    Returns:
        ``(x_fp8 [N, H] float8_e4m3fn, scales [N, H/128] float32)`` with
        ``x ≈ x_fp8 * scales`` blockwise (each block's largest magnitude maps to 448).
    """
    n, h = x.shape
    if h % BLOCK:
        raise ValueError(f"fp8 dispatch needs a hidden size divisible by {BLOCK}, got {h}")
    blocks = x.float().view(n, h // BLOCK, BLOCK)
    scales = (blocks.abs().amax(dim=2) / FP8_MAX).clamp_min(1e-12)
    x_fp8 = (blocks / scales.unsqueeze(2)).view(n, h).to(torch.float8_e4m3fn)
    return x_fp8, scales


def dequantize_fp8(x_fp8: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``[N, H]`` float32 values of an ``(x_fp8, scales)`` pair (:func:`quantize_fp8`'s inverse)."""
    n, h = x_fp8.shape
    return (x_fp8.float().view(n, h // BLOCK, BLOCK) * scales.unsqueeze(2)).view(n, h)
