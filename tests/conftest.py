import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def gpu_device():
    """One process group for every GPU test file of a torchrun-launched pytest session (a second
    group set-up in one process fails), this rank's device."""
    from gpu import gpu_group

    yield from gpu_group()


@pytest.fixture(autouse=True, scope="module")
def _free_gpu_buffers_after_each_file():
    """In a GPU session, every test file starts without the buffers of the files before it."""
    yield
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        from fused_a2a.teardown import free_all_buffers

        free_all_buffers()
        dist.barrier()
