"""``python -m fused_a2a.compat FRAMEWORK[,FRAMEWORK] [--] (SCRIPT | -m MODULE) [ARGS...]``: see :mod:`fused_a2a.compat.launch`."""

from fused_a2a.compat.launch import main

if __name__ == "__main__":
    main()
