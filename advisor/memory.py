"""GPU memory estimator: bytes per component for a training setup, and whether it fits a GPU.

The model is the training stack Tunewise runs (transformers + PEFT + TRL +
bitsandbytes on PyTorch), written as arithmetic on the model's shape:

- weights: 4 B/param in fp32, 2 in 16 bit; QLoRA stores the block's linear
  weights in NF4 (4.5 bits with one fp32 absmax per 64 weights, 4.127 with
  double quantization) or int8, while embeddings, lm_head, norms and biases
  stay unquantized, and PEFT's `prepare_model_for_kbit_training` upcasts them
  to fp32;
- adapters: LoRA's rank x (in + out) per adapted module, kept in fp32 by PEFT;
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
from dataclasses import dataclass, replace
from functools import lru_cache

from advisor.errors import TunewiseError
from advisor.plan import (ATTENTIONS, FIELD_LIMITS, MAX_GRAD_ACCUM, MAX_MICRO_BATCH, MAX_SEQ_LEN, METHODS, OPTIMIZERS,
                          PRECISIONS, SHARDINGS, STAGES, PlanError, settings)
from advisor.specs import ModelSpec, linear_layers, norms_per_layer, param_counts, resolve_targets

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
    def compute_bytes(self) -> int:
        """Bytes per activation element (16-bit compute unless fp32)."""
        return 4 if self.precision == "fp32" else 2

    def with_(self, **changes) -> "TrainingSetup":
        """A copy with some settings changed (validated again)."""
        return replace(self, **changes)


def setup_from_plan(plan) -> TrainingSetup:
    """The memory-relevant settings of an `advisor.plan.Plan`: those whose field names a TrainingSetup
    field (`Setting.memory`)."""
    return TrainingSetup(**{s.memory: s.value(plan) for s in settings() if s.memory})


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
def _lora_tensors(spec: ModelSpec, rank: int, targets: tuple[str, ...], head: str) -> tuple[tuple[int, ...], ...]:
    """Shapes of the LoRA A and B matrices (plus a trainable score head for seq-cls models)."""
    shapes: list[tuple[int, ...]] = []
    for layer in resolve_targets(spec, targets):
        shapes += [(rank, layer.in_features), (layer.out_features, rank)] * layer.count
    shapes = shapes * spec.num_layers
    if "lm_head" in targets and head == "causal_lm":
        shapes += [(rank, spec.hidden_size), (spec.vocab_size, rank)]
    if head == "seq_cls":
        shapes.append((1, spec.hidden_size))  # PEFT's SEQ_CLS task trains the score head (modules_to_save)
    return tuple(shapes)


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


def _layer_activation_bytes_per_token(spec: ModelSpec, setup: TrainingSetup, adapted: frozenset, batch: int) -> float:
    """Bytes autograd keeps per token for one transformer block (excluding the s^2 terms).

    Counts the tensors each op saves for backward in transformers' implementations with the
    given trainable set: `adapted` names the LoRA-adapted layers; in full fine-tuning every
    layer is trainable. A frozen linear saves nothing (its input gradient needs only the weight).
    """
    a = setup.compute_bytes
    h, q, kv, inter = spec.hidden_size, spec.q_dim, spec.kv_dim, spec.intermediate_size
    full = setup.method == "full"
    # A LoRA-adapted module keeps its input again: PEFT casts it to the adapter dtype, applies dropout
    # (1-byte mask) and under autocast saves a 16-bit copy for lora_A.
    lora_input_bytes = (1 if setup.lora_dropout > 0 else 0) + a

    hf = setup.runtime == "transformers"

    def consumers(names, width, fused=False):
        """Saved inputs for linear layers reading the same tensor of `width` elements.

        `fused`: litgpt/torchtune adapt a fused QKV projection with one dropout for all three."""
        nbytes = 0
        if full and names:
            nbytes += a * width  # one shared saved input for the trainable weights' gradients
        hits = [name for name in names if name in adapted]
        copies = 1 if (hits and fused and not hf) else len(hits)
        nbytes += copies * lora_input_bytes * width + len(hits) * a * setup.lora_rank  # input copy + lora_A output
        return nbytes

    # Norm inputs: HF's RMSNorm upcasts to fp32 and keeps that copy (plus the normalized output when
    # its weight trains); LayerNorm keeps its 16-bit input.
    if spec.norm == "rmsnorm":
        # litgpt keeps the fp32 normalized output instead of the 16-bit one.
        norm = 4 * h + ((a if setup.runtime != "litgpt" else 4) * h if full else 0)
    else:
        norm = a * h
    total = norm * norms_per_layer(spec)

    # Attention: SDPA keeps q, k, v and its output (k, v expanded to every head when a padding mask
    # forces transformers' repeat_kv, i.e. batches of more than one sequence).
    # litgpt and torchtune expand k and v to every head before SDPA.
    kv_saved = q if ((batch > 1 or not hf) and kv != q) else kv
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
        total += consumers([down_name], inter)
    elif spec.model_type == "phi3":
        total += consumers(["gate_up_proj"], h)
        total += a * 2 * inter + 2 * a * inter  # gate_up output (split) and the activated half, for the product
        total += consumers(["down_proj"], inter)
    else:
        mlp_in = consumers(["gate_proj", "up_proj"], h) if not spec.num_experts else (a * h * experts if full else 0)
        # gate output (for SiLU/GELU), activation output and up output (for the product).
        mlp_act = 3 * a * inter
        mlp_down = consumers(["down_proj"], inter) if not spec.num_experts else (a * inter if full else 0)
        total += mlp_in + experts * (mlp_act + mlp_down)
        if spec.num_experts:
            total += experts * a * h + 4 * spec.num_experts  # routed token copies and fp32 router probabilities
    if setup.method == "qlora" and setup.runtime == "litgpt":
        # The bitsandbytes of litgpt's published tables (MatMul4Bit before 0.45) kept every quantized
        # layer's input for backward even though the frozen weight needs no gradient: one copy per
        # distinct input (attention input, attention output, MLP input, MLP inner).
        if spec.model_type == "phi":
            total += a * (h + q + inter)
        else:
            total += a * (2 * h + q + inter)
    return total


def _eager_score_bytes(setup: TrainingSetup) -> int:
    """Bytes per attention score kept by eager attention: transformers' softmax runs in fp32 and its
    16-bit copy feeds the value product, so 4 + 2 (fp32 training: 4)."""
    return 4 if setup.precision == "fp32" else 4 + setup.compute_bytes


def _activations(spec: ModelSpec, setup: TrainingSetup, batch: int, seq: int, adapted: frozenset, head: str) -> tuple[int, str]:
    a = setup.compute_bytes
    per_token_layer = _layer_activation_bytes_per_token(spec, setup, adapted, batch)
    tokens = batch * seq
    per_layer = per_token_layer * tokens
    if setup.attn == "eager":
        per_layer += _eager_score_bytes(setup) * spec.num_heads * seq * seq * batch
    # The final norm's saved input, plus the padding mask transformers builds for batches (b x s x s bools).
    tail = (4 * spec.hidden_size if spec.norm == "rmsnorm" else a * spec.hidden_size) * tokens
    mask = batch * seq * seq if batch > 1 else 0
    if head == "causal_lm" and setup.method == "full":
        tail += a * spec.hidden_size * tokens  # lm_head's input, for its weight gradient
    if setup.gradient_checkpointing:
        total = spec.num_layers * a * spec.hidden_size * tokens + per_layer + tail + mask
        how = (f"checkpointing: {spec.num_layers} layer inputs x {a} B x {spec.hidden_size} x {tokens:,} tokens "
               f"+ one layer recomputed ({per_token_layer / spec.hidden_size:.1f} B x hidden per token)")
    else:
        total = spec.num_layers * per_layer + tail + mask
        how = (f"{spec.num_layers} layers x {per_token_layer / spec.hidden_size:.1f} B x hidden per token "
               f"x {tokens:,} tokens (saved tensors of each op)")
    if setup.attn == "eager":
        how += f", + eager attention scores {_eager_score_bytes(setup)} B x {spec.num_heads} heads x seq^2 per layer"
    return int(total), how


def _logits_bytes(spec: ModelSpec, setup: TrainingSetup, batch: int, seq: int, stage: str) -> tuple[int, str]:
    a = setup.compute_bytes
    if setup.runtime == "litgpt":
        # litgpt's chunked cross-entropy stays in 16 bit: logits + log-softmax, gradients one chunk at a time.
        per = 2 * a
        return per * batch * seq * spec.vocab_size, f"{per} B x {batch} x {seq} tokens x {spec.vocab_size:,} vocab (16-bit logits and log-softmax, chunked)"
    if stage == "sft":
        # 16-bit logits kept in the output, their fp32 copy's log-softmax kept for backward, and the
        # fp32 gradients of both during backward: 2 + 4 + 4 + 4 = 14 B (fp32 training and torchtune's
        # fp32 output: 16).
        per = a + 12 if (a == 2 and setup.runtime == "transformers") else 16
        return per * batch * seq * spec.vocab_size, f"{per} B x {batch} x {seq} tokens x {spec.vocab_size:,} vocab (logits, fp32 log-softmax and their gradients)"
    # TRL's DPO/PPO take log-probs row by row (selective_log_softmax): 16-bit logits, their
    # log-softmax and the two gradients.
    per = 4 * a
    return per * batch * seq * spec.vocab_size, f"{per} B x {batch} x {seq} tokens x {spec.vocab_size:,} vocab (logits, per-row log-softmax, gradients)"


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


def _trained_model(spec: ModelSpec, setup: TrainingSetup, head: str) -> _Trained:
    # Only these settings matter here; caching on them keeps searches over batch and length fast.
    key = (setup.method, setup.precision, setup.optimizer, setup.lora_rank, tuple(setup.lora_targets),
           setup.quant_bits, setup.double_quant, setup.upcast_non_quantized, setup.adapter_fp32)
    return _trained_model_cached(spec, key, head)


@lru_cache(maxsize=512)
def _trained_model_cached(spec: ModelSpec, key: tuple, head: str) -> _Trained:
    method, precision, optimizer, rank, targets, quant_bits, double_quant, upcast, adapter_fp32 = key
    setup = TrainingSetup(method=method, precision=precision, optimizer=optimizer, lora_rank=rank, lora_targets=targets,
                          quant_bits=quant_bits, double_quant=double_quant, upcast_non_quantized=upcast,
                          adapter_fp32=adapter_fp32)
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
                        frozenset(), largest)
    targets = tuple(setup.lora_targets)
    shapes = _lora_tensors(spec, setup.lora_rank, targets, head)
    trainable = sum(_numel(s) for s in shapes)
    adapter_bytes = 4 if (setup.adapter_fp32 or setup.precision == "fp32") else 2
    adapted = frozenset(l.name for l in resolve_targets(spec, targets))
    opt, opt_how = _optimizer_bytes(shapes, setup.optimizer, adapter_bytes)
    return _Trained(weights, weights_how, adapter_bytes * trainable,
                    f"rank {setup.lora_rank} on {', '.join(sorted(adapted))}: {trainable:,} params x {adapter_bytes} B",
                    adapter_bytes * trainable, f"{trainable:,} adapter params x {adapter_bytes} B", opt, opt_how,
                    trainable, counts.total, adapted, largest)


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
    act, act_how = _activations(spec, setup, batch, seq, policy.adapted, head)
    if pairs:
        act_how += " (chosen + rejected: 2 x micro-batch)"
    components.append(Component("activations", act, act_how))
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
        value_act, _ = _activations(spec, setup, setup.micro_batch, seq, value.adapted, "seq_cls")
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
    static = comp["weights"] + comp.get("adapters", 0) + comp["optimizer"] + extra_static
    if stage == "ppo":
        static += comp["value_model"] + comp["generation_cache"]
    grads_now = comp["gradients"]
    moving = comp["activations"] + comp["logits"] + comp["overhead"]
    if setup.optimizer == "paged_adamw_8bit":
        static -= comp["optimizer"]  # cudaMallocManaged pages: not in max_memory_allocated
    if setup.grad_accum > 1 or setup.method != "full":
        peak = static + grads_now + moving
        how = "weights + optimizer + gradients + activations + logits + overhead all at the start of backward"
    else:
        # Without accumulation the gradients appear as the activations are freed layer by layer:
        # the peak is the larger of the start of backward and the optimizer step.
        peak = static + max(moving, grads_now + comp["overhead"])
        how = "weights + optimizer + the larger of (activations + logits) at the start of backward and gradients at the step"
    if stage == "ppo":
        how += "; PPO: value model and generation cache alongside"
    if setup.optimizer == "paged_adamw_8bit":
        how += "; paged optimizer state not counted (outside PyTorch's allocator) but included in the total"
        total = int((peak) * ALLOCATOR_SLACK) + comp["optimizer"] + CUDA_CONTEXT_BYTES
    else:
        total = int(peak * ALLOCATOR_SLACK) + CUDA_CONTEXT_BYTES
    return MemoryEstimate(
        model_id=spec.id,
        setup=setup,
        components={c.name: c.bytes for c in components},
        explanations={c.name: c.explanation for c in components},
        peak_allocated_bytes=int(peak),
        total_bytes=total,
        peak_explanation=how + f"; total = peak x {ALLOCATOR_SLACK} allocator slack + {CUDA_CONTEXT_BYTES / GB:.1f} GB CUDA context",
        params_total=policy.total_params,
        trainable_params=policy.trainable,
        rough=spec.rough,
    )


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
    """Longest sequence that fits at this micro-batch (0: none), capped by the model's positions."""
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
    max_seq = _largest(lambda s: _fits(spec, _with_size(setup, seq_len=s), gpu_bytes), 1,
                       min(spec.max_position_embeddings, MAX_SEQ_LEN))
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
        if not setup.gradient_checkpointing:
            current = current.with_(gradient_checkpointing=True)
            said.append("turn on gradient checkpointing (about 30% slower, same results)")
            yield said, current
        if setup.optimizer == "adamw":
            current = current.with_(optimizer="adamw_8bit")
            said = said + ["switch to 8-bit AdamW"]
            yield said, current
        if setup.method != "qlora" and setup.stage != "ppo":
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
