"""A 2-rank dispatch/combine job exits cleanly, with or without ``destroy_process_group``: nothing of
fused_a2a keeps a destroyed group (and its gloo threads) alive, and at exit gloo's threads get to finish
before the interpreter finalises (it aborted in about half the runs before: "terminate called without an
active exception"). ``pytest -m slow tests/test_clean_exit.py`` runs the issue's 50 jobs each way."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ranks import free_port

SCRIPT = Path(__file__).parent / "exit_script.py"


def _aborted_jobs(runs: int, destroy: bool) -> list[str]:
    """Run the job ``runs`` times; each job whose ranks did not both exit with status 0, with its stderr."""
    aborted = []
    for _ in range(runs):
        port = str(free_port())
        ranks = [subprocess.Popen([sys.executable, str(SCRIPT), str(rank), "2", port, str(int(destroy))],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for rank in range(2)]
        results = [(rank.wait(timeout=120), rank.stderr.read()) for rank in ranks]
        if any(status != 0 for status, _ in results):
            aborted.append("; ".join(f"status {status}: {err.strip()[-200:]}" for status, err in results))
    return aborted


@pytest.mark.parametrize("destroy", [False, True], ids=["without-destroy", "with-destroy"])
def test_no_abort_at_exit(destroy: bool) -> None:
    assert _aborted_jobs(6, destroy) == []


@pytest.mark.slow
@pytest.mark.parametrize("destroy", [False, True], ids=["without-destroy", "with-destroy"])
def test_no_abort_at_exit_in_50_jobs(destroy: bool) -> None:
    assert _aborted_jobs(50, destroy) == []
