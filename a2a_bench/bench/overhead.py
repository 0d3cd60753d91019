"""The host time fused_a2a adds over calling a backend's buffer directly (issue: warm calls are cheap).

Each backend's process-wide buffer is replaced by a :class:`Replay` of itself: after one real call of
each kind it answers every call at once with the outputs of that real call. With the backend's own
work gone, what remains of a ``fused_a2a.dispatch`` + ``combine`` round trip (or the seed functions')
is our code: input checks, the agreed-knob cache, the autograd Functions, the backend adapter. Each
path runs twice: without grad (a decode step: the Functions' forward alone) and with tokens that
require grad (a training step: the Functions record a graph node). That time minus the time of the
same calls made directly on the replay is the overhead. With grad, the direct calls are also timed
inside a bare ``autograd.Function.apply`` each: what torch's autograd costs any wrapper, which
fused_a2a cannot go below. The round trips are timed alternately in batches (``perf_counter_ns``),
slowest rank per batch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist

from a2a_bench.bench.round_trips import round_trips
from a2a_bench.engine.measure import Stats, slowest, summarize
from a2a_bench.engine.workload import WorkloadSpec, make_inputs
from fused_a2a.backends import get_backend
from fused_a2a.backends.direct import DirectCalls
from fused_a2a.shape import CallShape
from fused_a2a.tuning.agreement import agreed_comm

BATCH = 50  # calls per timed batch: perf_counter's resolution is far below one call


class Replay:
    """A stand-in for a buffer: it forwards attributes to the real one and answers each call kind
    (layout, fresh dispatch, cached dispatch, combine; HybridEP's permuting dispatch and combine)
    with the outputs of the first such call; a HybridEP buffer's fresh dispatch still synchronises the
    host with the stream, as the real one does."""

    def __init__(self, real: Any) -> None:
        self._real = real
        self._answers: dict[str, Any] = {}
        self.needs_layout = getattr(real, "needs_layout", True)  # read on every call: no __getattr__ detour

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def _answer(self, kind: str, method: Callable, *args, **kwargs) -> Any:
        if kind not in self._answers:
            self._answers[kind] = method(*args, **kwargs)
        return self._answers[kind]

    def get_dispatch_layout(self, *args, **kwargs):
        return self._answer("layout", self._real.get_dispatch_layout, *args, **kwargs)

    def dispatch(self, *args, **kwargs):
        kind = "dispatch" if kwargs.get("handle") is None else "cached"
        answer = self._answer(kind, self._real.dispatch, *args, **kwargs)
        if kind == "dispatch" and "routing_map" in kwargs:  # HybridEP's dispatch (DeepEP's takes none)
            _synchronize(kwargs.get("hidden"))
        return answer

    def combine(self, *args, **kwargs):
        return self._answer("combine", self._real.combine, *args, **kwargs)

    def dispatch_with_permute(self, **kwargs):
        kind = "permute" if kwargs.get("handle") is None else "cached permute"
        return self._answer(kind, self._real.dispatch_with_permute, **kwargs)

    def update_template_config(self, **kwargs):
        return self._answer("template", self._real.update_template_config, **kwargs)

    @property
    def runtime(self) -> "_RuntimeReplay":
        """HybridEP's C++ buffer, answering as the buffer does."""
        return _RuntimeReplay(self)

    def combine_with_unpermute(self, **kwargs):
        return self._answer("unpermute", self._real.combine_with_unpermute, **kwargs)


def _synchronize(tokens: Any) -> None:
    """The host synchronisation HybridEP's uncached ``dispatch`` makes itself (it reads the received row
    count): kept in its replay, so that fused_a2a's adapter, which makes it in HybridEP's place between
    the runtime's preprocessing and dispatch, is not charged for it."""
    if isinstance(tokens, torch.Tensor) and tokens.is_cuda:
        torch.cuda.current_stream(tokens.device).synchronize()


class _RuntimeReplay:
    """The ``runtime`` of a :class:`Replay` of a HybridEP buffer: its preprocessing and dispatch answered
    with the outputs of the first such call."""

    def __init__(self, replay: Replay) -> None:
        self._replay = replay

    def metadata_preprocessing(self, **kwargs):
        return self._replay._answer("runtime preprocessing", self._replay._real.runtime.metadata_preprocessing, **kwargs)

    def dispatch(self, **kwargs):
        return self._replay._answer("runtime dispatch", self._replay._real.runtime.dispatch, **kwargs)


@dataclass(frozen=True)
class Overhead:
    """One backend and call path: host µs per dispatch + combine round trip.

    Attributes:
        backend, path: ``api`` (``fused_a2a.dispatch``/``combine``) or ``seed`` (the seed functions:
            ``fused_dispatch``/``fused_combine``, UCCL's, ``hybrid_ep_dispatch``/``hybrid_ep_combine``).
        grad: whether the tokens required grad.
        wrapped: the round trip through fused_a2a (buffer answering at once).
        direct: the same buffer calls made directly.
        added: ``wrapped - direct`` per batch (its median is the overhead).
        bare: with grad only: the direct calls, dispatch and combine each inside a bare
            ``torch.autograd.Function.apply`` (what any autograd wrapper of the buffer pays).
        beyond_bare: with grad only: ``wrapped - bare`` per batch (what fused_a2a adds beyond that).
    """

    backend: str
    path: str
    grad: bool
    wrapped: Stats
    direct: Stats
    added: Stats
    bare: Stats | None = None
    beyond_bare: Stats | None = None


class _Bare(torch.autograd.Function):
    """``apply`` around one direct buffer call: ``forward(ctx, tokens, (call, *args))`` returns
    ``call(tokens, *args)`` and saves nothing (its backward is never run)."""

    @staticmethod
    def forward(ctx, tokens, call):
        return call[0](tokens, *call[1:])


def _round_trips(calls: DirectCalls, tokens) -> tuple[Callable[[], Any], Callable[[], Any]]:
    """The direct round trip of ``calls`` on ``tokens``, and the same with each call in a bare
    autograd ``apply``."""
    dispatch, combine = calls.dispatch, calls.combine

    def direct():
        rows, handle = dispatch(tokens)
        return combine(rows, handle)

    def bare():
        rows, handle = _Bare.apply(tokens, (dispatch,))
        return _Bare.apply(rows, (combine, handle))

    return direct, bare


def _batch_us(fn: Callable[[], Any]) -> float:
    start = time.perf_counter_ns()
    for _ in range(BATCH):
        fn()
    return (time.perf_counter_ns() - start) / BATCH / 1e3


def measure_overhead(backend: str, workload: WorkloadSpec, iters: int, device: torch.device, group=None) -> list[Overhead]:
    """:class:`Overhead` of each call path of ``backend`` (warm: knobs agreed and cached first).

    Collective over ``group``. The backend's buffer is restored afterwards.

    Raises:
        ValueError: the backend keeps no process-wide buffer (``BackendSpec.buffer_slot``) to replay.
    """
    spec = get_backend(backend)
    if spec.buffer_slot is None:
        raise ValueError(f"{backend} keeps no process-wide buffer to replay")
    slot = spec.buffer_slot
    rank = dist.get_rank(group)
    inputs = make_inputs(workload, rank)
    x = inputs.x.to(device)
    idx, weights = inputs.topk_idx.to(device), inputs.topk_weights.to(device)
    trained = x.detach().requires_grad_(True)
    # no grad first: an autograd Function marks the tensors its forward returns, so once a grad path
    # has run, the replayed answers require grad and a no-grad combine would record a graph node
    paths = {(path, grad): run for grad, tokens in ((False, x), (True, trained))
             for path, run in round_trips(backend, tokens, idx, weights, workload.num_experts, group).items()}
    for run in paths.values():
        run()  # agree on the knobs
    shape = CallShape(workload.dtype, workload.hidden, workload.topk, workload.num_experts)
    comm = agreed_comm(backend, group, shape, workload.num_tokens, {}).comm
    results = []
    for (path, grad), run in paths.items():
        run()  # this path's buffer is now the backend's (HybridEP's api and seed paths use different ones)
        real = slot.current(group)
        replay = Replay(real)
        slot.install(group, replay)
        try:
            calls = spec.direct_calls(path, replay, comm, idx, weights, workload.num_experts, group)
            direct, bare = _round_trips(calls, trained if grad else x)
            timed = (run, direct, bare) if grad else (run, direct)
            for fn in timed:
                fn()
            local = torch.empty(len(timed), iters, dtype=torch.float64)
            for i in range(iters):
                for row, fn in enumerate(timed):
                    local[row, i] = _batch_us(fn)
        finally:
            slot.install(group, real)
        local = slowest(local, device, group)
        wrapped, direct_us = local[0], local[1]
        extra = {}
        if grad:
            extra = dict(bare=summarize(local[2].tolist()), beyond_bare=summarize((wrapped - local[2]).tolist()))
        results.append(Overhead(backend, path, grad, summarize(wrapped.tolist()), summarize(direct_us.tolist()),
                                summarize((wrapped - direct_us).tolist()), **extra))
    return results
