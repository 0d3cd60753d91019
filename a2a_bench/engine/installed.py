"""One answer for a backend that is not installed, wherever a command meets it: what is missing and
how to install it (a sweep records it as the point's ``skipped`` status; the benchmarks refuse with it)."""

from __future__ import annotations

from fused_a2a.backends import get_backend

INSTALL_HINT = "install it with scripts/install_backends.sh (README: Installing the backends), then check a2a-bench env"


def not_installed(backend: str) -> str | None:
    """``"<backend> is not installed (<why>); <how to install it>"``, or ``None`` when it is installed."""
    reason = get_backend(backend).unavailable()
    if reason is None:
        return None
    return f"{backend} is not installed ({reason}); {INSTALL_HINT}"
