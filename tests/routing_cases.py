"""Seeded routing cases for the property tests: every routing a framework can send.

A :class:`RoutingCase` fixes, for every rank, the tokens (0-64, unequal across ranks), top-k (1-8),
experts (2-256), hidden size, dtype, routing (uniform, Zipf-skewed, one hot expert, every token to one
rank's experts, or nowhere), ``-1`` holes, repeated experts within a token, the memory layout the tensors
arrive in (contiguous, sliced from a padded buffer, transposed, strided, broadcast), grad on or off, and
optionally a mistake on one rank (an expert id outside ``[-1, E)``, or a tensor of the wrong dtype).
:func:`generate` draws them from one seed, so every rank builds the same list without talking.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from a2a_bench.engine.workload import Inputs

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
ROUTINGS = ("uniform", "zipf", "hot", "one_rank", "nowhere")
LAYOUTS = ("contiguous", "sliced", "transposed", "strided", "broadcast")
BAD_IDS = (1, 7, -2, -100, 1 << 40)  # added to E - 1 for the positive ones: E, E + 6, ...; the others as they are


@dataclass(frozen=True)
class RoutingCase:
    """One dispatch + combine (+ backward) on every rank of a group.

    Attributes:
        seed: the case's seed (rank ``r`` draws from ``(seed, r)``).
        world: ranks of the group.
        tokens: tokens of each rank.
        topk, num_experts, hidden, dtype: the call's shape.
        routing: how the experts are drawn (:data:`ROUTINGS`).
        holes: the share of top-k slots set to ``-1``.
        duplicates: a token may name one expert in several slots.
        layout: how ``x``, ``topk_idx`` and ``topk_weights`` are laid out in memory (:data:`LAYOUTS`).
        grad: whether ``x`` and ``topk_weights`` require grad (the backward is checked too).
        fault: ``none``, ``bad_id`` (one id outside ``[-1, E)`` on ``fault_rank``) or ``bad_dtype``
            (``fault_rank`` passes float64 weights).
        fault_rank: the rank with the fault.
    """

    seed: int
    world: int
    tokens: tuple[int, ...]
    topk: int
    num_experts: int
    hidden: int
    dtype: str = "bf16"
    routing: str = "uniform"
    holes: float = 0.0
    duplicates: bool = False
    layout: str = "contiguous"
    grad: bool = True
    fault: str = "none"
    fault_rank: int = 0

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def num_local(self) -> int:
        return self.num_experts // self.world

    def describe(self) -> str:
        when = "first" if self.fault_on_first_call else "warm"
        fault = "" if self.fault == "none" else f" {self.fault}@r{self.fault_rank} ({when} call)"
        return (f"seed={self.seed} W={self.world} N={list(self.tokens)} k={self.topk} E={self.num_experts} "
                f"H={self.hidden} {self.dtype} {self.routing} holes={self.holes:.2f} dup={self.duplicates} "
                f"{self.layout} grad={self.grad}{fault}")

    def clean(self, rank: int) -> Inputs:
        """This rank's inputs as the reference sees them: contiguous, on the CPU, without the fault."""
        gen = torch.Generator().manual_seed(self.seed * 1000 + rank)
        n, k, e = self.tokens[rank], self.topk, self.num_experts
        x = torch.randn(n, self.hidden, generator=gen).to(self.torch_dtype)
        weights = torch.rand(n, k, generator=gen)
        if self.layout == "broadcast":  # one row repeated: the tensors arrive with stride 0
            x = torch.randn(1, self.hidden, generator=gen).to(self.torch_dtype).expand(n, -1).clone()
            weights = weights[:1].expand(n, -1).clone() if n else weights
        return Inputs(x, self._ids(rank, gen, n, k, e), weights)

    def _ids(self, rank: int, gen: torch.Generator, n: int, k: int, e: int) -> torch.Tensor:
        routing = self.routing
        probs = torch.ones(e)
        if routing == "zipf":
            probs = 1.0 / (torch.randperm(e, generator=gen).double() + 1) ** 1.2
        elif routing == "hot":
            probs[torch.randint(e, (1,), generator=gen)] = 10.0 * e
        elif routing == "one_rank":
            owner = int(torch.randint(self.world, (1,), generator=gen))
            probs = torch.zeros(e)
            probs[owner * self.num_local:(owner + 1) * self.num_local] = 1.0
        if n == 0 or routing == "nowhere" and rank % 2 == 0:
            return torch.full((n, k), -1, dtype=torch.int64)
        if self.duplicates:
            ids = torch.multinomial(probs.float().expand(n, -1), k, replacement=True, generator=gen)
        else:
            usable = int((probs > 0).sum())
            ids = torch.full((n, k), -1, dtype=torch.int64)
            ids[:, :min(k, usable)] = torch.multinomial(probs.float().expand(n, -1), min(k, usable), generator=gen)
        holes = torch.rand(n, k, generator=gen) < self.holes
        return torch.where(holes, -1, ids)

    @property
    def fault_on_first_call(self) -> bool:
        """The fault comes with the first call of the shape (else with the second, warm, one)."""
        return self.seed % 2 == 0

    def inputs(self, rank: int, device: torch.device, faulty: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x, topk_idx, topk_weights)`` of this rank on ``device``, in the case's layout, with the fault
        where this rank has it (unless not ``faulty``)."""
        clean = self.clean(rank)
        x, idx, weights = (_lay_out(t.to(device), self.layout, index)
                           for index, t in enumerate((clean.x, clean.topk_idx, clean.topk_weights)))
        if faulty and rank == self.fault_rank and self.fault == "bad_id":
            idx = idx.clone()
            token, slot = divmod(self.seed * 7919 % max(idx.numel(), 1), self.topk)
            bad = BAD_IDS[self.seed % len(BAD_IDS)]
            idx[token, slot] = self.num_experts - 1 + bad if bad > 0 else bad
        if faulty and rank == self.fault_rank and self.fault == "bad_dtype":
            weights = weights.double()
        return x, idx, weights


def _lay_out(tensor: torch.Tensor, layout: str, index: int) -> torch.Tensor:
    """``tensor`` (``[N, C]``, contiguous) with the same values in ``layout``."""
    n, c = tensor.shape
    if layout == "sliced":  # rows and columns of a larger, padded buffer
        padded = torch.full((n + 3, c + 5), 7, dtype=tensor.dtype, device=tensor.device)
        padded[2:n + 2, 1:c + 1] = tensor
        return padded[2:n + 2, 1:c + 1]
    if layout == "transposed":  # column-major
        return tensor.t().contiguous().t()
    if layout == "strided":  # every other row of a buffer twice as long
        spaced = torch.zeros(2 * n, c, dtype=tensor.dtype, device=tensor.device)
        spaced[::2] = tensor
        return spaced[::2]
    if layout == "broadcast" and index != 1 and n:  # x and weights: one row, stride 0
        return tensor[:1].expand(n, c)
    return tensor


def hybridep_shape_ok(case: RoutingCase) -> bool:
    """Whether HybridEP's kernels take the case's shape (its rules, :func:`shape_problem` of the backend)."""
    from fused_a2a.backends import BACKENDS
    from fused_a2a.shape import CallShape

    shape = CallShape(case.dtype, case.hidden, case.topk, case.num_experts, world_size=case.world, tokens=case.tokens)
    return BACKENDS["hybridep"].shape_problem(shape, {}) is None


def hybridep_tokens_ok(case: RoutingCase) -> bool:
    """Whether the case's token counts keep HybridEP's token rules (the same count on every rank, at least
    one, its TMA and allgather alignments), whatever its dtype, hidden size or faults."""
    from fused_a2a.backends import BACKENDS
    from fused_a2a.shape import CallShape

    shape = CallShape("bf16", 16, case.topk, case.num_experts, world_size=case.world, tokens=case.tokens)
    problem = BACKENDS["hybridep"].shape_problem(shape, {})
    return problem is None or "token" not in problem


# hidden sizes: on the CPU any with 16-byte bf16 rows (the fakes' rule); on GPUs multiples of 16, as DeepEP's
# and UCCL-EP's SM90 kernels load a row in two halves of 16-byte units (a device assert otherwise), and
# HybridEP on few (hidden, experts per rank) pairs, since each new pair builds (and compiles) a buffer
HIDDEN = {"cpu": (8, 16, 24, 64), "gpu": (16, 32, 64, 128)}
HYBRIDEP_FRIENDLY = {"cpu": None, "gpu": ((128, 4), (128, 16))}


def generate(count: int, world: int, seed: int, fault_share: float = 0.12, profile: str = "cpu") -> list[RoutingCase]:
    """``count`` cases for a group of ``world`` ranks (``profile``: ``cpu`` for the fakes, ``gpu`` for the
    real libraries, see :data:`HIDDEN`). About a third have HybridEP's shapes (equal token counts,
    16-divisible hidden sizes, distinct experts), so every backend runs many of them."""
    rng = random.Random(seed * 7 + world)
    cases = []
    for index in range(count):
        friendly = rng.random() < 0.35
        experts_per_rank = rng.choice([1, 2, 3, 4, 8, 16, 32, 64, 128])
        num_experts = max(2, min(256, experts_per_rank * world) // world * world)
        topk = rng.randint(1, 8)
        if friendly:
            num_experts = max(num_experts, 4 * world)
            num_experts -= num_experts % (4 * world)
            tokens = (rng.choice([4, 8, 12, 16, 24, 32, 48, 64]),) * world
            hidden, dtype, duplicates = rng.choice([16, 32, 64]), "bf16", False
            if HYBRIDEP_FRIENDLY[profile]:
                hidden, per_rank = rng.choice(HYBRIDEP_FRIENDLY[profile])
                num_experts = per_rank * world
            topk = min(topk, num_experts)
        else:
            tokens = tuple(rng.choice([0, 0, 1, 1, 2, 3, 5, 7, 13, 31, 64, rng.randint(0, 64)]) for _ in range(world))
            hidden = rng.choice(HIDDEN[profile])
            dtype = rng.choice(["bf16", "bf16", "fp32"])
            duplicates = rng.random() < 0.3
        fault, fault_rank = "none", rng.randrange(world)
        if rng.random() < fault_share:
            fault = rng.choice(["bad_id", "bad_id", "bad_dtype"])
            if fault == "bad_id" and tokens[fault_rank] == 0:
                fault = "bad_dtype"
        cases.append(RoutingCase(
            seed=seed * 100_000 + index, world=world, tokens=tokens, topk=topk, num_experts=num_experts,
            hidden=hidden, dtype=dtype, routing=rng.choice(ROUTINGS), holes=rng.choice([0.0, 0.0, 0.1, 0.5]),
            duplicates=duplicates, layout=rng.choice(LAYOUTS), grad=rng.random() < 0.6, fault=fault,
            fault_rank=fault_rank,
        ))
    return cases
