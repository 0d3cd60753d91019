"""A user error ends the command with one line and status 2; under torchrun every rank parses the same
command, so rank 0 reports it and another rank only when rank 0 has not ended the job meanwhile (the error
was its own)."""

from __future__ import annotations

import os
import sys
import time

from a2a_bench.launch.lifeline import launched_by_torchrun

# a rank other than 0 that hits a user error waits this long for rank 0 to report it (torchrun then stops it)
RANK0_REPORTS_S = 5.0


def user_error(message: str) -> None:
    """Print ``a2a-bench: error: <message>`` on stderr (prefixed by the rank on a rank other than 0, after
    :data:`RANK0_REPORTS_S`) and exit with status 2."""
    rank = int(os.environ.get("RANK", "0")) if launched_by_torchrun() else 0
    if rank != 0:
        time.sleep(RANK0_REPORTS_S)
        message = f"rank {rank}: {message}"
    print(f"a2a-bench: error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)
