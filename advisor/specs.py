"""Model specs: the architecture numbers the planner needs, and exact parameter counts.

A `ModelSpec` holds a model's shape (hidden size, layers, heads, KV heads,
intermediate size, vocabulary, tied embeddings, biases, experts, norm type),
never its weights. Specs come from the catalogue in `assets/models.json`
(keyed by Hugging Face id, case-insensitive, with short aliases), from a local
directory's `config.json`, from the hub's `config.json` when online, or from a
bare size such as "7B" (the guide's rough mode: a Llama-shaped model of that
size, flagged `rough=True`).

From a spec this module derives, with exact integer arithmetic:

- `param_counts(spec)`: parameters split by kind (embeddings, attention,
  MLP/experts, norms, lm_head) and how many a bitsandbytes quantizer would
  quantize (the weights of every nn.Linear / Conv1D inside the blocks);
- `linear_layers(spec)`: the real module names of the block's linear layers
  with their shapes, e.g. GPT-2's `c_attn`, Phi-3's `qkv_proj`;
- `target_module_sets(spec)`: the guide's minimum / recommended / maximum LoRA
  targets mapped onto those names;
- `lora_trainable_params(spec, rank, targets)`: what PEFT reports as trainable;
- `to_hf_config_dict(spec)`: a plain dict transformers turns into a config
  (the tests use it to prove the counts on the meta device).

Pure Python: no torch or transformers.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

from advisor.errors import ModelNotFound, TunewiseError

REPO_ROOT = Path(__file__).resolve().parent.parent
CATALOGUE_PATH = REPO_ROOT / "assets" / "models.json"
DEMO_MODEL_DIR = REPO_ROOT / "assets" / "demo-model"

#: Architectures whose layout this module knows exactly (transformers' model_type).
KNOWN_MODEL_TYPES = ("llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "gemma2", "phi3", "phi", "stablelm", "gpt2")

#: Architectures whose positions are rotary (RoPE), which transformers' `rope_parameters` can stretch;
#: GPT-2 learns one embedding per position, so its window cannot be scaled.
ROTARY_MODEL_TYPES = tuple(t for t in KNOWN_MODEL_TYPES if t != "gpt2")

#: How long a hub lookup may take before we call it offline (seconds).
HUB_TIMEOUT_S = 4.0


@dataclass(frozen=True)
class ModelSpec:
    """The shape of a causal language model: everything memory and LoRA arithmetic needs."""

    id: str
    """Canonical name: the Hugging Face id for catalogue and hub models, the directory for local ones."""
    model_type: str
    """transformers' model_type (llama, mistral, mixtral, qwen2, qwen2_moe, gemma2, phi3, phi, stablelm, gpt2)."""
    hidden_size: int
    """Width of the residual stream (d_model)."""
    num_layers: int
    """Number of transformer blocks."""
    num_heads: int
    """Attention (query) heads."""
    num_kv_heads: int
    """Key/value heads (fewer than num_heads for grouped-query attention)."""
    intermediate_size: int
    """MLP inner width (per expert for mixture-of-experts models: Qwen2-MoE's moe_intermediate_size)."""
    vocab_size: int
    """Rows of the token embedding (and columns of the lm_head)."""
    max_position_embeddings: int
    """Longest sequence the model was built for."""
    head_dim: int = 0
    """Per-head width; 0 means hidden_size // num_heads."""
    tie_embeddings: bool = False
    """The lm_head shares the embedding matrix (no separate parameters)."""
    qkv_bias: bool = False
    """Query/key/value projections have biases (Qwen2, phi-1_5, GPT-2)."""
    o_bias: bool = False
    """The attention output projection has a bias."""
    mlp_bias: bool = False
    """MLP projections have biases."""
    lm_head_bias: bool = False
    """The lm_head has a bias (phi-1_5)."""
    norm: str = "rmsnorm"
    """rmsnorm (weight only) or layernorm (weight and bias)."""
    num_experts: int = 0
    """Experts per MoE layer (0 for dense models)."""
    experts_per_token: int = 0
    """Experts each token is routed to (Mixtral: 2)."""
    shared_expert_size: int = 0
    """Inner width of the dense expert every token also goes through (Qwen2-MoE's
    shared_expert_intermediate_size; 0 when there is none)."""
    hf_extra: tuple = ()
    """Other config.json entries needed to rebuild the model (rope_theta, eps, ...), as sorted (key, value) pairs."""
    aliases: tuple[str, ...] = ()
    """Short names that also find this model in the catalogue."""
    rough: bool = False
    """True when the shape is guessed (a bare size like "7B" or an unknown architecture)."""
    source: str = "catalogue"
    """Where the numbers came from: catalogue, local config, hub config, rough size, demo."""

    def __post_init__(self):
        for name in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size", "vocab_size", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise TunewiseError(f"model spec {self.id}: {name} must be a positive whole number, got {value!r}", field=name)
        if self.num_heads % self.num_kv_heads:
            raise TunewiseError(f"model spec {self.id}: num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})", field="num_kv_heads")
        if self.norm not in ("rmsnorm", "layernorm"):
            raise TunewiseError(f"model spec {self.id}: norm must be rmsnorm or layernorm, got {self.norm!r}", field="norm")

    @property
    def head_size(self) -> int:
        """Per-head width actually used."""
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def q_dim(self) -> int:
        """Width of the query projection output (heads x head size)."""
        return self.num_heads * self.head_size

    @property
    def kv_dim(self) -> int:
        """Width of the key (or value) projection output."""
        return self.num_kv_heads * self.head_size

    @property
    def extra(self) -> dict:
        """`hf_extra` as a dict."""
        return dict(self.hf_extra)

    @property
    def display_name(self) -> str:
        return self.id


@dataclass(frozen=True)
class LinearLayer:
    """One linear layer inside every transformer block."""

    name: str
    """The name a user targets with LoRA (PEFT matches it as a suffix of the module path)."""
    path: str
    """Module path inside a block, e.g. self_attn.q_proj, attn.c_proj, mlp.experts.gate_up_proj."""
    in_features: int
    out_features: int
    bias: bool
    """Has a bias vector."""
    kind: str
    """attention or mlp."""
    count: int = 1
    """Copies per block (experts for fused MoE weights)."""
    is_module: bool = True
    """An nn.Linear / Conv1D module: bitsandbytes quantizes it and LoRA can target it by name.
    False for fused expert tensors (nn.Parameter), which neither does."""

    @property
    def weight_params(self) -> int:
        return self.in_features * self.out_features * self.count

    @property
    def params(self) -> int:
        return self.weight_params + (self.out_features * self.count if self.bias else 0)


@dataclass(frozen=True)
class ParamCounts:
    """Exact parameter counts by kind (tied embeddings counted once)."""

    embeddings: int
    """Token embedding (plus GPT-2's learned position embedding)."""
    attention: int
    """Query/key/value/output projections with their biases, all layers."""
    mlp: int
    """MLP projections (all experts and the router for MoE), all layers."""
    norms: int
    """Norm weights (and biases), all layers plus the final norm."""
    lm_head: int
    """Output projection (0 when tied to the embedding); the score head for sequence classification."""
    total: int
    """Everything."""
    quantizable: int
    """Weights of the block's nn.Linear / Conv1D layers: what bitsandbytes replaces (embeddings,
    lm_head, norms, biases and fused expert tensors stay in 16 bit)."""
    quantizable_bias: int
    """Biases of those quantized layers (kept in 16 bit)."""
    linear_modules: int
    """Number of quantizable linear modules in the whole model (each carries quantization constants)."""


# -- architecture layouts ----------------------------------------------------------------------


def linear_layers(spec: ModelSpec) -> dict[str, LinearLayer]:
    """The block's linear layers by the name LoRA targets use, in forward order."""
    return dict(_linear_layers(spec))


@lru_cache(maxsize=256)
def _linear_layers(spec: ModelSpec) -> tuple:
    h, q, kv, inter = spec.hidden_size, spec.q_dim, spec.kv_dim, spec.intermediate_size
    t = spec.model_type
    layers: list[LinearLayer] = []
    if t == "gpt2":
        layers = [
            LinearLayer("c_attn", "attn.c_attn", h, 3 * h, True, "attention"),
            LinearLayer("attn.c_proj", "attn.c_proj", h, h, True, "attention"),
            LinearLayer("c_fc", "mlp.c_fc", h, inter, True, "mlp"),
            LinearLayer("mlp.c_proj", "mlp.c_proj", inter, h, True, "mlp"),
        ]
    elif t == "phi3":
        layers = [
            LinearLayer("qkv_proj", "self_attn.qkv_proj", h, q + 2 * kv, spec.qkv_bias, "attention"),
            LinearLayer("o_proj", "self_attn.o_proj", q, h, spec.o_bias, "attention"),
            LinearLayer("gate_up_proj", "mlp.gate_up_proj", h, 2 * inter, spec.mlp_bias, "mlp"),
            LinearLayer("down_proj", "mlp.down_proj", inter, h, spec.mlp_bias, "mlp"),
        ]
    elif t == "phi":
        layers = [
            LinearLayer("q_proj", "self_attn.q_proj", h, q, spec.qkv_bias, "attention"),
            LinearLayer("k_proj", "self_attn.k_proj", h, kv, spec.qkv_bias, "attention"),
            LinearLayer("v_proj", "self_attn.v_proj", h, kv, spec.qkv_bias, "attention"),
            LinearLayer("dense", "self_attn.dense", q, h, spec.o_bias, "attention"),
            LinearLayer("fc1", "mlp.fc1", h, inter, spec.mlp_bias, "mlp"),
            LinearLayer("fc2", "mlp.fc2", inter, h, spec.mlp_bias, "mlp"),
        ]
    else:
        # Llama layout (llama, mistral, qwen2, gemma2, stablelm, mixtral's attention).
        layers = [
            LinearLayer("q_proj", "self_attn.q_proj", h, q, spec.qkv_bias, "attention"),
            LinearLayer("k_proj", "self_attn.k_proj", h, kv, spec.qkv_bias, "attention"),
            LinearLayer("v_proj", "self_attn.v_proj", h, kv, spec.qkv_bias, "attention"),
            LinearLayer("o_proj", "self_attn.o_proj", q, h, spec.o_bias, "attention"),
        ]
        if spec.num_experts:
            # transformers 5 fuses the experts into 3-D parameters (MixtralExperts, Qwen2MoeExperts: one
            # nn.Parameter of shape (experts, out, in) each): not nn.Linear, so bitsandbytes does not replace them.
            e = spec.num_experts
            layers += [
                LinearLayer("experts.gate_up_proj", "mlp.experts.gate_up_proj", h, 2 * inter, False, "mlp", count=e, is_module=False),
                LinearLayer("experts.down_proj", "mlp.experts.down_proj", inter, h, False, "mlp", count=e, is_module=False),
            ]
            if spec.shared_expert_size:
                # Qwen2-MoE's shared expert is an ordinary gated MLP of nn.Linear modules, and its sigmoid gate
                # (hidden -> 1) is an nn.Linear too: bitsandbytes quantizes all four.
                shared = spec.shared_expert_size
                layers += [
                    LinearLayer("shared_expert.gate_proj", "mlp.shared_expert.gate_proj", h, shared, False, "mlp"),
                    LinearLayer("shared_expert.up_proj", "mlp.shared_expert.up_proj", h, shared, False, "mlp"),
                    LinearLayer("shared_expert.down_proj", "mlp.shared_expert.down_proj", shared, h, False, "mlp"),
                    LinearLayer("shared_expert_gate", "mlp.shared_expert_gate", h, 1, False, "mlp"),
                ]
        else:
            layers += [
                LinearLayer("gate_proj", "mlp.gate_proj", h, inter, spec.mlp_bias, "mlp"),
                LinearLayer("up_proj", "mlp.up_proj", h, inter, spec.mlp_bias, "mlp"),
                LinearLayer("down_proj", "mlp.down_proj", inter, h, spec.mlp_bias, "mlp"),
            ]
    return tuple((layer.name, layer) for layer in layers)


def norms_per_layer(spec: ModelSpec) -> int:
    """Norm modules inside one block."""
    if spec.model_type == "gemma2":
        return 4  # input, post-attention, pre-feedforward, post-feedforward
    if spec.model_type == "phi":
        return 1  # one shared norm: attention and MLP run in parallel
    return 2


def router_params_per_layer(spec: ModelSpec) -> int:
    """MoE router weights in one block (hidden -> experts, no bias)."""
    return spec.num_experts * spec.hidden_size if spec.num_experts else 0


@lru_cache(maxsize=512)
def param_counts(spec: ModelSpec, head: str = "causal_lm", num_labels: int = 1) -> ParamCounts:
    """Exact parameter counts. head="seq_cls" swaps the lm_head for a score head (reward/value models)."""
    if head not in ("causal_lm", "seq_cls"):
        raise TunewiseError(f"head must be causal_lm or seq_cls, got {head!r}", field="head")
    h, layers = spec.hidden_size, spec.num_layers
    norm_size = h * (2 if spec.norm == "layernorm" else 1)
    embeddings = spec.vocab_size * h
    if spec.model_type == "gpt2":
        embeddings += spec.max_position_embeddings * h  # learned positions (wpe)
    block_linears = linear_layers(spec).values()
    attention = layers * sum(l.params for l in block_linears if l.kind == "attention")
    mlp = layers * (sum(l.params for l in block_linears if l.kind == "mlp") + router_params_per_layer(spec))
    norms = (layers * norms_per_layer(spec) + 1) * norm_size
    if head == "seq_cls":
        lm_head = h * num_labels  # score: Linear(hidden, num_labels, bias=False)
    elif spec.tie_embeddings:
        lm_head = 0
    else:
        lm_head = spec.vocab_size * h + (spec.vocab_size if spec.lm_head_bias else 0)
    quantizable = layers * sum(l.weight_params for l in block_linears if l.is_module)
    quantizable_bias = layers * sum(l.params - l.weight_params for l in block_linears if l.is_module)
    modules = layers * sum(l.count for l in block_linears if l.is_module)
    return ParamCounts(
        embeddings=embeddings,
        attention=attention,
        mlp=mlp,
        norms=norms,
        lm_head=lm_head,
        total=embeddings + attention + mlp + norms + lm_head,
        quantizable=quantizable,
        quantizable_bias=quantizable_bias,
        linear_modules=modules,
    )


# -- LoRA targets ------------------------------------------------------------------------------


def target_module_sets(spec: ModelSpec) -> dict[str, list[str]]:
    """The guide's LoRA target sets mapped to this architecture's module names.

    minimum: query and value projections; recommended: all attention; maximum: attention + MLP.
    Fused projections (GPT-2's c_attn, Phi-3's qkv_proj) cannot be split, so the minimum set
    adapts the fused layer.
    """
    names = list(linear_layers(spec))
    if spec.model_type == "gpt2":
        return {
            "minimum": ["c_attn"],
            "recommended": ["c_attn", "attn.c_proj"],
            "maximum": ["c_attn", "c_proj", "c_fc"],
        }
    if spec.model_type == "phi3":
        return {
            "minimum": ["qkv_proj"],
            "recommended": ["qkv_proj", "o_proj"],
            "maximum": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
        }
    out_name = "dense" if spec.model_type == "phi" else "o_proj"
    attention = ["q_proj", "k_proj", "v_proj", out_name]
    # Mixtral's experts are fused tensors in transformers 5, not modules: LoRA by name reaches attention only.
    mlp = [n for n, l in linear_layers(spec).items() if l.kind == "mlp" and l.is_module]
    assert all(n in names for n in attention)
    return {"minimum": ["q_proj", "v_proj"], "recommended": attention, "maximum": attention + mlp}


def _target_matches(path: str, target: str) -> bool:
    """PEFT's rule: a target matches a module whose full name is it or ends with '.' + it."""
    return ("." + path).endswith("." + target)


def rope_factor_for(window: int, seq_len: int, factor: float | None) -> float:
    """The factor a RoPE scaling uses: the plan's own, else seq_len / the model's window rounded up to a whole
    number (LLaMA-Factory's rule, `configure_rope`), and never below 1."""
    if factor is not None:
        return float(factor)
    return float(max(1, math.ceil(seq_len / window)))


def check_context(name: str, window: int, seq_len: int, rope_scaling: str = "none", rope_factor: float | None = None,
                  rotary: bool = True) -> float | None:
    """Refuse a training sequence the model's positions cannot hold; return the RoPE factor to apply (None:
    no scaling). The planner (`check_seq_len`) and the trainer's pre-flight (which reads the real config)
    both ask this, so they refuse the same plans with the same words.

    `window` is the model's max_position_embeddings; with `rope_scaling` (linear, dynamic or yarn) a rotary
    model's window stretches by the factor (`rope_factor_for`)."""
    if rope_scaling == "none":
        if seq_len > window:
            raise TunewiseError(
                f"training.seq_len: {seq_len} is longer than {name}'s window of {window} positions: set "
                f"training.rope_scaling (--rope-scaling yarn, linear or dynamic) to stretch the window to it, or "
                "lower training.seq_len (the dataset profile recommends one)",
                field="training.seq_len",
            )
        return None
    if not rotary:
        raise TunewiseError(
            f"training.rope_scaling: {name} learns one embedding per position (no rotary positions), so RoPE "
            f"scaling cannot stretch its window of {window}: set it to none and keep training.seq_len within {window}",
            field="training.rope_scaling",
        )
    factor = rope_factor_for(window, seq_len, rope_factor)
    if seq_len > factor * window:
        raise TunewiseError(
            f"training.rope_factor: {factor:g} x {name}'s window of {window} is {int(factor * window)} positions, "
            f"shorter than training.seq_len {seq_len}: raise it to {math.ceil(seq_len / window)} or leave it unset "
            "(it is then seq_len / window, rounded up)",
            field="training.rope_factor",
        )
    return factor


def context_window(spec: ModelSpec, rope_scaling: str = "none", rope_factor: float | None = None,
                   seq_len: int | None = None) -> int:
    """The longest sequence a setup may train: the model's positions, times the RoPE factor when scaling is on
    (with no factor given, the one `seq_len` needs)."""
    window = spec.max_position_embeddings
    if rope_scaling == "none" or spec.model_type not in ROTARY_MODEL_TYPES:
        return window
    return int(rope_factor_for(window, seq_len or window, rope_factor) * window)


def check_seq_len(spec: ModelSpec, seq_len: int, rope_scaling: str = "none", rope_factor: float | None = None) -> None:
    """Refuse a training sequence longer than the model's window unless RoPE scaling stretches it (the trainer
    refuses the same, see `check_context`); rough sizes ("7B") have no real maximum and are not checked."""
    if not spec.rough:
        check_context(spec.id, spec.max_position_embeddings, seq_len, rope_scaling, rope_factor,
                      rotary=spec.model_type in ROTARY_MODEL_TYPES)


def quantized_parameter_names(spec: ModelSpec) -> tuple[str, ...]:
    """The parameters bitsandbytes turns into `Params4bit` / `Int8Params` when transformers loads `spec` with a
    BitsAndBytesConfig: the weight of every nn.Linear / Conv1D inside the blocks (`LinearLayer.is_module`).
    Left out: embeddings and lm_head (transformers' `get_keys_to_not_convert` skips the output embedding),
    norms, biases, MoE routers (`TopKRouter` holds a bare nn.Parameter) and fused expert tensors (3-D
    nn.Parameters, which `replace_with_bnb_linear` never sees). Names as `model.named_parameters()` gives them."""
    prefix = "transformer.h" if spec.model_type == "gpt2" else "model.layers"
    names = []
    for index in range(spec.num_layers):
        for layer in linear_layers(spec).values():
            if layer.is_module:
                names.append(f"{prefix}.{index}.{layer.path}.weight")
    return tuple(names)


def resolve_targets(spec: ModelSpec, targets) -> list[LinearLayer]:
    """The block layers a target list selects ("all-linear" = every linear module in the blocks).

    Raises TunewiseError naming method.lora_targets when a name matches nothing.
    """
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    targets = list(targets)
    layers = linear_layers(spec)
    if not targets:
        raise TunewiseError("method.lora_targets: is empty: name modules such as q_proj,v_proj or use all-linear", field="method.lora_targets")
    if any(t in ("all-linear", "all_linear") for t in targets):
        return [l for l in layers.values() if l.is_module]
    sets = target_module_sets(spec)
    # The guide's set names ("minimum", "recommended", "maximum") stand for this architecture's modules.
    targets = [name for t in targets for name in (sets[t] if t in sets else [t])]
    chosen: list[LinearLayer] = []
    for target in targets:
        if target in ("lm_head", "embed_tokens", "wte"):
            continue  # whole-model modules, handled by lora_trainable_params
        matched = [l for l in layers.values() if l.is_module and _target_matches(l.path, target)]
        if not matched:
            known = ", ".join(n for n, l in layers.items() if l.is_module)
            raise TunewiseError(
                f"method.lora_targets: {target!r} is not a linear layer of {spec.id} ({spec.model_type}); "
                f"its layers are {known}, or use all-linear",
                field="method.lora_targets",
            )
        for layer in matched:
            if layer not in chosen:
                chosen.append(layer)
    return chosen


def lora_trainable_params(spec: ModelSpec, rank: int, targets) -> int:
    """Trainable parameters LoRA adds: rank x (in + out) per adapted module (what PEFT reports).

    `targets` may also name "lm_head" (rank x (hidden + vocab)) or the embedding.
    """
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise TunewiseError(f"method.lora_rank: must be a whole number of at least 1, got {rank!r}", field="method.lora_rank")
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    targets = list(targets)
    per_layer = sum(rank * (l.in_features + l.out_features) * l.count for l in resolve_targets(spec, targets))
    total = per_layer * spec.num_layers
    if "lm_head" in targets:
        total += rank * (spec.hidden_size + spec.vocab_size)
    if "embed_tokens" in targets or "wte" in targets:
        total += rank * (spec.vocab_size + spec.hidden_size)
    return total


# -- transformers config -----------------------------------------------------------------------


def to_hf_config_dict(spec: ModelSpec) -> dict[str, Any]:
    """A config.json-style dict for transformers (`AutoConfig.for_model(**d)`), pure data."""
    extra = spec.extra
    if spec.model_type == "gpt2":
        d = {
            "model_type": "gpt2",
            "n_embd": spec.hidden_size,
            "n_layer": spec.num_layers,
            "n_head": spec.num_heads,
            "n_inner": spec.intermediate_size,
            "n_positions": spec.max_position_embeddings,
            "vocab_size": spec.vocab_size,
            "tie_word_embeddings": spec.tie_embeddings,
            "activation_function": "gelu_new",
        }
        d.update(extra)
        return d
    d = {
        "model_type": spec.model_type,
        "hidden_size": spec.hidden_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "intermediate_size": spec.intermediate_size,
        "vocab_size": spec.vocab_size,
        "max_position_embeddings": spec.max_position_embeddings,
        "tie_word_embeddings": spec.tie_embeddings,
    }
    if spec.head_dim:
        d["head_dim"] = spec.head_dim
    if spec.model_type == "llama":
        d["attention_bias"] = spec.qkv_bias
        d["mlp_bias"] = spec.mlp_bias
    elif spec.model_type == "stablelm":
        d["use_qkv_bias"] = spec.qkv_bias
    elif spec.model_type == "mixtral":
        d["num_local_experts"] = spec.num_experts
        d["num_experts_per_tok"] = spec.experts_per_token
    elif spec.model_type == "qwen2_moe":
        d["moe_intermediate_size"] = spec.intermediate_size
        d["shared_expert_intermediate_size"] = spec.shared_expert_size
        d["num_experts"] = spec.num_experts
        d["num_experts_per_tok"] = spec.experts_per_token
        d["qkv_bias"] = spec.qkv_bias
    elif spec.model_type == "gemma2":
        d["attention_bias"] = spec.qkv_bias
    d.update(extra)
    return d


# -- where specs come from ---------------------------------------------------------------------

#: Per-architecture defaults for what config.json does not say (transformers' own defaults).
_FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {"norm": "rmsnorm"},
    "mistral": {"norm": "rmsnorm"},
    "mixtral": {"norm": "rmsnorm"},
    "qwen2": {"norm": "rmsnorm", "qkv_bias": True},
    "qwen2_moe": {"norm": "rmsnorm", "qkv_bias": True},
    "gemma2": {"norm": "rmsnorm", "tie_embeddings": True},
    "phi3": {"norm": "rmsnorm"},
    "phi": {"norm": "layernorm", "qkv_bias": True, "o_bias": True, "mlp_bias": True, "lm_head_bias": True},
    "stablelm": {"norm": "layernorm"},
    "gpt2": {"norm": "layernorm", "qkv_bias": True, "o_bias": True, "mlp_bias": True, "tie_embeddings": True},
}

#: config.json keys kept in hf_extra when present (enough to rebuild the model faithfully).
_EXTRA_KEYS = (
    "rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", "rope_theta", "partial_rotary_factor",
    "sliding_window", "query_pre_attn_scalar", "final_logit_softcapping", "attn_logit_softcapping",
)


def _spec_from_entry(model_id: str, entry: Mapping[str, Any], source: str) -> ModelSpec:
    model_type = entry["model_type"]
    values = dict(_FAMILY_DEFAULTS.get(model_type, {"norm": "rmsnorm"}))
    for key in ("qkv_bias", "o_bias", "mlp_bias", "lm_head_bias", "tie_embeddings", "norm"):
        if key in entry:
            values[key] = entry[key]
    return ModelSpec(
        id=model_id,
        model_type=model_type,
        hidden_size=int(entry["hidden_size"]),
        num_layers=int(entry["num_layers"]),
        num_heads=int(entry["num_heads"]),
        num_kv_heads=int(entry.get("num_kv_heads") or entry["num_heads"]),
        intermediate_size=int(entry["intermediate_size"]),
        vocab_size=int(entry["vocab_size"]),
        max_position_embeddings=int(entry["max_position_embeddings"]),
        head_dim=int(entry.get("head_dim") or 0),
        num_experts=int(entry.get("num_experts") or 0),
        experts_per_token=int(entry.get("experts_per_token") or 0),
        shared_expert_size=int(entry.get("shared_expert_size") or 0),
        hf_extra=tuple(sorted((entry.get("hf_extra") or {}).items())),
        aliases=tuple(entry.get("aliases", ())),
        source=source,
        rough=bool(entry.get("rough", False)),
        **values,
    )


@lru_cache(maxsize=1)
def catalogue() -> dict[str, ModelSpec]:
    """Every catalogue model by its Hugging Face id."""
    data = json.loads(CATALOGUE_PATH.read_text(encoding="utf-8"))
    return {model_id: _spec_from_entry(model_id, entry, "catalogue") for model_id, entry in data["models"].items()}


@lru_cache(maxsize=1)
def _catalogue_index() -> dict[str, str]:
    """Lower-cased ids and aliases (and the id's part after the slash) -> canonical id."""
    index: dict[str, str] = {}
    for model_id, spec in catalogue().items():
        index[model_id.lower()] = model_id
        for alias in spec.aliases:
            index[alias.lower()] = model_id
    for model_id in catalogue():
        index.setdefault(model_id.split("/")[-1].lower(), model_id)
    return index


def catalogue_names() -> list[str]:
    """Catalogue ids, in catalogue order (for menus)."""
    return list(catalogue())


def spec_from_hf_config(config: Mapping[str, Any], model_id: str, source: str = "local config") -> ModelSpec:
    """Read a transformers config.json dict (Llama-like, GPT-2, Qwen2, Mistral, Mixtral, Gemma2, Phi, Phi3, StableLM).

    Unknown architectures with Llama-like fields are read as Llama-shaped and flagged rough.
    """
    cfg = dict(config)
    if isinstance(cfg.get("text_config"), dict) and "hidden_size" not in cfg:
        cfg = {**cfg["text_config"], "model_type": cfg["text_config"].get("model_type", cfg.get("model_type"))}
    model_type = str(cfg.get("model_type") or "")

    def first(*keys, default=None):
        for key in keys:
            if cfg.get(key) is not None:
                return cfg[key]
        return default

    try:
        hidden = int(first("hidden_size", "n_embd", "d_model"))
        layers = int(first("num_hidden_layers", "n_layer", "num_layers"))
        heads = int(first("num_attention_heads", "n_head", "num_heads"))
    except (TypeError, ValueError):
        raise ModelNotFound(
            f"{model_id}: config.json lacks hidden_size / num_hidden_layers / num_attention_heads, "
            "so its shape cannot be read; give a catalogue id or a bare size such as 7B"
        ) from None
    kv_heads = int(first("num_key_value_heads", "n_head_kv", default=heads))
    inter = first("intermediate_size", "n_inner", "ffn_dim")
    if inter is None:
        inter = 4 * hidden
    vocab = int(first("vocab_size", "padded_vocab_size", default=32000))
    max_pos = int(first("max_position_embeddings", "n_positions", "seq_length", default=2048))
    family = model_type if model_type in KNOWN_MODEL_TYPES else "llama"
    defaults = _FAMILY_DEFAULTS[family]
    tie_default = defaults.get("tie_embeddings", False)
    entry: dict[str, Any] = {
        "model_type": family,
        "hidden_size": hidden,
        "num_layers": layers,
        "num_heads": heads,
        "num_kv_heads": kv_heads,
        "intermediate_size": int(inter),
        "vocab_size": vocab,
        "max_position_embeddings": max_pos,
        "tie_embeddings": bool(first("tie_word_embeddings", default=tie_default)),
        "hf_extra": {k: cfg[k] for k in _EXTRA_KEYS if cfg.get(k) is not None},
        "rough": model_type not in KNOWN_MODEL_TYPES,
    }
    head_dim = cfg.get("head_dim")
    if head_dim and int(head_dim) * heads != hidden:
        entry["head_dim"] = int(head_dim)
    if family == "llama":
        entry["qkv_bias"] = entry["o_bias"] = bool(cfg.get("attention_bias", False))
        entry["mlp_bias"] = bool(cfg.get("mlp_bias", False))
    elif family == "gemma2":
        entry["qkv_bias"] = entry["o_bias"] = bool(cfg.get("attention_bias", False))
    elif family == "stablelm":
        entry["qkv_bias"] = bool(cfg.get("use_qkv_bias", False))
    elif family == "mixtral":
        entry["num_experts"] = int(first("num_local_experts", default=8))
        entry["experts_per_token"] = int(first("num_experts_per_tok", default=2))
    elif family == "qwen2_moe":
        # transformers' Qwen2MoeConfig defaults (Qwen1.5-MoE-A2.7B's shape); every layer sparse
        # (decoder_sparse_step 1, no mlp_only_layers), as in the released Qwen MoE models.
        entry["intermediate_size"] = int(first("moe_intermediate_size", default=1408))
        entry["shared_expert_size"] = int(first("shared_expert_intermediate_size", default=5632))
        entry["num_experts"] = int(first("num_experts", default=60))
        entry["experts_per_token"] = int(first("num_experts_per_tok", default=4))
        entry["qkv_bias"] = bool(cfg.get("qkv_bias", True))
    spec = _spec_from_entry(model_id, entry, source if model_type in KNOWN_MODEL_TYPES else f"{source} (unknown architecture {model_type!r}, read as Llama-shaped)")
    return spec


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([bBmM])\s*$")


def rough_spec(size: str) -> ModelSpec:
    """A Llama-2-shaped spec with about `size` parameters ("7B", "500M"): the guide's rough mode.

    Llama-2's proportions: head size 128, layers ~ hidden / 128, MLP width ~ 8/3 hidden,
    32k vocabulary, grouped-query attention (8 KV heads) from ~30B up.
    """
    match = _SIZE_RE.match(size)
    if not match:
        raise ModelNotFound(f"{size!r} is not a size such as 7B or 500M")
    target = float(match.group(1)) * (1e9 if match.group(2).lower() == "b" else 1e6)
    if not 1e6 <= target <= 2e12:
        raise ModelNotFound(f"{size!r}: rough mode covers 1M to 2000B parameters")
    vocab = 32000

    def params_for(hidden: int, layers: int) -> int:
        inter = _round_to(8 * hidden / 3, 256)
        return layers * (4 * hidden * hidden + 3 * hidden * inter) + 2 * vocab * hidden

    # Search the width (multiples of 64) whose Llama-proportioned model is closest to the target.
    best = None
    for hidden in range(128, 32768 + 1, 64):
        layers = max(2, round(hidden / 128))
        estimate = params_for(hidden, layers)
        if best is None or abs(estimate - target) < abs(best[2] - target):
            best = (hidden, layers, estimate)
    hidden, layers, _ = best
    # Fine-tune the layer count to land nearer the target.
    per_layer = params_for(hidden, 1) - 2 * vocab * hidden
    layers = max(1, round((target - 2 * vocab * hidden) / per_layer))
    head = 128 if hidden >= 1024 else 64
    heads = max(1, hidden // head)
    hidden = heads * head
    kv_heads = 8 if target >= 30e9 and heads % 8 == 0 else heads
    label = size.strip().upper()
    return ModelSpec(
        id=f"rough-{label}",
        model_type="llama",
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        intermediate_size=_round_to(8 * hidden / 3, 256),
        vocab_size=vocab,
        max_position_embeddings=4096,
        hf_extra=(("rms_norm_eps", 1e-05),),
        rough=True,
        source=f"rough size {label} (Llama-2-shaped guess)",
    )


def _round_to(value: float, multiple: int) -> int:
    return int(multiple * math.ceil(value / multiple))


def _read_local(directory: Path, model_id: str, source: str) -> ModelSpec:
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise ModelNotFound(f"{directory} has no config.json: point at a model directory saved with save_pretrained")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelNotFound(f"{config_path} is not valid JSON: {exc}") from None
    return spec_from_hf_config(config, model_id, source)


def _hub_allowed(allow_hub: bool | None) -> bool:
    if allow_hub is not None:
        return allow_hub
    offline = os.environ.get("HF_HUB_OFFLINE", "") or os.environ.get("TRANSFORMERS_OFFLINE", "")
    return offline.strip().lower() not in ("1", "true", "yes", "on")


def _fetch_hub_config(model_id: str, revision: str | None) -> dict:
    """config.json from the hub over plain HTTPS with a short timeout (raises OSError when offline)."""
    import urllib.error
    import urllib.request

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    url = f"{endpoint}/{model_id}/resolve/{revision or 'main'}/config.json"
    request = urllib.request.Request(url, headers={"User-Agent": "tunewise"})
    with urllib.request.urlopen(request, timeout=HUB_TIMEOUT_S) as response:  # noqa: S310 - fixed https endpoint
        return json.loads(response.read().decode("utf-8"))


def checkpoint_on_disk(name: str) -> tuple[int, bool] | None:
    """For a local model directory (or "demo"): the checkpoint's bytes on disk and whether transformers
    memory-maps it (safetensors and zip-format .bin files are mapped; a pickled .bin is read whole). None for
    a hub or catalogue name (their releases ship safetensors, 2 bytes per parameter)."""
    directory = DEMO_MODEL_DIR if str(name).strip().lower() == "demo" else Path(str(name)).expanduser()
    if not directory.is_dir():
        return None
    safetensors = sorted(directory.glob("*.safetensors"))
    if safetensors:
        return sum(f.stat().st_size for f in safetensors), True
    pickled = sorted(directory.glob("*.bin"))
    if not pickled:
        return None
    mapped = True
    for path in pickled:
        with open(path, "rb") as handle:
            mapped = mapped and handle.read(4) == b"PK\x03\x04"  # torch.save's zip format (torch >= 1.6)
    return sum(f.stat().st_size for f in pickled), mapped


def resolve_model(name: str, allow_hub: bool | None = None, revision: str | None = None) -> ModelSpec:
    """Find a model's spec by catalogue id or alias, "demo", local directory, hub id, or bare size.

    allow_hub: None asks the hub unless HF_HUB_OFFLINE is set; False never asks (tests).
    Raises ModelNotFound with close catalogue matches when nothing fits.
    """
    if not isinstance(name, str) or not name.strip():
        raise ModelNotFound("model name is empty: give a catalogue id (e.g. llama-2-7b), a local path, 'demo' or a size like 7B")
    name = name.strip()
    key = name.lower()
    index = _catalogue_index()
    if key in index:
        return catalogue()[index[key]]
    if key == "demo":
        if not (DEMO_MODEL_DIR / "config.json").is_file():
            raise ModelNotFound(f"the demo model is not built yet ({DEMO_MODEL_DIR} has no config.json)")
        return replace(_read_local(DEMO_MODEL_DIR, "demo", "demo"), id="demo")
    path = Path(name).expanduser()
    if path.is_dir():
        return _read_local(path, str(path), "local config")
    if _SIZE_RE.match(name):
        return rough_spec(name)
    looks_like_path = name.startswith((".", "/", "~")) or os.sep in name and not re.fullmatch(r"[\w.-]+/[\w.-]+", name)
    if looks_like_path:
        raise ModelNotFound(f"{name}: no such directory")
    if re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        if not _hub_allowed(allow_hub):
            raise ModelNotFound(
                f"{name} is not in the catalogue and the hub is off (offline): give a local directory with "
                f"config.json, a catalogue id{_suggest(key)}, or a size such as 7B"
            )
        try:
            config = _fetch_hub_config(name, revision)
        except Exception as exc:  # network errors, 404s, gated repos: all mean "not available"
            raise ModelNotFound(
                f"{name}: could not read its config.json from the hub ({type(exc).__name__}: {exc}); "
                f"if you are offline give a local directory or a catalogue id{_suggest(key)}"
            ) from None
        return spec_from_hf_config(config, name, "hub config")
    raise ModelNotFound(f"unknown model {name!r}{_suggest(key)}; give a catalogue id, a local directory, a hub id (owner/name) or a size like 7B")


def _suggest(key: str) -> str:
    close = difflib.get_close_matches(key, list(_catalogue_index()), n=3, cutoff=0.5)
    if not close:
        return ""
    names = []
    for match in close:
        canonical = _catalogue_index()[match]
        if canonical not in names:
            names.append(canonical)
    return " (did you mean " + " or ".join(names) + "?)"


def canonical_model_id(name: str) -> str:
    """What `from_pretrained` should load: alias -> hub id, "demo" -> the demo directory, a path stays a path."""
    if not isinstance(name, str) or not name.strip():
        raise ModelNotFound("model name is empty")
    name = name.strip()
    if name.lower() == "demo":
        return str(DEMO_MODEL_DIR)
    index = _catalogue_index()
    if name.lower() in index and not Path(name).expanduser().is_dir():
        return index[name.lower()]
    return name
