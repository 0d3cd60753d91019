"""The stand-ins of :mod:`fused_a2a.compat`, registered under NeMo Automodel's and Megatron-LM's module names
and driven as their token dispatchers drive them: on 2 gloo ranks with the CPU fakes of deep_ep
(HybridEPBuffer included) and uccl.ep, and in a fresh interpreter where none of the libraries imports.

The ranks' work is in ``tests/compat_workers.py``; only the spawned ranks import the fakes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import compat_workers as workers
from ranks import spawn

TESTS = Path(__file__).parent


def test_automodel_stand_in_with_deepep_hybridep_and_uccl() -> None:
    spawn(workers.automodel, 2, sys_path=workers.FAKES)


def test_megatron_stand_in_with_deepep_and_hybridep() -> None:
    spawn(workers.megatron, 2, sys_path=workers.FAKES)


def test_both_stand_ins_without_the_libraries() -> None:
    """A fresh interpreter in which deep_ep, uccl and transformer_engine cannot be imported."""
    path = os.pathsep.join([str(TESTS), *sys.path])
    done = subprocess.run([sys.executable, "-c", "import compat_workers; compat_workers.absent()"],
                          env={**os.environ, "PYTHONPATH": path}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("absent: ok")
