"""The CPU fake of ``deep_ep.HybridEPBuffer`` (``tests/fakes/deep_ep/hybrid_ep_buffer.py``): real results on 2
gloo ranks against a dense reference, and the real library's contract (same signatures, same exception types).

Only the spawned ranks import the fake; this process keeps running without deep_ep.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

import hybridep_fake_workers as workers
from ranks import spawn

FAKE_SOURCE = Path(__file__).parent / "fakes" / "deep_ep" / "hybrid_ep_buffer.py"
REAL_SOURCE = Path(__file__).parents[1] / ".dev" / "deepep" / "deep_ep" / "hybrid_ep_buffer.py"
PUBLIC = ("__init__", "dispatch", "combine", "dispatch_with_permute", "combine_with_unpermute", "update_template_config",
          "empty_jit_cache")


def _signatures(source: Path) -> dict[str, tuple]:
    """Each public method of ``HybridEPBuffer`` as (positional names, defaults, keyword-only names, kw defaults, **kwargs)."""
    tree = ast.parse(source.read_text())
    cls = next(node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "HybridEPBuffer")
    out = {}
    for node in cls.body:
        if isinstance(node, ast.FunctionDef) and node.name in PUBLIC:
            args = node.args
            out[node.name] = (
                [a.arg for a in args.args],
                [ast.unparse(d) for d in args.defaults],
                [a.arg for a in args.kwonlyargs],
                [None if d is None else ast.unparse(d) for d in args.kw_defaults],
                args.kwarg.arg if args.kwarg else None,
            )
    return out


def test_fake_exports_the_buffer_without_importing_it_here() -> None:
    assert "deep_ep" not in sys.modules
    fake = _signatures(FAKE_SOURCE)
    assert set(fake) == set(PUBLIC)
    assert fake["dispatch_with_permute"][0] == ["self"] and fake["combine_with_unpermute"][0] == ["self"]  # keyword-only
    init = (Path(__file__).parent / "fakes" / "deep_ep" / "__init__.py").read_text()
    assert "from .hybrid_ep_buffer import HybridEPBuffer" in init and '"HybridEPBuffer"' in init


@pytest.mark.skipif(not REAL_SOURCE.exists(), reason="no vendored DeepEP hybrid-ep checkout under .dev/")
def test_signatures_match_the_real_buffer() -> None:
    assert _signatures(FAKE_SOURCE) == _signatures(REAL_SOURCE)


def test_dispatch_combine_permute_and_fp8_match_the_dense_reference() -> None:
    spawn(workers.data_paths, 2, sys_path=workers.FAKES)


def test_two_nvlink_domains_of_one_rank() -> None:
    spawn(workers.multinode, 2, sys_path=workers.FAKES)


def test_construction_and_call_contract() -> None:
    spawn(workers.contract, 2, sys_path=workers.FAKES)
