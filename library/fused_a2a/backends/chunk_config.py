"""The rules of ``deep_ep.Config`` (SM count and chunk sizes of the normal-mode kernels), pure Python.

DeepEP and UCCL-EP (which runs DeepEP's kernels) share these rules; each backend supplies its own
table of defaults per group size. The libraries do not expose a ``Config``'s values to Python, so
:class:`ChunkConfig` is the readable copy from which their ``Config`` objects are built.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

from fused_a2a.backends.base import Knob

CHUNK_KNOBS = ("nvl_send", "nvl_recv", "rdma_send", "rdma_recv")
# ranks of one NVLink domain (DeepEP's NUM_MAX_NVL_PEERS) and most RDMA ranks (NUM_MAX_RDMA_PEERS)
NVL_PEERS = 8
MAX_RDMA_RANKS = 20

DefaultTable = Mapping[int, tuple[int, int, int, int]]


@dataclass(frozen=True)
class ChunkConfig:
    """One ``deep_ep.Config``.

    Attributes:
        num_sms: SMs of the kernels; DeepEP runs ``num_sms / 2`` channels (even, > 0).
        nvl_send: tokens a channel sends over NVLink at once (``num_max_nvl_chunked_send_tokens``).
        nvl_recv: NVLink receive buffer of a channel, in tokens (``num_max_nvl_chunked_recv_tokens``).
        rdma_send: tokens a channel sends over RDMA at once (internode only).
        rdma_recv: RDMA receive buffer of a channel, in tokens (internode only).
    """

    num_sms: int = 20
    nvl_send: int = 6
    nvl_recv: int = 256
    rdma_send: int = 6
    rdma_recv: int = 256

    @property
    def rdma_recv_rounded(self) -> int:
        """``rdma_recv`` rounded up to a multiple of ``rdma_send``, as DeepEP's ``Config`` stores it."""
        return -(-self.rdma_recv // self.rdma_send) * self.rdma_send

    def args(self) -> tuple[int, int, int, int, int]:
        """The positional arguments of ``Config(...)``."""
        return (self.num_sms, self.nvl_send, self.nvl_recv, self.rdma_send, self.rdma_recv)

    def problems(self, num_ranks: int, combine: bool = False) -> str | None:
        """Why DeepEP would reject this config on ``num_ranks`` ranks, or ``None`` if it runs.

        The rules are DeepEP's own asserts: the group sizes its kernels exist for, positive values,
        an even SM count (every kernel runs one channel per 2 SMs), ``nvl_send < nvl_recv``,
        ``rdma_send <= rdma_recv_rounded / 2``, and for an internode ``combine`` an ``nvl_recv``
        divisible by the RDMA ranks with ``nvl_send <= nvl_recv / rdma_ranks``.

        Args:
            num_ranks: ranks of the expert-parallel group.
            combine: check the extra rules of DeepEP's internode combine.
        """
        problem = rank_problem(num_ranks)
        if problem is not None:
            return problem
        for name in ("num_sms", *CHUNK_KNOBS):
            if getattr(self, name) <= 0:
                return f"{name} must be positive, got {getattr(self, name)}"
        if self.num_sms % 2:
            return f"num_sms must be even (DeepEP runs one channel per 2 SMs), got {self.num_sms}"
        if self.nvl_send >= self.nvl_recv:
            return f"nvl_send ({self.nvl_send}) must be smaller than nvl_recv ({self.nvl_recv})"
        if 2 * self.rdma_send > self.rdma_recv_rounded:
            return (
                f"rdma_send ({self.rdma_send}) must be at most half of rdma_recv rounded up to a multiple "
                f"of rdma_send ({self.rdma_recv_rounded})"
            )
        rdma_ranks = num_ranks // NVL_PEERS
        if combine and rdma_ranks > 1:
            if self.nvl_recv % rdma_ranks:
                return f"nvl_recv ({self.nvl_recv}) must be a multiple of the {rdma_ranks} RDMA ranks (internode combine)"
            if self.nvl_send > self.nvl_recv // rdma_ranks:
                return (
                    f"nvl_send ({self.nvl_send}) must be at most nvl_recv / RDMA ranks "
                    f"({self.nvl_recv // rdma_ranks}) (internode combine)"
                )
        return None


def rank_problem(num_ranks: int) -> str | None:
    """Why DeepEP's normal mode cannot run on ``num_ranks`` ranks, or ``None``.

    Intranode (up to 8 ranks) kernels exist for 2, 4 and 8 ranks; beyond one node the group is whole
    nodes of 8 ranks, at most 20 of them.
    """
    if num_ranks <= NVL_PEERS and num_ranks not in (2, 4, 8):
        return f"DeepEP's intranode kernels run on 2, 4 or 8 ranks, not {num_ranks}"
    if num_ranks > NVL_PEERS and num_ranks % NVL_PEERS:
        return f"DeepEP spans nodes of 8 ranks: {num_ranks} ranks is not a multiple of 8"
    if num_ranks > NVL_PEERS * MAX_RDMA_RANKS:
        return f"DeepEP runs on at most {NVL_PEERS * MAX_RDMA_RANKS} ranks (20 nodes of 8), not {num_ranks}"
    return None


def check_num_sms(value: Any) -> str | None:
    """A knob check: an even int >= 2."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 2 or value % 2:
        return f"num_sms must be an even int >= 2 (one channel per 2 SMs), got {value!r}"
    return None


def check_chunk(name: str, library: str):
    """A knob check for chunk size ``name``: an int >= 0 (0: ``library``'s default)."""

    def check(value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            return f"{name} must be an int >= 0 (0: {library}'s default for the group size), got {value!r}"
        return None

    return check


def chunk_knobs(library: str, default_num_sms: int) -> tuple[Knob, ...]:
    """The knobs of a backend that runs DeepEP's normal-mode kernels: ``num_sms`` and the four chunk
    sizes of its ``Config`` (a chunk size of 0: ``library``'s default for the group size)."""
    return (
        Knob("num_sms", default_num_sms, (8, 16, 20, 24, 32, 48, 64),
             "SMs of the normal-mode kernels (even: one channel per 2 SMs); dispatch and combine share it",
             check=check_num_sms),
        Knob("nvl_send", 0, (4, 8, 12, 16, 24, 32),
             f"tokens a channel sends over NVLink at once (0: {library}'s default)", check=check_chunk("nvl_send", library)),
        Knob("nvl_recv", 0, (128, 256, 512),
             f"NVLink receive buffer per channel, tokens (0: {library}'s default)", check=check_chunk("nvl_recv", library)),
        Knob("rdma_send", 0, (4, 8, 12, 16, 20, 32),
             f"tokens a channel sends over RDMA at once, internode only (0: {library}'s default)",
             check=check_chunk("rdma_send", library)),
        Knob("rdma_recv", 0, (128, 256, 512),
             f"RDMA receive buffer per channel, tokens, internode only (0: {library}'s default)",
             check=check_chunk("rdma_recv", library)),
    )


def configs_from_knobs(
    dispatch_knobs: dict[str, Any],
    combine_knobs: dict[str, Any],
    num_ranks: int,
    dispatch_defaults: DefaultTable,
    combine_defaults: DefaultTable,
    library: str,
) -> tuple[ChunkConfig, ChunkConfig]:
    """The checked ``(dispatch, combine)`` configs of two full knob dicts on ``num_ranks`` ranks.

    A chunk knob of ``0`` takes the library's default for ``num_ranks`` and that operation (from
    ``dispatch_defaults``/``combine_defaults``: ``(nvl_send, nvl_recv, rdma_send, rdma_recv)`` per
    group size).

    Raises:
        ValueError: a knob value the library rejects (the message names the operation), ``num_sms``
            differing between dispatch and combine (a handle holds ``num_sms / 2`` channels), a
            group size the kernels do not run on, or no default for ``num_ranks`` when one is needed.
    """
    if dispatch_knobs["num_sms"] != combine_knobs["num_sms"]:
        raise ValueError(
            f"dispatch and combine must use the same num_sms (a handle holds num_sms / 2 channels), "
            f"got {dispatch_knobs['num_sms']} and {combine_knobs['num_sms']}"
        )
    problem = rank_problem(num_ranks)
    if problem is not None:
        raise ValueError(problem)
    configs = []
    for op, knobs, table in (("dispatch", dispatch_knobs, dispatch_defaults), ("combine", combine_knobs, combine_defaults)):
        if not all(knobs[name] for name in CHUNK_KNOBS) and num_ranks not in table:
            raise ValueError(
                f"{library} has no default {op} config for {num_ranks} ranks (it has {', '.join(map(str, table))}); "
                f"give {', '.join(CHUNK_KNOBS)}"
            )
        default = dict(zip(CHUNK_KNOBS, table.get(num_ranks, (0, 0, 0, 0))))
        config = ChunkConfig(knobs["num_sms"], *(knobs[name] or default[name] for name in CHUNK_KNOBS))
        problem = config.problems(num_ranks, combine=op == "combine")
        if problem is not None:
            raise ValueError(f"{op} config: {problem}")
        configs.append(config)
    return configs[0], configs[1]


def invalid_chunk_knobs(knobs: tuple[Knob, ...], configs: Callable[[dict, dict, int], Any], chosen: dict[str, Any],
                        world_size: int) -> str | None:
    """Why the ``chosen`` knobs of a backend with DeepEP's chunk knobs (``knobs``, used for dispatch and
    combine alike, as a sweep point does) cannot run on ``world_size`` ranks, or ``None``: the first
    knob check that fails, else the ``ValueError`` of ``configs(full, full, world_size)``. Pure."""
    full = {**{knob.name: knob.default for knob in knobs}, **chosen}
    for knob in knobs:
        problem = knob.check(full[knob.name])
        if problem is not None:
            return problem
    try:
        configs(full, full, world_size)
    except ValueError as err:
        return str(err)
    return None
