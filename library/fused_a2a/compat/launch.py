"""Run a training script with the stand-ins installed, without editing it.

::

    python -m fused_a2a.compat megatron -- pretrain_gpt.py --num-layers 2 ...
    torchrun --nproc-per-node 8 -m fused_a2a.compat automodel -- train.py --config cfg.yaml
    torchrun --nproc-per-node 8 -m fused_a2a.compat automodel,megatron -- -m my_package.train ARGS

The first argument names the frameworks (comma-separated); ``--`` is optional. Then either a script,
run as ``python SCRIPT ARGS`` would run it (``__name__ == "__main__"``, ``sys.argv = [SCRIPT, *ARGS]``,
the script's folder first on ``sys.path``), or ``-m MODULE``, run as ``python -m MODULE ARGS`` would.
"""

from __future__ import annotations

import os
import runpy
import sys

from fused_a2a.compat.swap import FRAMEWORKS, install

USAGE = (f"usage: python -m fused_a2a.compat FRAMEWORK[,FRAMEWORK] [--] (SCRIPT | -m MODULE) [ARGS...]"
         f"  (FRAMEWORK: {' or '.join(sorted(FRAMEWORKS))})")


class UsageError(ValueError):
    """A command line the launcher cannot run."""


def parse(argv: list[str]) -> tuple[list[str], str | None, str | None, list[str]]:
    """``(frameworks, script, module, args)`` of a launcher command line (one of script/module is set).

    Raises:
        UsageError: no framework, an unknown one, or nothing to run.
    """
    if not argv:
        raise UsageError("name the framework(s) and the script to run")
    frameworks = []
    for name in argv[0].split(","):
        name = name.strip()
        if name not in FRAMEWORKS:
            raise UsageError(f"unknown framework {name!r}; choose from {', '.join(sorted(FRAMEWORKS))}")
        if name not in frameworks:
            frameworks.append(name)
    rest = argv[1:]
    if rest[:1] == ["--"]:
        rest = rest[1:]
    if not rest:
        raise UsageError("no script to run")
    if rest[0] == "-m":
        if len(rest) < 2:
            raise UsageError("-m needs a module name")
        return frameworks, None, rest[1], rest[2:]
    return frameworks, rest[0], None, rest[1:]


def main(argv: list[str] | None = None) -> None:
    """Install the stand-ins, then run the script or module as ``__main__`` (exit status 2 on a usage error)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["-h"], ["--help"]):
        print(USAGE)
        return
    try:
        frameworks, script, module, args = parse(argv)
    except UsageError as err:
        print(f"fused_a2a.compat: {err}\n{USAGE}", file=sys.stderr)
        raise SystemExit(2) from None
    if script is not None and not os.path.isfile(script):
        print(f"fused_a2a.compat: no such script: {script}", file=sys.stderr)
        raise SystemExit(2)
    for framework in frameworks:
        install(framework)
    if module is not None:
        sys.argv = [module, *args]  # runpy puts the module's path in argv[0]
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        return
    sys.argv = [script, *args]
    sys.path[0] = os.path.dirname(os.path.abspath(script))
    runpy.run_path(script, run_name="__main__")
