"""The versions a run records (``run.json``) and ``a2a-bench env`` prints: torch, NCCL, each backend's build."""

from __future__ import annotations

import torch

from fused_a2a.backends import BACKENDS


def nccl_version() -> str | None:
    """NCCL's version as ``major.minor.patch``, or ``None`` on a CPU build of torch."""
    if not torch.cuda.is_available():
        return None
    version = torch.cuda.nccl.version()
    return ".".join(str(v) for v in version) if isinstance(version, tuple) else str(version)


def backend_versions() -> dict[str, str | None]:
    """Versions of torch, NCCL and each registered backend's library build (``None`` when absent); the
    reference backend is torch itself, given once."""
    return {"torch": torch.__version__, "nccl": nccl_version(),
            **{name: spec.version() for name, spec in BACKENDS.items() if not spec.reference}}
