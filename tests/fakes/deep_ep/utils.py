"""CPU stand-ins for ``deep_ep``'s events: nothing runs asynchronously on the CPU."""

from __future__ import annotations


class EventHandle:
    """Stands for a CUDA event recorded on the current stream (``deep_ep.EventHandle``)."""

    def current_stream_wait(self) -> None:
        """Make the current stream wait for the event: nothing to wait for on the CPU."""


class EventOverlap:
    """``deep_ep.utils.EventOverlap``: an optional event plus tensors kept alive until it is waited on.

    Args:
        event: an :class:`EventHandle`, or ``None`` (what a call without ``async_finish`` returns).
        extra_tensors: tensors to keep alive.
    """

    def __init__(self, event: EventHandle | None = None, extra_tensors=None) -> None:
        self.event = event
        self.extra_tensors = extra_tensors

    def current_stream_wait(self) -> None:
        """Wait for the event; DeepEP asserts that there is one."""
        assert self.event is not None
        self.event.current_stream_wait()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc_value, traceback) -> None:
        if self.event is not None:
            self.event.current_stream_wait()
