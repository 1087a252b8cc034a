"""Memory in a run: the plan's estimate at the start, what the trainer really uses at each log, and the words
when it runs out.

- `plan_estimate(plan, device)`: the planner's numbers for this plan on the device it trains on (the `started`
  event carries them): on CUDA the peak of allocated tensors per GPU (`advisor.memory.estimate`), on the CPU the
  host RAM of the node (`advisor.memory.host_estimate`, training in fp32), with what each is comparable to.
- `measured_memory()`: this process's measured memory, as `log` event fields (namespaced like TRL's metrics):
  on CUDA `memory/max_allocated_bytes` and `memory/max_reserved_bytes` (torch.cuda.max_memory_allocated /
  max_memory_reserved since the process started; per rank under DDP, `memory/max_allocated_bytes_per_rank`);
  on the CPU the process's peak resident set, `memory/peak_rss_bytes` (VmHWM in /proc/self/status).
- `cuda_oom_message`, `host_oom_message`, `oom_killed_message`: what a `failed` event says when a run runs out
  of GPU memory, of host RAM inside the process (an allocation refused: MemoryError, an address-space limit),
  or was killed by the kernel's OOM killer: the plan's estimate, what the machine has, the measured peak before
  the failure, and the planner's cheapest fix for that plan.
- `oom_kills()`: the OOM killer's kill count for this process's cgroup (cgroup v2 memory.events, v1
  memory.oom_control), so the watcher can tell an OOM kill from a kill by hand.

torch is imported inside the functions: the watcher imports this module and must start in milliseconds.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from advisor.errors import TunewiseError

GB = 1e9


def _gb(nbytes: float | int | None) -> str:
    """Bytes for a message: GB with 2 decimals, MB below 0.1 GB (the tiny models of tests and demos)."""
    if nbytes is None:
        return "unknown"
    return f"{nbytes / GB:.2f} GB" if nbytes >= 0.1 * GB else f"{nbytes / 1e6:.1f} MB"


# -- the plan's estimate -----------------------------------------------------------------------------------


def _spec_and_setup(plan):
    from advisor import memory, specs
    from trainer.models import resolve_model_path

    spec = specs.resolve_model(resolve_model_path(plan.model.name), allow_hub=False)
    return spec, memory.setup_from_plan(plan)


def _gpu_bytes_of_plan(plan) -> int | None:
    from advisor import gpus

    if plan.hardware.gpu_memory_gb:
        return int(plan.hardware.gpu_memory_gb * GB)
    if plan.hardware.gpu:
        try:
            return int(gpus.get_gpu(plan.hardware.gpu).memory_bytes)
        except TunewiseError:
            return None
    return None


def machine_ram_bytes() -> int | None:
    from advisor.gpus import this_machine

    return this_machine().ram_bytes


def plan_estimate(plan, device: str) -> dict[str, Any] | None:
    """The planner's memory numbers for `plan` on `device` (cuda or cpu), for the `started` event; None when
    the model's shape cannot be read here (a hub id this machine has no config for)."""
    try:
        return _plan_estimate(plan, device)
    except Exception:  # noqa: BLE001 - an estimate is a note on the run: a planner that cannot say never stops it
        return None


def _plan_estimate(plan, device: str) -> dict[str, Any] | None:
    from advisor import memory, specs

    try:
        spec, setup = _spec_and_setup(plan)
    except (TunewiseError, OSError, ValueError):
        return None
    checkpoint = specs.checkpoint_on_disk(_resolved(plan.model.name))
    mmap = checkpoint[1] if checkpoint else True
    host = memory.host_estimate(spec, setup, on_gpu=device == "cuda", mmap=mmap,
                                checkpoint_bytes=checkpoint[0] if checkpoint else None)
    out: dict[str, Any] = {"device": device, "host_ram_bytes": int(host.host_ram_bytes),
                           "host_components": {k: int(v) for k, v in host.components.items()}}
    if device == "cuda":
        est = memory.estimate(spec, setup)
        out.update(peak_allocated_bytes=int(est.peak_allocated_bytes), total_bytes=int(est.total_bytes),
                   peak_phase=est.peak_phase, compare="memory/max_allocated_bytes")
    else:
        est = memory.estimate_cpu(spec, setup)
        out.update(peak_allocated_bytes=int(est.peak_allocated_bytes), peak_phase=est.peak_phase,
                   compare="memory/peak_rss_bytes")
    out["estimate_bytes"] = out["peak_allocated_bytes"] if device == "cuda" else out["host_ram_bytes"]
    return out


def _resolved(name: str) -> str:
    from trainer.models import resolve_model_path

    try:
        return resolve_model_path(name)
    except TunewiseError:
        return name


# -- measured memory ---------------------------------------------------------------------------------------


def _proc_status_bytes(field: str) -> int | None:
    """A `kB` line of /proc/self/status (VmHWM, VmRSS) in bytes; None where there is no /proc."""
    try:
        text = Path("/proc/self/status").read_text(encoding="ascii")
    except OSError:
        return None
    match = re.search(rf"^{field}:\s+(\d+)\s+kB", text, re.M)
    return int(match.group(1)) * 1024 if match else None


def peak_rss_bytes() -> int | None:
    """This process's peak resident set size (VmHWM), falling back to getrusage's ru_maxrss (KiB on Linux)."""
    value = _proc_status_bytes("VmHWM")
    if value is not None:
        return value
    try:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    except (ImportError, OSError):
        return None


def measured_memory(gather: bool = True) -> dict[str, Any]:
    """This process's measured memory as `log` event fields. On CUDA under DDP (`gather`), every rank's
    values too: an all_gather every rank reaches at the same log."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        allocated = int(torch.cuda.max_memory_allocated())
        reserved = int(torch.cuda.max_memory_reserved())
        fields: dict[str, Any] = {"memory/max_allocated_bytes": allocated, "memory/max_reserved_bytes": reserved}
        per_rank = _per_rank([allocated, reserved]) if gather else None
        if per_rank is not None:
            fields["memory/max_allocated_bytes_per_rank"] = [values[0] for values in per_rank]
            fields["memory/max_reserved_bytes_per_rank"] = [values[1] for values in per_rank]
            fields["memory/max_allocated_bytes"] = max(values[0] for values in per_rank)
            fields["memory/max_reserved_bytes"] = max(values[1] for values in per_rank)
        return fields
    fields = {"memory/peak_rss_bytes": peak_rss_bytes()}
    rss = _proc_status_bytes("VmRSS")
    if rss is not None:
        fields["memory/rss_bytes"] = rss
    return {key: value for key, value in fields.items() if value is not None}


def _per_rank(values: list[int]) -> list[list[int]] | None:
    """Every rank's `values` (rank order) when torch.distributed runs more than one process, else None."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    device = f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"
    mine = torch.tensor(values, dtype=torch.int64, device=device)
    every = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    return [[int(v) for v in tensor.tolist()] for tensor in every]


# -- running out ----------------------------------------------------------------------------------------------


def is_cuda_oom(exc: BaseException) -> bool:
    """torch's own CUDA out-of-memory error (torch.OutOfMemoryError, the caching allocator's), or a CUDA
    library's "CUDA error: out of memory" (cuBLAS or NCCL failing to allocate: torch.AcceleratorError, a
    RuntimeError)."""
    try:
        import torch
    except ImportError:  # pragma: no cover - the trainer always has torch
        return False
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and "cuda" in text and "out of memory" in text


_HOST_ALLOC_FAILURES = ("can't allocate memory", "cannot allocate memory", "std::bad_alloc", "out of memory")


def is_host_oom(exc: BaseException) -> bool:
    """An allocation in host RAM refused inside the process: Python's MemoryError, or torch's CPU allocator
    ("DefaultCPUAllocator: can't allocate memory"), e.g. under an address-space limit."""
    if isinstance(exc, MemoryError):
        return True
    text = str(exc).lower()
    # A GPU's allocator says "out of memory" too (CUDA, Apple's MPS, XPU): those are not host RAM.
    on_device = is_cuda_oom(exc) or any(device in text for device in ("cuda", "mps", "xpu", "gpu"))
    return isinstance(exc, RuntimeError) and not on_device and any(words in text for words in _HOST_ALLOC_FAILURES)


_TRIED = re.compile(r"Tried to allocate ([\d.]+) (GiB|MiB|KiB|B)")


def _tried_bytes(message: str) -> int:
    match = _TRIED.search(message)
    if not match:
        return 0
    scale = {"GiB": 2**30, "MiB": 2**20, "KiB": 2**10, "B": 1}[match.group(2)]
    return int(float(match.group(1)) * scale)


def _cuda_total_bytes() -> int | None:
    import torch

    try:
        if torch.cuda.is_available():
            return int(torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)
    except (RuntimeError, AssertionError):
        pass
    return None


def cuda_oom_message(plan, estimate: dict | None, exc: BaseException, step: int) -> tuple[str, dict]:
    """The `failed` event's message for a CUDA out-of-memory error, and its fields: what the plan estimated,
    what the GPU has, the measured peak before the failure, and the planner's cheapest fix for this plan."""
    from advisor import memory

    gpu_bytes = _cuda_total_bytes() or _gpu_bytes_of_plan(plan)
    measured = _measured_gpu_peak()
    tried = _tried_bytes(str(exc))
    fields: dict[str, Any] = {"oom": "cuda", "gpu_bytes": gpu_bytes, "measured_peak_bytes": measured,
                              "tried_to_allocate_bytes": tried or None}
    fix = None
    estimated_total = None
    try:
        spec, setup = _spec_and_setup(plan)
        est = memory.estimate(spec, setup)
        estimated_total = est.total_bytes
        fields.update(estimate_bytes=int(est.peak_allocated_bytes), estimate_total_bytes=int(est.total_bytes))
        if gpu_bytes:
            budget = gpu_bytes
            if memory.gpu_fit(spec, setup, gpu_bytes).fits:
                # The estimate said it fits, yet the run's tensors filled what the allocator could hand out and
                # asked for more: the cheapest change whose peak is smaller by that ratio (the context is fixed).
                context, slack = memory.CUDA_CONTEXT_BYTES, memory.ALLOCATOR_SLACK
                needed = max(0, gpu_bytes - context) / slack + tried
                ratio = max(1.0, needed / max(1, est.peak_allocated_bytes))
                budget = int(est.peak_allocated_bytes / ratio * slack + context)
            fit = memory.gpu_fit(spec, setup, max(1, budget))
            fix = fit.cheapest_fix
            if fix and budget != gpu_bytes:
                after = memory.estimate(spec, fit.fixed_setup)
                fix = (f"{fix.split(': needs ')[0]} (its estimate: {_gb(after.peak_allocated_bytes)} of tensors instead "
                       f"of {_gb(est.peak_allocated_bytes)}, smaller by what this run really lacked)")
    except (TunewiseError, OSError, ValueError):
        pass
    fields["cheapest_fix"] = fix
    estimated = fields.get("estimate_bytes") or (estimate or {}).get("peak_allocated_bytes")
    message = (
        f"CUDA out of memory at step {step}: the plan estimated {_gb(estimated)} of tensors at the peak"
        + (f" ({_gb(estimated_total)} with the CUDA context and allocator slack)" if estimated_total else "")
        + f"; the GPU has {_gb(gpu_bytes)}; the measured peak before the failure was "
        + (f"{_gb(measured)} allocated" if measured is not None else "unknown (no CUDA device to measure here)")
        + (f", and it tried to allocate {_gb(tried)} more" if tried else "")
        + ". " + (f"Cheapest fix for this plan: {fix.rstrip('.')}." if fix else
                  "No change the planner tries makes it fit: use a larger GPU, more GPUs with --shard zero3, or a "
                  "smaller model.")
        + f" (torch: {str(exc).splitlines()[0][:200]})"
    )
    return message, fields


def _measured_gpu_peak() -> int | None:
    import torch

    try:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            return int(torch.cuda.max_memory_allocated())
    except RuntimeError:
        pass
    return None


def host_oom_message(plan, estimate: dict | None, exc: BaseException, step: int) -> tuple[str, dict]:
    """The `failed` event's message when host RAM ran out inside the process (an allocation was refused)."""
    peak = peak_rss_bytes()
    ram = machine_ram_bytes()
    limit = _address_space_limit()
    host, fix = _host_numbers(plan, estimate, ram, peak)
    fields = {"oom": "host", "host_estimate_bytes": host, "host_ram_bytes": ram, "measured_peak_bytes": peak,
              "address_space_limit_bytes": limit, "cheapest_fix": fix}
    message = (
        f"out of host memory (RAM) at step {step}: an allocation was refused ({type(exc).__name__}: "
        f"{str(exc).splitlines()[0][:160] if str(exc) else 'no details'}). The plan's host RAM estimate is "
        f"{_gb(host)}; this machine has {_gb(ram)}"
        + (f" and this process may map at most {_gb(limit)} (an address-space limit, ulimit -v)" if limit else "")
        + f"; the process's peak resident memory before the failure was {_gb(peak)}. " + _host_advice(fix)
    )
    return message, fields


def oom_killed_message(estimate: dict | None, last_measured: int | None, ram: int | None, certain: bool) -> str:
    """What the watcher says when the trainer was killed by SIGKILL: the kernel's OOM killer (certain when the
    cgroup's OOM-kill count rose during the run), with the host estimate."""
    host = (estimate or {}).get("host_ram_bytes")
    cause = ("the kernel's OOM killer ended the training process (signal 9, SIGKILL): this machine ran out of host "
             "memory (RAM)"
             if certain else
             "the training process was killed by signal 9 (SIGKILL): the kernel's OOM killer does this when host "
             "memory (RAM) runs out (or it was killed by hand)")
    return (f"{cause}. The plan's host RAM estimate is {_gb(host)}; this machine has {_gb(ram)}; the last measured "
            f"peak resident memory was {_gb(last_measured)}. `tunewise plan --host-ram-gb` shows the cheapest fix; "
            "fewer processes, a memory-mapped (safetensors) checkpoint, no CPU offload or a smaller micro-batch "
            "need less")


def _host_numbers(plan, estimate: dict | None, ram: int | None, peak: int | None) -> tuple[int | None, str | None]:
    """The host estimate and the planner's cheapest fix: against the machine's RAM, or, when the estimate fits
    it (something else held the memory: another process, a memory limit), against what the process got."""
    from advisor import memory, specs

    host = (estimate or {}).get("host_ram_bytes")
    fix = None
    try:
        spec, setup = _spec_and_setup(plan)
        on_gpu = (estimate or {}).get("device") == "cuda"
        checkpoint = specs.checkpoint_on_disk(_resolved(plan.model.name))
        mmap = checkpoint[1] if checkpoint else True
        size = checkpoint[0] if checkpoint else None
        host = host or memory.host_estimate(spec, setup, on_gpu, mmap, size).host_ram_bytes
        if ram:
            fit = memory.host_fit(spec, setup, ram, on_gpu, mmap, size)
            fix = fit.cheapest_fix
            if fit.fits and peak:
                # The estimate said it fits this machine, so something else held the memory (another process, a
                # limit): the cheapest change that needs less than both the estimate and what the process got.
                fix = memory.host_fit(spec, setup, max(1, min(peak, host) - 1), on_gpu, mmap, size).cheapest_fix
    except (TunewiseError, OSError, ValueError):
        pass
    return host, fix


def _address_space_limit() -> int | None:
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    except (ImportError, OSError, ValueError):
        return None
    return None if soft == resource.RLIM_INFINITY else int(soft)


def _host_advice(fix: str | None) -> str:
    if fix:
        return f"Cheapest fix for this plan: {fix}"
    return ("Fewer processes per node, a memory-mapped (safetensors) checkpoint, no CPU offload or a smaller "
            "micro-batch need less; `tunewise plan --host-ram-gb` checks a plan against a machine's RAM.")


# -- the OOM killer's count ---------------------------------------------------------------------------------


def oom_kills(pid: int | str = "self") -> int | None:
    """How many processes the kernel's OOM killer has killed in `pid`'s memory cgroup (None when unknown):
    cgroup v2's memory.events `oom_kill`, or v1's memory.oom_control `oom_kill`."""
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text(encoding="ascii").splitlines()
    except OSError:
        return None
    root = Path("/sys/fs/cgroup")
    candidates = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":
            candidates.append(root / path.lstrip("/") / "memory.events")
        elif "memory" in controllers.split(","):
            candidates.append(root / "memory" / path.lstrip("/") / "memory.oom_control")
    for candidate in candidates:
        try:
            text = candidate.read_text(encoding="ascii")
        except OSError:
            continue
        match = re.search(r"^oom_kill\s+(\d+)", text, re.M)
        if match:
            return int(match.group(1))
    return None
