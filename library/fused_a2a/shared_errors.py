"""One rank's bad dispatch input, raised as the same ``ValueError`` on every rank of its group.

A check that looks at one rank's tensors alone would leave that rank's peers waiting in the dispatch's
exchange. Here the verdict travels with the counts every dispatch exchanges anyway, so every rank reads
it at the synchronisation the dispatch makes anyway: no collective is added.

* Expert ids outside ``[-1, E)``: the torch backend sends each rank's smallest and largest id with its
  counts (:func:`range_error`). A ``deep_ep.Buffer``-shaped library (DeepEP, UCCL-EP) never sees them:
  :func:`sanitize_topk` clamps them into that range on the device, and a rank that had some adds
  :func:`flag_offset` to every entry of the ``num_tokens_per_expert`` it passes to ``dispatch``. DeepEP's
  ``notify_dispatch`` sums the senders' entries into each rank's ``num_recv_tokens_per_expert_list``
  (which it only returns), so every rank reads the flag there (:func:`raise_if_flagged`).
* Any other input that fails a check on one rank: that rank still takes part in its peers' dispatch
  with a placeholder whose expert ids are :data:`POISON_ID` (:mod:`fused_a2a.calls`), which every
  backend reports like a bad id, naming no reason; the rank concerned adds its reason.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

POISON_ID = -(1 << 62)  # the expert id of a placeholder row: "this rank's inputs failed a check"
_MAX_FLAG = 1 << 24


def flag_offset(world_size: int) -> int:
    """What a flagged rank adds to each per-expert count: ``2**24``, smaller for groups of more than 64
    ranks so that every rank flagging still fits DeepEP's int32 counts (real counts stay below it)."""
    return min(_MAX_FLAG, (1 << 30) // max(world_size, 1))


def sanitize_topk(topk_idx: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, bad)``: ``topk_idx`` clamped into ``[-1, num_experts)`` (a new contiguous int64 tensor:
    an id below ``-1`` becomes ``-1``, one of ``num_experts`` or more the last expert; the dispatch
    that carries them raises on every rank anyway), and a 0-d bool tensor on the same device, ``True``
    when an id was outside. Three kernels, no host synchronisation."""
    ids = topk_idx.clamp(-1, num_experts - 1).contiguous()
    return ids, ids.ne(topk_idx).any()


def flag_counts(num_tokens_per_expert: torch.Tensor, bad: torch.Tensor, world_size: int) -> torch.Tensor:
    """``num_tokens_per_expert`` (``[E]`` int32, as ``get_dispatch_layout`` returns it) plus
    :func:`flag_offset` where ``bad`` (0-d bool) is set; same dtype, no host synchronisation."""
    return num_tokens_per_expert.add(bad, alpha=flag_offset(world_size))


def flagged_ranks(counts: Sequence[int], world_size: int) -> int:
    """How many ranks flagged the dispatch whose received per-expert counts are ``counts``."""
    return max(counts, default=0) // flag_offset(world_size)


def raise_if_flagged(counts: Sequence[int], world_size: int, num_experts: int,
                     detail: Callable[[], str | None]) -> None:
    """Raise the shared ``ValueError`` if any rank flagged the dispatch whose per-expert counts (what the
    library returned) are ``counts``; ``detail()`` says what this rank did wrong (``None``: nothing)."""
    ranks = flagged_ranks(counts, world_size)
    if ranks:
        mine = detail()
        raise ValueError(flagged_message(ranks, num_experts) + (f"; this rank: {mine}" if mine else ""))


def flagged_message(ranks: int, num_experts: int) -> str:
    """The message every rank raises when ``ranks`` ranks flagged a dispatch."""
    return (f"invalid dispatch inputs on {ranks} rank{'s' if ranks > 1 else ''} of the group: topk_idx values "
            f"outside [-1, {num_experts}), or another failed check (that rank's error says which)")


def ids_detail(topk_idx: torch.Tensor, num_experts: int) -> str | None:
    """What is wrong with this rank's ids (synchronises; for an error path), or ``None``."""
    ids = topk_idx[topk_idx != POISON_ID]
    if ids.numel() == 0:
        return None
    low, high = torch.stack([ids.min(), ids.max()]).tolist()
    return f"topk_idx values in [{low}, {high}]" if low < -1 or high >= num_experts else None


def range_error(num_experts: int, lows: Sequence[int], highs: Sequence[int]) -> ValueError | None:
    """The ``ValueError`` every rank raises when the ids of rank ``r`` ranged over ``[lows[r], highs[r]]``
    (a rank that failed another check sends :data:`POISON_ID`), or ``None`` when every id is valid."""
    poisoned = [r for r, low in enumerate(lows) if low == POISON_ID]
    bad = [r for r, (low, high) in enumerate(zip(lows, highs)) if r not in poisoned and (low < -1 or high >= num_experts)]
    if not poisoned and not bad:
        return None
    parts = []
    if bad:
        low = min(lows[r] for r in bad)
        high = max(highs[r] for r in bad)
        parts.append(f"topk_idx values must lie in [-1, {num_experts}), found range [{low}, {high}] "
                     f"(rank {', '.join(map(str, bad))})")
    if poisoned:
        parts.append(f"the dispatch inputs of rank {', '.join(map(str, poisoned))} failed a check "
                     "(that rank's error says which)")
    return ValueError("; ".join(parts))
