"""Drop-in stand-ins for the training frameworks' ``fused_a2a`` modules, with this cluster's tuned knobs.

* :mod:`fused_a2a.compat.automodel` stands in for NeMo Automodel's
  ``nemo_automodel.components.moe.megatron.fused_a2a``;
* :mod:`fused_a2a.compat.megatron` for Megatron-LM's ``megatron.core.transformer.moe.fused_a2a``.

One line, before the framework imports its module (the first lines of the training script)::

    import fused_a2a.compat; fused_a2a.compat.install("automodel")   # or "megatron"

Without editing the script, the launcher installs them, then runs the script (or ``-m`` module)::

    torchrun --nproc-per-node 8 -m fused_a2a.compat megatron -- pretrain_gpt.py ARGS

:func:`replaced` says which framework modules are stand-ins in this process; :func:`uninstall` undoes
:func:`install`.
"""

from fused_a2a.compat.swap import FRAMEWORKS, install, replaced, uninstall

__all__ = ["FRAMEWORKS", "install", "replaced", "uninstall"]
