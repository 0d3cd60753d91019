"""``a2a-bench show`` and ``env``: what fused_a2a would use for a call on this machine, and what the machine
offers."""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from typing import Optional

from rich.table import Table

from a2a_bench.commands.call import Call, check_call
from a2a_bench.engine.spec import SpecError
from a2a_bench.output import make_console
from a2a_bench.reports.machine import describe, mps_line
from a2a_bench.reports.report import entry_verdict
from fused_a2a.backends import BACKENDS, get_backend
from fused_a2a.cluster import cluster_id_problem, detect_cluster
from fused_a2a.shape import CallShape
from fused_a2a.tuning.resolve import STRICT_ENV, resolve, tuning_dirs


def show(backend: str, hidden: int, tokens: int, world_size: int, dtype: str, topk: Optional[int],
         experts: Optional[int], cluster: Optional[str], knob: Optional[list[str]], routing: Optional[str],
         framework: Optional[str]) -> None:
    """Each backend's resolution for the call (``backend``'s, or with ``framework`` those of each of the
    framework's backends), checked by the library's own checks, in strict mode."""
    if cluster is not None and cluster_id_problem(cluster):
        raise SpecError(f"--cluster: {cluster_id_problem(cluster)}")
    backends = [backend]
    console = make_console()
    if framework is not None:
        from fused_a2a.compat import FRAMEWORKS, replaced

        if framework not in FRAMEWORKS:
            raise SpecError(f"--framework must be one of {', '.join(sorted(FRAMEWORKS))}, got {framework!r}")
        here = "replaced in this process" if framework in replaced() else "not replaced in this process"
        console.print(f"{framework}: fused_a2a.compat.install({framework!r}) (or python -m fused_a2a.compat {framework} -- "
                      f"SCRIPT) puts fused_a2a.compat.{framework} in place of {FRAMEWORKS[framework]} ({here}); "
                      "the framework's default SM counts count as not set", markup=False)
        backends = [name for name, spec in BACKENDS.items() if framework in spec.names.frameworks]
    for name in backends:
        spec = get_backend(name)
        check_call(Call(name, world_size, dtype, hidden, tokens, topk, experts))
        explicit = {}
        for text in knob or []:
            knob_name, sep, value = text.partition("=")
            if not sep:
                raise SpecError(f"--knob takes name=value, got {text!r}")
            if framework is None or knob_name in {k.name for k in spec.knobs}:
                explicit[knob_name] = spec.knob(knob_name).parse(value)
        with strict_tuning():
            shape = CallShape(dtype, hidden, topk, experts, routing, world_size=world_size, tokens=(tokens,))
            res = resolve(name, shape, explicit, cluster=cluster)
        print_resolution(console, res, hidden, tokens, world_size, dtype, cluster)


def print_resolution(console, res, hidden: int, tokens: int, world_size: int, dtype: str,
                     cluster: Optional[str]) -> None:
    """One backend's knobs, their sources and the table entry they came from, with the mode that chose
    it and how it compared with the default."""
    out = Table(title=f"{res.backend}: hidden {hidden}, {tokens} tokens, {world_size} ranks, {dtype}, {res.routing} routing")
    for column in ("knob", "dispatch", "combine", "source"):
        out.add_column(column)
    for name in res.dispatch:
        out.add_row(name, str(res.dispatch[name]), str(res.combine[name]), res.sources[name])
    console.print(out)
    if res.entry is not None:
        e = res.entry
        console.print(f"table entry: {res.table_path} ({e.backend}, {e.world_size} ranks, {e.dtype}, {e.routing} routing, "
                      f"hidden {e.hidden}, {e.num_tokens} tokens, top-{e.topk}, {e.num_experts} experts, "
                      f"measured with {e.build or 'an unrecorded build'}; installed: {res.build or 'not installed'})",
                      markup=False)
        mode = f"chosen by {e.selected_by} mode"
        if e.selected_by == "kernel":
            mode += (" (the buffer's cached calls, not the full call a training step makes: a table tuned before "
                     "a2a-bench tune ranked by api, or with --by kernel)")
        console.print(f"{mode}; vs the default: {entry_verdict(e)}", markup=False)
    elif res.table_path is not None:
        console.print(f"no table entry for this call in {res.table_path}: the backend's defaults apply", markup=False)
    else:
        cluster = cluster or detect_cluster(world_size).id
        console.print(f"no tuning table for cluster {cluster} (looked in {' and '.join(map(str, tuning_dirs()))}): "
                      "the backend's defaults apply; a2a-bench sweep --tune makes one", markup=False)


@contextmanager
def strict_tuning():
    """The library's strict mode for the body: unusable overrides and tables raise instead of warning."""
    before = os.environ.get(STRICT_ENV)
    os.environ[STRICT_ENV] = "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ[STRICT_ENV]
        else:
            os.environ[STRICT_ENV] = before


def env(world_size: Optional[int], as_json: bool) -> None:
    """Installed backends (version, or why not), GPUs, link topology, MPS and cluster id; JSON with ``as_json``."""
    if world_size is not None and world_size < 1:
        raise SpecError(f"--world-size must be >= 1, got {world_size}")
    info = describe(world_size)
    console = make_console()
    if as_json:
        print(json.dumps(info, indent=2))
        return
    c = info["cluster"]
    console.print(f"cluster id: [bold]{c['id']}[/bold]  gpu: {c['gpu'] or 'none'}  gpus/node: {c['gpus_per_node']}  "
                  f"nodes: {c['nodes']}  intranode link: {c['intranode_link'] or 'n/a'}  internode: {c['internode'] or 'n/a'}")
    console.print(f"GPUs: {', '.join(info['gpus']) or 'none'}")
    console.print(mps_line(info["mps"]), markup=False, highlight=False)
    console.print("versions: " + ", ".join(f"{k} {v}" for k, v in info["versions"].items() if v))
    out = Table(title="backends")
    for column in ("backend", "available", "version or reason"):
        out.add_column(column)
    for b in info["backends"]:
        out.add_row(b["backend"], "yes" if b["available"] else "no", b["detail"])
    console.print(out)

