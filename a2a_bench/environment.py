"""What this machine offers: backends (version or why not), GPUs, links, cluster id."""

from __future__ import annotations

from importlib import metadata

import torch

from fused_a2a.backends import BACKENDS
from fused_a2a.backends.deepep import DEEP_EP
from fused_a2a.backends.hybridep import HAVE_HYBRIDEP
from fused_a2a.backends.uccl import UCCL_EP
from fused_a2a.cluster import detect_cluster

_DISTRIBUTIONS = {"deep_ep": ("deep_ep", "deep-ep"), "uccl.ep": ("uccl",)}


def _version(import_name: str) -> str:
    for dist_name in _DISTRIBUTIONS.get(import_name, (import_name,)):
        try:
            return metadata.version(dist_name)
        except metadata.PackageNotFoundError:
            continue
    return "installed (version unknown)"


def nccl_version() -> str | None:
    """NCCL's version as ``major.minor.patch``, or ``None`` on a CPU build of torch."""
    if not torch.cuda.is_available():
        return None
    version = torch.cuda.nccl.version()
    return ".".join(str(v) for v in version) if isinstance(version, tuple) else str(version)


def backend_versions() -> dict[str, str | None]:
    """Versions of torch, NCCL and each optional backend library (``None`` when absent)."""
    return {
        "torch": torch.__version__,
        "nccl": nccl_version(),
        "deep_ep": _version("deep_ep") if DEEP_EP.available else None,
        "uccl": _version("uccl.ep") if UCCL_EP.available else None,
    }


def backend_status() -> list[tuple[str, bool, str]]:
    """``(backend, available, version or reason)`` for every registered backend and HybridEP."""
    versions = backend_versions()
    library = {"torch": "torch", "deepep": "deep_ep", "uccl": "uccl"}
    rows = []
    for name, spec in BACKENDS.items():
        reason = spec.unavailable()
        rows.append((name, reason is None, reason or versions.get(library.get(name, name)) or "available"))
    rows.append(("hybridep (deep_ep.HybridEPBuffer)", HAVE_HYBRIDEP,
                 "available" if HAVE_HYBRIDEP else (DEEP_EP.reason or "deep_ep built without HybridEP")))
    return rows


def gpus() -> list[str]:
    """Names of the visible CUDA devices (empty without CUDA)."""
    if not torch.cuda.is_available():
        return []
    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]


def describe(world_size: int | None) -> dict:
    """Everything ``a2a-bench env`` prints, as plain data."""
    return {
        "cluster": detect_cluster(world_size).to_json(),
        "gpus": gpus(),
        "versions": backend_versions(),
        "backends": [{"backend": b, "available": ok, "detail": d} for b, ok, d in backend_status()],
    }
