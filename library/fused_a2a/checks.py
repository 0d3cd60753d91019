"""Input validation shared by every backend: one clear ``ValueError`` per mistake.

The shape and dtype checks read only tensor metadata (no device synchronisation). These checks see one
rank's inputs: :mod:`fused_a2a.calls` makes a failure raise on every rank of the group, and the range
of ``topk_idx`` is checked on every rank through the counts a dispatch exchanges
(:mod:`fused_a2a.shared_errors`). :func:`check_topk_range` reads the minimum and maximum on this rank
alone (a device synchronisation), for a caller that raises on every rank by other means.
"""

from __future__ import annotations

import torch

HIDDEN_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def dtype_name(dtype: torch.dtype) -> str:
    """The name tuning tables and backend limits give a token dtype: ``bf16``, ``fp16``, ``fp32``;
    any other as torch names it without its prefix (``float64``)."""
    return DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def check_dispatch_inputs(
    x: torch.Tensor,
    topk_idx: torch.Tensor,
    topk_weights: torch.Tensor | None,
    num_experts: int,
    group_size: int,
) -> None:
    """Raise ``ValueError`` unless the arguments of a dispatch are consistent.

    Args:
        x: ``[N, H]`` tokens, bf16/fp16/fp32, or an FP8 pair ``(x_fp8 [N, H] float8_e4m3fn,
            scales [N, H/128] float32)``.
        topk_idx: ``[N, K]`` int64 global expert ids, ``-1`` for "no expert".
        topk_weights: ``[N, K]`` float32 routing weights, or ``None``.
        num_experts: total number of experts across the group.
        group_size: number of ranks in the expert-parallel group.
    """
    dispatch_shape(x, topk_idx, topk_weights, num_experts)
    check_experts_divisible(num_experts, group_size)


def check_experts_divisible(num_experts: int, group_size: int) -> None:
    """Raise ``ValueError`` unless ``num_experts`` splits evenly over ``group_size`` ranks."""
    if num_experts % group_size != 0:
        raise ValueError(f"num_experts ({num_experts}) is not divisible by the group size ({group_size})")


def dispatch_shape(x, topk_idx: torch.Tensor, topk_weights: torch.Tensor | None,
                   num_experts: int) -> tuple[str, int, int, int]:
    """``(dtype, num_tokens, hidden, topk)`` of a dispatch's arguments (``dtype`` as
    :func:`dtype_name` names it, ``"fp8"`` for an FP8 pair), after the checks of
    :func:`check_dispatch_inputs` but the group size's. Raises ``ValueError`` naming the mistake."""
    try:  # the common call (tensors, no FP8 pair), each piece of metadata read once
        num_tokens, hidden = x.shape
        idx_shape = topk_idx.shape
        name = DTYPE_NAMES.get(x.dtype)  # None for anything but a torch dtype of tokens
        if (name is not None and topk_idx.dtype is torch.int64 and len(idx_shape) == 2 and idx_shape[0] == num_tokens
                and (topk_weights is None or (topk_weights.dtype is torch.float32 and topk_weights.shape == idx_shape))
                and type(num_experts) is int and num_experts > 0):
            return name, num_tokens, hidden, idx_shape[1]
    except (AttributeError, TypeError, ValueError):
        pass
    _explain(x, topk_idx, topk_weights, num_experts)
    tokens = x[0] if isinstance(x, tuple) else x
    return ("fp8" if isinstance(x, tuple) else dtype_name(tokens.dtype)), tokens.size(0), tokens.size(1), topk_idx.size(1)


def _explain(x, topk_idx, topk_weights, num_experts) -> None:
    """Raise the ``ValueError`` that names the first mistake in a dispatch's arguments, if any."""
    if isinstance(x, tuple):
        x = _check_fp8_pair(x)
    elif not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"x must be a 2-D tensor [num_tokens, hidden], got shape {_shape(x)}")
    elif x.dtype not in HIDDEN_DTYPES:
        raise ValueError(f"x must be bfloat16, float16 or float32, got {x.dtype}")
    if not isinstance(topk_idx, torch.Tensor) or topk_idx.dim() != 2:
        raise ValueError(f"topk_idx must be a 2-D tensor [num_tokens, topk], got shape {_shape(topk_idx)}")
    if topk_idx.dtype != torch.int64:
        raise ValueError(f"topk_idx must be int64, got {topk_idx.dtype}")
    if topk_idx.size(0) != x.size(0):
        raise ValueError(f"x has {x.size(0)} tokens but topk_idx has {topk_idx.size(0)}")
    if topk_weights is not None:
        if not isinstance(topk_weights, torch.Tensor) or topk_weights.dim() != 2:
            raise ValueError(f"topk_weights must be a 2-D tensor [num_tokens, topk], got shape {_shape(topk_weights)}")
        if topk_weights.dtype != torch.float32:
            raise ValueError(f"topk_weights must be float32, got {topk_weights.dtype}")
        if topk_weights.shape != topk_idx.shape:
            raise ValueError(
                f"topk_weights shape {tuple(topk_weights.shape)} does not match topk_idx shape {tuple(topk_idx.shape)}"
            )
    if not isinstance(num_experts, int) or num_experts <= 0:
        raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")


def check_topk_range(topk_idx: torch.Tensor, num_experts: int) -> None:
    """Raise ``ValueError`` unless every entry of ``topk_idx`` lies in ``[-1, num_experts)``."""
    if topk_idx.numel() == 0:
        return
    low, high = torch.stack([topk_idx.min(), topk_idx.max()]).tolist()
    if low < -1 or high >= num_experts:
        raise ValueError(f"topk_idx values must lie in [-1, {num_experts}), found range [{low}, {high}]")


def check_combine_input(x: torch.Tensor, num_recv_tokens: int) -> None:
    """Raise ``ValueError`` unless ``x`` can be combined by a handle that received ``num_recv_tokens``."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"combine input must be a 2-D tensor [num_recv_tokens, hidden], got shape {_shape(x)}")
    if x.dtype not in HIDDEN_DTYPES:
        raise ValueError(f"combine input must be bfloat16, float16 or float32, got {x.dtype}")
    if x.size(0) != num_recv_tokens:
        raise ValueError(
            f"combine input has {x.size(0)} rows but its handle received {num_recv_tokens} tokens"
        )


def _check_fp8_pair(x: tuple) -> torch.Tensor:
    """The FP8 tensor of a valid ``(x_fp8, scales)`` pair; ``ValueError`` otherwise."""
    if len(x) != 2 or not all(isinstance(t, torch.Tensor) for t in x):
        raise ValueError("an FP8 x must be a pair (x_fp8 [N, H] float8_e4m3fn, scales [N, H/128] float32)")
    x_fp8, scales = x
    if x_fp8.dim() != 2 or x_fp8.dtype != torch.float8_e4m3fn:
        raise ValueError(f"x_fp8 must be a 2-D float8_e4m3fn tensor, got {x_fp8.dtype} of shape {_shape(x_fp8)}")
    n, h = x_fp8.shape
    if h % 128 or scales.dtype != torch.float32 or tuple(scales.shape) != (n, h // 128):
        raise ValueError(f"scales must be float32 [{n}, {h} / 128] for x_fp8 [{n}, {h}], got {scales.dtype} {_shape(scales)}")
    return x_fp8


def _shape(obj: object) -> object:
    return tuple(obj.shape) if isinstance(obj, torch.Tensor) else type(obj).__name__
