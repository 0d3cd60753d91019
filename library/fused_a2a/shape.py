"""The shape of one dispatch: what the group agrees on, what the tuning table is looked up with and what a
backend's limits see.

One :class:`CallShape` travels from the entry (:mod:`fused_a2a.calls`) through the agreement
(:mod:`fused_a2a.tuning.agreement`) to the knob resolution (:mod:`fused_a2a.tuning.resolve`), the table
lookup (:func:`fused_a2a.tuning.table.lookup`) and a backend's ``shape_problem``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class CallShape:
    """The shape of one dispatch.

    The first five attributes are what a call is keyed by (the agreement caches one resolution per
    group, backend, knobs and these); the group's size and token counts are added once the group is
    known (:meth:`on`).

    Attributes:
        dtype: token dtype: ``bf16``, ``fp16``, ``fp32`` or ``fp8`` (``None``: not known, a call that
            failed its checks).
        hidden: hidden size ``H``, elements per token (``None``: not known, likewise).
        topk: experts per token ``K`` (``None``: not known, e.g. a combine of a handle made elsewhere).
        num_experts: experts of the whole group ``E`` (``None``: not known).
        routing: the routing the caller declares (``uniform``, ``zipf:<skew>``, ``hot:<fraction>``;
            ``None``: ``$FUSED_A2A_ROUTING``, else ``uniform``).
        world_size: ranks of the expert-parallel group (``None``: not known yet: the group gives it).
        tokens: tokens of each rank, in rank order, or one value (every rank's, or this rank's alone);
            empty: not known yet.
        ranks_per_node: ranks of one NVLink domain (``None``: the whole group).
    """

    dtype: str | None
    hidden: int | None
    topk: int | None = None
    num_experts: int | None = None
    routing: str | None = None
    world_size: int | None = None
    tokens: tuple[int, ...] = ()
    ranks_per_node: int | None = None
    _hash: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # computed once: a warm dispatch hashes its (interned, :func:`keyed`) shape on every call
        object.__setattr__(self, "_hash", hash((self.dtype, self.hidden, self.topk, self.num_experts, self.routing,
                                                 self.world_size, self.tokens, self.ranks_per_node)))

    def __hash__(self) -> int:
        return self._hash

    def __reduce__(self):
        # rebuilt through __init__ in another process, so that its hash is that process's
        return CallShape, (self.dtype, self.hidden, self.topk, self.num_experts, self.routing, self.world_size,
                           self.tokens, self.ranks_per_node)

    @property
    def num_tokens(self) -> int:
        """The largest rank's token count (what the tuning table is looked up with); ``0`` when not known."""
        return max(self.tokens, default=0)

    def on(self, world_size: int, tokens: tuple[int, ...], ranks_per_node: int | None = None) -> CallShape:
        """This shape on a group of ``world_size`` ranks holding ``tokens`` (see :attr:`tokens`)."""
        return replace(self, world_size=world_size, tokens=tuple(tokens), ranks_per_node=ranks_per_node)

    def with_routing(self, routing: str) -> CallShape:
        """This shape with ``routing`` declared."""
        return replace(self, routing=routing)

    def describe(self) -> str:
        """``bf16 hidden 7168 top-8 64 experts``: the parts that are known."""
        return (f"{self.dtype} hidden {self.hidden}" + (f" top-{self.topk}" if self.topk else "")
                + (f" {self.num_experts} experts" if self.num_experts else ""))


@functools.lru_cache(maxsize=4096)
def keyed(dtype: str, hidden: int, topk: int | None, num_experts: int | None, routing: str | None) -> CallShape:
    """The :class:`CallShape` of these key facts, one object for equal values: a warm dispatch builds
    none (its shape is found, and its hash was computed, at the first call of these values)."""
    return CallShape(dtype, hidden, topk, num_experts, routing)
