"""Which cluster this process runs on: a fingerprint, and the id that names its tuning table.

The id (e.g. ``h200-x2-nv18``) is the folder name under ``tuning_results/``; the environment
variable ``FUSED_A2A_CLUSTER_ID`` overrides it (the other fields are still detected). Ranks that
share a GPU say so in the id (``h200-x1-mps2``: two ranks per GPU under MPS; ``h200-x1-ts2``: two
ranks time-slicing it), so a table measured that way is found only by jobs that share GPUs alike.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import subprocess
from dataclasses import asdict, dataclass

import torch

from fused_a2a import mps

CLUSTER_ID_ENV = "FUSED_A2A_CLUSTER_ID"
PCIE_PATHS = ("PIX", "PXB", "PHB", "NODE", "SYS")
# how ranks that share a GPU share it, and the id's word for it
SHARING_WORDS = {"mps": "mps", "timeslice": "ts"}
# a cluster id names a folder: letters, digits, '.', '_' and '-', never a path
CLUSTER_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

logger = logging.getLogger("fused_a2a")


def cluster_id_problem(ident: object) -> str | None:
    """Why ``ident`` cannot be a cluster id (it names a folder, never a path), or ``None``."""
    if not isinstance(ident, str) or not CLUSTER_ID_RE.match(ident):
        return (f"cluster id {ident!r} is not a name: use letters, digits, '.', '_' and '-' "
                "(starting with a letter or digit, at most 128 characters)")
    return None


@dataclass(frozen=True)
class ClusterInfo:
    """The fingerprint of a cluster, as stored in a tuning table's ``cluster`` object.

    Attributes:
        id: the cluster id (see :func:`cluster_id`).
        gpu: the name of GPU 0 (``"NVIDIA H200"``), ``None`` on CPU.
        gpus_per_node: ranks per node (GPUs on GPU clusters).
        nodes: number of nodes.
        intranode_link: the link between GPU 0 and GPU 1 (``"NV18"``, ``"PCIe"``), ``None`` if unknown.
        internode: the network between nodes, ``None`` if unknown or single node.
        ranks_per_gpu: the most ranks that share one GPU of a node (1: a GPU per rank).
        gpu_sharing: how ranks share a GPU: ``"mps"`` (an MPS daemon serves them: their kernels run
            side by side), ``"timeslice"`` (they take turns: timings mean nothing), ``None`` (they
            do not share).
    """

    id: str
    gpu: str | None
    gpus_per_node: int
    nodes: int
    intranode_link: str | None
    internode: str | None
    ranks_per_gpu: int = 1
    gpu_sharing: str | None = None

    def to_json(self) -> dict:
        """The ``cluster`` object of ``tuning.json`` (keys in the order of the fields)."""
        return asdict(self)


def cluster_id(gpu: str | None, gpus_per_node: int, nodes: int, link: str | None, ranks_per_gpu: int = 1,
               gpu_sharing: str | None = None) -> str:
    """The id of a cluster: ``cpu-gloo-x<ranks>`` on CPU, else
    ``<gpu>-x<gpus>[-n<nodes>][-<link>][-mps<ranks per GPU>|-ts<ranks per GPU>]``.

    ``gpu`` is shortened to its model (``"NVIDIA H100 80GB HBM3"`` -> ``h100``,
    ``"NVIDIA A100-SXM4-80GB"`` -> ``a100``); ``link`` is lower-cased (``"NV18"`` -> ``nv18``); ranks
    that share a GPU (``ranks_per_gpu > 1``) add ``mps<n>`` (``gpu_sharing="mps"``) or ``ts<n>``
    (``"timeslice"``). Examples: ``cluster_id("NVIDIA H200", 2, 1, "NV18") == "h200-x2-nv18"``,
    ``cluster_id("NVIDIA H200", 1, 1, None, 2, "mps") == "h200-x1-mps2"``.
    """
    if gpu is None:
        return f"cpu-gloo-x{gpus_per_node * nodes}"
    model = (re.sub(r"(?i)^\s*nvidia\s+", "", gpu).split() or ["gpu"])[0]
    short = re.sub(r"[^a-z0-9]", "", model.split("-")[0].lower()) or "gpu"
    parts = [f"{short}-x{gpus_per_node}"]
    if nodes > 1:
        parts.append(f"n{nodes}")
    if link:
        parts.append(link.lower())
    if ranks_per_gpu > 1:
        parts.append(f"{SHARING_WORDS[gpu_sharing or 'timeslice']}{ranks_per_gpu}")
    return "-".join(parts)


def parse_topo_link(topo_text: str) -> str | None:
    """The GPU0-GPU1 link in the matrix printed by ``nvidia-smi topo -m``.

    Returns:
        ``"NV<n>"`` for NVLink, ``"PCIe"`` for a PCIe path (PIX/PXB/PHB/NODE/SYS), ``None`` when the
        text has fewer than 2 GPUs or an entry this function does not know.
    """
    header = None
    for line in re.sub(r"\x1b\[[0-9;]*m", "", topo_text).splitlines():  # some versions underline the header
        cells = line.split()
        if header is None:
            if cells[:2] == ["GPU0", "GPU1"]:
                header = cells
        elif cells[:1] == ["GPU0"] and len(cells) > header.index("GPU1") + 1:
            link = cells[header.index("GPU1") + 1]
            if link.startswith("NV"):
                return link
            return "PCIe" if link in PCIE_PATHS else None
    return None


def _nvidia_smi_link() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "topo", "-m"], capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return parse_topo_link(out.stdout)


def _cuda_device() -> tuple[str, int] | None:
    """(name of GPU 0, visible GPUs), or ``None`` without a usable CUDA device."""
    try:
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return (torch.cuda.get_device_name(0), count) if count else None
    except Exception:  # a broken driver must not stop a training job: treat it as no GPU
        return None


def visible_gpus() -> int:
    """The CUDA devices this process sees (``CUDA_VISIBLE_DEVICES`` applied); 0 without a usable CUDA device."""
    device = _cuda_device()
    return device[1] if device else 0


def sharing_of(ranks_per_node: int, gpus: int) -> tuple[int, str | None]:
    """How ``ranks_per_node`` ranks placed round-robin on ``gpus`` GPUs share them:
    ``(most ranks on one GPU, "mps" | "timeslice" | None)``. Sharing is ``"mps"`` when an MPS control
    daemon serves this process (:func:`fused_a2a.mps.daemon_pid`), else ``"timeslice"``; ``None``
    when no GPU holds two ranks (or there is no GPU). Never raises."""
    if gpus < 1 or ranks_per_node <= gpus:
        return 1, None
    return -(-ranks_per_node // gpus), "mps" if mps.daemon_pid() is not None else "timeslice"


def _env_int(name: str) -> int | None:
    value = os.environ.get(name, "")
    return int(value) if value.isdigit() and int(value) > 0 else None


@functools.lru_cache(maxsize=None)
def detect_cluster(world_size: int | None = None) -> ClusterInfo:
    """The fingerprint of the cluster this process runs on; never raises.

    Args:
        world_size: ranks of the job (default: ``$WORLD_SIZE``, else one node's worth).

    Returns:
        a :class:`ClusterInfo`. Ranks per node: ``$LOCAL_WORLD_SIZE``, else the visible GPUs (on CPU:
        ``world_size``, else 1); GPUs per node: the ranks per node, at most the visible GPUs (ranks
        that share a GPU do not make more GPUs); nodes: ``world_size // ranks per node`` (at least
        1); the link from ``nvidia-smi topo -m``; ``internode`` is not detected (``None``); with
        more ranks than GPUs on a node, how they share them (:func:`sharing_of`: MPS when a daemon
        serves this process, else time slices). The id is ``$FUSED_A2A_CLUSTER_ID`` when set to a
        valid name (:func:`cluster_id_problem`; an invalid one is ignored with a warning), else
        :func:`cluster_id` of those fields. Cached per ``world_size``
        (``detect_cluster.cache_clear()`` forgets it).
    """
    world = world_size or _env_int("WORLD_SIZE")
    device = _cuda_device()
    gpu, visible = device if device else (None, None)
    ranks_per_node = _env_int("LOCAL_WORLD_SIZE") or visible or world or 1
    gpus_per_node = min(ranks_per_node, visible) if visible else ranks_per_node
    nodes = max(1, (world or ranks_per_node) // ranks_per_node)
    link = _nvidia_smi_link() if gpu else None
    per_gpu, sharing = sharing_of(ranks_per_node, visible or 0)
    ident = os.environ.get(CLUSTER_ID_ENV)
    if ident and cluster_id_problem(ident):
        logger.warning("fused_a2a: ignoring %s: %s", CLUSTER_ID_ENV, cluster_id_problem(ident))
        ident = None
    ident = ident or cluster_id(gpu, gpus_per_node, nodes, link, per_gpu, sharing)
    return ClusterInfo(ident, gpu, gpus_per_node, nodes, link, None, per_gpu, sharing)
