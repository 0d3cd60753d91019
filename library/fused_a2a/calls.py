"""What every dispatch entry (:func:`fused_a2a.dispatch`, the seed functions) runs before a backend sees
its inputs: the checks, made to fail on every rank of the group, the agreed knobs, and contiguous inputs.

A rank whose inputs fail a check does not raise alone (its peers would wait in the dispatch's exchange
for the group's timeout). It takes part in what its peers run instead, and every rank raises the same
``ValueError``, the rank concerned adding its reason:

* at a key its group has not agreed yet (a first call): the agreement's exchange
  (:mod:`fused_a2a.tuning.agreement`), which carries the reason to every rank;
* at a shape the group has run (the latest agreed dispatch whose dtype, hidden size, top-k and experts
  match what the failed call still gives; the group's last dispatch when it gives none of them): that
  dispatch, with a placeholder whose expert ids are :data:`~fused_a2a.shared_errors.POISON_ID`; every
  backend reports such a rank on every rank (:mod:`fused_a2a.shared_errors`).

Limits: a rank whose call is valid on its own but differs from its peers' in backend, dtype, hidden size,
top-k, experts, routing, SM budget or knobs runs its own key. The ranks raise together when all of them
are at a first call (the agreement compares the calls); a rank that changes its key while its peers
repeat a key they ran before meets them in no collective, and its peers wait for the group's timeout
(catching that too would need a collective on every call). Likewise a failed check on one rank at a
shape the group has run while its peers start a new one (or the reverse) pairs the placeholder with the
agreement's exchange.
"""

from __future__ import annotations

from typing import Any, NoReturn

import torch
import torch.distributed as dist

from fused_a2a.autograd import Comm, dispatch_forward
from fused_a2a.backends import BACKENDS
from fused_a2a.checks import DTYPE_NAMES, dispatch_shape
from fused_a2a.layout import dense
from fused_a2a.shape import CallShape, keyed
from fused_a2a.shared_errors import POISON_ID
from fused_a2a.tuning import agreement
from fused_a2a.tuning.agreement import CallKey, LocalProblem, agreed_comm, frozen_knobs


def agreed_dispatch(backend: str, group: dist.ProcessGroup | None, x, topk_idx, topk_weights, num_experts,
                    explicit: dict[str, Any], num_sms_budget: int | None = None, routing: str | None = None):
    """The agreed knobs of a dispatch and its inputs laid out for the backends.

    Args: as :func:`fused_a2a.dispatch` (``explicit``: the knob arguments).

    Returns:
        ``(agreed, x, topk_idx, topk_weights)``: the ``Agreed`` of the call
        (:func:`~fused_a2a.tuning.agreement.agreed_comm`), and the inputs made contiguous (copies only
        where they were not; an FP8 pair element-wise).

    Raises:
        ValueError: an input that fails a check on any rank (shape, dtype, expert count, a dtype the
            backend does not move), or anything :func:`~fused_a2a.tuning.agreement.agreed_comm` raises:
            the same on every rank of ``group``.
    """
    try:
        dtype, num_tokens, hidden, topk = dispatch_shape(x, topk_idx, topk_weights, num_experts)
    except ValueError as error:
        raise_on_every_rank(str(error), backend, group, x, topk_idx, num_experts, explicit, num_sms_budget, routing)
    try:
        agreed = agreed_comm(backend, group, keyed(dtype, hidden, topk, num_experts, routing), num_tokens, explicit,
                             num_sms_budget)
    except LocalProblem as error:  # this rank's dtype or expert count cannot run (nor its peers' at this shape)
        raise_on_every_rank(str(error), backend, group, x, topk_idx, num_experts, explicit, num_sms_budget, routing)
    x = dense(x) if type(x) is not tuple else tuple(dense(t) for t in x)
    return agreed, x, topk_idx.contiguous(), topk_weights.contiguous()


def raise_on_every_rank(problem: str, backend: str, group: dist.ProcessGroup | None, x, topk_idx, num_experts,
                        explicit: dict[str, Any], num_sms_budget: int | None = None,
                        routing: str | None = None) -> NoReturn:
    """Raise ``ValueError`` about ``problem`` (this rank's inputs) on every rank of ``group``: through
    the dispatch the peers most likely run (:func:`~fused_a2a.tuning.agreement.join_target`), else through
    the first-call exchange (:func:`~fused_a2a.tuning.agreement.refuse`). Collective.

    The choice depends only on the call's shape (never on which check failed), so ranks that call with
    the same shape choose alike: a dtype the backend does not move, or a value that is not a shape,
    counts as not given."""
    dtype, hidden, topk = _shape_of(x, topk_idx)
    if dtype is not None and backend in BACKENDS and dtype not in BACKENDS[backend].dtypes:
        dtype = None
    experts = num_experts if type(num_experts) is int and num_experts > 0 else None
    frozen = frozen_knobs(explicit)
    given = CallKey(backend, CallShape(dtype, hidden, topk, experts, routing), frozen, num_sms_budget)
    target = agreement.join_target(group, given)
    if target is None:
        agreement.refuse(problem, group, CallKey(backend, CallShape(None, None, routing=routing), frozen, num_sms_budget))
    shape, comm = target
    rows = max(_rows(x, topk_idx), 1)  # one row at least: it carries the placeholder's ids
    device = _device(x, topk_idx)
    try:
        _placeholder_dispatch(comm, group, shape, rows, device)
    except ValueError as shared:
        raise ValueError(f"{shared}; this rank: {problem}") from None
    raise ValueError(f"{problem} (the {comm.name} backend did not report it to the other ranks)")


def _placeholder_dispatch(comm: Comm, group, shape: CallShape, rows: int, device: torch.device) -> None:
    """A dispatch of ``rows`` zero tokens of ``shape`` whose every expert id is :data:`POISON_ID`, with ``comm``."""
    dtype, hidden, topk = shape.dtype, shape.hidden, shape.topk or 1
    if dtype == "fp8":
        x = (torch.zeros(rows, hidden, device=device).to(torch.float8_e4m3fn),
             torch.ones(rows, hidden // 128, device=device))
    else:
        x = torch.zeros(rows, hidden, dtype=_TORCH_DTYPES[dtype], device=device)
    topk_idx = torch.full((rows, topk), POISON_ID, dtype=torch.int64, device=device)
    topk_weights = torch.zeros(rows, topk, dtype=torch.float32, device=device)
    dispatch_forward(None, comm, x, topk_idx, topk_weights, shape.num_experts, group, False, False)


_TORCH_DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}


def _shape_of(x, topk_idx) -> tuple[str | None, int | None, int | None]:
    """``(dtype name, hidden, top-k)`` as far as inputs that failed a check give them (``None``: not known)."""
    tokens = x[0] if type(x) is tuple and x else x
    dtype = hidden = topk = None
    if isinstance(tokens, torch.Tensor) and tokens.dim() == 2:
        dtype = "fp8" if type(x) is tuple else DTYPE_NAMES.get(tokens.dtype)
        hidden = tokens.size(1)
    if isinstance(topk_idx, torch.Tensor) and topk_idx.dim() == 2:
        topk = topk_idx.size(1)
    return dtype, hidden, topk


def _rows(x, topk_idx) -> int:
    for tensor in (x[0] if type(x) is tuple and x else x, topk_idx):
        if isinstance(tensor, torch.Tensor) and tensor.dim() >= 1:
            return tensor.size(0)
    return 1


def _device(x, topk_idx) -> torch.device:
    for tensor in (x[0] if type(x) is tuple and x else x, topk_idx):
        if isinstance(tensor, torch.Tensor):
            return tensor.device
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")

