"""The seed API: the functions of NeMo Automodel's ``fused_a2a`` module, one module per library.

They sit above the backends (:mod:`fused_a2a.backends`) and the knob resolution
(:mod:`fused_a2a.tuning`): the same names, arguments and returns as the seed, with the knobs of this
cluster's tuning table where the caller sets none.
"""
