"""Tuning-table entries for other tools: SGLang's ``--deepep-config`` JSON and environment variables."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from a2a_bench.engine.results import ResultsError
from a2a_bench.engine.spec import SpecError
from fused_a2a.backends import BACKENDS, get_backend
from fused_a2a.backends.frameworks import ForeignNames
from fused_a2a.cluster import detect_cluster
from fused_a2a.shape import CallShape
from fused_a2a.tuning.resolve import env_var, load_cluster_table, tuning_dirs
from fused_a2a.tuning.table import TuningEntry, TuningTable, lookup, read_table

FORMATS = ("sglang", "env")

def sglang_backends() -> list[str]:
    """The backends SGLang's ``--deepep-config`` holds the configs of (``ForeignNames.sglang``)."""
    return [name for name, spec in BACKENDS.items() if spec.names.sglang is not None]


def check_request(fmt: str, backend: str) -> None:
    """Raise ``SpecError`` (one line) for an unknown format, or ``sglang`` for a backend SGLang takes no
    config of."""
    if fmt not in FORMATS:
        raise SpecError(f"unknown --format {fmt!r}; choose from {', '.join(FORMATS)}")
    if fmt == "sglang" and backend not in sglang_backends():
        raise SpecError(f"--format sglang writes DeepEP's Config (SGLang's --deepep-config): use --backend "
                        f"{' or '.join(sglang_backends())}, not {backend!r}")


def load_table(cluster_dir: Path | None, world_size: int) -> TuningTable:
    """``cluster_dir/tuning.json``, or without a folder the first valid table of this machine's cluster
    (:func:`fused_a2a.tuning.resolve.tuning_dirs`, cluster id for ``world_size`` ranks).

    Raises:
        TuningFileError: the file is missing or invalid.
        ResultsError: this machine's cluster has no table.
    """
    if cluster_dir is not None:
        return read_table(cluster_dir / "tuning.json")
    cluster = detect_cluster(world_size).id
    table, _ = load_cluster_table(cluster, strict=True)
    if table is None:
        dirs = ", ".join(str(d) for d in tuning_dirs())
        raise ResultsError(f"no tuning table for cluster {cluster} in {dirs}; pass --cluster-dir")
    return table


def find_entry(
    table: TuningTable,
    backend: str,
    world_size: int,
    dtype: str,
    hidden: int,
    num_tokens: int,
    topk: int | None = None,
    num_experts: int | None = None,
    routing: str = "uniform",
) -> TuningEntry:
    """The entry ``fused_a2a`` would use for this call (:func:`fused_a2a.tuning.table.lookup`, with the
    installed build of the backend preferred).

    Raises:
        ValueError: unknown backend.
        ResultsError: no entry for this backend, world size and dtype (the message lists those there are).
    """
    spec = get_backend(backend)
    shape = CallShape(dtype, hidden, topk, num_experts, routing, world_size=world_size, tokens=(num_tokens,))
    entry = lookup(table, backend, shape, spec.version())
    if entry is None:
        have = sorted({f"{e.backend} on {e.world_size} ranks in {e.dtype}" for e in table.entries})
        raise ResultsError(
            f"the tuning table of {table.cluster['id']} has no entry for {backend} on {world_size} ranks in {dtype}; "
            f"it has: {', '.join(have) or 'no entries'}"
        )
    return entry


def describe(entry: TuningEntry) -> str:
    """One line naming the entry's key."""
    return (f"{entry.backend}, {entry.world_size} ranks, {entry.dtype}, hidden {entry.hidden}, {entry.num_tokens} tokens, "
            f"top-{entry.topk}, {entry.num_experts} experts, {entry.routing} routing, build {entry.build or 'unknown'}")


def sglang_config(entry: TuningEntry, num_ranks: int) -> dict[str, dict[str, int]]:
    """SGLang's ``--deepep-config``: ``{"normal_dispatch": {Config kwargs}, "normal_combine": {...}}``.

    A chunk knob of ``0`` (or a missing knob) becomes DeepEP's default for ``num_ranks`` and the
    operation (the backend's ``ForeignNames.sglang``); both sections have the same ``num_sms``, as
    SGLang asserts.

    Args:
        entry: an entry of a backend of :func:`sglang_backends`.
        num_ranks: ranks of the expert-parallel group SGLang runs with.

    Returns:
        the two sections, keyed by ``deep_ep.Config`` keyword names; chunk sizes in tokens.

    Raises:
        ValueError: another backend, or knobs DeepEP rejects on ``num_ranks`` ranks.
    """
    if entry.backend not in sglang_backends():
        raise ValueError(f"SGLang's --deepep-config holds DeepEP configs; this entry is for {entry.backend!r}")
    spec = get_backend(entry.backend)
    defaults = spec.defaults()
    try:
        return spec.names.sglang.sections({**defaults, **entry.dispatch}, {**defaults, **entry.combine}, num_ranks)
    except ValueError as err:
        raise ValueError(f"{entry.backend} entry ({describe(entry)}): {err}") from None


def env_lines(entry: TuningEntry) -> list[str]:
    """``export NAME=value`` lines that set the entry's knobs.

    Every knob gets our variable (``FUSED_A2A_<BACKEND>_<KNOB>``, read by ``fused_a2a``); the knobs
    other tools read get theirs too (the backend's ``ForeignNames.env``: ``DEEP_EP_SM_NUMS``, ``UCCL_EP_SM_NUMS``,
    HybridEP's ``NUM_OF_TOKENS_PER_CHUNK_*_API``; a ``0`` there, "the tool's default", is not exported).
    One variable sets dispatch and combine alike: a knob named for one operation takes that
    operation's value; a knob whose dispatch and combine values differ gets a ``#`` comment instead
    (``fused_a2a`` takes it from the tuning table).
    """
    foreign_env = dict(_names(entry.backend).env)
    lines = []
    for name in sorted(entry.dispatch):
        d, c = entry.dispatch[name], entry.combine[name]
        if "combine" in name:
            value = c
        elif "dispatch" in name or d == c:
            value = d
        else:
            lines.append(f"# {name}: dispatch {d}, combine {c}; one variable sets both, so it is left to the tuning table")
            continue
        text = shlex.quote(str(value).lower() if isinstance(value, bool) else str(value))
        lines.append(f"export {env_var(entry.backend, name)}={text}")
        foreign = foreign_env.get(name)
        if foreign is not None and value != 0:
            lines.append(f"export {foreign}={text}")
    return lines


def framework_lines(entry: TuningEntry) -> list[str]:
    """``#`` lines with the framework settings that give the entry's knobs: Megatron-LM's TransformerConfig
    fields and NeMo Automodel's ``BackendConfig.dispatcher_num_sms`` (its ``moe_hybridep_num_sms`` for
    HybridEP). Both frameworks set one SM count for dispatch and combine; a combine count that differs is
    named. A knob of ``0`` ("the library's default") is left out."""
    names = _names(entry.backend)
    megatron = []
    for knob, field in names.megatron:
        value = entry.dispatch.get(knob)
        if value not in (None, 0):
            megatron.append(f"{field}={value}")
    lines = []
    if megatron:
        lines.append(f"# Megatron-LM TransformerConfig: {', '.join(megatron)}")
    sms = names.automodel_sms
    if sms is not None and sms in entry.dispatch:
        automodel = [f"dispatcher_num_sms={entry.dispatch[sms]}"]
        for knob, field in names.automodel:
            if knob in entry.dispatch:
                automodel.append(f"{field}={entry.dispatch[knob]}")
        lines.append(f"# NeMo Automodel BackendConfig: {', '.join(automodel)}")
        combine_sms = entry.combine.get(names.combine_sms) if names.combine_sms is not None else None
        if combine_sms is not None and combine_sms != entry.dispatch[sms]:
            lines.append(f"# (the table's combine uses {combine_sms} SMs; both frameworks set one count for both)")
    return lines


def _names(backend: str) -> ForeignNames:
    """The names other tools give ``backend``'s knobs (none for a backend this process does not know)."""
    spec = BACKENDS.get(backend)
    return spec.names if spec is not None else ForeignNames()


def render(fmt: str, entry: TuningEntry) -> str:
    """The text of ``fmt`` for ``entry``: SGLang's JSON (for ``entry.world_size`` ranks) or shell lines."""
    if fmt == "sglang":
        return json.dumps(sglang_config(entry, entry.world_size), indent=2) + "\n"
    return "\n".join([f"# a2a-bench tuning entry: {describe(entry)}", *env_lines(entry), *framework_lines(entry)]) + "\n"
