"""A stand-in for NeMo Automodel's ``nemo_automodel.components.moe.megatron.fused_a2a`` (Automodel main,
2026-08-22), on fused_a2a's backends, so Automodel's MoE layers get this cluster's tuned knobs.

Put it in place before Automodel imports its own module (first lines of the training script)::

    import fused_a2a.compat; fused_a2a.compat.install("automodel")

or, without editing the script: ``torchrun ... -m fused_a2a.compat automodel -- train.py ARGS``.

What Automodel's code sees, name for name:

* ``fused_dispatch``, ``fused_combine``, ``set_deepep_num_sms`` (DeepEP), ``hybrid_ep_dispatch``,
  ``hybrid_ep_combine`` (HybridEP), ``uccl_fused_dispatch``, ``uccl_fused_combine``, ``set_uccl_num_sms``
  (UCCL-EP) are ``None`` where that library is missing, as Automodel's dispatcher expects (it tests
  ``is None``); otherwise they are fused_a2a's seed functions (:mod:`fused_a2a.seed`), same arguments and
  returns: ``fused_dispatch`` returns ``(recv_x, recv_token_indices, recv_token_probs, tokens_per_expert
  [CPU int64], handle)``, ``fused_combine`` ``(combined_x, None)``, ``hybrid_ep_combine`` one tensor and
  takes ``num_permuted_tokens`` as an int or a 0-d tensor.
* Always defined: ``get_hidden_bytes``, ``get_buffer``, ``free_buffer``, ``_is_nvshmem_available``,
  ``init_hybrid_ep_buffer`` (Automodel's 7 positional parameters), ``reset_hybrid_ep_buffer``,
  ``get_uccl_buffer``, the autograd Functions ``FusedDispatch``, ``FusedCombine``, ``HybridEPDispatch``,
  ``HybridEPCombine``, ``UCCLFusedDispatch``, ``UCCLFusedCombine``, the flags ``HAVE_DEEP_EP``,
  ``HAVE_HYBRIDEP``, ``HAVE_UCCL_EP``; ``Buffer``, ``EventHandle``, ``EventOverlap``, ``HybridEPBuffer``,
  ``UCCLBuffer`` only where their library imports.
* Module state ``_buffer``, ``_uccl_buffer``, ``_hybrid_ep_buffer``, ``_nvshmem_available``: reading one
  gives the live process-wide object of fused_a2a's backend, assigning one replaces it (so
  ``module._buffer = stub; module.free_buffer()`` destroys the stub), see :mod:`fused_a2a.compat.common`.
* ``free_buffer()``: destroys the DeepEP buffer once, swallows any exception of ``destroy()`` silently and
  always clears ``_buffer``; a no-op without a buffer or without deep_ep.

Knobs: each call's configs come from explicit arguments and ``set_deepep_num_sms``/``set_uccl_num_sms``
(which win), else ``FUSED_A2A_<BACKEND>_<KNOB>``, this cluster's tuning table, the library's defaults,
agreed by every rank of the group (:mod:`fused_a2a.tuning.agreement`). Automodel's dispatcher calls
``set_*_num_sms`` and passes HybridEP's SM counts on every call, with its default (20) when its user set
none: that default, and HybridEP's 24, count as "not set" and the table's SM counts apply; any other
count Automodel passes wins (:func:`fused_a2a.compat.common.framework_sms`).

Deliberate differences, none of which Automodel's code relies on: a DeepEP or UCCL-EP buffer is destroyed
before a larger one replaces it (Automodel drops the old one alive); calling a function of a missing
library raises ``RuntimeError`` naming the package (Automodel: ``NameError``); ``HAVE_DEEP_EP`` is True for
any importable ``deep_ep`` (Automodel also needs ``deep_ep.utils.EventOverlap``, which DeepEP main lacks);
a dispatch whose tuned configs need a larger buffer than ``get_buffer`` made grows it; Automodel keeps the
first HybridEP buffer for every later call whatever its arguments, here a call whose (agreed) knobs differ
gets a buffer of its own (one made by ``init_hybrid_ep_buffer`` is used as it is, as in Automodel).
"""

from __future__ import annotations

import sys
import types

from fused_a2a.autograd import get_hidden_bytes
from fused_a2a.backends import deepep as _deepep
from fused_a2a.backends import hybridep as _hybridep
from fused_a2a.backends import uccl as _uccl
from fused_a2a.compat import common as _common
from fused_a2a.seed import hybridep as _seed_hybridep
from fused_a2a.seed.deepep import FusedCombine, FusedDispatch, get_buffer
from fused_a2a.seed.hybridep import HybridEPCombine, HybridEPDispatch, reset_hybrid_ep_buffer
from fused_a2a.seed.uccl import UCCLFusedCombine, UCCLFusedDispatch, get_uccl_buffer

# the public names Automodel's module always binds (library-specific ones may be None)
__all__ = [
    "HAVE_DEEP_EP", "HAVE_HYBRIDEP", "HAVE_UCCL_EP", "FusedCombine", "FusedDispatch", "HybridEPCombine",
    "HybridEPDispatch", "UCCLFusedCombine", "UCCLFusedDispatch", "free_buffer", "fused_combine", "fused_dispatch",
    "get_buffer", "get_hidden_bytes", "get_uccl_buffer", "hybrid_ep_combine", "hybrid_ep_dispatch",
    "init_hybrid_ep_buffer", "reset_hybrid_ep_buffer", "set_deepep_num_sms", "set_uccl_num_sms",
    "uccl_fused_combine", "uccl_fused_dispatch",
]

HAVE_DEEP_EP: bool = _deepep.HAVE_DEEP_EP
HAVE_HYBRIDEP: bool = _hybridep.HAVE_HYBRIDEP
HAVE_UCCL_EP: bool = _uccl.HAVE_UCCL_EP

if HAVE_DEEP_EP:
    Buffer = _deepep.DEEP_EP.module.Buffer
    _utils = getattr(_deepep.DEEP_EP.module, "utils", None)
    for _name in ("EventHandle", "EventOverlap"):
        if hasattr(_utils, _name):
            globals()[_name] = getattr(_utils, _name)
    del _utils, _name
if HAVE_HYBRIDEP:
    HybridEPBuffer = _hybridep.HYBRID_EP.module.HybridEPBuffer
if HAVE_UCCL_EP:
    UCCLBuffer = _uccl.UCCLBuffer


def _is_nvshmem_available() -> bool:
    """Whether DeepEP was compiled with NVSHMEM (``Buffer.is_sm90_compiled()``), cached in ``_nvshmem_available``.

    Raises:
        RuntimeError: deep_ep is not installed.
    """
    return _deepep.is_nvshmem_available()


def free_buffer() -> None:
    """Destroy the process-wide DeepEP buffer before ``destroy_process_group`` (best effort).

    ``destroy()`` runs once; an exception it raises is swallowed; ``_buffer`` is ``None`` afterwards. A
    no-op without a buffer, and without deep_ep.
    """
    _common.free_deepep_buffer()


if HAVE_DEEP_EP:
    from fused_a2a.compat.common import set_deepep_num_sms
    from fused_a2a.seed.deepep import fused_combine, fused_dispatch
else:
    fused_dispatch = None
    fused_combine = None
    set_deepep_num_sms = None


def init_hybrid_ep_buffer(group, hidden_dim: int, seq_len: int, num_local_experts: int, num_sms_dispatch_api: int,
                          num_sms_combine_api: int, fp8_dispatch: bool) -> None:
    """Create the process-wide HybridEP buffer; the HybridEP functions then use it as it is.

    Args:
        group: process group of the HybridEP all-to-all.
        hidden_dim: hidden size of the tokens.
        seq_len: most tokens a rank dispatches in one call (HybridEP grows the buffer, at a cost, if exceeded).
        num_local_experts: experts per rank.
        num_sms_dispatch_api, num_sms_combine_api: SMs of the dispatch and combine kernels (``None``:
            HybridEP's defaults).
        fp8_dispatch: must be False (Automodel's HybridEP path dispatches bf16).

    Raises:
        AssertionError: ``fp8_dispatch`` is set.
        RuntimeError: deep_ep has no HybridEPBuffer.
    """
    assert not fp8_dispatch, "HybridEP dispatch in NeMo Automodel is bf16 only (fp8_dispatch must be False)"
    _seed_hybridep.init_hybrid_ep_buffer(group, hidden_dim, seq_len, num_local_experts, num_sms_dispatch_api,
                                         num_sms_combine_api, fp8_dispatch)


if HAVE_HYBRIDEP:

    def hybrid_ep_dispatch(x, routing_map, probs, group, num_local_experts, num_sms_dispatch_api=24,
                           num_sms_combine_api=24, num_permuted_tokens=None, pad_multiple=None):
        """Permute + dispatch with HybridEP (Automodel's signature).

        Args:
            x: ``[num_tokens, hidden]`` bf16 tokens of this rank (the same count on every rank).
            routing_map: ``[num_tokens, num_experts]`` bool.
            probs: ``[num_tokens, num_experts]`` float32 routing probabilities.
            group: the expert-parallel process group.
            num_local_experts: experts per rank.
            num_sms_dispatch_api, num_sms_combine_api: SMs of the kernels; ``None`` and Automodel's
                defaults (20, 24) leave them to the tuning table (:func:`fused_a2a.compat.common.framework_sms`).
            num_permuted_tokens: size of the permuted output if known (int or 0-d tensor; non-blocking).
            pad_multiple: pad each expert's rows to a multiple of this.

        Returns:
            ``(hidden [P, hidden] expert-major, probs [P] float32, scaling_factor (None),
            tokens_per_expert [num_local_experts] int64, handle)``.
        """
        return _seed_hybridep.hybrid_ep_dispatch(x, routing_map, probs, group, num_local_experts,
                                                 _common.framework_sms(num_sms_dispatch_api, _common.HYBRIDEP_DEFAULT_SMS),
                                                 _common.framework_sms(num_sms_combine_api, _common.HYBRIDEP_DEFAULT_SMS),
                                                 num_permuted_tokens,
                                                 pad_multiple)

    def hybrid_ep_combine(x, handle, num_permuted_tokens=None, pad_multiple=None):
        """Combine + unpermute with HybridEP (Automodel's signature).

        Args:
            x: ``[P, hidden]`` bf16 rows in the order :func:`hybrid_ep_dispatch` returned them.
            handle: that dispatch's handle.
            num_permuted_tokens: ``P``, an int or the 0-d tensor ``tokens_per_expert.sum()``.
            pad_multiple: as given to the dispatch.

        Returns:
            ``[num_tokens, hidden]``, one tensor.
        """
        return _seed_hybridep.hybrid_ep_combine(x, handle, num_permuted_tokens, pad_multiple)

else:
    hybrid_ep_dispatch = None
    hybrid_ep_combine = None


if HAVE_UCCL_EP:
    from fused_a2a.compat.common import set_uccl_num_sms
    from fused_a2a.seed.uccl import uccl_fused_combine, uccl_fused_dispatch
else:
    uccl_fused_dispatch = None
    uccl_fused_combine = None
    set_uccl_num_sms = None


class _AutomodelModule(types.ModuleType):
    """This module's type: Automodel's module-level buffer variables as live properties."""

    _buffer = _common.DEEPEP_BUFFER
    _nvshmem_available = _common.NVSHMEM_AVAILABLE
    _uccl_buffer = _common.UCCL_BUFFER
    _hybrid_ep_buffer = _common.HYBRID_EP_BUFFER


sys.modules[__name__].__class__ = _AutomodelModule
