"""A test backend that fails on purpose: the torch backend plus a ``fault`` knob.

Loaded into sweeps with ``A2A_BENCH_BACKENDS=faulty_backend`` (tests/ on ``PYTHONPATH``).
"""

from __future__ import annotations

import os
import signal
import time

import torch.distributed as dist

from fused_a2a.autograd import Comm
from fused_a2a.backends import BACKENDS, BackendSpec, Knob, one_of
from fused_a2a.backends.torch_a2a import TorchBuffer, TorchConfig

FAULTS = ("none", "raise", "hang", "hang_rank1", "kill_rank1", "invalid", "hold", "hold_rank1")
HOLD_FILE_ENV = "FAULTY_HOLD_FILE"


class FaultyBuffer(TorchBuffer):
    """A torch buffer whose ``dispatch`` raises, hangs or kills its process, as ``fault`` says
    (``hold``: waits while the file ``$FAULTY_HOLD_FILE`` exists, then works; ``hold_rank1``: rank 1
    waits so, while rank 0 goes on into the exchange and waits there for rank 1)."""

    def __init__(self, group, fault: str) -> None:
        super().__init__(group)
        self.fault = fault

    def dispatch(self, *args, **kwargs):
        rank1 = dist.get_rank(self.group) == 1
        if self.fault == "raise":
            raise RuntimeError("injected failure")
        if self.fault == "hang" or (self.fault == "hang_rank1" and rank1):
            time.sleep(3600)
        while (self.fault == "hold" or (self.fault == "hold_rank1" and rank1)) and os.path.exists(os.environ[HOLD_FILE_ENV]):
            time.sleep(0.05)
        if self.fault == "kill_rank1" and rank1:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().dispatch(*args, **kwargs)


def _comm(dispatch: dict, combine: dict, num_ranks: int | None) -> Comm:
    fault = dispatch["fault"]
    if fault == "invalid":
        raise ValueError("faulty: the installed library rejects fault=invalid")
    return Comm(name="faulty", get_buffer=lambda group, tokens: FaultyBuffer(group, fault),
                dispatch_config=TorchConfig(), combine_config=TorchConfig())


BACKENDS["faulty"] = BackendSpec(
    name="faulty",
    knobs=(Knob("fault", "none", FAULTS, "what goes wrong in dispatch", check=one_of("fault", FAULTS)),),
    make_comm=_comm,
    invalid=lambda knobs, world_size: "injected invalid combination" if knobs["fault"] == "invalid" else None,
)
