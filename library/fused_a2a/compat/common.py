"""What the two stand-ins share: the framework modules' buffer variables as live views of fused_a2a's
process-wide buffers, and a ``free_buffer`` with the frameworks' error handling.

A framework module keeps its buffers in module globals (``_buffer``, ``_hybrid_ep_buffer``, ...); code and
tests read them and assign them. In a stand-in these names are properties of the module's class
(a :class:`types.ModuleType` subclass): reading one returns the buffer the backend holds now, assigning
one replaces it (without destroying the old one, as an assignment in the framework module does), and
deleting one (what ``mock.patch.object`` does on exit) sets it to ``None``.
"""

from __future__ import annotations

import logging

from fused_a2a.backends import deepep, hybridep_buffer, uccl
from fused_a2a.seed import deepep as seed_deepep
from fused_a2a.seed import hybridep as seed_hybridep
from fused_a2a.seed import uccl as seed_uccl

logger = logging.getLogger("fused_a2a")

# the SM counts the frameworks pass when their user set none: NeMo Automodel's
# BackendConfig.dispatcher_num_sms (for DeepEP, UCCL-EP and HybridEP) and Megatron-LM's DeepEP fallback
# when moe_flex_dispatcher_num_sms is unset
FRAMEWORK_DEFAULT_SMS = (20,)
# HybridEP's: Automodel's default count, and 24, the default of Automodel's hybrid_ep_dispatch (HybridEP's own)
HYBRIDEP_DEFAULT_SMS = (20, 24)


def framework_sms(num_sms: int | None, defaults: tuple[int, ...] = FRAMEWORK_DEFAULT_SMS) -> int | None:
    """``None`` ("not set": the tuning table decides) for a framework's default SM count, else the count.

    The frameworks pass an SM count on every call whether or not their user chose one; taking their
    defaults as explicit would shut the tuned counts out. A user who wants exactly a default count sets
    ``FUSED_A2A_<BACKEND>_<KNOB>`` (the environment beats the table).
    """
    return None if num_sms in defaults else num_sms


def set_deepep_num_sms(num_sms: int) -> None:
    """The framework's ``set_deepep_num_sms``: its default count (20) leaves the SM count to the tuning
    table (:func:`framework_sms`), any other count is fixed (``deep_ep.Buffer.set_num_sms``)."""
    seed_deepep.set_deepep_num_sms(framework_sms(num_sms))


def set_uccl_num_sms(num_sms: int) -> None:
    """The framework's ``set_uccl_num_sms``, with :func:`framework_sms`'s rule."""
    seed_uccl.set_uccl_num_sms(framework_sms(num_sms))


def free_deepep_buffer() -> None:
    """Destroy the process-wide DeepEP buffer, as the framework's ``free_buffer`` does.

    A no-op without a buffer (and without deep_ep). Otherwise the buffer is forgotten, then its
    ``destroy()`` runs once; an exception it raises is swallowed (teardown is best effort: NeMo
    Automodel calls this right before ``destroy_process_group``), logged at DEBUG only.
    """
    buffer = deepep.current_buffer()
    if buffer is None:
        return
    deepep.set_current_buffer(None)
    try:
        buffer.destroy()
    except Exception as exc:  # the framework module swallows it silently
        logger.debug("fused_a2a.compat: destroying the DeepEP buffer failed: %s", exc)


def _set_nvshmem_available(_module, value) -> None:
    deepep._nvshmem_available = value  # the backend's cache of Buffer.is_sm90_compiled()


def _set_hybrid_ep_buffer(_module, buffer) -> None:
    if buffer is None:
        seed_hybridep.reset_hybrid_ep_buffer()
    else:  # a buffer the caller built: the seed functions use it as it is (as after init_hybrid_ep_buffer)
        seed_hybridep.adopt_buffer(buffer)


DEEPEP_BUFFER = property(
    lambda _module: deepep.current_buffer(),
    lambda _module, buffer: deepep.set_current_buffer(buffer),
    lambda _module: deepep.set_current_buffer(None),
    doc="The process-wide ``deep_ep.Buffer`` (``None`` without one); assigning replaces it without destroying the old one.",
)
NVSHMEM_AVAILABLE = property(
    lambda _module: deepep._nvshmem_available,
    _set_nvshmem_available,
    lambda module: _set_nvshmem_available(module, None),
    doc="The cached ``Buffer.is_sm90_compiled()`` (``None`` until first asked); assigning overrides it.",
)
UCCL_BUFFER = property(
    lambda _module: uccl.current_buffer(),
    lambda _module, buffer: uccl.set_current_buffer(buffer),
    lambda _module: uccl.set_current_buffer(None),
    doc="The process-wide UCCL-EP buffer (``None`` without one); assigning replaces it without destroying the old one.",
)
HYBRID_EP_BUFFER = property(
    lambda _module: hybridep_buffer.current_buffer(),
    _set_hybrid_ep_buffer,
    lambda module: _set_hybrid_ep_buffer(module, None),
    doc="The process-wide ``HybridEPBuffer`` (``None`` without one); assigning ``None`` resets it "
        "(``reset_hybrid_ep_buffer``), assigning a buffer makes the HybridEP functions use it as it is.",
)
