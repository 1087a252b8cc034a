"""The `accelerate launch` config file for a multi-process run, generated from plan.hardware.

- shard none: DDP, a full copy of the model per process (MULTI_GPU; on a
  machine without a GPU the same launcher runs the processes on the CPU with
  the gloo backend).
- shard zero2: FSDP SHARD_GRAD_OP (gradients and optimizer state sharded,
  like DeepSpeed ZeRO-2).
- shard zero3: FSDP FULL_SHARD (parameters too, like ZeRO-3).
- cpu_offload: FSDP parameter (and optimizer) offload to CPU memory.

A cluster job (trainer.jobs) starts from this config and sets the machine count,
the total process count and the main node's address and port.

FSDP rather than DeepSpeed because it ships with torch and accelerate (no
extra package or compiler); the planner's zero2 / zero3 memory model is the
same for both.

Stdlib and PyYAML only (the supervisor calls it before any training process starts).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from advisor.plan import Plan

_SHARDING = {"zero2": "SHARD_GRAD_OP", "zero3": "FULL_SHARD"}


def gpu_present() -> bool:
    """Whether this machine has an NVIDIA GPU (without importing torch)."""
    return Path("/dev/nvidiactl").exists() or shutil.which("nvidia-smi") is not None


def accelerate_config(plan: Plan, on_cpu: bool | None = None) -> dict:
    """The config as a dict (what `accelerate config` would write) for plan.hardware.

    `on_cpu` None: decided by plan.hardware.device and whether this machine has a GPU (a local run);
    a cluster job decides it from the plan alone, since it runs on other machines (trainer.jobs)."""
    hardware = plan.hardware
    if on_cpu is None:
        on_cpu = hardware.device == "cpu" or (hardware.device == "auto" and not gpu_present())
    config: dict = {
        "compute_environment": "LOCAL_MACHINE",
        "num_processes": hardware.num_gpus,
        "num_machines": 1,
        "machine_rank": 0,
        "mixed_precision": "no",  # the Trainer sets it from the plan's precision
        "dynamo_config": {},
        "rdzv_backend": "static",
        "same_network": True,
        "main_training_function": "main",
        "use_cpu": False,
        "gpu_ids": "all",
        "debug": False,
    }
    if hardware.shard == "none" or on_cpu:
        # torchrun + gloo on the CPU; NCCL DDP on GPUs. (FSDP needs GPUs.)
        config["distributed_type"] = "MULTI_GPU"
        return config
    config["distributed_type"] = "FSDP"
    config["fsdp_config"] = {
        "fsdp_version": 1,
        "fsdp_sharding_strategy": _SHARDING[hardware.shard],
        "fsdp_offload_params": bool(hardware.cpu_offload),
        "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "fsdp_backward_prefetch": "BACKWARD_PRE",
        "fsdp_forward_prefetch": False,
        "fsdp_state_dict_type": "SHARDED_STATE_DICT",
        "fsdp_cpu_ram_efficient_loading": True,
        "fsdp_sync_module_states": True,
        # PEFT freezes most parameters: FSDP must keep the original parameters to mix
        # frozen and trainable ones in one flat shard.
        "fsdp_use_orig_params": True,
        "fsdp_activation_checkpointing": False,
    }
    return config


def write_accelerate_config(plan: Plan, path: str | Path) -> Path:
    """Write the config for `plan` as YAML to `path` and return the path."""
    import yaml

    path = Path(path)
    path.write_text(yaml.safe_dump(accelerate_config(plan), sort_keys=False), encoding="utf-8")
    return path
