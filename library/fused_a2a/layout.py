"""The memory layout the fused libraries read token rows in: contiguous and 16-byte aligned."""

from __future__ import annotations

import torch

ALIGN_BYTES = 16


def dense(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` itself when it is contiguous and starts on a 16-byte boundary, else a contiguous copy
    (a fresh allocation, so aligned), same values, shape and dtype.

    DeepEP, UCCL-EP and HybridEP move rows with 16-byte vector loads and TMA, and check contiguity only.
    A tensor with one row counts as contiguous whatever its row stride, so a row sliced out of a wider
    buffer passes that check while starting anywhere: its kernels then fault (misaligned address).
    """
    if tensor.is_contiguous() and tensor.data_ptr() % ALIGN_BYTES == 0:
        return tensor
    return tensor.clone(memory_format=torch.contiguous_format)
