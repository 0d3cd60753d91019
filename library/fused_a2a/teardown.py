"""Release every backend's process-wide buffer: call before ``destroy_process_group``."""

from __future__ import annotations

from fused_a2a.backends import deepep, hybridep, torch_a2a, uccl


def free_all_buffers() -> None:
    """Destroy the DeepEP and UCCL-EP buffers, drop the HybridEP buffer and the torch buffers."""
    deepep.free_buffer()
    uccl.free_uccl_buffer()
    hybridep.reset_hybrid_ep_buffer()
    torch_a2a.free_torch_buffers()
