"""The GPUs the planner sizes plans for, with their memory in bytes.

Memory is what `nvidia-smi` reports as the card's total (MiB x 2^20), which is
a little less than the marketing figure for some cards. "any" other card is
described by its memory in GB with `custom_gpu`.

Pure Python.
"""

from __future__ import annotations

from dataclasses import dataclass

from advisor.errors import TunewiseError

MIB = 2**20
GB = 10**9


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
    bf16_tflops: float | None = None
    """Dense 16-bit tensor-core TFLOPS from the datasheet (bf16; fp16 for the T4), for rough time estimates."""

    @property
    def memory_gb(self) -> float:
        return self.memory_bytes / GB


#: The common training GPUs, smallest first (totals as nvidia-smi reports them, in MiB).
#: TFLOPS: NVIDIA's datasheets, dense (without structured sparsity), 16-bit inputs with fp32 accumulation.
GPUS: tuple[GPU, ...] = (
    GPU("T4", 15360 * MIB, bf16=False, aliases=("t4-16gb", "tesla-t4"), bf16_tflops=65),
    GPU("L4", 23034 * MIB, aliases=("l4-24gb",), bf16_tflops=121),
    GPU("A10G", 23028 * MIB, aliases=("a10g-24gb", "a10"), bf16_tflops=70),
    GPU("RTX-3090", 24576 * MIB, aliases=("3090", "rtx3090", "rtx 3090"), bf16_tflops=71),
    GPU("RTX-4090", 24564 * MIB, aliases=("4090", "rtx4090", "rtx 4090"), bf16_tflops=165),
    GPU("A100-40GB", 40960 * MIB, aliases=("a100-40", "a100 40gb"), bf16_tflops=312),
    GPU("L40S", 46068 * MIB, aliases=("l40s-48gb",), bf16_tflops=362),
    GPU("A100-80GB", 81920 * MIB, aliases=("a100", "a100-80", "a100 80gb"), bf16_tflops=312),
    GPU("H100-80GB", 81559 * MIB, aliases=("h100", "h100-80", "h100 80gb"), bf16_tflops=989),
    GPU("H200", 143771 * MIB, aliases=("h200-141gb",), bf16_tflops=989),
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
    return GPU(name or f"{memory_gb:g} GB GPU", int(memory_gb * GB))
