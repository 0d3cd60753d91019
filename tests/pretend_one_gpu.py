"""Loaded into CPU tests' a2a-bench processes with ``A2A_BENCH_BACKENDS=pretend_one_gpu`` (tests/ on
``PYTHONPATH``): the process's cluster detection and GPU-sharing decisions see one GPU, an "NVIDIA
H200" (``fused_a2a.cluster``'s device probe answers so), while its ranks still run on the CPU. The CPU
tests drive the ``--share-gpu`` paths with it, which need more ranks than GPUs; on a GPU machine the
same paths run with the real probe."""

import fused_a2a.cluster

fused_a2a.cluster._cuda_device = lambda: ("NVIDIA H200", 1)
