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
