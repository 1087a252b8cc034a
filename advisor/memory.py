"""GPU memory estimator: bytes per component for a training setup, and whether it fits a GPU.

The model is the training stack Tunewise runs (transformers + PEFT + TRL +
bitsandbytes on PyTorch), written as arithmetic on the model's shape:

- weights: 4 B/param in fp32, 2 in 16 bit; QLoRA stores the block's linear
  weights in NF4 (4.5 bits with one fp32 absmax per 64 weights, 4.127 with
  double quantization) or int8, while embeddings, lm_head, norms and biases
  stay unquantized, and PEFT's `prepare_model_for_kbit_training` upcasts them
  to fp32;
- adapters: LoRA's rank x (in + out) per adapted module, kept in fp32 by PEFT;
  DoRA (PEFT's use_dora) adds a trainable magnitude vector (out) per adapted
  module, keeps the base output and the LoRA output of each adapted module for
  the magnitude's gradient (2 x out per token), and recomputes the weight norm
  of W + s x BA every forward: an identity (in x in, adapter dtype), BA and
  W + s x BA (out x in) of the largest adapted layer live at once;
- gradients: one per trainable parameter, in the trainable parameter's dtype;
- optimizer: AdamW 2 states in the parameter's dtype (mixed precision: fp32
  master weights count as the weights, so 4 + 4 + 8 = 16 B/param, the ZeRO
  paper's figure; pure bf16: 2 + 2 + 4 = 8); bitsandbytes 8-bit AdamW keeps
  2 B/param for tensors of at least 4096 elements (smaller ones stay 32 bit);
  Adafactor factored second moments; SGD (no momentum) none;
- activations: what autograd saves, layer by layer, counted tensor by tensor
  for each architecture (norm inputs, the inputs a trainable or LoRA-adapted
  linear needs, attention q/k/v/output for SDPA, the MLP's activation inputs;
  Korthikanti et al. 2022 give the same count for a GPT block:
  s*b*h*(34 + 5*a*s/h)); a frozen linear needs no saved input; eager attention
  adds the a*s^2 score matrices; gradient checkpointing keeps each layer's input
  plus one layer's activations while it is recomputed;
- logits: the lm_head output and the cross-entropy around it (bytes x batch x
  seq x vocab);
- stages: reward models have a 1-output score head (no vocab logits) and
  forward chosen and rejected together; DPO adds a frozen reference copy for
  full fine-tuning (LoRA disables its adapter instead); PPO adds reference,
  reward and value models and the generation KV cache;
- several GPUs: DDP keeps a full copy per GPU (plus gradient buckets), ZeRO-2
  shards gradients and optimizer state, ZeRO-3 / FSDP shards the weights too,
  CPU offload moves optimizer state (and with ZeRO-3 the weights) off the GPU;
  over several nodes the shards are split over every GPU of every node
  (nodes x GPUs per node); host memory and network traffic per node are in
  `advisor.cluster`.

`peak_allocated_bytes` is comparable to `torch.cuda.max_memory_allocated()`;
`total_bytes` adds the CUDA context and the caching allocator's slack (what
the card must hold). All figures are per GPU. Calibration against published
measurements: `bench/estimator_accuracy.py`.

Pure Python and fast (a few microseconds per estimate): no torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from functools import lru_cache

from advisor.errors import TunewiseError
from advisor.plan import (ATTENTIONS, FIELD_LIMITS, MAX_GRAD_ACCUM, MAX_MICRO_BATCH, MAX_SEQ_LEN, METHODS, OPTIMIZERS,
                          PRECISIONS, ROPE_SCALINGS, SHARDINGS, STAGES, PlanError, settings)
from advisor.specs import (ModelSpec, context_window, linear_layers, norms_per_layer, param_counts, quantized_parameter_names,
                           resolve_targets)

GB = 10**9
GIB = 2**30
RUNTIMES = ("transformers", "litgpt", "torchtune")

#: CUDA context + cuBLAS workspace, outside the PyTorch allocator (~0.3-0.5 GB in practice).
CUDA_CONTEXT_BYTES = 400 * 10**6
#: The caching allocator reserves more than it hands out (fragmentation): reserved ~ allocated x this.
ALLOCATOR_SLACK = 1.08
#: bitsandbytes' 8-bit optimizers keep 32-bit state for tensors smaller than this.
BNB_MIN_8BIT_SIZE = 4096
#: bitsandbytes 8-bit optimizer block size (one fp32 absmax per block per state).
BNB_OPTIM_BLOCK = 256
#: NF4 block size (one absmax per 64 weights) and the double-quantization block of those absmaxes.
NF4_BLOCK = 64
NF4_DQ_BLOCK = 256
#: TRL 1.12's SFTTrainer computes its default loss (loss_type="chunked_nll") over this many tokens at a time
#: (trl/trainer/sft_trainer.py, _CHUNKED_LM_HEAD_CHUNK_SIZE).
TRL_CE_CHUNK = 256


def nf4_bits_per_weight(double_quant: bool) -> float:
    """Storage bits per NF4 weight: 4 + the absmax constants (QLoRA paper: 4.5 -> 4.127 with DQ)."""
    if double_quant:
        # 8-bit absmax per 64 weights, plus one fp32 second-level constant per 256 absmaxes.
        return 4 + 8 / NF4_BLOCK + 32 / (NF4_BLOCK * NF4_DQ_BLOCK)
    return 4 + 32 / NF4_BLOCK


@dataclass(frozen=True)
class TrainingSetup:
    """The memory-relevant settings of one training run (per GPU)."""

    method: str = "lora"
    """full, lora or qlora."""
    precision: str = "bf16"
    """bf16 / fp16 (pure 16-bit weights and optimizer state), fp32, or amp (fp32 master weights, 16-bit compute)."""
    optimizer: str = "adamw"
    """adamw, adamw_8bit, paged_adamw_8bit, sgd (no momentum) or adafactor."""
    micro_batch: int = 1
    """Sequences per GPU per forward pass."""
    seq_len: int = 512
    """Tokens per sequence (the longest in the batch: shorter ones are padded to it)."""
    gradient_checkpointing: bool = False
    """Recompute each layer's activations in the backward pass."""
    attn: str = "sdpa"
    """eager (materializes the attention scores) or sdpa (fused, no s^2 memory)."""
    lora_rank: int = 16
    """LoRA rank r."""
    lora_targets: tuple[str, ...] = ("recommended",)
    """Module names, "all-linear", or the guide's set names minimum / recommended / maximum."""
    lora_dropout: float = 0.05
    """LoRA dropout; above 0 each adapted module keeps its own dropped-out input copy."""
    quant_bits: int = 4
    """QLoRA base: 4 (NF4) or 8 (LLM.int8)."""
    double_quant: bool = True
    """QLoRA: quantize the NF4 constants too (4.127 instead of 4.5 bits per weight)."""
    upcast_non_quantized: bool = True
    """QLoRA: prepare_model_for_kbit_training upcasts embeddings, lm_head and norms to fp32 (PEFT does; litgpt does not)."""
    adapter_fp32: bool = True
    """LoRA adapter weights in fp32 (PEFT's default autocast_adapter_dtype) rather than the base dtype."""
    use_dora: bool = False
    """DoRA adapters (PEFT's use_dora): a magnitude vector per adapted module and a per-forward weight norm.
    Ignored for full fine-tuning (no adapters)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step; above 1 the gradients live alongside the activations."""
    stage: str = "sft"
    """sft, rm (reward model), dpo or ppo."""
    generation_len: int = 64
    """PPO: tokens generated per rollout (added to seq_len for the policy's forward)."""
    num_gpus: int = 1
    """GPUs training together (data parallel); with num_nodes above 1, the GPUs of each node."""
    num_nodes: int = 1
    """Machines training together: num_nodes x num_gpus GPUs share the sharded state."""
    shard: str = "none"
    """none (DDP), zero2 (shard gradients + optimizer), zero3 (also the weights; FSDP full shard)."""
    cpu_offload: bool = False
    """Move optimizer state (and with zero3 the weights) to CPU memory."""
    runtime: str = "transformers"
    """Whose layer code autograd runs: transformers (Tunewise's trainer) or litgpt / torchtune, whose
    fused kernels keep fewer tensors (used to compare with their published measurements)."""
    chunked_loss: bool = False
    """The loss is TRL's chunked_nll (SFTTrainer's default in TRL 1.12, what Tunewise's SFT stage runs): lm_head
    and cross-entropy in chunks of 256 tokens, never the full logits. False: the model's own cross-entropy over
    the full logits (transformers' ForCausalLMLoss, a plain Trainer, TRL's preference trainers)."""
    use_liger_kernel: bool = False
    """Liger's kernels (TRL's use_liger_kernel): fused linear cross-entropy (logits a chunk at a time), fused
    RMSNorm and SwiGLU (fewer saved tensors)."""
    rope_scaling: str = "none"
    """RoPE scaling (none, linear, dynamic, yarn): stretches the window a sequence may fill (no memory of its own)."""
    rope_factor: float | None = None
    """RoPE scaling factor; None: seq_len / the model's window, rounded up."""

    def __post_init__(self):
        def choice(field_name, value, allowed):
            if value not in allowed:
                raise PlanError(field_name, f"{value!r} is not one of {', '.join(map(str, allowed))}")

        def whole(field_name, value, low=1, high=None):
            # The plan's maxima (advisor.plan.FIELD_LIMITS) hold here too, so a setup built without a Plan
            # cannot send the searches below huge numbers either.
            high = FIELD_LIMITS[field_name].high if high is None else high
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                raise PlanError(field_name, f"must be a whole number from {low} to {high:,}, got {value!r}")

        choice("method.method", self.method, METHODS)
        choice("method.precision", self.precision, PRECISIONS)
        choice("method.optimizer", self.optimizer, OPTIMIZERS)
        choice("method.attn", self.attn, ATTENTIONS)
        choice("stage", self.stage, STAGES)
        choice("hardware.shard", self.shard, SHARDINGS)
        choice("runtime", self.runtime, RUNTIMES)
        choice("training.rope_scaling", self.rope_scaling, ROPE_SCALINGS)
        if self.rope_factor is not None and (isinstance(self.rope_factor, bool)
                                             or not isinstance(self.rope_factor, (int, float))
                                             or not 1 <= self.rope_factor <= FIELD_LIMITS["training.rope_factor"].high):
            raise PlanError("training.rope_factor", f"must be a number from 1 to "
                            f"{FIELD_LIMITS['training.rope_factor'].high:g}, got {self.rope_factor!r}")
        whole("training.micro_batch", self.micro_batch)
        whole("training.seq_len", self.seq_len)
        # The cheapest fix trades micro-batch for accumulation, so a setup may carry up to their product.
        whole("training.grad_accum", self.grad_accum, high=MAX_GRAD_ACCUM * MAX_MICRO_BATCH)
        whole("method.lora_rank", self.lora_rank)
        whole("hardware.num_gpus", self.num_gpus)
        whole("hardware.num_nodes", self.num_nodes)
        whole("preference.max_new_tokens", self.generation_len, 0)
        if self.quant_bits not in (4, 8):
            raise PlanError("method.quant_bits", f"must be 4 or 8, got {self.quant_bits!r}")
        if not isinstance(self.lora_dropout, (int, float)) or not 0 <= self.lora_dropout < 1:
            raise PlanError("method.lora_dropout", f"must be between 0 and 1, got {self.lora_dropout!r}")
        if isinstance(self.lora_targets, str):
            object.__setattr__(self, "lora_targets", tuple(t.strip() for t in self.lora_targets.split(",") if t.strip()))
        else:
            object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        if not self.lora_targets:
            raise PlanError("method.lora_targets", "is empty: name modules such as q_proj,v_proj or use all-linear")
        if self.method == "qlora" and self.precision == "fp32":
            raise PlanError("method.precision", "QLoRA computes in 16 bit: choose bf16 or fp16")
        if self.cpu_offload and self.shard == "none":
            raise PlanError("hardware.cpu_offload", "needs sharding: set shard to zero2 or zero3")

    @property
    def world_size(self) -> int:
        """GPUs training together over every node (what ZeRO / FSDP shard over)."""
        return self.num_gpus * self.num_nodes

    @property
    def dora(self) -> bool:
        """DoRA is on and there are adapters for it to apply to."""
        return bool(self.use_dora) and self.method != "full"

    @property
    def compute_bytes(self) -> int:
        """Bytes per activation element (16-bit compute unless fp32)."""
        return 4 if self.precision == "fp32" else 2

    def with_(self, **changes) -> "TrainingSetup":
        """A copy with some settings changed (validated again)."""
        return replace(self, **changes)


def trainer_loss(stage: str, use_liger_kernel: bool) -> dict:
    """The TrainingSetup loss fields for how Tunewise's trainer computes a stage's loss: TRL 1.12's SFTTrainer
    defaults to loss_type="chunked_nll" unless the Liger kernel is on (sft_config.py, `__post_init__`); the
    preference stages use their own trainers' losses over full logits."""
    return {"use_liger_kernel": bool(use_liger_kernel), "chunked_loss": stage == "sft" and not use_liger_kernel}


def setup_from_plan(plan) -> TrainingSetup:
    """The memory-relevant settings of an `advisor.plan.Plan`: those whose field names a TrainingSetup
    field (`Setting.memory`), and the loss the trainer computes for its stage (`trainer_loss`)."""
    values = {s.memory: s.value(plan) for s in settings() if s.memory}
    values.update(trainer_loss(plan.stage, plan.method.use_liger_kernel))
    return TrainingSetup(**values)


@dataclass(frozen=True)
class Component:
    """One line of the memory bill."""

    name: str
    """weights, adapters, gradients, optimizer, activations, logits, overhead, reference_model, ..."""
    bytes: int
    """Bytes per GPU."""
    explanation: str
    """How the number was computed, in one line."""


@dataclass(frozen=True)
class MemoryEstimate:
    """Per-GPU memory for one model + setup."""

    model_id: str
    setup: TrainingSetup
    components: dict[str, int]
    """The bill: bytes per GPU by component name (weights, adapters, gradients, optimizer, activations,
    logits, overhead; reference_model, reward_model, value_model, generation_cache for preference stages)."""
    explanations: dict[str, str]
    """How each component was computed, one line each (same keys as components)."""
    peak_allocated_bytes: int
    """Comparable to torch.cuda.max_memory_allocated(): tensors only."""
    total_bytes: int
    """What the GPU must hold: peak x allocator slack + CUDA context."""
    peak_explanation: str
    """How the components combine into the peak."""
    params_total: int
    """Parameters of the trained model."""
    trainable_params: int
    """Parameters the optimizer updates."""
    rough: bool = False
    """The model's shape was guessed (bare size or unknown architecture)."""
    phases: dict[str, int] = field(default_factory=dict)
    """Bytes alive at the peak of each phase of a step (`PHASES`: forward_loss, backward, optimizer_step); the
    largest is `peak_allocated_bytes`."""
    peak_phase: str = ""
    """The phase that sets the peak."""
    phase_explanations: dict[str, str] = field(default_factory=dict)
    """What each phase holds, one line each."""
    warnings: tuple[str, ...] = ()
    """What the numbers alone do not say, in words (MoE weights QLoRA cannot quantize, paged state outside the
    allocator, a guessed shape, ...): the CLI prints them and its JSON lists them."""

    def lines(self) -> list[Component]:
        """The bill as Component rows, in order."""
        return [Component(name, nbytes, self.explanations[name]) for name, nbytes in self.components.items()]

    @property
    def total_gb(self) -> float:
        return self.total_bytes / GB

    @property
    def peak_gb(self) -> float:
        return self.peak_allocated_bytes / GB


# -- parameter tensors -----------------------------------------------------------------------


@lru_cache(maxsize=256)
def _model_tensors(spec: ModelSpec, head: str) -> tuple[tuple[int, ...], ...]:
    """Shapes of every parameter tensor (for per-tensor optimizer rules), tied ones once."""
    h, L = spec.hidden_size, spec.num_layers
    shapes: list[tuple[int, ...]] = [(spec.vocab_size, h)]
    if spec.model_type == "gpt2":
        shapes.append((spec.max_position_embeddings, h))
    norm_shapes = [(h,)] * (2 if spec.norm == "layernorm" else 1)
    block: list[tuple[int, ...]] = []
    for layer in linear_layers(spec).values():
        for _ in range(layer.count):
            block.append((layer.out_features, layer.in_features))
            if layer.bias:
                block.append((layer.out_features,))
    if spec.num_experts:
        block.append((spec.num_experts, h))
    block += norm_shapes * norms_per_layer(spec)
    shapes += block * L
    shapes += norm_shapes
    if head == "seq_cls":
        shapes.append((1, h))
    elif not spec.tie_embeddings:
        shapes.append((spec.vocab_size, h))
        if spec.lm_head_bias:
            shapes.append((spec.vocab_size,))
    return tuple(shapes)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


@lru_cache(maxsize=1024)
def _lora_tensors(spec: ModelSpec, rank: int, targets: tuple[str, ...], head: str,
                  dora: bool = False) -> tuple[tuple[int, ...], ...]:
    """Shapes of the LoRA A and B matrices (DoRA: and the magnitude vector of each adapted module), plus a
    trainable score head for seq-cls models."""
    shapes: list[tuple[int, ...]] = []
    for layer in resolve_targets(spec, targets):
        shapes += ([(rank, layer.in_features), (layer.out_features, rank)]
                   + ([(layer.out_features,)] if dora else [])) * layer.count
    shapes = shapes * spec.num_layers
    if "lm_head" in targets and head == "causal_lm":
        shapes += [(rank, spec.hidden_size), (spec.vocab_size, rank)] + ([(spec.vocab_size,)] if dora else [])
    if head == "seq_cls":
        shapes.append((1, spec.hidden_size))  # PEFT's SEQ_CLS task trains the score head (modules_to_save)
    return tuple(shapes)


def _step_workspace(shapes: tuple[tuple[int, ...], ...], optimizer: str, state_bytes: int) -> int:
    """Temporaries of one optimizer step. torch's AdamW (transformers' adamw_torch) runs its foreach
    implementation on CUDA, whose intermediates are a list of tensors (torch.optim docs: foreach "uses more peak
    memory"): `_multi_tensor_adamw` takes sqrt(exp_avg_sq) into a new list, one second moment's size. bitsandbytes'
    8-bit optimizers update each tensor in place in one kernel, SGD without momentum needs nothing, and Adafactor
    builds a full-size fp32 update per tensor, one tensor at a time."""
    if optimizer == "adamw":
        return state_bytes * sum(_numel(shape) for shape in shapes)
    if optimizer == "adafactor":
        return 4 * max(_numel(shape) for shape in shapes)
    return 0


def _optimizer_bytes(shapes: tuple[tuple[int, ...], ...], optimizer: str, state_bytes: int) -> tuple[int, str]:
    """Optimizer state for these trainable tensors, with its explanation."""
    total = sum(_numel(s) for s in shapes)
    if optimizer == "adamw":
        return 2 * state_bytes * total, f"AdamW: 2 states x {state_bytes} B x {total:,} trainable params"
    if optimizer in ("adamw_8bit", "paged_adamw_8bit"):
        sizes = [_numel(s) for s in shapes]
        big = sum(n for n in sizes if n >= BNB_MIN_8BIT_SIZE)
        small = total - big
        blocks = sum(-(-n // BNB_OPTIM_BLOCK) for n in sizes if n >= BNB_MIN_8BIT_SIZE)
        # 2 states x 1 byte, one fp32 absmax per 256-element block per state, and the two shared
        # 256-entry fp32 quantization maps; small tensors keep 2 fp32 states.
        nbytes = 2 * big + 2 * 4 * blocks + (2 * 256 * 4 if big else 0) + 8 * small
        paged = " (paged: pages move to CPU under memory pressure)" if optimizer.startswith("paged") else ""
        return nbytes, f"8-bit AdamW: 2 B/param for {big:,} params in tensors >= {BNB_MIN_8BIT_SIZE} elements, 8 B for {small:,} others{paged}"
    if optimizer == "sgd":
        return 0, "SGD without momentum keeps no state"
    # Adafactor (transformers' defaults: no first moment): factored row + column second moments for
    # matrices, a full second moment for vectors, fp32.
    nbytes = 0
    for s in shapes:
        nbytes += 4 * (s[0] + _numel(s) // s[0]) if len(s) >= 2 else 4 * _numel(s)
    return nbytes, "Adafactor: fp32 factored second moments (rows + columns per matrix)"


# -- activations -----------------------------------------------------------------------------


def _layer_activation_bytes_per_token(spec: ModelSpec, setup: TrainingSetup, adapted: frozenset, batch: int) -> tuple[float, float]:
    """Bytes autograd keeps per token for one transformer block (excluding the s^2 terms), and how many of
    them are the block's last linear layer's saved input (freed first in the block's backward).

    Counts the tensors each op saves for backward in transformers' implementations with the
    given trainable set: `adapted` names the LoRA-adapted layers; in full fine-tuning every
    layer is trainable. A frozen linear saves nothing (its input gradient needs only the weight).
    """
    a = setup.compute_bytes
    h, q, kv, inter = spec.hidden_size, spec.q_dim, spec.kv_dim, spec.intermediate_size
    full = setup.method == "full"
    # A LoRA-adapted module keeps its input again: PEFT casts it to the adapter dtype, applies dropout
    # (1-byte mask) and under autocast saves a 16-bit copy for lora_A. Without dropout and without a cast
    # (adapters in the compute dtype: fp32 training) lora_A gets the module's input itself, so the adapted
    # modules reading one tensor keep that one tensor between them (measured on the CPU: bench/cpu_memory.py).
    lora_input_bytes = (1 if setup.lora_dropout > 0 else 0) + a
    adapter_bytes = 4 if (setup.adapter_fp32 or setup.precision == "fp32") else 2
    shares_input = setup.lora_dropout == 0 and adapter_bytes == a
    # DoRA's output is (m/||W + sBA|| - 1) x base + m/||W + sBA|| x lora x s: both products keep their
    # (tokens x out) operand for the magnitude's gradient (peft/tuners/lora/dora.py, DoraLinearLayer.forward).
    layers = linear_layers(spec)

    def dora_bytes(name: str) -> int:
        return 2 * a * layers[name].out_features * layers[name].count if setup.dora and name in layers else 0

    hf = setup.runtime == "transformers"

    def consumers(names, width, fused=False):
        """Saved inputs for linear layers reading the same tensor of `width` elements.

        `fused`: litgpt/torchtune adapt a fused QKV projection with one dropout for all three."""
        nbytes = 0
        if full and names:
            nbytes += a * width  # one shared saved input for the trainable weights' gradients
        hits = [name for name in names if name in adapted]
        copies = 1 if (hits and ((fused and not hf) or shares_input)) else len(hits)
        if shares_input and full:
            copies = 0  # the trainable weights' saved input is that same tensor
        nbytes += copies * lora_input_bytes * width + len(hits) * a * setup.lora_rank  # input copy + lora_A output
        nbytes += sum(dora_bytes(name) for name in hits)
        return nbytes

    # Norm inputs: HF's RMSNorm upcasts to fp32 and keeps that copy (plus the normalized output when
    # its weight trains); LayerNorm keeps its 16-bit input.
    liger = setup.use_liger_kernel and hf
    if spec.norm == "rmsnorm" and liger:
        # Liger's RMSNorm keeps its input as it came and one fp32 rstd per row (liger_kernel/ops/rms_norm.py),
        # and computes the weight's gradient from those.
        norm = a * h + 4
    elif spec.norm == "rmsnorm":
        # litgpt keeps the fp32 normalized output instead of the 16-bit one.
        norm = 4 * h + ((a if setup.runtime != "litgpt" else 4) * h if full else 0)
    else:
        norm = a * h
    total = norm * norms_per_layer(spec)

    # Attention: SDPA keeps q, k, v and its output (k, v expanded to every head when a padding mask
    # forces transformers' repeat_kv, i.e. batches of more than one sequence).
    # litgpt and torchtune expand k and v to every head before SDPA.
    kv_saved = q if ((batch > 1 or not hf) and kv != q) else kv
    # litgpt's fused QKV without grouped queries (n_query_groups = n_head): q, k and v are views of the fused
    # output, RoPE makes new q and k, and the v that SDPA keeps is still a view, so the whole fused buffer stays
    # alive beside the new q and k: q + kv more than separate projections (grouped queries expand k and v by a
    # copy, which frees the buffer).
    fused_views = a * (q + kv) if (setup.runtime == "litgpt" and kv == q) else 0
    total += fused_views
    if spec.model_type == "gpt2":
        total += consumers(["c_attn"], h)
        total += a * (q + 2 * kv) + a * q  # q, k, v are views of c_attn's output; plus the output
        total += consumers(["attn.c_proj"], q)
        total += 3 * h  # two residual-dropout masks (p=0.1) and the MLP's
    elif spec.model_type == "phi3":
        total += consumers(["qkv_proj"], h)
        total += a * (q + 2 * kv_saved) + a * q
        total += consumers(["o_proj"], q)
    else:
        out_name = "dense" if spec.model_type == "phi" else "o_proj"
        total += consumers(["q_proj", "k_proj", "v_proj"], h, fused=True)
        if spec.model_type == "phi":
            # phi runs attention and MLP in parallel on one normed input, shared with fc1.
            total += consumers(["fc1"], h) - (a * h if full else 0)
        total += a * (q + 2 * kv_saved) + a * q
        total += consumers([out_name], q)
    total += 4 * spec.num_heads  # SDPA's fp32 logsumexp per head

    # MLP.
    experts = spec.experts_per_token if spec.num_experts else 1
    if spec.model_type in ("gpt2", "phi"):
        up_name, down_name = ("c_fc", "mlp.c_proj") if spec.model_type == "gpt2" else ("fc1", "fc2")
        if spec.model_type == "gpt2":
            total += consumers([up_name], h)
        # transformers' gelu_new is Python arithmetic: it keeps its input, 0.5*x, tanh(...) and 1+tanh(...);
        # litgpt's native tanh-GELU keeps only its input.
        total += (4 if hf else 1) * a * inter
        last_input = consumers([down_name], inter)
        total += last_input
    elif spec.model_type == "phi3":
        total += consumers(["gate_up_proj"], h)
        total += a * 2 * inter + 2 * a * inter  # gate_up output (split) and the activated half, for the product
        last_input = consumers(["down_proj"], inter)
        total += last_input
    else:
        mlp_in = consumers(["gate_proj", "up_proj"], h) if not spec.num_experts else (a * h * experts if full else 0)
        # gate output (for SiLU/GELU), activation output and up output (for the product); Liger's SwiGLU
        # keeps only the gate and up outputs and recomputes SiLU in backward (liger_kernel/ops/swiglu.py).
        mlp_act = (2 if liger else 3) * a * inter
        mlp_down = consumers(["down_proj"], inter) if not spec.num_experts else (a * inter if full else 0)
        total += mlp_in + experts * (mlp_act + mlp_down)
        last_input = experts * mlp_down
        if spec.num_experts:
            total += experts * a * h + 4 * spec.num_experts  # routed token copies and fp32 router probabilities
        if spec.shared_expert_size:
            # Qwen2-MoE: every token also goes through the shared gated MLP, then its sigmoid gate
            # (hidden -> 1): the MLP's tensors at its width, the gate's output and sigmoid.
            shared = spec.shared_expert_size
            total += consumers(["shared_expert.gate_proj", "shared_expert.up_proj"], h) + (2 if liger else 3) * a * shared
            total += consumers(["shared_expert.down_proj"], shared) + consumers(["shared_expert_gate"], h) + 2 * a + a * h
    if setup.method == "qlora" and setup.runtime == "litgpt":
        # The bitsandbytes of litgpt's published tables (MatMul4Bit before 0.45) kept every quantized
        # layer's input for backward even though the frozen weight needs no gradient: one copy per
        # distinct input (attention input, attention output, MLP input, MLP inner).
        if spec.model_type == "phi":
            total += a * (h + q + inter)
        else:
            total += a * (2 * h + q + inter)
    return total, last_input


def _eager_score_bytes(setup: TrainingSetup) -> int:
    """Bytes per attention score kept by eager attention: transformers' softmax runs in fp32 and its
    16-bit copy feeds the value product, so 4 + 2 (fp32 training: 4)."""
    return 4 if setup.precision == "fp32" else 4 + setup.compute_bytes


@dataclass(frozen=True)
class _Saved:
    """What autograd holds for one micro-batch, split by when it is alive (bytes per GPU)."""

    kept: int
    """Held from the forward pass to the backward pass: every layer's saved tensors (with checkpointing only
    each layer's input), the final norm's input and the padding mask."""
    layer: int
    """One layer's saved tensors while it is recomputed in the backward pass (checkpointing only)."""
    workspace: int
    """The gradients one layer's backward computes and frees again (of its output, its MLP, its scores)."""
    how: str


def _backward_workspace_bytes_per_token(spec: ModelSpec, setup: TrainingSetup) -> float:
    """Gradient tensors alive at once inside one layer's backward pass, per token, at its peak (the MLP's
    product): the residual stream's incoming and outgoing gradient (2 x hidden) and the MLP's two inner-width
    gradients (the two factors of SwiGLU's product; GELU's output and input). Measured on the CPU with a
    live-tensor count (bench/cpu_memory.py): 2 x hidden + 2 x inner width, within 5%. An MoE layer runs its
    experts one after the other on the tokens routed to each, so one expert's share (experts per token /
    experts) of the inner gradients, plus the shared expert's."""
    a = setup.compute_bytes
    h, inter = spec.hidden_size, spec.intermediate_size
    mlp = 2 * a * inter
    if spec.num_experts:
        mlp = mlp * spec.experts_per_token / spec.num_experts + 2 * a * spec.shared_expert_size
    return 2 * a * h + mlp


def _activations(spec: ModelSpec, setup: TrainingSetup, batch: int, seq: int, adapted: frozenset, head: str) -> _Saved:
    a = setup.compute_bytes
    per_token_layer, last_input = _layer_activation_bytes_per_token(spec, setup, adapted, batch)
    tokens = batch * seq
    per_layer = per_token_layer * tokens
    scores = 0
    if setup.attn == "eager":
        scores = _eager_score_bytes(setup) * spec.num_heads * seq * seq * batch
        per_layer += scores
    # The final norm's saved input, plus the padding mask transformers builds for batches (b x s x s bools).
    tail = (4 * spec.hidden_size if spec.norm == "rmsnorm" else a * spec.hidden_size) * tokens
    mask = batch * seq * seq if batch > 1 else 0
    if head == "causal_lm" and setup.method == "full" and not (setup.chunked_loss or setup.use_liger_kernel):
        tail += a * spec.hidden_size * tokens  # lm_head's input, for its weight gradient (the chunked losses hold their own)
    # The block's backward starts with its MLP, whose last linear layer's saved input is freed before the
    # MLP's gradients peak; eager attention adds the softmax's fp32 gradient beside the scores.
    workspace = ((_backward_workspace_bytes_per_token(spec, setup) - last_input) * tokens
                 + (4 * spec.num_heads * seq * seq * batch if scores else 0))
    if setup.gradient_checkpointing:
        kept = spec.num_layers * a * spec.hidden_size * tokens + tail + mask
        how = (f"checkpointing: {spec.num_layers} layer inputs x {a} B x {spec.hidden_size} x {tokens:,} tokens "
               f"+ one layer recomputed ({per_token_layer / spec.hidden_size:.1f} B x hidden per token)")
        saved = _Saved(int(kept), int(per_layer), int(workspace), how)
    else:
        kept = spec.num_layers * per_layer + tail + mask
        how = (f"{spec.num_layers} layers x {per_token_layer / spec.hidden_size:.1f} B x hidden per token "
               f"x {tokens:,} tokens (saved tensors of each op)")
        saved = _Saved(int(kept), 0, int(workspace), how)
    if setup.attn == "eager":
        return replace(saved, how=saved.how + f", + eager attention scores {_eager_score_bytes(setup)} B x "
                                              f"{spec.num_heads} heads x seq^2 per layer")
    return saved


def _next_power_of_two(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _logits_bytes(spec: ModelSpec, setup: TrainingSetup, batch: int, seq: int, stage: str) -> tuple[int, str]:
    """The loss's own tensors at their peak, which comes at the start of the backward pass, while every
    kept activation is still alive (they are freed before the first layer is recomputed)."""
    a = setup.compute_bytes
    h, vocab = spec.hidden_size, spec.vocab_size
    tokens = batch * seq
    if setup.runtime == "litgpt":
        # litgpt's chunked cross-entropy stays in 16 bit: logits + log-softmax, gradients one chunk at a time.
        per = 2 * a
        return per * tokens * vocab, f"{per} B x {batch} x {seq} tokens x {vocab:,} vocab (16-bit logits and log-softmax, chunked)"
    if setup.runtime == "transformers" and setup.use_liger_kernel and stage in ("sft", "dpo"):
        # Liger's fused linear cross-entropy (liger_kernel/ops/fused_linear_cross_entropy.py) computes the loss
        # and its gradients in the forward pass, chunk by chunk: chunk = next power of 2 of tokens / ceil(vocab /
        # hidden) tokens, so one chunk's 16-bit logits are about tokens x hidden; it keeps grad_input (tokens x
        # hidden) for the backward pass, beside the shifted hidden states it was given (a contiguous copy), and an
        # fp32 loss per token. Full fine-tuning adds the lm_head's gradient, accumulated there in its dtype.
        chunk = min(tokens, _next_power_of_two(-(-tokens // -(-vocab // h))))
        weight_grad = (4 if setup.precision in ("fp32", "amp") else 2) * vocab * h if setup.method == "full" else 0
        nbytes = a * chunk * vocab + 2 * a * tokens * h + 4 * tokens + weight_grad
        return nbytes, (f"Liger fused linear cross-entropy: {chunk:,}-token chunks of {a}-B logits x {vocab:,} vocab, "
                        f"+ the hidden states and their gradient ({a} B x {tokens:,} x {h})"
                        + (" + the lm_head gradient" if weight_grad else ""))
    if setup.runtime == "transformers" and setup.chunked_loss and stage == "sft":
        # TRL 1.12's chunked_nll (sft_trainer.py, _chunked_cross_entropy_loss) runs lm_head + cross-entropy over
        # 256-token chunks, each under non-reentrant checkpointing, so the forward pass holds one chunk at a time.
        # The backward pass does not: measured with a live-tensor count on torch 2.13 (bench/cpu_memory.py),
        # each chunk's recomputed tensors stay alive until the whole backward pass ends, 2 x the compute dtype's
        # bytes per token per vocabulary entry (8.1 B in fp32, 4.05 B under bf16 autocast, slopes over 1k-4k
        # tokens), plus about 8 B x chunk x vocab in flight; still a third of ForCausalLMLoss's 12 B under
        # autocast. Beside them: the hidden states' packed copy and its gradient (3 x hidden per token, two
        # buffers while a chunk's slice is added in) and the lm_head weight cast per chunk (w.float(): 4 B x vocab
        # x hidden unless it already is fp32; under 16-bit autocast back to 16 bit, 2 B). Full fine-tuning adds
        # the fp32 weight copy's gradient.
        chunk = min(tokens, TRL_CE_CHUNK)
        lm_head_fp32 = setup.precision == "fp32" or (setup.method == "qlora" and setup.upcast_non_quantized)
        autocast = setup.precision != "fp32"
        weight_copies = ((0 if lm_head_fp32 else 4) + (2 if autocast else 0)) * vocab * h
        weight_grad = 4 * vocab * h if setup.method == "full" else 0
        # The weight copies live only around each chunk's matmul, the chunk's tensors after it: the larger counts.
        nbytes = 2 * a * tokens * vocab + max(8 * chunk * vocab, weight_copies) + 3 * a * tokens * h + weight_grad
        return nbytes, (f"TRL chunked cross-entropy: the chunks' recomputed tensors, {2 * a} B x {batch} x {seq} tokens "
                        f"x {vocab:,} vocab, + one {chunk}-token chunk in flight, the hidden states' copy and its "
                        f"gradient, the lm_head weight cast per chunk ({weight_copies / (vocab * h):g} B x {vocab:,} x {h})"
                        + (" + the weight copy's fp32 gradient" if weight_grad else ""))
    if stage == "sft":
        # transformers' ForCausalLMLoss: the 16-bit logits, their fp32 copy and its log-softmax (kept for
        # backward) in the forward pass (a + 8 B); then the loss's backward: the kept log-softmax, its gradient
        # and the logits' gradient in fp32 (12 B), the model output with its 16-bit logits dropped by then
        # (Trainer.compute_loss returns only the loss). fp32 training: 12 as well (the fp32 copy is the logits
        # themselves). torchtune's recipe (older revision) holds fp32 logits in a local variable through
        # backward: 16.
        per = 16 if setup.runtime == "torchtune" else 12
        return per * tokens * vocab, f"{per} B x {batch} x {seq} tokens x {vocab:,} vocab (fp32 log-softmax and the gradients, at the loss's backward)"
    # TRL's DPO/PPO take log-probs row by row (selective_log_softmax): 16-bit logits, their
    # log-softmax and the two gradients.
    per = 4 * a
    return per * tokens * vocab, f"{per} B x {batch} x {seq} tokens x {vocab:,} vocab (logits, per-row log-softmax, gradients)"


# -- weights ---------------------------------------------------------------------------------


def quantized_weight_bytes(spec: ModelSpec, bits: int = 4, double_quant: bool = True, upcast_non_quantized: bool = False, head: str = "causal_lm") -> int:
    """Bytes of a bitsandbytes-quantized model: quantized block linears + the rest in 16 (or 32) bit."""
    counts = param_counts(spec, head=head)
    other = counts.total - counts.quantizable
    other_bytes = other * (4 if upcast_non_quantized else 2)
    if bits == 4:
        return int(counts.quantizable * nf4_bits_per_weight(double_quant) / 8) + other_bytes
    # LLM.int8: int8 weights plus one fp32 scale per output row.
    rows = sum(l.out_features * l.count for l in linear_layers(spec).values() if l.is_module) * spec.num_layers
    return counts.quantizable + 4 * rows + other_bytes


def _base_weights(spec: ModelSpec, setup: TrainingSetup, head: str) -> tuple[int, str]:
    counts = param_counts(spec, head=head)
    if setup.method == "qlora":
        nbytes = quantized_weight_bytes(spec, setup.quant_bits, setup.double_quant, setup.upcast_non_quantized, head)
        fmt = (f"NF4 {nf4_bits_per_weight(setup.double_quant):.3f} bits" if setup.quant_bits == 4 else "int8 + fp32 row scales")
        rest = "fp32 (prepare_model_for_kbit_training)" if setup.upcast_non_quantized else "16 bit"
        return nbytes, f"{counts.quantizable:,} block linear weights in {fmt}, {counts.total - counts.quantizable:,} others in {rest}"
    if setup.precision in ("fp32", "amp") and (setup.method == "full" or setup.precision == "fp32"):
        return 4 * counts.total, f"{counts.total:,} params x 4 B (fp32{' master weights' if setup.precision == 'amp' else ''})"
    return 2 * counts.total, f"{counts.total:,} params x 2 B (16 bit)"


def _frozen_copy_bytes(spec: ModelSpec, setup: TrainingSetup, head: str) -> int:
    """A frozen model kept for reference/reward: 16-bit (fp32 when training in fp32)."""
    return param_counts(spec, head=head).total * (4 if setup.precision == "fp32" else 2)


# -- the estimate ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Trained:
    """Memory of one trained model (policy, reward model or value model) before sharding."""

    weights: int
    weights_how: str
    adapters: int
    adapters_how: str
    gradients: int
    gradients_how: str
    optimizer: int
    optimizer_how: str
    trainable: int
    total_params: int
    adapted: frozenset
    largest_linear: int
    step_workspace: int = 0
    """Temporaries of one optimizer step (see `_step_workspace`)."""


def _trained_model(spec: ModelSpec, setup: TrainingSetup, head: str) -> _Trained:
    # Only these settings matter here; caching on them keeps searches over batch and length fast.
    key = (setup.method, setup.precision, setup.optimizer, setup.lora_rank, tuple(setup.lora_targets),
           setup.quant_bits, setup.double_quant, setup.upcast_non_quantized, setup.adapter_fp32, setup.dora)
    return _trained_model_cached(spec, key, head)


@lru_cache(maxsize=512)
def _trained_model_cached(spec: ModelSpec, key: tuple, head: str) -> _Trained:
    method, precision, optimizer, rank, targets, quant_bits, double_quant, upcast, adapter_fp32, dora = key
    # Built without re-validation: the key comes from a setup that was validated (or is cpu_setup's QLoRA in fp32).
    setup = _with_size(TrainingSetup(), method=method, precision=precision, optimizer=optimizer, lora_rank=rank,
                       lora_targets=targets, quant_bits=quant_bits, double_quant=double_quant, upcast_non_quantized=upcast,
                       adapter_fp32=adapter_fp32, use_dora=dora)
    counts = param_counts(spec, head=head)
    weights, weights_how = _base_weights(spec, setup, head)
    largest = max(l.in_features * l.out_features for l in linear_layers(spec).values())
    if setup.method == "full":
        shapes = _model_tensors(spec, head)
        trainable = counts.total
        param_bytes = 4 if setup.precision in ("fp32", "amp") else 2
        grads = param_bytes * trainable
        opt, opt_how = _optimizer_bytes(shapes, setup.optimizer, param_bytes)
        return _Trained(weights, weights_how, 0, "full fine-tuning: no adapters", grads,
                        f"{trainable:,} params x {param_bytes} B", opt, opt_how, trainable, counts.total,
                        frozenset(), largest, _step_workspace(shapes, setup.optimizer, param_bytes))
    targets = tuple(setup.lora_targets)
    shapes = _lora_tensors(spec, setup.lora_rank, targets, head, setup.dora)
    trainable = sum(_numel(s) for s in shapes)
    adapter_bytes = 4 if (setup.adapter_fp32 or setup.precision == "fp32") else 2
    adapted = frozenset(l.name for l in resolve_targets(spec, targets))
    opt, opt_how = _optimizer_bytes(shapes, setup.optimizer, adapter_bytes)
    kind = "DoRA rank" if setup.dora else "rank"
    return _Trained(weights, weights_how, adapter_bytes * trainable,
                    f"{kind} {setup.lora_rank} on {', '.join(sorted(adapted))}: {trainable:,} params x {adapter_bytes} B"
                    + (" (A, B and a magnitude vector per module)" if setup.dora else ""),
                    adapter_bytes * trainable, f"{trainable:,} adapter params x {adapter_bytes} B", opt, opt_how,
                    trainable, counts.total, adapted, largest, _step_workspace(shapes, setup.optimizer, adapter_bytes))


def _dora_norm_bytes(spec: ModelSpec, setup: TrainingSetup, adapted: frozenset) -> int:
    """DoRA's per-forward temporaries for the largest adapted layer: PEFT computes BA as lora_B(lora_A(I))
    from an (in x in) identity in the adapter dtype, then W + s x BA (out x in) for its column norms."""
    adapter_bytes = 4 if (setup.adapter_fp32 or setup.precision == "fp32") else 2
    layers = [layer for layer in linear_layers(spec).values() if layer.name in adapted]
    return max(adapter_bytes * layer.in_features ** 2 + 2 * setup.compute_bytes * layer.in_features * layer.out_features
               for layer in layers)


def estimate(spec: ModelSpec, setup: TrainingSetup) -> MemoryEstimate:
    """Per-GPU memory for training `spec` with `setup` (see the module docstring for the model)."""
    if not isinstance(setup, TrainingSetup):
        raise TunewiseError(f"estimate needs a TrainingSetup, got {type(setup).__name__}")
    return _estimate_cached(spec, setup)


@lru_cache(maxsize=4096)
def _estimate_cached(spec: ModelSpec, setup: TrainingSetup) -> MemoryEstimate:
    stage = setup.stage
    n = setup.world_size  # ZeRO / FSDP shard over every GPU of every node
    shard_opt = n > 1 and setup.shard in ("zero2", "zero3")
    shard_weights = n > 1 and setup.shard == "zero3"
    offload = setup.cpu_offload and setup.shard != "none"
    a = setup.compute_bytes
    head = "seq_cls" if stage == "rm" else "causal_lm"
    policy = _trained_model(spec, setup, head)
    components: list[Component] = []

    def shard(nbytes: int, on: bool) -> int:
        return -(-nbytes // n) if on else nbytes

    sharded_note = (f" / {n} GPUs ({setup.num_nodes} nodes x {setup.num_gpus})" if setup.num_nodes > 1
                    else f" / {n} GPUs" if n > 1 else "")
    # Weights: with ZeRO-3 each GPU holds 1/N (plus the layers being gathered, see overhead).
    # Mixed precision under ZeRO keeps 16-bit weights on the GPU and fp32 masters in the optimizer.
    weights = policy.weights
    weights_how = policy.weights_how
    master_bytes = 0
    if setup.method == "full" and setup.precision == "amp" and shard_opt:
        weights = 2 * policy.total_params
        weights_how = f"{policy.total_params:,} params x 2 B (16 bit; fp32 masters live with the optimizer)"
        master_bytes = 4 * policy.total_params
    if offload and shard_weights:
        weights, weights_how = 0, weights_how + ", offloaded to CPU"
    else:
        weights = shard(weights, shard_weights)
        if shard_weights:
            weights_how += sharded_note
    components.append(Component("weights", weights, weights_how))
    if setup.method != "full":
        components.append(Component("adapters", shard(policy.adapters, shard_weights), policy.adapters_how))

    grads, grads_how = policy.gradients, policy.gradients_how
    if setup.method == "full" and setup.precision == "amp" and shard_opt:
        grads = 2 * policy.total_params  # DeepSpeed/FSDP reduce 16-bit gradients
        grads_how = f"{policy.total_params:,} params x 2 B (16-bit gradients)"
    components.append(Component("gradients", shard(grads, shard_opt), grads_how + (sharded_note if shard_opt else "")))
    optimizer = policy.optimizer + master_bytes
    opt_how = policy.optimizer_how + (" + fp32 master weights" if master_bytes else "")
    if offload:
        optimizer, opt_how = 0, opt_how + ", offloaded to CPU"
    elif shard_opt:
        optimizer, opt_how = shard(optimizer, True), opt_how + sharded_note
    components.append(Component("optimizer", optimizer, opt_how))

    # Activations and logits of the trained model(s) for one micro-batch.
    batch, seq = setup.micro_batch, setup.seq_len
    pairs = stage in ("rm", "dpo")
    if pairs:
        batch = 2 * batch  # chosen and rejected go through the model together
    if stage == "ppo":
        seq = setup.seq_len + setup.generation_len
    saved = _activations(spec, setup, batch, seq, policy.adapted, head)
    act_how = saved.how + (" (chosen + rejected: 2 x micro-batch)" if pairs else "")
    components.append(Component("activations", saved.kept + saved.layer, act_how))
    if head == "causal_lm":
        logits, logits_how = _logits_bytes(spec, setup, batch, seq, stage)
    else:
        logits, logits_how = 4 * batch * seq, "score head: one value per token (no vocabulary logits)"
    components.append(Component("logits", logits, logits_how))

    # Extra models of the preference stages.
    extra_static = 0
    if stage in ("dpo", "ppo"):
        if setup.method == "full":
            ref = shard(_frozen_copy_bytes(spec, setup, "causal_lm"), shard_weights)
            components.append(Component("reference_model", ref, f"frozen {a * 8}-bit copy of the starting policy{sharded_note if shard_weights else ''}"))
        else:
            ref = 0
            components.append(Component("reference_model", 0, "none extra: the reference is the base with the adapter disabled"))
        extra_static += ref
    value_act = 0
    if stage == "ppo":
        reward = shard(_frozen_copy_bytes(spec, setup, "seq_cls"), shard_weights)
        components.append(Component("reward_model", reward, f"frozen {a * 8}-bit sequence-classification copy (score head: hidden -> 1)"))
        value = _trained_model(spec, setup, "seq_cls")
        if setup.method == "full":
            v_static = value.weights + value.gradients + value.optimizer
        else:
            v_static = value.weights + value.adapters + value.gradients + value.optimizer
        if offload:
            v_static -= value.optimizer
        v_static = shard(v_static, shard_opt)
        value_saved = _activations(spec, setup, setup.micro_batch, seq, value.adapted, "seq_cls")
        value_act = value_saved.kept + value_saved.layer
        components.append(Component("value_model", v_static + value_act,
                                    f"sequence-classification model trained with {setup.method} (weights, grads, optimizer{sharded_note if shard_opt else ''}) + its activations"))
        # KV cache while generating rollouts: 2 (k, v) x layers x kv width x tokens x 2 B.
        kv_tokens = setup.micro_batch * (setup.seq_len + setup.generation_len)
        cache = 2 * spec.num_layers * spec.kv_dim * kv_tokens * a
        components.append(Component("generation_cache", cache,
                                    f"KV cache: 2 x {spec.num_layers} layers x {spec.kv_dim} x {kv_tokens:,} tokens x {a} B"))
        extra_static += reward

    # Overhead: transient buffers that coexist with the peak.
    overhead = 0
    notes = []
    if setup.method == "qlora":
        overhead += 2 * policy.largest_linear  # one dequantized weight at a time in forward/backward
        notes.append("one dequantized 16-bit weight")
    if setup.dora and policy.adapted:
        overhead += _dora_norm_bytes(spec, setup, policy.adapted)
        notes.append("DoRA's weight norm of the largest adapted layer (identity, BA and W + s x BA)")
    if setup.method == "full" and setup.precision == "amp" and not shard_opt:
        overhead += 2 * policy.total_params  # autocast's 16-bit weight copies, kept for backward
        notes.append("autocast's 16-bit weight copies (2 B/param)")
    if n > 1 and setup.shard == "none":
        overhead += policy.gradients  # DDP's gradient buckets duplicate the gradients
        notes.append("DDP gradient buckets (a copy of the gradients)")
    if shard_weights:
        per_layer = (param_counts(spec).total - param_counts(spec).embeddings) // spec.num_layers
        overhead += 2 * per_layer * 2  # the gathered layer and the prefetched next one, 16 bit
        notes.append("two gathered 16-bit layers")
    if setup.optimizer == "paged_adamw_8bit":
        notes.append("paged optimizer state is outside the PyTorch allocator")
    components.append(Component("overhead", overhead, "; ".join(notes) if notes else "none beyond the above"))

    comp = {c.name: c.bytes for c in components}
    phases, phase_how = _phases(setup, comp, saved, extra_static, shard(policy.step_workspace, shard_opt) if not offload else 0)
    peak_phase = max(phases, key=phases.get)
    peak = phases[peak_phase]
    how = f"the larger of three phases: {'; '.join(f'{name}: {text}' for name, text in phase_how.items())}; {peak_phase} sets the peak"
    if stage == "ppo":
        how += "; PPO: value model and generation cache alongside"
    if setup.optimizer == "paged_adamw_8bit":
        how += "; paged optimizer state not counted (outside PyTorch's allocator) but included in the total"
        total = int(peak * ALLOCATOR_SLACK) + comp["optimizer"] + CUDA_CONTEXT_BYTES
    else:
        total = int(peak * ALLOCATOR_SLACK) + CUDA_CONTEXT_BYTES
    return MemoryEstimate(
        model_id=spec.id,
        setup=setup,
        components=comp,
        explanations={c.name: c.explanation for c in components},
        peak_allocated_bytes=int(peak),
        total_bytes=total,
        peak_explanation=how + f"; total = peak x {ALLOCATOR_SLACK} allocator slack + {CUDA_CONTEXT_BYTES / GB:.1f} GB CUDA context",
        params_total=policy.total_params,
        trainable_params=policy.trainable,
        rough=spec.rough,
        phases=phases,
        peak_phase=peak_phase,
        phase_explanations=phase_how,
        warnings=_warnings(spec, setup, comp),
    )


#: The phases of one training step, in order, whose largest sets the peak (`MemoryEstimate.phases`).
PHASES = ("forward_loss", "backward", "optimizer_step")


def _phases(setup: TrainingSetup, comp: dict[str, int], saved: _Saved, extra_static: int,
            step_workspace: int) -> tuple[dict[str, int], dict[str, str]]:
    """Bytes alive at the peak of each phase of a step, and what they are.

    The components are not all alive at once. Through a step: the weights (adapters, frozen reference,
    reward and value models, generation cache) and the optimizer state always are; the gradients appear during
    the backward pass and live until the optimizer step (from one micro-batch to the next when accumulating);
    the loss's tensors exist only around the loss, and with checkpointing they are freed before the first layer
    is recomputed, so one recomputed layer never coexists with them:

    - forward_loss: end of the forward pass and the loss's own backward: everything kept for backward, and the
      loss's tensors at their peak (`_logits_bytes`);
    - backward: one layer recomputed (checkpointing) and its backward's gradients (`_Saved.workspace`), while
      what was kept is freed layer by layer as the gradients fill up: the larger of the start (all kept, the
      accumulated gradients) and the end (all gradients);
    - optimizer_step: all gradients and the step's temporaries (`_step_workspace`).
    """
    static = comp["weights"] + comp.get("adapters", 0) + comp["optimizer"] + extra_static
    if setup.stage == "ppo":
        static += comp["value_model"] + comp["generation_cache"]
    if setup.optimizer == "paged_adamw_8bit":
        static -= comp["optimizer"]  # cudaMallocManaged pages: not in max_memory_allocated
    grads = comp["gradients"]
    accumulated = grads if setup.grad_accum > 1 else 0
    overhead = comp["overhead"]
    phases = {
        "forward_loss": static + accumulated + saved.kept + comp["logits"] + overhead,
        "backward": static + max(saved.kept + accumulated, grads) + saved.layer + saved.workspace + overhead,
        "optimizer_step": static + grads + step_workspace,
    }
    recompute = "one layer recomputed + " if saved.layer else ""
    how = {
        "forward_loss": f"weights + optimizer{' + accumulated gradients' if accumulated else ''} + kept activations + logits/loss "
                        f"({phases['forward_loss'] / GB:.2f} GB)",
        "backward": f"weights + optimizer + the larger of (kept activations{' + accumulated gradients' if accumulated else ''}) "
                    f"and gradients + {recompute}its backward's gradients ({phases['backward'] / GB:.2f} GB)",
        "optimizer_step": f"weights + optimizer + gradients + the step's temporaries ({phases['optimizer_step'] / GB:.2f} GB)",
    }
    return {name: int(value) for name, value in phases.items()}, how


# -- what QLoRA quantizes, and warnings ----------------------------------------------------------------


@dataclass(frozen=True)
class QuantizationReport:
    """What QLoRA quantizes of a model on the installed stack (transformers 5 + bitsandbytes + PEFT), and what
    it leaves: bitsandbytes replaces nn.Linear / Conv1D modules only (transformers' `replace_with_bnb_linear`),
    so embeddings, lm_head, norms, biases, MoE routers and fused 3-D expert parameters keep their dtype, and
    PEFT's `prepare_model_for_kbit_training` upcasts every one of them to fp32."""

    quantized_params: int
    """Weights stored in 4 (or 8) bits: those of `quantized_names`."""
    quantized_names: tuple[str, ...]
    """The parameters that become bitsandbytes `Params4bit` / `Int8Params` (`specs.quantized_parameter_names`)."""
    kept_params: dict[str, int]
    """Parameters left unquantized, by kind (embeddings, lm_head, norms, biases, routers, experts)."""
    kept_bytes: int
    """Their bytes (fp32 after PEFT's upcast, else 16 bit)."""
    kept_dtype: str
    """fp32 or 16-bit."""
    qlora_weights_bytes: int
    """The QLoRA base's weights."""
    lora_weights_bytes: int
    """The same model's 16-bit base, as LoRA trains it."""

    @property
    def saved_bytes(self) -> int:
        """What QLoRA saves against LoRA's 16-bit base (negative: it costs more)."""
        return self.lora_weights_bytes - self.qlora_weights_bytes

    @property
    def quantized_share(self) -> float:
        return self.quantized_params / max(1, self.quantized_params + sum(self.kept_params.values()))


def quantization_report(spec: ModelSpec, setup: TrainingSetup) -> QuantizationReport:
    """What QLoRA quantizes of `spec` and what stays 16-bit (fp32 after PEFT's upcast), with what it saves."""
    counts = param_counts(spec)
    layers = linear_layers(spec).values()
    experts = spec.num_layers * sum(l.params for l in layers if not l.is_module)
    routers = spec.num_layers * spec.num_experts * spec.hidden_size
    kept = {"embeddings": counts.embeddings, "lm_head": counts.lm_head, "norms": counts.norms,
            "biases": counts.quantizable_bias, "routers": routers, "experts": experts}
    kept = {kind: n for kind, n in kept.items() if n}
    upcast = setup.upcast_non_quantized
    qlora = setup if setup.method == "qlora" else setup.with_(method="qlora", precision="bf16" if setup.precision == "fp32" else setup.precision)
    lora_setup = setup.with_(method="lora")
    return QuantizationReport(
        quantized_params=counts.quantizable,
        quantized_names=quantized_parameter_names(spec),
        kept_params=kept,
        kept_bytes=(4 if upcast else 2) * sum(kept.values()),
        kept_dtype="fp32" if upcast else "16-bit",
        qlora_weights_bytes=_base_weights(spec, qlora, "causal_lm")[0],
        lora_weights_bytes=_base_weights(spec, lora_setup, "causal_lm")[0],
    )


def moe_qlora_warning(spec: ModelSpec, setup: TrainingSetup) -> str | None:
    """For QLoRA on a mixture-of-experts model: which weights stay 16-bit, what QLoRA saves, what to do
    instead (None for other setups)."""
    if setup.method != "qlora" or not spec.num_experts:
        return None
    report = quantization_report(spec, setup)
    experts = report.kept_params.get("experts", 0)
    upcast = (", and PEFT's prepare_model_for_kbit_training upcasts them (with embeddings, lm_head, norms and "
              "routers) to fp32" if setup.upcast_non_quantized else "")
    saved = report.saved_bytes
    verdict = (f"QLoRA saves {saved / GB:.1f} GB" if saved > 0 else f"QLoRA costs {-saved / GB:.1f} GB more")
    return (f"QLoRA quantizes only {report.quantized_share:.0%} of {spec.id}'s weights here: its {experts:,} expert "
            f"weights are fused 3-D parameters (transformers 5), which bitsandbytes does not replace (it quantizes "
            f"nn.Linear modules only), so they stay 16-bit{upcast}: {report.kept_bytes / GB:.1f} GB of its "
            f"{report.qlora_weights_bytes / GB:.1f} GB of weights. {verdict} than LoRA on the 16-bit base "
            f"({report.lora_weights_bytes / GB:.1f} GB of weights). Instead: train LoRA on the 16-bit base "
            "(--method lora) and shard it with ZeRO-3 / FSDP over enough GPUs (--shard zero3 --gpus N); the experts "
            "take no adapters either way (LoRA reaches the attention projections).")


def _warnings(spec: ModelSpec, setup: TrainingSetup, comp: dict[str, int]) -> tuple[str, ...]:
    """What the text output says in prose beside the numbers (MemoryEstimate.warnings)."""
    found = []
    moe = moe_qlora_warning(spec, setup)
    if moe:
        found.append(moe)
    if spec.rough:
        found.append(f"{spec.id}: the model's shape is guessed from its size ({spec.source}), so every figure is rough")
    if setup.optimizer == "paged_adamw_8bit":
        found.append("paged 8-bit AdamW keeps its state in CUDA unified memory, outside PyTorch's allocator: it is "
                     f"not in torch.cuda.max_memory_allocated (the peak) but is in the total ({comp['optimizer'] / GB:.2f} GB)")
    if setup.use_liger_kernel and setup.stage not in ("sft", "dpo"):
        found.append(f"the Liger kernel's fused loss is for SFT and DPO; the {setup.stage} stage computes its own loss")
    return tuple(found)


# -- fitting a GPU ---------------------------------------------------------------------------


@dataclass(frozen=True)
class FitResult:
    """Whether a setup fits a GPU, how far it can grow, and the cheapest change if it does not."""

    fits: bool
    gpu_bytes: int
    """Memory of one GPU."""
    total_bytes: int
    """The estimate's total for the setup as given."""
    headroom_bytes: int
    """gpu_bytes - total_bytes (negative when it does not fit)."""
    max_micro_batch: int
    """Largest micro-batch that fits at this sequence length (0: not even 1)."""
    max_seq_len: int
    """Longest sequence that fits at this micro-batch (0: none), capped by the model's positions (stretched by
    RoPE scaling)."""
    cheapest_fix: str | None
    """A sentence naming the first change that makes it fit (None when it fits or nothing tried does)."""
    fixed_setup: TrainingSetup | None = None
    """The setup with that change applied."""


def _fits(spec: ModelSpec, setup: TrainingSetup, gpu_bytes: int) -> bool:
    return _estimate_cached(spec, setup).total_bytes <= gpu_bytes


def _with_size(setup: TrainingSetup, **changes) -> TrainingSetup:
    """A copy with micro_batch / seq_len changed, skipping re-validation (searches stay fast)."""
    copy = object.__new__(TrainingSetup)
    copy.__dict__.update(setup.__dict__)
    copy.__dict__.update(changes)
    return copy


def _largest(fits_at, low: int, cap: int) -> int:
    """Largest x in [low, cap] with fits_at(x), assuming monotonic; 0 if none.

    Doubling then bisection: about 2 x log2(cap) estimates. Memory never falls as the micro-batch or the
    sequence grows (every term is a non-negative multiple of batch, seq or seq^2; see _cheapest_fix), so
    "fits" is true up to some x and false after it."""
    if not fits_at(low):
        return 0
    hi = low
    while hi < cap and fits_at(min(cap, hi * 2)):
        hi = min(cap, hi * 2)
    if hi == cap:
        return cap
    lo, hi = hi, min(cap, hi * 2)  # fits at lo, not at hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits_at(mid):
            lo = mid
        else:
            hi = mid
    return lo


MAX_MICRO_BATCH_SEARCH = 1024


def _divisors(n: int) -> list[int]:
    """The divisors of n in increasing order, by trial division up to sqrt(n) (n <= 65536: 256 tries)."""
    small, large = [], []
    for d in range(1, math.isqrt(n) + 1):
        if n % d == 0:
            small.append(d)
            if d != n // d:
                large.append(n // d)
    return small + large[::-1]


def gpu_fit(spec: ModelSpec, setup: TrainingSetup, gpu_bytes: int) -> FitResult:
    """Fit `setup` on a GPU of `gpu_bytes`; search the largest micro-batch and sequence; suggest a fix."""
    if not isinstance(gpu_bytes, int) or gpu_bytes <= 0:
        raise TunewiseError(f"hardware.gpu_memory_gb: GPU memory must be positive, got {gpu_bytes!r} bytes", field="hardware.gpu_memory_gb")
    total = estimate(spec, setup).total_bytes
    fits = total <= gpu_bytes
    max_batch = _largest(lambda b: _fits(spec, _with_size(setup, micro_batch=b), gpu_bytes), 1, MAX_MICRO_BATCH_SEARCH)
    # A model's own config may claim any length: the search stops at the longest sequence a plan may have.
    window = context_window(spec, setup.rope_scaling, setup.rope_factor, setup.seq_len)
    max_seq = _largest(lambda s: _fits(spec, _with_size(setup, seq_len=s), gpu_bytes), 1, min(window, MAX_SEQ_LEN))
    fix, fixed = (None, None) if fits else _cheapest_fix(spec, setup, gpu_bytes)
    return FitResult(fits, gpu_bytes, total, gpu_bytes - total, max_batch, max_seq, fix, fixed)


#: (nodes, GPUs per node) the cheapest-fix search shards over, fewest GPUs first: one node up to the 8
#: GPUs a node usually holds (advisor.gpus.TYPICAL_GPUS_PER_NODE), then whole nodes of 8.
SHARD_LAYOUTS = ((1, 2), (1, 4), (1, 8), (2, 8), (4, 8), (8, 8), (16, 8))


def _cheapest_fix(spec: ModelSpec, setup: TrainingSetup, gpu_bytes: int) -> tuple[str | None, TrainingSetup | None]:
    """Climb a ladder of changes, cheapest first, each rung keeping the ones below it: gradient
    checkpointing, 8-bit AdamW, QLoRA, ZeRO-3 over more GPUs (one node of up to 8, then 2, 4, 8, 16
    nodes of 8: SHARD_LAYOUTS). On each rung a smaller micro-batch
    (with more accumulation, so the effective batch stays) is tried before the next rung."""

    def rungs():
        current, said = setup, []
        if setup.method == "qlora" and spec.num_experts and quantization_report(spec, setup).saved_bytes <= 0:
            # QLoRA cannot quantize this MoE model's fused experts and upcasts them to fp32 (moe_qlora_warning):
            # the 16-bit base of LoRA is smaller, so it is the first change and every later rung keeps it.
            current = current.with_(method="lora", optimizer="adamw" if setup.optimizer == "paged_adamw_8bit" else setup.optimizer)
            said.append("train LoRA on the 16-bit base instead of QLoRA (bitsandbytes cannot quantize this model's "
                        "fused experts, and PEFT upcasts them to fp32)")
            yield said, current
        if not setup.gradient_checkpointing:
            current = current.with_(gradient_checkpointing=True)
            said = said + ["turn on gradient checkpointing (about 30% slower, same results)"]
            yield said, current
        if current.optimizer == "adamw":
            current = current.with_(optimizer="adamw_8bit")
            said = said + ["switch to 8-bit AdamW"]
            yield said, current
        # QLoRA is a rung only where it shrinks the base: a mixture-of-experts model keeps its fused experts in
        # 16 bit (fp32 after PEFT's upcast), so there QLoRA costs more than LoRA (see moe_qlora_warning).
        if (setup.method != "qlora" and setup.stage != "ppo"
                and (not spec.num_experts or quantization_report(spec, setup).saved_bytes > 0)):
            current = current.with_(method="qlora", precision="bf16" if setup.precision == "fp32" else setup.precision,
                                    optimizer="paged_adamw_8bit" if current.optimizer != "sgd" else "sgd")
            said = said + ["use QLoRA (4-bit NF4 base, double quantization)"]
            yield said, current
        for nodes, per_node in SHARD_LAYOUTS:
            if nodes * per_node <= setup.world_size:
                continue
            if nodes == 1:
                words = f"shard with ZeRO-3 / FSDP over {per_node} GPUs of this size"
            else:
                words = (f"shard with ZeRO-3 / FSDP over {nodes} nodes x {per_node} GPUs of this size "
                         f"({nodes * per_node} GPUs; `tunewise job` writes the cluster job)")
            yield said + [words], current.with_(num_gpus=per_node, num_nodes=nodes, shard="zero3")

    def answer(words: list[str], option: TrainingSetup) -> tuple[str, TrainingSetup]:
        total = _estimate_cached(spec, option).total_bytes
        sentence = "; ".join(words)
        return f"{sentence[0].upper()}{sentence[1:]}: needs {total / GB:.1f} GB of {gpu_bytes / GB:.1f} GB.", option

    # Smaller micro-batches keep the effective batch: b must divide the micro-batch.
    divisors = _divisors(setup.micro_batch)[:-1]
    for said, candidate in rungs():
        if _fits(spec, candidate, gpu_bytes):
            return answer(said, candidate)

        def smaller(b: int) -> TrainingSetup:
            return candidate.with_(micro_batch=b, grad_accum=setup.grad_accum * setup.micro_batch // b)

        # The largest divisor b that fits, by bisection over the sorted divisors. Valid because memory
        # never falls as b grows: activations, logits, the value model's activations and the KV cache are
        # b x (bytes per sequence), the padding mask b x s^2 (b > 1), and per-token bytes only step up once,
        # at b = 2 (k/v expanded to every head); weights, adapters, gradients and optimizer state do not
        # depend on b. Accumulation enters the estimate only as "more than 1" (gradients live alongside the
        # activations), and every b below the micro-batch gives accumulation of at least 2, so it is the same
        # for all of them. Fitting is therefore true up to some divisor and false after it: log2(divisors)
        # estimates (at most ~8 for b <= 65536) instead of one try per smaller micro-batch.
        if not divisors or not _fits(spec, smaller(divisors[0]), gpu_bytes):
            continue
        lo, hi = 0, len(divisors)  # divisors[lo] fits; divisors[hi] (if any) does not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if _fits(spec, smaller(divisors[mid]), gpu_bytes):
                lo = mid
            else:
                hi = mid
        b = divisors[lo]
        option = smaller(b)
        return answer(said + [f"lower the micro-batch to {b} with gradient accumulation {option.grad_accum} "
                              "(same effective batch)"], option)
    return None, None


# -- host RAM ----------------------------------------------------------------------------------------

#: Resident memory of one training process before it holds any model: Python with torch, transformers, TRL and
#: PEFT imported (measured: 0.43 GB peak RSS, torch 2.13 CPU build, transformers 5.24, TRL 1.12).
HOST_RUNTIME_BYTES = 500 * 10**6
#: What a process adds on the host once it has initialised CUDA: the driver's and CUDA libraries' host-side
#: state (pytorch/pytorch#113326: max RSS 0.32 GB -> 2.06 GB once a tensor is on the GPU, torch 2.2 + CUDA 11.8).
CUDA_HOST_BYTES = 1_700 * 10**6
#: DeepSpeed's ZeRO-Offload keeps, per trainable parameter, an fp32 master copy, AdamW's two fp32 moments and
#: an fp32 gradient in host memory (estimate_zero2_model_states_mem_needs: 16 B/param); ZeRO-3 with parameter
#: offload adds the 16-bit parameters themselves (estimate_zero3_model_states_mem_needs: 18 B/param).
OFFLOAD_BYTES_PER_TRAINABLE = 16
OFFLOAD_PARAM_BYTES = 2


@dataclass(frozen=True)
class HostEstimate:
    """Host RAM one node needs for a training run, by component (bytes), each with how it was computed."""

    components: dict[str, int]
    """runtime, loading, offload, training (the last only when the node trains on its CPU)."""
    explanations: dict[str, str]
    host_ram_bytes: int
    """The node's total: what its RAM must hold at the peak."""
    processes: int
    """Training processes on the node (each loads the model)."""
    on_gpu: bool
    """The run trains on GPUs (False: on this node's CPU, where the whole training footprint is host RAM)."""

    def lines(self) -> list[Component]:
        return [Component(name, nbytes, self.explanations[name]) for name, nbytes in self.components.items()]


def cpu_setup(setup: TrainingSetup) -> TrainingSetup:
    """The setup as Tunewise's trainer runs it on a CPU: everything in fp32 (trainer.models.resolve_precision;
    QLoRA keeps its 4-bit base and computes in fp32), no paged optimizer, no sharding."""
    optimizer = "adamw_8bit" if setup.optimizer == "paged_adamw_8bit" else setup.optimizer
    # _with_size skips validation: the plan refuses QLoRA in fp32 for GPUs, but on a CPU that is what runs.
    return _with_size(setup, precision="fp32", optimizer=optimizer, shard="none", cpu_offload=False)


def host_estimate(spec: ModelSpec, setup: TrainingSetup, on_gpu: bool = True, mmap: bool = True,
                  checkpoint_bytes: int | None = None) -> HostEstimate:
    """Host RAM per node for training `spec` with `setup`.

    - runtime: every process imports the training stack (HOST_RUNTIME_BYTES) and, on GPUs, holds CUDA's host
      state (CUDA_HOST_BYTES); a data-parallel run has one process per GPU, each of which loads the model.
    - loading: transformers memory-maps safetensors (and zip-format .bin) checkpoints, so their pages are the
      kernel's page cache, shared by every process and given back under pressure; it only casts one tensor
      at a time. Without memory-mapping (a pickled .bin, or a FUSE mount where transformers reads the file whole)
      each process holds the file's bytes and the tensors made from them: twice the checkpoint.
    - offload: ZeRO-Offload's optimizer state and fp32 gradients (and with ZeRO-3 the 16-bit parameters),
      per node, whatever the number of processes.
    - training: on a CPU the whole training footprint (weights, gradients, optimizer, activations) is host RAM,
      per process, as `estimate` counts it for the trainer's CPU precision (`cpu_setup`).

    `checkpoint_bytes` is the checkpoint's size on disk (None: 2 bytes per parameter, as released)."""
    processes = setup.num_gpus
    counts = param_counts(spec)
    checkpoint = int(checkpoint_bytes if checkpoint_bytes is not None else 2 * counts.total)
    components: dict[str, int] = {}
    how: dict[str, str] = {}
    per_process = HOST_RUNTIME_BYTES + (CUDA_HOST_BYTES if on_gpu else 0)
    components["runtime"] = processes * per_process
    how["runtime"] = (f"{processes} process{'es' if processes > 1 else ''} x ({HOST_RUNTIME_BYTES / GB:.1f} GB Python + torch + "
                      "transformers + TRL" + (f" + {CUDA_HOST_BYTES / GB:.1f} GB CUDA host state" if on_gpu else "") + ")")
    largest = max(_numel(shape) for shape in _model_tensors(spec, "causal_lm"))
    if mmap:
        components["loading"] = processes * 4 * largest
        how["loading"] = ("checkpoint memory-mapped (safetensors): its pages are shared, reclaimable page cache; "
                          f"each process casts one tensor at a time ({largest:,} elements x 4 B)")
    else:
        components["loading"] = processes * 2 * checkpoint
        how["loading"] = (f"not memory-mapped: each of {processes} process{'es' if processes > 1 else ''} reads the "
                          f"{checkpoint / GB:.2f} GB checkpoint whole and builds its tensors from it (2 x)")
    if setup.cpu_offload and setup.shard != "none":
        trainable = _trained_model(spec, setup, "causal_lm").trainable
        offload = OFFLOAD_BYTES_PER_TRAINABLE * trainable
        text = f"ZeRO-Offload: {trainable:,} trainable params x {OFFLOAD_BYTES_PER_TRAINABLE} B (fp32 master, AdamW moments, fp32 gradients)"
        if setup.shard == "zero3":
            offload += OFFLOAD_PARAM_BYTES * counts.total
            text += f" + {counts.total:,} params x {OFFLOAD_PARAM_BYTES} B (ZeRO-3 offloads the 16-bit weights too)"
        components["offload"] = offload
        how["offload"] = text + ", once per node"
    if not on_gpu:
        cpu = estimate_cpu(spec, setup)
        components["training"] = processes * cpu.peak_allocated_bytes
        how["training"] = (f"training on the CPU in fp32: {processes} x {cpu.peak_allocated_bytes / GB:.2f} GB "
                           f"(the estimate's peak, set by {cpu.peak_phase})")
    return HostEstimate(components, how, sum(components.values()), processes, on_gpu)


def estimate_cpu(spec: ModelSpec, setup: TrainingSetup) -> MemoryEstimate:
    """The memory estimate for the setup as the trainer runs it on a CPU (`cpu_setup`)."""
    return _estimate_cached(spec, cpu_setup(setup))


@dataclass(frozen=True)
class HostFit:
    """Whether a run's host RAM need fits a node's RAM, and the cheapest change if it does not."""

    fits: bool
    host_bytes: int
    """The node's RAM."""
    host_ram_bytes: int
    """The estimate's total."""
    cheapest_fix: str | None
    """A sentence naming the first change that makes it fit (None when it fits or nothing tried does)."""


def host_fit(spec: ModelSpec, setup: TrainingSetup, host_bytes: int, on_gpu: bool = True, mmap: bool = True,
             checkpoint_bytes: int | None = None) -> HostFit:
    """Fit the run's host RAM into `host_bytes`; when it does not fit, climb a ladder of changes, cheapest
    first: a memory-mapped checkpoint, no CPU offload (when the GPUs hold the state then), fewer processes
    per node, and, training on the CPU, the GPU ladder of `gpu_fit` against the RAM left."""
    if not isinstance(host_bytes, int) or host_bytes <= 0:
        raise TunewiseError(f"--host-ram-gb: host RAM must be positive, got {host_bytes!r} bytes", field="host_ram_gb")
    need = host_estimate(spec, setup, on_gpu, mmap, checkpoint_bytes).host_ram_bytes
    if need <= host_bytes:
        return HostFit(True, host_bytes, need, None)

    def total(option: TrainingSetup, mapped: bool) -> int:
        return host_estimate(spec, option, on_gpu, mapped, checkpoint_bytes).host_ram_bytes

    def sentence(words: list[str], nbytes: int) -> str:
        text = "; ".join(words)
        return f"{text[0].upper()}{text[1:]}: needs {nbytes / GB:.1f} GB of {host_bytes / GB:.1f} GB of RAM."

    said: list[str] = []
    current, mapped = setup, mmap
    if not mmap:
        mapped = True
        said.append("save the checkpoint as safetensors (transformers memory-maps it instead of reading it into "
                    "every process)")
        if total(current, mapped) <= host_bytes:
            return HostFit(False, host_bytes, need, sentence(said, total(current, mapped)))
    if current.cpu_offload:
        current = current.with_(cpu_offload=False)
        said.append("turn off CPU offload (the optimizer state moves back to the GPUs: check they hold it)")
        if total(current, mapped) <= host_bytes:
            return HostFit(False, host_bytes, need, sentence(said, total(current, mapped)))
    for processes in range(current.num_gpus - 1, 0, -1):
        option = _with_size(current, num_gpus=processes)
        if total(option, mapped) <= host_bytes:
            return HostFit(False, host_bytes, need, sentence(
                said + [f"run {processes} process{'es' if processes > 1 else ''} on this node instead of {current.num_gpus}"],
                total(option, mapped)))
    if not on_gpu:
        # Training on the CPU: the training footprint is host RAM, so the training ladder applies, with the
        # rungs a CPU has (no 8-bit or paged optimizers, QLoRA computes in fp32 there, no GPUs to shard over).
        one = _with_size(current, num_gpus=1)
        words = said + ([f"run 1 process instead of {current.num_gpus}"] if current.num_gpus > 1 else [])
        rungs = []
        if not one.gradient_checkpointing:
            one = one.with_(gradient_checkpointing=True)
            words = words + ["turn on gradient checkpointing"]
            rungs.append((words, one))
        for b in _divisors(one.micro_batch)[-2::-1]:
            rungs.append((words + [f"lower the micro-batch to {b} with gradient accumulation "
                                   f"{one.grad_accum * one.micro_batch // b} (same effective batch)"],
                          one.with_(micro_batch=b, grad_accum=one.grad_accum * one.micro_batch // b)))
        if one.method == "full":
            smallest = rungs[-1][1] if rungs else one
            rungs.append((rungs[-1][0] + ["train LoRA adapters instead of every weight"] if rungs else
                          words + ["train LoRA adapters instead of every weight"], smallest.with_(method="lora")))
        for rung_words, option in rungs:
            if total(option, mapped) <= host_bytes:
                return HostFit(False, host_bytes, need, sentence(rung_words, total(option, mapped)))
    return HostFit(False, host_bytes, need, None)


# -- the guide's table -----------------------------------------------------------------------

#: The guide's "Memory Savings" table (fine-tuning-guide.md, QLoRA section), GB.
GUIDE_TABLE_GB = {
    "7B": {"full": 28, "lora": 16, "qlora": 6},
    "13B": {"full": 52, "lora": 28, "qlora": 10},
    "70B": {"full": 280, "lora": 160, "qlora": 48},
}
GUIDE_TABLE_MODELS = {"7B": "meta-llama/Llama-2-7b-hf", "13B": "meta-llama/Llama-2-13b-hf", "70B": "meta-llama/Llama-2-70b-hf"}

GUIDE_TABLE_NOTE = (
    "The guide's \"Full FT (fp16)\" column counts 16-bit weights and gradients only (4 bytes per parameter: "
    "7B x 4 = 28 GB); training with mixed-precision AdamW also keeps fp32 master weights and two fp32 moments "
    "(16 bytes per parameter, about 108 GB for Llama-2-7B) plus activations. Its LoRA and QLoRA figures "
    "are close to the weights alone plus a little for adapters and activations."
)


@dataclass(frozen=True)
class GuideRow:
    """One cell of the guide's table beside our estimate."""

    size: str
    model_id: str
    method: str
    guide_bytes: int
    estimate_bytes: int
    """Our total (peak + slack + context) for the stated setup."""
    setup: TrainingSetup


def guide_setup(method: str) -> TrainingSetup:
    """The setup our guide-table column assumes: micro-batch 1, 512 tokens, bf16 / mixed-precision AdamW."""
    if method == "full":
        return TrainingSetup(method="full", precision="amp", optimizer="adamw", micro_batch=1, seq_len=512)
    return TrainingSetup(method=method, precision="bf16", optimizer="adamw", micro_batch=1, seq_len=512,
                         lora_rank=16, lora_targets=("recommended",))


def guide_table() -> list[GuideRow]:
    """The guide's quick-reference table beside our estimate for Llama-2 7B/13B/70B."""
    from advisor.specs import catalogue

    rows = []
    for size, by_method in GUIDE_TABLE_GB.items():
        spec = catalogue()[GUIDE_TABLE_MODELS[size]]
        for method, gb in by_method.items():
            setup = guide_setup(method)
            rows.append(GuideRow(size, spec.id, method, gb * GB, estimate(spec, setup).total_bytes, setup))
    return rows
