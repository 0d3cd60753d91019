"""The ``--nproc`` launcher: a command run again on local ranks under torchrun's own launcher."""

from __future__ import annotations

import json
import logging
import os
import sys

from a2a_bench.launch.lifeline import LAUNCHER_PID_ENV, launched_by_torchrun

COMMAND_ENV = "A2A_BENCH_COMMAND"  # the user's command line, passed by ``a2a-bench --nproc`` to its ranks


def under_local_launcher() -> bool:
    """This rank was started by ``a2a-bench --nproc`` (which reports for the whole job)."""
    return launched_by_torchrun() and LAUNCHER_PID_ENV in os.environ


def command_line() -> list[str]:
    """The command line as its user typed it (``a2a-bench ...``): under ``a2a-bench --nproc``,
    the launcher's (:data:`COMMAND_ENV`), not the one it gave the ranks."""
    if under_local_launcher() and COMMAND_ENV in os.environ:
        return json.loads(os.environ[COMMAND_ENV])
    return ["a2a-bench", *sys.argv[1:]]


def launch_local(nproc: int, argv: list[str], max_restarts: int = 0) -> int:
    """Re-run this command under torchrun's own launcher with ``nproc`` local ranks; its exit status.

    The ranks are this process's children and die with it (:mod:`a2a_bench.launch.lifeline`). Status 2 when
    the first rank to fail reported a user error (it printed the line), else 1 for any failure;
    ``128 + signal`` when this process was interrupted (SIGINT, SIGTERM): the agent passed the signal on
    to the ranks and waited for them, and its own lines about it are left out (the caller reports).
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args([
        "--nproc-per-node", str(nproc), "--standalone", "--max-restarts", str(max_restarts),
        "-m", "a2a_bench", *argv,
    ])
    os.environ[LAUNCHER_PID_ENV] = str(os.getpid())
    os.environ[COMMAND_ENV] = json.dumps(["a2a-bench", *sys.argv[1:]])
    quiet = _QuietInterrupt()
    for name in _AGENT_LOGGERS:
        logging.getLogger(name).addFilter(quiet)
    try:
        run(args)
    except SignalException as exc:
        return 128 + int(exc.sigval)
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        if failure.exitcode == 2:
            return 2
        print(f"a2a-bench: rank {rank} failed with exit status {failure.exitcode}", file=sys.stderr)
        return 1
    finally:
        del os.environ[LAUNCHER_PID_ENV], os.environ[COMMAND_ENV]
        for name in _AGENT_LOGGERS:
            logging.getLogger(name).removeFilter(quiet)
    return 0


_AGENT_LOGGERS = ("torch.distributed.elastic.agent.server.api", "torch.distributed.elastic.multiprocessing.api")


class _QuietInterrupt(logging.Filter):
    """Leaves out torchrun's agent lines about a signal it received and passes on to the ranks."""

    def __init__(self) -> None:
        super().__init__()
        self.signalled = False

    def filter(self, record: logging.LogRecord) -> bool:
        text = str(record.msg)
        if "death signal" in text:
            self.signalled = True
            return False
        return not (self.signalled and "closing signal" in text)
