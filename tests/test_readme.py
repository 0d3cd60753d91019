"""The README: a quick start of exactly two commands, the second the one CI runs, with its figures filled
in; its teardown call works after a plain ``import fused_a2a``."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def quick_start() -> list[str]:
    text = (REPO / "README.md").read_text()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def test_the_quick_start_is_two_commands_and_ci_runs_the_second() -> None:
    install_and_sweep, install_and_test = quick_start()
    steps = install_and_sweep.split(" && ")
    # torch first: the CPU build on this project's machines (and CI's), before the package's `torch >= 2.4`
    assert steps[0] == 'pip install "torch==2.13.0"'
    assert steps[1:] == ["pip install -e .", "a2a-bench sweep --quick --nproc 2"]
    assert install_and_test == 'pip install -e ".[test]" && python -m pytest -q'
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert install_and_test in [line.strip() for line in ci]


def test_the_quick_start_states_measured_times() -> None:
    section = (REPO / "README.md").read_text().split("## Quick start", 1)[1].split("\n## ", 1)[0]
    assert not re.search(r"[A-Z]+_TIME", section)
    assert re.search(r"about \d+ s on a 2-core machine", section) and re.search(r"about \d+(\.\d)? minutes on 2 cores", section)


def test_free_all_buffers_as_the_readme_calls_it_after_import_fused_a2a() -> None:
    assert "fused_a2a.teardown.free_all_buffers()" in (REPO / "README.md").read_text()
    proc = subprocess.run([sys.executable, "-c", "import fused_a2a; fused_a2a.teardown.free_all_buffers()"],
                          capture_output=True, text=True, timeout=120)  # a fresh interpreter: only `import fused_a2a`
    assert proc.returncode == 0, proc.stderr
