"""Per-cluster tuning tables.

:mod:`fused_a2a.tuning.table`: the ``tuning.json`` format (schema ``a2a-bench/tuning/v1``), its only
reader and writer, and the lookup rule. :mod:`fused_a2a.tuning.resolve`: where a call's knobs come
from (argument > environment > tuning table > backend default).
"""
