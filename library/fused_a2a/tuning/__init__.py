"""Per-cluster tuning tables.

:mod:`fused_a2a.tuning.table`: the ``tuning.json`` format (schema ``a2a-bench/tuning/v1``), its only
reader and writer, and the lookup rule. :mod:`fused_a2a.tuning.resolve`: where a call's knobs come
from (argument > environment > tuning table > backend default). :mod:`fused_a2a.tuning.agreement`: the
knobs every rank of a group agrees on, cached per call key. :func:`clear` forgets every cache of them.
"""

from fused_a2a.cluster import detect_cluster
from fused_a2a.tuning import agreement, resolve


def clear() -> None:
    """Forget every cache of knob resolution: the loaded tables, the detected cluster, which resolutions
    were logged and the agreed resolutions (call it on every rank of a group, or on none: a cleared rank
    runs the agreement's collective again at its next call)."""
    resolve.clear_tables()
    detect_cluster.cache_clear()
    agreement.clear()
