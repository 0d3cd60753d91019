"""The autograd Function pair the seed's DeepEP and UCCL-EP functions share (:mod:`fused_a2a.seed.deepep`,
:mod:`fused_a2a.seed.uccl`): a dispatch through the group's agreed :class:`~fused_a2a.autograd.Comm` of a
``deep_ep.Buffer``-shaped backend, and a combine with the Comm of the dispatch that made its handle.

Each seed module subclasses :class:`SeedDispatch` and :class:`SeedCombine` under the seed's class names,
with a ``forward`` that names its backend (an autograd Function's ``forward`` is a static method: it
cannot read its class) and calls :func:`dispatch_forward_of` / :func:`combine_forward_of`.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from fused_a2a.autograd import Comm, combine_backward, combine_forward, dispatch_backward, dispatch_forward
from fused_a2a.calls import agreed_dispatch
from fused_a2a.checks import dtype_name
from fused_a2a.seed.handles import comm_of, remember
from fused_a2a.shape import CallShape
from fused_a2a.tuning.agreement import agreed_comm

HandleLayout = Callable[[Any], tuple[int, int]]  # a backend's handle -> (num_sms, num_tokens) of its dispatch


class SeedDispatch(torch.autograd.Function):
    """The backward of a seed dispatch (a combine of the gradients); subclasses add the ``forward``."""

    differentiable = (0, 2)  # x, token_probs (for run_function)

    @staticmethod
    def backward(ctx, grad_output, grad_token_indices, grad_token_probs, grad_tokens_per_expert, grad_handle):
        """Backward pass of fused dispatch: a combine of the gradients."""
        grad_x, grad_probs = dispatch_backward(ctx, grad_output, grad_token_probs)
        return grad_x, None, grad_probs, None, None, None, None


class SeedCombine(torch.autograd.Function):
    """The backward of a seed combine (a cached dispatch of the gradient); subclasses add the ``forward``."""

    differentiable = (0,)  # x (for run_function)

    @staticmethod
    def backward(ctx, grad_output, grad_event=None):
        """Backward pass of fused combine: a cached dispatch of the gradient."""
        return combine_backward(ctx, grad_output), None, None, None, None


def dispatch_forward_of(backend: str, explicit: dict[str, Any], ctx, x, token_indices, token_probs, num_experts, group,
                        async_finish: bool, allocate_on_comm_stream: bool):
    """The forward of a seed dispatch on ``backend`` with the knob arguments ``explicit``: the group's
    agreed knobs (:func:`~fused_a2a.calls.agreed_dispatch`), then :func:`~fused_a2a.autograd.dispatch_forward`;
    the handle remembers its Comm for the combine. Returns what ``dispatch_forward`` returns."""
    agreed, x, token_indices, token_probs = agreed_dispatch(backend, group, x, token_indices, token_probs, num_experts,
                                                            explicit)
    out = dispatch_forward(ctx, agreed.comm, x, token_indices, token_probs, num_experts, group, async_finish,
                           allocate_on_comm_stream)
    remember(out[4], agreed.comm)
    return out


def combine_forward_of(backend: str, handle_layout: HandleLayout, ctx, x, group, handle, async_finish: bool,
                       allocate_on_comm_stream: bool):
    """The forward of a seed combine on ``backend``: ``(combined_x [N, H], None)`` with the Comm of
    :func:`combine_comm`."""
    comm = combine_comm(backend, handle_layout, group, x, handle)
    return combine_forward(ctx, comm, x, group, handle, async_finish, allocate_on_comm_stream), None


def combine_comm(backend: str, handle_layout: HandleLayout, group, x: torch.Tensor, handle) -> Comm:
    """The Comm of the dispatch that made ``handle``; for a handle made elsewhere, the agreed one with the
    handle's SM count (``handle_layout(handle)`` gives it, and the dispatch's token count)."""
    comm = comm_of(handle)
    if comm is None:
        num_sms, num_tokens = handle_layout(handle)
        comm = agreed_comm(backend, group, CallShape(dtype_name(x.dtype), x.size(1)), num_tokens,
                           {"num_sms": num_sms}).comm
    return comm
