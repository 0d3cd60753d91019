"""Drop-in stand-ins for the training frameworks' ``fused_a2a`` modules, with this cluster's tuned knobs.

* :mod:`fused_a2a.compat.automodel` stands in for NeMo Automodel's
  ``nemo_automodel.components.moe.megatron.fused_a2a``;
* :mod:`fused_a2a.compat.megatron` for Megatron-LM's ``megatron.core.transformer.moe.fused_a2a``.
"""
