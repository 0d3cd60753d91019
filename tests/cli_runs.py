"""Run the CLI as a user does: in this process (its exit status and output captured) or as a child
process with its output in pipes; and the check every user error must pass."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from a2a_bench.cli import main


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """``a2a-bench ARGS`` in this process: ``(exit status, stdout, stderr)``."""
    monkeypatch.setattr(sys, "argv", ["a2a-bench", *args])
    with pytest.raises(SystemExit) as exc:
        main()
    captured = capsys.readouterr()
    return exc.value.code, captured.out, captured.err


def run_child(*args: str, env: dict[str, str | None] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m a2a_bench ARGS`` as a child process, output in pipes (not a terminal, as in a Slurm
    log), tables 250 columns wide; ``env`` entries override this environment (``None`` removes one)."""
    child_env = {**os.environ, "COLUMNS": "250", **(env or {})}
    child_env = {key: value for key, value in child_env.items() if value is not None}
    return subprocess.run([sys.executable, "-m", "a2a_bench", *args], capture_output=True, text=True,
                          timeout=timeout, env=child_env)


def assert_one_line_error(code: int, err: str, fragment: str) -> None:
    """Exit status 2 and one ``a2a-bench: error:`` line on stderr holding ``fragment``."""
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("a2a-bench: error: ")
    assert fragment in lines[0], lines[0]
