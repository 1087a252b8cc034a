"""The GPUs the planner sizes plans for, with their memory in bytes.

Memory is what `nvidia-smi` reports as the card's total (MiB x 2^20), which is
a little less than the marketing figure for some cards. "any" other card is
described by its memory in GB with `custom_gpu`.

For plans over several machines each GPU also says how many fit in one node
(`max_per_node`) and its dense 16-bit tensor throughput (`dense_tflops`, the
datasheet's figure without sparsity), which the cluster planner uses to tell
whether the network between nodes can keep up with the compute.

Pure Python.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from advisor.errors import TunewiseError

MIB = 2**20
GB = 10**9

#: No node holds more GPUs than this: the largest boxes sold carry 16 (DGX-2 / HGX-2 with 16 V100s,
#: Google Cloud's a2-megagpu-16g with 16 A100-40GB); a plan asking for more per node is a typo.
MAX_GPUS_PER_NODE = 16
#: What a node of one GPU type usually holds: 8, the HGX / DGX baseboards (A100, H100, H200) and
#: the largest cloud instances of every type listed here (p4d/p5, g5/g6/g6e.48xlarge, a2/a3 VMs).
TYPICAL_GPUS_PER_NODE = 8


@dataclass(frozen=True)
class GPU:
    """A GPU model the planner knows."""

    name: str
    """Display name, e.g. "A100-80GB"."""
    memory_bytes: int
    """Total device memory in bytes (nvidia-smi's total)."""
    bf16: bool = True
    """Supports bfloat16 (T4 does not: use fp16 there)."""
    aliases: tuple[str, ...] = ()
    """Other spellings accepted by `get_gpu`."""
    max_per_node: int = TYPICAL_GPUS_PER_NODE
    """The most of these a node holds (8 for every type here except the A100-40GB, of which
    Google Cloud's a2-megagpu-16g carries 16)."""
    dense_tflops: float | None = None
    """Peak dense 16-bit tensor throughput in TFLOPS (datasheet, no sparsity; bf16, or fp16 with
    fp32 accumulation where there is no bf16); None when unknown."""

    @property
    def memory_gb(self) -> float:
        return self.memory_bytes / GB


#: The common training GPUs, smallest first (totals as nvidia-smi reports them, in MiB).
#: TFLOPS: NVIDIA's datasheets, dense (without structured sparsity), 16-bit inputs with fp32 accumulation.
GPUS: tuple[GPU, ...] = (
    # dense_tflops from NVIDIA's datasheets and architecture whitepapers (GeForce cards: fp16 with fp32
    # accumulation, half their fp16-accumulate rate); AWS publishes none for its A10G: 70 is the figure
    # Baseten's A10 / A10G comparison gives. H100-80GB is the SXM card (989; the PCIe card: 756).
    GPU("T4", 15360 * MIB, bf16=False, aliases=("t4-16gb", "tesla-t4"), dense_tflops=65),
    GPU("L4", 23034 * MIB, aliases=("l4-24gb",), dense_tflops=121),
    GPU("A10G", 23028 * MIB, aliases=("a10g-24gb", "a10"), dense_tflops=70),
    GPU("RTX-3090", 24576 * MIB, aliases=("3090", "rtx3090", "rtx 3090"), dense_tflops=71),
    GPU("RTX-4090", 24564 * MIB, aliases=("4090", "rtx4090", "rtx 4090"), dense_tflops=165),
    GPU("A100-40GB", 40960 * MIB, aliases=("a100-40", "a100 40gb"), max_per_node=16, dense_tflops=312),
    GPU("L40S", 46068 * MIB, aliases=("l40s-48gb",), dense_tflops=362),
    GPU("A100-80GB", 81920 * MIB, aliases=("a100", "a100-80", "a100 80gb"), dense_tflops=312),
    GPU("H100-80GB", 81559 * MIB, aliases=("h100", "h100-80", "h100 80gb"), dense_tflops=989),
    GPU("H200", 143771 * MIB, aliases=("h200-141gb",), dense_tflops=989),
)


def _key(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def get_gpu(name: str) -> GPU:
    """Look a GPU up by name or alias (case-insensitive)."""
    key = _key(name or "")
    for gpu in GPUS:
        if key == _key(gpu.name) or key in (_key(a) for a in gpu.aliases):
            return gpu
    known = ", ".join(g.name for g in GPUS)
    raise TunewiseError(f"hardware.gpu: unknown GPU {name!r}; known: {known}, or give hardware.gpu_memory_gb", field="hardware.gpu")


#: The name other modules use.
find_gpu = get_gpu


def custom_gpu(memory_gb: float, name: str | None = None) -> GPU:
    """Any other card, described by its memory in GB (1e9 bytes)."""
    if not isinstance(memory_gb, (int, float)) or isinstance(memory_gb, bool) or not memory_gb > 0:
        raise TunewiseError(f"hardware.gpu_memory_gb: must be a positive number of GB, got {memory_gb!r}", field="hardware.gpu_memory_gb")
    return GPU(name or f"{memory_gb:g} GB GPU", int(memory_gb * GB), max_per_node=MAX_GPUS_PER_NODE)


@dataclass(frozen=True)
class Machine:
    """The machine this process runs on, as far as planning needs it."""

    ram_bytes: int | None
    """Physical RAM (None when the OS does not say)."""
    has_nvidia_gpu: bool
    """An NVIDIA driver with at least one GPU is loaded (/proc/driver/nvidia/gpus lists one)."""


def this_machine() -> Machine:
    """This machine's RAM and whether it has an NVIDIA GPU, from the OS alone (no torch, no CUDA): the one
    function of the advisor that looks at the machine it runs on (the CLI's and the wizard's host RAM default)."""
    import os
    from pathlib import Path

    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        ram = None
    gpus = Path("/proc/driver/nvidia/gpus")
    try:
        has_gpu = gpus.is_dir() and any(gpus.iterdir())
    except OSError:
        has_gpu = False
    return Machine(int(ram) if ram else None, has_gpu)


@functools.lru_cache(maxsize=1)
def local_gpus(timeout_s: float = 5.0) -> tuple[tuple[str, int | None], ...]:
    """The NVIDIA GPUs on this machine as (model name, total memory in MiB or None), from `nvidia-smi` when it
    is installed, else the driver's /proc/driver/nvidia/gpus/*/information (names only); () without any.
    No torch, no CUDA context: the page's process stays light. Asked once per process (cached)."""
    import shutil
    import subprocess
    from pathlib import Path

    if not this_machine().has_nvidia_gpu:
        return ()
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            done = subprocess.run([smi, "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
                                  capture_output=True, text=True, timeout=timeout_s, check=False)
        except (OSError, subprocess.SubprocessError):
            done = None
        if done is not None and done.returncode == 0:
            found = []
            for line in done.stdout.splitlines():
                name, _, mib = line.rpartition(",")
                if name.strip():
                    found.append((name.strip(), int(float(mib)) if mib.strip().replace(".", "", 1).isdigit() else None))
            if found:
                return tuple(found)
    found = []
    for info in sorted(Path("/proc/driver/nvidia/gpus").glob("*/information")):
        try:
            for line in info.read_text(errors="replace").splitlines():
                if line.startswith("Model:"):
                    found.append((line.split(":", 1)[1].strip(), None))
        except OSError:
            continue
    return tuple(found)


def match_gpu(model_name: str, memory_mib: int | None = None) -> GPU | None:
    """The catalogue GPU a driver's model name is ("NVIDIA H100 80GB HBM3" -> H100-80GB, "NVIDIA A100-SXM4-40GB"
    -> A100-40GB, "Tesla T4" -> T4, "NVIDIA GeForce RTX 4090" -> RTX-4090), by the type's own word in the name
    and, between sizes of one type, the memory nearest `memory_mib` (or the size the name says); None for a
    card the catalogue lacks."""
    import re

    words = {word.lower() for word in re.split(r"[^A-Za-z0-9]+", model_name or "") if word}
    said_gb = [int(word[:-2]) for word in words if word.endswith("gb") and word[:-2].isdigit()]
    candidates = []
    for gpu in GPUS:
        kind = _key(gpu.name).split("-")
        word = kind[1] if kind[0] == "rtx" else kind[0]  # RTX-4090: "4090"; A100-80GB: "a100"; L40S: "l40s"
        if word in words:
            candidates.append(gpu)
    if not candidates:
        return None
    target = memory_mib * MIB if memory_mib else (said_gb[0] * GB if said_gb else None)
    if target is None:
        return max(candidates, key=lambda gpu: gpu.memory_bytes)
    return min(candidates, key=lambda gpu: abs(gpu.memory_bytes - target))


def max_gpus_per_node(gpu_name: str | None) -> tuple[int, str]:
    """(the most GPUs one node holds, that limit in words) for a GPU type by name, or for any GPU."""
    if gpu_name:
        gpu = get_gpu(gpu_name)
        if gpu.max_per_node == TYPICAL_GPUS_PER_NODE:
            return gpu.max_per_node, (f"the {gpu.max_per_node} {gpu.name} GPUs a node holds (HGX / DGX boards and "
                                      "the largest cloud instances carry 8)")
        return gpu.max_per_node, f"the {gpu.max_per_node} {gpu.name} GPUs the largest nodes hold"
    return MAX_GPUS_PER_NODE, f"the {MAX_GPUS_PER_NODE} GPUs the largest nodes hold (DGX-2, a2-megagpu-16g)"
