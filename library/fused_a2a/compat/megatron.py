"""A stand-in for Megatron-LM's ``megatron.core.transformer.moe.fused_a2a`` (Megatron-LM main, 2026-08-22),
on fused_a2a's backends, so Megatron's flex token dispatcher gets this cluster's tuned knobs.

Put it in place before Megatron imports its own module (first lines of the training script)::

    import fused_a2a.compat; fused_a2a.compat.install("megatron")

or, without editing the script: ``torchrun ... -m fused_a2a.compat megatron -- pretrain_gpt.py ARGS``.

What Megatron's code sees, name for name:

* The 13 names its token dispatcher imports: ``HYBRIDEP_TOKEN_ALIGNMENT`` (64), ``fused_dispatch``,
  ``fused_combine``, ``set_deepep_num_sms`` (``None`` without DeepEP), ``hybrid_ep_dispatch``,
  ``hybrid_ep_combine`` (``None`` without HybridEP), and the NCCL EP functions
  ``ensure_nccl_ep_bootstrapped``, ``is_nccl_ep_bootstrapped``, ``nccl_ep_finalize`` (always defined),
  ``alloc_ep_symm_buffer``, ``new_nccl_ep_buffer``, ``nccl_ep_dispatch``, ``nccl_ep_combine`` (``None``
  without TransformerEngine's EP module).
* ``hybrid_ep_dispatch``/``hybrid_ep_combine``/``init_hybrid_ep_buffer``/``HybridEPDispatch`` with
  Megatron's parameter order (``fused``, ``num_blocks_permute``, ``num_blocks_unpermute``,
  ``num_sms_preprocessing_api``; ``hybrid_ep_combine`` has two required parameters), ``handle[-1]`` the
  overflow flag of a non-blocking dispatch.
* ``get_hidden_bytes``, ``get_buffer``, ``reset_hybrid_ep_buffer``, ``FusedDispatch``, ``FusedCombine``,
  ``HybridEPCombine``, the flags ``HAVE_DEEP_EP``, ``HAVE_HYBRIDEP``, ``HAVE_TE_EP``; module state
  ``_buffer`` and ``_hybrid_ep_buffer``, live views of fused_a2a's process-wide buffers (assignable, see
  :mod:`fused_a2a.compat.common`). One extra: ``free_buffer()`` (as NeMo Automodel's: destroy the DeepEP
  buffer before ``destroy_process_group``, errors swallowed), which Megatron's module lacks.

Knobs: as in :mod:`fused_a2a.compat.automodel`. Megatron calls ``set_deepep_num_sms`` itself, with 20
when ``moe_flex_dispatcher_num_sms`` is unset: that default counts as "not set" and the table's SM count
applies (:func:`fused_a2a.compat.common.framework_sms`); a count the user configured wins. For HybridEP an argument left ``None`` is tuned; **``num_sms_preprocessing_api=108``
(Megatron's default) counts as "not set"**: 108 is HybridEP's own default, and Megatron passes its
config value (default 108) on every call, so treating it as explicit would shut the table out for good. Pass
any other value to fix it.

NCCL EP (``transformer_engine.pytorch.ep``) has no backend in fused_a2a: with TransformerEngine's EP
module installed, the NCCL EP functions are thin wrappers calling it as Megatron does (no tuned knobs);
that path could not be run here (no TransformerEngine), so it is kept minimal. Without it, as in
Megatron: ``ensure_nccl_ep_bootstrapped`` raises ``RuntimeError``, ``is_nccl_ep_bootstrapped`` returns
False, ``nccl_ep_finalize`` does nothing.

Deliberate differences, none of which Megatron's code relies on: the DeepEP buffer is created with
``explicitly_destroy=True`` and destroyed before a larger one replaces it; a group of more than 8 ranks
needs a DeepEP built with NVSHMEM (clear ``RuntimeError``, where Megatron's DeepEP would fail inside the
size hint); calling a function of a missing library raises ``RuntimeError`` naming the package; Megatron
keeps the first HybridEP buffer for every later call whatever its arguments, here a call whose (agreed)
knobs differ gets a buffer of its own (one made by ``init_hybrid_ep_buffer`` is used as it is).
"""

from __future__ import annotations

import inspect
import sys
import types

from fused_a2a.autograd import get_hidden_bytes, run_function
from fused_a2a.backends import deepep as _deepep
from fused_a2a.backends import hybridep as _hybridep
from fused_a2a.backends.optional import try_import
from fused_a2a.compat import common as _common
from fused_a2a.seed import hybridep as _seed_hybridep
from fused_a2a.seed.deepep import FusedCombine, FusedDispatch, get_buffer
from fused_a2a.seed.hybridep import HybridEPCombine, reset_hybrid_ep_buffer

# the public names Megatron's module always binds (library-specific ones may be None), plus free_buffer
__all__ = [
    "HAVE_DEEP_EP", "HAVE_HYBRIDEP", "HAVE_TE_EP", "HYBRIDEP_TOKEN_ALIGNMENT", "FusedCombine", "FusedDispatch",
    "HybridEPCombine", "HybridEPDispatch", "alloc_ep_symm_buffer", "ensure_nccl_ep_bootstrapped", "free_buffer",
    "fused_combine", "fused_dispatch", "get_buffer", "get_hidden_bytes", "hybrid_ep_combine", "hybrid_ep_dispatch",
    "init_hybrid_ep_buffer", "is_nccl_ep_bootstrapped", "nccl_ep_combine", "nccl_ep_dispatch", "nccl_ep_finalize",
    "new_nccl_ep_buffer", "reset_hybrid_ep_buffer", "set_deepep_num_sms",
]

HAVE_DEEP_EP: bool = _deepep.HAVE_DEEP_EP
HAVE_HYBRIDEP: bool = _hybridep.HAVE_HYBRIDEP

# HybridEP's public dispatch/combine kernels work in chunks of 64 tokens (Megatron pads uneven inputs to it)
HYBRIDEP_TOKEN_ALIGNMENT = 64
# HybridEP's own default SM count of the preprocessing kernel (Megatron's default argument)
HYBRIDEP_DEFAULT_PREPROCESSING_SMS = 108

if HAVE_DEEP_EP:
    Buffer = _deepep.DEEP_EP.module.Buffer
if HAVE_HYBRIDEP:
    HybridEPBuffer = _hybridep.HYBRID_EP.module.HybridEPBuffer


def free_buffer() -> None:
    """Destroy the process-wide DeepEP buffer before ``destroy_process_group`` (best effort; not in
    Megatron's module). ``destroy()`` runs once, an exception it raises is swallowed, ``_buffer`` is
    ``None`` afterwards; a no-op without a buffer."""
    _common.free_deepep_buffer()


if HAVE_DEEP_EP:
    from fused_a2a.compat.common import set_deepep_num_sms
    from fused_a2a.seed.deepep import fused_combine, fused_dispatch
else:
    fused_dispatch = None
    fused_combine = None
    set_deepep_num_sms = None


# ---------------------------------------------------------------------------------------------------
# HybridEP, Megatron's signatures


def _preprocessing_sms(num_sms: int | None) -> int | None:
    """``None`` (tuned, else HybridEP's default) for Megatron's default 108, else the value."""
    return None if num_sms == HYBRIDEP_DEFAULT_PREPROCESSING_SMS else num_sms


def init_hybrid_ep_buffer(group, hidden_dim: int, num_tokens: int, num_local_experts: int,
                          num_sms_dispatch_api: int | None = None, num_sms_combine_api: int | None = None,
                          num_blocks_permute: int | None = None, num_blocks_unpermute: int | None = None,
                          fp8_dispatch: bool = False, num_sms_preprocessing_api: int | None = None) -> None:
    """Create the process-wide HybridEP buffer; the HybridEP functions then use it as it is.

    Args:
        group: process group of the HybridEP all-to-all.
        hidden_dim: hidden size of the tokens.
        num_tokens: most tokens a rank dispatches in one call (HybridEP grows the buffer, at a cost, if exceeded).
        num_local_experts: experts per rank.
        num_sms_dispatch_api, num_sms_combine_api, num_blocks_permute, num_blocks_unpermute,
            num_sms_preprocessing_api: HybridEP's kernel sizes (``None``: HybridEP's defaults).
        fp8_dispatch: must be False (Megatron's HybridEP path dispatches bf16).

    Raises:
        AssertionError: ``fp8_dispatch`` is set.
        RuntimeError: deep_ep has no HybridEPBuffer.
    """
    assert not fp8_dispatch, "HybridEP dispatch in Megatron-LM is bf16 only (fp8_dispatch must be False)"
    _seed_hybridep.init_hybrid_ep_buffer(
        group, hidden_dim, num_tokens, num_local_experts, num_sms_dispatch_api, num_sms_combine_api, fp8_dispatch,
        num_blocks_permute=num_blocks_permute, num_blocks_unpermute=num_blocks_unpermute,
        num_sms_preprocessing_api=num_sms_preprocessing_api,
    )


class HybridEPDispatch(_seed_hybridep.HybridEPDispatch):
    """Permute + dispatch with HybridEP, taking its arguments in Megatron's order (the backward is the seed's)."""

    @staticmethod
    def forward(ctx, x, routing_map, probs, group, num_local_experts, num_sms_dispatch_api=None,
                num_sms_combine_api=None, num_blocks_permute=None, num_blocks_unpermute=None, fused=False,
                num_permuted_tokens=None, pad_multiple=None,
                num_sms_preprocessing_api=HYBRIDEP_DEFAULT_PREPROCESSING_SMS):
        """Forward pass (see :func:`hybrid_ep_dispatch`)."""
        return _seed_hybridep.HybridEPDispatch.forward(
            ctx, x, routing_map, probs, group, num_local_experts, num_sms_dispatch_api, num_sms_combine_api,
            num_permuted_tokens, pad_multiple, num_blocks_permute, num_blocks_unpermute, fused,
            _preprocessing_sms(num_sms_preprocessing_api),
        )


if HAVE_HYBRIDEP:

    def hybrid_ep_dispatch(x, routing_map, probs, group, num_local_experts, num_sms_dispatch_api=None,
                           num_sms_combine_api=None, num_blocks_permute=None, num_blocks_unpermute=None, fused=False,
                           num_permuted_tokens=None, pad_multiple=None,
                           num_sms_preprocessing_api=HYBRIDEP_DEFAULT_PREPROCESSING_SMS):
        """Permute + dispatch with HybridEP (Megatron's signature).

        Args:
            x: ``[num_tokens, hidden]`` bf16 tokens of this rank (the same count on every rank).
            routing_map: ``[num_tokens, num_experts]`` bool.
            probs: ``[num_tokens, num_experts]`` float32 routing probabilities.
            group: the expert-parallel process group.
            num_local_experts: experts per rank.
            num_sms_dispatch_api, num_sms_combine_api, num_blocks_permute, num_blocks_unpermute: HybridEP's
                kernel sizes (``None``: tuned, else HybridEP's defaults).
            fused: fuse the permute into the dispatch (False: tuned; falls back with a warning where
                the installed HybridEP lacks it).
            num_permuted_tokens: a token budget (int or 0-d tensor): the call is non-blocking, returns
                exactly that many rows and drops the rest, flagging it in ``handle[-1]``.
            pad_multiple: pad each expert's rows to a multiple of this.
            num_sms_preprocessing_api: SMs of the preprocessing kernel; 108 (HybridEP's default) counts
                as not set, so the tuned value applies.

        Returns:
            ``(hidden [P, hidden] expert-major, probs [P] float32, scaling_factor (None),
            tokens_per_expert [num_local_experts] int64, handle)``; ``handle[-1]`` is the overflow flag.
        """
        return run_function(HybridEPDispatch, x, routing_map, probs, group, num_local_experts, num_sms_dispatch_api,
                            num_sms_combine_api, num_blocks_permute, num_blocks_unpermute, fused,
                            num_permuted_tokens, pad_multiple, num_sms_preprocessing_api)

    def hybrid_ep_combine(x, handle, num_permuted_tokens, pad_multiple, fused=False):
        """Combine + unpermute with HybridEP (Megatron's signature).

        Args:
            x: ``[P, hidden]`` bf16 rows in the order :func:`hybrid_ep_dispatch` returned them.
            handle: that dispatch's handle.
            num_permuted_tokens: ``P`` (int or 0-d tensor), for the backward's cached dispatch.
            pad_multiple: as given to the dispatch (``None``: no padding).
            fused: fuse the unpermute into the combine.

        Returns:
            ``[num_tokens, hidden]``, one tensor.
        """
        return _seed_hybridep.hybrid_ep_combine(x, handle, num_permuted_tokens, pad_multiple, fused=fused)

else:
    hybrid_ep_dispatch = None
    hybrid_ep_combine = None


# ---------------------------------------------------------------------------------------------------
# NCCL EP: TransformerEngine's transformer_engine.pytorch.ep, called as Megatron calls it

TE_EP = try_import("transformer_engine.pytorch.ep",
                   "install TransformerEngine built with NCCL EP support (NVTE_BUILD_WITH_NCCL_EP=1)")
HAVE_TE_EP: bool = TE_EP.available
if HAVE_TE_EP:
    te_ep = TE_EP.module


def ensure_nccl_ep_bootstrapped(ep_group, num_experts, max_tokens_per_rank, recv_capacity_per_rank, hidden_dim,
                                num_topk, num_sms=0, zero_copy=False) -> None:
    """Bootstrap TransformerEngine's process-wide NCCL EP context once (later calls do nothing).

    Collective over ``ep_group``: every rank calls it with the same arguments before its first dispatch.

    Args:
        ep_group: the expert-parallel process group.
        num_experts: experts over the whole group.
        max_tokens_per_rank: most local tokens of one forward.
        recv_capacity_per_rank: receive capacity in tokens (``None``: eager mode, sized per step;
            otherwise tokens beyond it are dropped).
        hidden_dim: hidden size; num_topk: top-k per token.
        num_sms: most SMs NCCL EP may use (0: its choice).
        zero_copy: caller-owned symmetric receive buffers.

    Raises:
        RuntimeError: TransformerEngine's EP module is not installed.
    """
    if not HAVE_TE_EP:
        raise RuntimeError(
            f"NCCL EP needs transformer_engine.pytorch.ep, which is not available ({TE_EP.reason}); "
            f"{TE_EP.install_hint}"
        )
    if is_nccl_ep_bootstrapped():
        return
    te_ep.ep_bootstrap(ep_group, num_experts=num_experts, max_tokens_per_rank=max_tokens_per_rank,
                       recv_capacity_per_rank=recv_capacity_per_rank, hidden_dim=hidden_dim, num_topk=num_topk,
                       max_num_sms=num_sms, zero_copy=zero_copy,
                       drop_on_overflow=recv_capacity_per_rank is not None)


def is_nccl_ep_bootstrapped() -> bool:
    """Whether TransformerEngine's NCCL EP context is up (False without TransformerEngine's EP module)."""
    if not HAVE_TE_EP:
        return False
    probe = getattr(te_ep, "is_ep_bootstrapped", None)
    return bool(probe()) if probe is not None else bool(te_ep._BOOTSTRAPPED)


def nccl_ep_finalize() -> None:
    """Tear TransformerEngine's NCCL EP context down (before ``destroy_process_group``); a no-op without
    TransformerEngine's EP module or a context."""
    if HAVE_TE_EP:
        te_ep.ep_finalize()


if HAVE_TE_EP:

    def _accepts_quant_recipes() -> bool:
        try:
            return "dispatch_fwd_quant_recipe" in inspect.signature(te_ep.EpBuffer).parameters
        except (TypeError, ValueError):
            return False

    _TE_EP_BUFFER_HAS_QUANT_RECIPE: bool = _accepts_quant_recipes()

    def alloc_ep_symm_buffer(shape, dtype, ep_group):
        """One persistent NCCL symmetric-memory tensor of ``shape`` and ``dtype`` (collective over ``ep_group``)."""
        return te_ep.symm_mem_alloc(shape, dtype, ep_group)

    def new_nccl_ep_buffer(top_k, max_tokens_per_rank, recv_capacity_per_rank, hidden_dim, num_local_experts,
                           alignment=0, dispatch_fwd_quant_recipe=None, combine_bwd_quant_recipe=None):
        """A TransformerEngine ``EpBuffer`` for one dispatch/combine pair (it has ``total_recv_tokens``).

        Raises:
            RuntimeError: a quantisation recipe on a TransformerEngine whose ``EpBuffer`` takes none.
        """
        recipes = {}
        if dispatch_fwd_quant_recipe is not None or combine_bwd_quant_recipe is not None:
            if not _TE_EP_BUFFER_HAS_QUANT_RECIPE:
                raise RuntimeError("quantised NCCL EP payloads need a TransformerEngine whose EpBuffer takes "
                                   "dispatch_fwd_quant_recipe / combine_bwd_quant_recipe")
            recipes = {"dispatch_fwd_quant_recipe": dispatch_fwd_quant_recipe,
                       "combine_bwd_quant_recipe": combine_bwd_quant_recipe}
        return te_ep.EpBuffer(top_k=top_k, max_tokens_per_rank=max_tokens_per_rank,
                              recv_capacity_per_rank=recv_capacity_per_rank, hidden_dim=hidden_dim,
                              num_local_experts=num_local_experts, alignment=alignment, **recipes)

    def nccl_ep_dispatch(buffer, tokens, topk_idx, topk_weights, recv_tokens=None, recv_topk_weights=None):
        """Dispatch with NCCL EP (differentiable).

        Returns:
            ``(recv_tokens [rows, hidden] grouped by local expert, tokens_per_expert [num_local_experts]
            int64 on the device, dispatched_probs [rows] float32)``.
        """
        received, probs, tokens_per_expert = te_ep.ep_dispatch(buffer, tokens, topk_idx, topk_weights,
                                                               recv_tokens=recv_tokens,
                                                               recv_topk_weights=recv_topk_weights)
        return received, tokens_per_expert, probs

    def nccl_ep_combine(buffer, expert_out, num_local_tokens=None, grad_out=None):
        """Combine with NCCL EP (differentiable): ``[num_local_tokens, hidden]`` in local token order."""
        return te_ep.ep_combine(buffer, expert_out, num_local_tokens=num_local_tokens, grad_out=grad_out)

else:
    alloc_ep_symm_buffer = None
    new_nccl_ep_buffer = None
    nccl_ep_dispatch = None
    nccl_ep_combine = None


class _MegatronModule(types.ModuleType):
    """This module's type: Megatron's module-level buffer variables as live properties."""

    _buffer = _common.DEEPEP_BUFFER
    _hybrid_ep_buffer = _common.HYBRID_EP_BUFFER


sys.modules[__name__].__class__ = _MegatronModule
