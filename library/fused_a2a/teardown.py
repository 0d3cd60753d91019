"""Release every backend's process-wide buffers: call before ``destroy_process_group``."""

from __future__ import annotations

from fused_a2a.backends import BACKENDS


def free_all_buffers() -> None:
    """Run every registered backend's teardown (DeepEP and UCCL-EP destroy their buffers, collectively;
    HybridEP's is dropped; the torch backend forgets its per-group objects)."""
    for spec in BACKENDS.values():
        spec.teardown()
