"""Plans over several machines: memory per GPU for each sharding strategy over nodes x GPUs,
host memory per node, and the traffic between nodes per step, with a warning when the network
between them cannot keep up with the GPUs.

`cluster_estimate(spec, setup, interconnect_gbps, gpu)` takes a `TrainingSetup` whose
`num_nodes` x `num_gpus` is the layout and returns a `ClusterEstimate`:

- memory per GPU for DDP, ZeRO-2 and ZeRO-3 / FSDP over the world size (from
  `advisor.memory.estimate`, which shards over every GPU of every node);
- host RAM per node: each training process's own footprint, plus the larger of the
  weights being loaded and what CPU offload keeps there;
- bytes in and out of each node per optimizer step, per strategy, and the seconds that
  takes at the interconnect's speed, against the seconds of compute it can hide behind.

Traffic, from the ZeRO paper's communication analysis (Rajbhandari et al., "ZeRO: Memory
Optimizations Toward Training Trillion Parameter Models", SC 2020, arXiv:1910.02054,
section 7): data parallelism all-reduces the gradients, 2 x Psi elements per GPU per step
(a reduce-scatter and an all-gather); ZeRO-2 also moves 2 x Psi (reduce-scatter the
gradients, all-gather the updated parameters); ZeRO-3 moves 3 x Psi, because the
parameters are all-gathered twice (in the forward pass and again in the backward pass,
having been freed in between) and the gradients reduce-scattered once. In bytes that is
3 x the 16-bit parameter bytes per step per GPU (6 bytes per parameter). Tunewise runs
ZeRO-2 and ZeRO-3 as FSDP (trainer.accelerate_config), which gathers at every micro-batch,
so with gradient accumulation the gathers repeat per micro-batch; with LoRA the frozen base
is still gathered while only the adapters' gradients are reduced.

NCCL runs these collectives as rings over all N x G GPUs: every link of the ring, including
the one into and out of each node, carries (W - 1) / W of the volume, W = N x G. So the bytes
each node sends (and receives) over the network per step is about the volume above times
(W - 1) / W, whatever G is (inside a node the rest moves over NVLink / PCIe).

Pure Python (no torch), like the rest of the advisor.
"""

from __future__ import annotations

from dataclasses import dataclass

from advisor.memory import GB, TrainingSetup, estimate
from advisor.specs import ModelSpec, param_counts

#: Network speed between nodes assumed when none is given, in Gbit/s per node: the Ethernet most
#: cloud instances get between them without InfiniBand or EFA (100 Gb/s class). An 8-GPU InfiniBand
#: node has 8 x 400 = 3200 Gb/s; say so with `--interconnect-gbps`.
DEFAULT_INTERCONNECT_GBPS = 100.0

#: Share of the GPU's peak throughput training reaches (model FLOPs utilisation): a little below the
#: 46.2% the PaLM paper reports for its 540B run (Chowdhery et al. 2022, table 3), what well-tuned
#: FSDP / ZeRO fine-tuning gets; it sets how long a step computes, and so how much communication hides.
MFU = 0.40

#: Host memory one training process takes before it loads a model: Python with torch, transformers
#: and TRL imported, the CUDA libraries and the host side of its CUDA context, the tokenizer and the
#: data loader (1.5-3 GB of resident memory for a CUDA PyTorch trainer; 2 GB is the middle).
PROCESS_HOST_BYTES = 2 * GB

#: Strategy -> what it is called in reports (FSDP's FULL_SHARD is ZeRO-3; SHARD_GRAD_OP is ZeRO-2).
STRATEGIES = {"none": "DDP", "zero2": "ZeRO-2 (FSDP SHARD_GRAD_OP)", "zero3": "ZeRO-3 / FSDP FULL_SHARD"}


@dataclass(frozen=True)
class NetworkTraffic:
    """What one strategy sends between nodes per optimizer step."""

    shard: str
    """none (DDP), zero2 or zero3."""
    bytes_per_step: int
    """Bytes each node sends (and receives) over the network per optimizer step (0 on one node)."""
    explanation: str
    """How the bytes were counted."""
    seconds_per_step: float
    """bytes_per_step at the interconnect's speed."""
    compute_seconds_per_step: float | None
    """Seconds of compute per optimizer step the transfers can overlap with (None: the GPU's
    throughput is not known)."""
    needed_gbps: float | None
    """The interconnect (Gbit/s per node) at which the transfers take as long as the compute."""


@dataclass(frozen=True)
class ClusterEstimate:
    """A plan laid out over nodes x GPUs."""

    nodes: int
    gpus_per_node: int
    world_size: int
    """nodes x gpus_per_node."""
    shard: str
    """The plan's own strategy."""
    per_gpu_bytes: dict[str, int]
    """Strategy (none / zero2 / zero3) -> what each GPU must hold (the estimate's total)."""
    host_bytes_per_node: int
    """Host RAM each node needs for its processes (with the plan's own strategy)."""
    host_explanation: str
    """How the host memory was counted."""
    traffic: dict[str, NetworkTraffic]
    """Strategy -> network traffic per step."""
    interconnect_gbps: float
    """The network speed between nodes the seconds are computed at (Gbit/s per node)."""
    warnings: tuple[str, ...]
    """Plain-language warnings (a slow interconnect)."""


def _strategy_setup(setup: TrainingSetup, shard: str) -> TrainingSetup:
    """`setup` with another strategy (CPU offload needs sharding, so DDP drops it)."""
    return setup.with_(shard=shard, cpu_offload=setup.cpu_offload and shard != "none")


def host_memory(spec: ModelSpec, setup: TrainingSetup, on_cpu: bool = False) -> tuple[int, str]:
    """(bytes, how) of host RAM one node needs for its `setup.num_gpus` training processes."""
    per_node = setup.num_gpus
    head = "seq_cls" if setup.stage == "rm" else "causal_lm"
    params = param_counts(spec, head=head).total
    weight_bytes = 4 if setup.precision == "fp32" else 2
    # Loading: from_pretrained materialises the weights in host memory before they move to the device
    # (QLoRA too: bitsandbytes quantizes each weight as it moves). Under FSDP (zero2 / zero3) accelerate's
    # cpu_ram_efficient_loading loads on the node's local rank 0 only; the others start on the meta device.
    copies = 1 if setup.shard in ("zero2", "zero3") else per_node
    loading = copies * weight_bytes * params
    parts = [f"{per_node} process{'es' if per_node > 1 else ''} x {PROCESS_HOST_BYTES / GB:.0f} GB (Python, torch, "
             "CUDA libraries, data)"]
    loading_how = (f"{copies} cop{'ies' if copies > 1 else 'y'} of the {weight_bytes * 8}-bit weights while loading "
                   f"({params:,} params x {weight_bytes} B{'; FSDP loads on one process per node' if copies == 1 else ''})")
    offload = 0
    if setup.cpu_offload and setup.shard != "none":
        on_gpu = estimate(spec, setup.with_(cpu_offload=False))
        moved = on_gpu.components["optimizer"] + (on_gpu.components["weights"] if setup.shard == "zero3" else 0)
        offload = per_node * moved
    resident = 0
    if on_cpu:
        # No GPU: each process's training memory is host memory.
        resident = per_node * estimate(spec, setup).peak_allocated_bytes
        parts.append(f"{per_node} x {resident / per_node / GB:.2f} GB of training memory (no GPU: it lives in RAM)")
    if offload > loading:
        parts.append(f"the offloaded optimizer state{' and weights' if setup.shard == 'zero3' else ''} of "
                     f"{per_node} GPU{'s' if per_node > 1 else ''} ({offload / GB:.2f} GB; more than the "
                     f"{loading / GB:.2f} GB of loading)")
    else:
        parts.append(loading_how + (f" (more than the {offload / GB:.2f} GB offloaded)" if offload else ""))
    total = per_node * PROCESS_HOST_BYTES + resident + max(loading, offload)
    return int(total), " + ".join(parts)


def _compute_seconds(spec: ModelSpec, setup: TrainingSetup, dense_tflops: float | None) -> float | None:
    """Seconds one GPU computes per optimizer step: k x params x tokens FLOPs at MFU of its peak.

    k = 6 for full fine-tuning (2 forward + 4 backward per parameter per token; Kaplan et al. 2020),
    4 with adapters (the frozen base needs no weight gradients, only the input gradients), + 2 when
    gradient checkpointing recomputes the forward pass. Attention's own FLOPs are left out (small at
    these lengths). Reward models and DPO run chosen and rejected together (2 x the tokens)."""
    if not dense_tflops:
        return None
    k = (6 if setup.method == "full" else 4) + (2 if setup.gradient_checkpointing else 0)
    pairs = 2 if setup.stage in ("rm", "dpo") else 1
    tokens = setup.micro_batch * setup.seq_len * setup.grad_accum * pairs
    params = param_counts(spec).total
    return k * params * tokens / (dense_tflops * 1e12 * MFU)


def network_traffic(spec: ModelSpec, setup: TrainingSetup, interconnect_gbps: float = DEFAULT_INTERCONNECT_GBPS,
                    dense_tflops: float | None = None) -> NetworkTraffic:
    """Bytes in and out of each node per optimizer step for `setup.shard` (see the module docstring)."""
    nodes, world = setup.num_nodes, setup.world_size
    compute = _compute_seconds(spec, setup, dense_tflops)
    if nodes <= 1:
        return NetworkTraffic(setup.shard, 0, "one node: the collectives stay on NVLink / PCIe inside it", 0.0,
                              compute, None)
    single = estimate(spec, _strategy_setup(setup, "none").with_(num_gpus=1, num_nodes=1))
    params, trainable = single.params_total, single.trainable_params
    ring = (world - 1) / world
    wire = 4 if setup.precision == "fp32" else 2  # FSDP / ZeRO communicate in the 16-bit compute dtype
    accum = setup.grad_accum
    if setup.shard == "zero3":
        # Per micro-batch: all-gather every parameter for the forward pass and again for the backward
        # pass (FSDP frees them in between), then reduce-scatter the trainable gradients: for full
        # fine-tuning 3 x the 16-bit parameter bytes, the ZeRO paper's 3 Psi.
        volume = accum * (2 * wire * params + wire * trainable)
        how = (f"ZeRO-3: all-gather the {params:,} params in forward and again in backward (2 x {wire} B each) + "
               f"reduce-scatter {trainable:,} trainable gradients ({wire} B each)")
    elif setup.shard == "zero2":
        # FSDP SHARD_GRAD_OP: parameters gathered once per micro-batch (kept through backward), gradients
        # reduce-scattered: for full fine-tuning 2 Psi, as the ZeRO paper counts ZeRO-2.
        volume = accum * (wire * params + wire * trainable)
        how = (f"ZeRO-2 (FSDP SHARD_GRAD_OP): all-gather the {params:,} params once ({wire} B each) + reduce-scatter "
               f"{trainable:,} trainable gradients ({wire} B each)")
    else:
        # DDP all-reduces the gradients once per optimizer step (accumulation skips the sync), in their
        # own dtype: a reduce-scatter plus an all-gather, 2 Psi.
        grad_bytes = max(1, round(single.components["gradients"] / max(1, trainable)))
        volume = 2 * grad_bytes * trainable
        accum = 1
        how = f"DDP: all-reduce {trainable:,} trainable gradients ({grad_bytes} B each), 2 x their bytes"
    per_node = int(volume * ring)
    how += (f"{f' x {accum} micro-batches' if accum > 1 else ''} x (W - 1) / W = {world - 1}/{world} "
            f"(NCCL ring over {world} GPUs) = {per_node / GB:.2f} GB into and out of each node per step")
    seconds = per_node * 8 / (interconnect_gbps * 1e9)
    needed = per_node * 8 / compute / 1e9 if compute else None
    return NetworkTraffic(setup.shard, per_node, how, seconds, compute, needed)


def cluster_estimate(spec: ModelSpec, setup: TrainingSetup, interconnect_gbps: float | None = None,
                     dense_tflops: float | None = None, on_cpu: bool = False) -> ClusterEstimate:
    """`setup` (num_nodes x num_gpus) over a cluster: memory per GPU by strategy, host RAM per node,
    traffic between nodes, and a warning when the interconnect is the bottleneck."""
    gbps = DEFAULT_INTERCONNECT_GBPS if interconnect_gbps is None else float(interconnect_gbps)
    if not gbps > 0:
        from advisor.errors import TunewiseError

        raise TunewiseError(f"interconnect_gbps: must be a positive number of Gbit/s, got {interconnect_gbps!r}",
                            field="interconnect_gbps")
    per_gpu, traffic = {}, {}
    for shard in STRATEGIES:
        variant = _strategy_setup(setup, shard)
        per_gpu[shard] = estimate(spec, variant).total_bytes
        traffic[shard] = network_traffic(spec, variant, gbps, dense_tflops)
    host, host_how = host_memory(spec, setup, on_cpu)
    warnings = []
    own = traffic[setup.shard]
    if own.bytes_per_step and own.compute_seconds_per_step is not None and own.seconds_per_step > own.compute_seconds_per_step:
        waiting = 1 - own.compute_seconds_per_step / own.seconds_per_step
        warnings.append(
            f"slow interconnect: {STRATEGIES[setup.shard]} moves {own.bytes_per_step / GB:.1f} GB into and out of each "
            f"node per step, {own.seconds_per_step:.2f} s at {gbps:g} Gb/s, against about "
            f"{own.compute_seconds_per_step:.2f} s of compute to hide it behind: the GPUs would wait on the network "
            f"about {waiting:.0%} of the time. Hiding it takes about {own.needed_gbps:,.0f} Gb/s per node (an 8-GPU "
            "InfiniBand node has 8 x 400 = 3,200), or more tokens per step (micro-batch, sequence length, "
            "accumulation), fewer nodes, or LoRA / QLoRA on fewer GPUs")
    return ClusterEstimate(setup.num_nodes, setup.num_gpus, setup.world_size, setup.shard, per_gpu, host, host_how,
                           traffic, gbps, tuple(warnings))
