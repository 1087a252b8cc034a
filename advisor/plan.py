"""The training plan: the one contract between the wizard, the CLI and the trainer.

A plan is a tree of frozen dataclasses, one per group of settings. Every field
is documented where it is declared; conflicting or impossible values are
rejected at construction with a `PlanError` naming the field and the fix.

A plan round-trips through plain dicts and YAML (`to_dict`, `from_dict`,
`save`, `load`). Unknown keys are refused, so a typo in a plan file is an
error rather than a silently ignored setting. `with_overrides` applies dotted
`group.field` overrides (from CLI flags or wizard widgets) and re-validates.

Pure Python: no torch, transformers or gradio.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from advisor.errors import TunewiseError

REPO_ROOT = Path(__file__).resolve().parent.parent
ASSETS_DIR = REPO_ROOT / "assets"
DEMO_MODEL_DIR = ASSETS_DIR / "demo-model"
DEMO_DATA_DIR = ASSETS_DIR / "data"

#: Bundled datasets by short name; any other value is a local path or a
#: `datasets` hub name.
DEMO_DATASETS = {
    "demo-sft": DEMO_DATA_DIR / "demo_sft.jsonl",
    "demo-preference": DEMO_DATA_DIR / "demo_preference.jsonl",
    "demo-original": DEMO_DATA_DIR / "demo_original.jsonl",
    "demo-pretrain": DEMO_DATA_DIR / "demo_pretrain.txt",
}

STAGES = ("sft", "rm", "dpo", "ppo")
PIPELINES = ("none", "rlhf", "dpo", "compare")
#: The stages each pipeline runs, in order (compare: SFT once, then RM -> PPO beside DPO).
PIPELINE_STAGES = {
    "rlhf": ("sft", "rm", "ppo"),
    "dpo": ("sft", "dpo"),
    "compare": ("sft", "rm", "ppo", "dpo"),
}
METHODS = ("full", "lora", "qlora")
PRECISIONS = ("bf16", "fp16", "fp32", "amp")
OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit", "sgd", "adafactor")
ATTENTIONS = ("eager", "sdpa")
SHARDINGS = ("none", "zero2", "zero3")
SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup")
DATA_FORMATS = ("auto", "text", "prompt_completion", "messages", "preference")
ONLINE_RL = ("ppo", "rloo", "grpo")


class PlanError(TunewiseError, ValueError):
    """A plan setting is invalid. `field` is the dotted name of the culprit."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}", field=field_name)


def _choice(group: str, name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise PlanError(f"{group}.{name}", f"{value!r} is not one of {', '.join(map(str, allowed))}")


@dataclass(frozen=True)
class Limit:
    """The range a numeric plan setting may take (checked wherever a Plan is built)."""

    low: float
    """The smallest value allowed (excluded when `low_open`)."""
    high: float
    """The largest value allowed."""
    whole: bool = False
    """A whole number (int) rather than any finite number."""
    low_open: bool = False
    """`low` itself is refused (the value must be above it)."""
    hint: str = ""
    """Typical values, added to the message."""


# Maxima: no real run comes near them, but they keep every number the planner multiplies, searches
# over or formats finite and small enough to answer at once. The arithmetic behind each:
#: Training steps: a million steps is a long pretraining run (Llama-2 70B: 500k); fine-tuning stays far below.
MAX_STEPS = 100_000_000
#: Tokens per sequence: the longest context windows models are trained at are about 1M tokens; 2^21 leaves room.
MAX_SEQ_LEN = 2**21
#: Sequences per device per forward pass: even 100M-parameter classifiers at 128 tokens run a few thousand.
MAX_MICRO_BATCH = 65_536
#: Micro-batches per optimizer step: 1M x micro-batch 1 is a million sequences per step, above any published
#: batch (Llama 3: 16M tokens = 2k-4k sequences).
MAX_GRAD_ACCUM = 1_000_000
#: LoRA rank: beyond the adapted matrix's smaller side (the hidden size) a rank adds weights, not capacity;
#: the widest released dense model (Llama 3.1 405B) has hidden size 16384.
MAX_LORA_RANK = 16_384
#: Examples and tokens of a dataset: the largest pretraining corpora hold ~15T tokens (Llama 3).
MAX_EXAMPLES = 10**12
MAX_TOKENS = 10**15
#: Alert thresholds: a huge value is the way to switch an alert off in practice, so the cap only refuses
#: infinity (and numbers that would overflow when multiplied).
MAX_THRESHOLD = 1e9
#: Memory of one GPU in GB: today's largest accelerators hold 288 GB.
MAX_GPU_MEMORY_GB = 10_000.0

#: Every numeric plan setting and its range, by dotted name. The plan's dataclasses check their fields
#: against it, the planner's memory setup reuses it, and the wizard's number boxes take their maxima from it.
FIELD_LIMITS: dict[str, Limit] = {
    "data.eval_fraction": Limit(0.0, 0.5),
    "data.max_examples": Limit(1, MAX_EXAMPLES, whole=True),
    "data.examples": Limit(1, MAX_EXAMPLES, whole=True),
    "data.tokens": Limit(1, MAX_TOKENS, whole=True),
    "method.lora_rank": Limit(1, MAX_LORA_RANK, whole=True, hint=" (the guide uses 4-256)"),
    # scaling = alpha / rank; twice the largest rank, doubled again, covers every published choice.
    "method.lora_alpha": Limit(0.0, 4.0 * MAX_LORA_RANK, low_open=True, hint=" (typical: 2 x rank)"),
    "method.lora_dropout": Limit(0.0, 0.9),
    # Above 1.0 every optimizer diverges at once (Adam's step is about lr per weight).
    "training.learning_rate": Limit(0.0, 1.0, low_open=True, hint=" (LoRA: 1e-4 to 3e-4; full: 1e-5 to 5e-5)"),
    "training.warmup_ratio": Limit(0.0, 0.5, hint=" (guide: 0.05-0.10)"),
    # Hundreds of passes already memorise any dataset.
    "training.epochs": Limit(0.0, 10_000.0, low_open=True),
    "training.max_steps": Limit(1, MAX_STEPS, whole=True),
    "training.micro_batch": Limit(1, MAX_MICRO_BATCH, whole=True),
    "training.grad_accum": Limit(1, MAX_GRAD_ACCUM, whole=True),
    "training.seq_len": Limit(1, MAX_SEQ_LEN, whole=True),
    # NumPy's seed (set by transformers' set_seed) must fit in 32 bits.
    "training.seed": Limit(0, 2**32 - 1, whole=True),
    "training.logging_steps": Limit(1, MAX_STEPS, whole=True),
    "training.eval_steps": Limit(1, MAX_STEPS, whole=True),
    "training.save_steps": Limit(1, MAX_STEPS, whole=True),
    "training.keep_checkpoints": Limit(1, 100_000, whole=True),
    "training.weight_decay": Limit(0.0, 1.0),
    # A norm of 1e9 never clips in practice; above that only infinity is left to refuse.
    "training.max_grad_norm": Limit(0.0, 1e9, low_open=True),
    "forgetting.eval_every": Limit(1, MAX_STEPS, whole=True),
    "forgetting.threshold_pct": Limit(0.0, MAX_THRESHOLD, low_open=True),
    "forgetting.replay_fraction": Limit(0.0, 0.5, hint=" (guide: 0.01-0.10)"),
    # The trainer normalises the Fisher information to mean 1 (trainer/forgetting.py) and starts at 1:
    # a million times that pins every weight it protects.
    "forgetting.ewc_lambda": Limit(0.0, 1e6, hint=" (0 is off; Tunewise starts at 1)"),
    "forgetting.max_eval_examples": Limit(1, 100_000, whole=True),
    "forgetting.ewc_batches": Limit(1, 100_000, whole=True),
    # The guide's ranges are 0.1-0.5 (beta) and 0.01-0.1 (KL); 100 is far past any use of either.
    "preference.beta": Limit(0.0, 100.0, low_open=True, hint=" (guide: 0.1-0.5)"),
    "preference.kl_coef": Limit(0.0, 100.0, low_open=True, hint=" (guide: 0.01-0.1)"),
    "preference.target_kl": Limit(0.0, MAX_THRESHOLD, low_open=True),
    "preference.kl_limit": Limit(0.0, MAX_THRESHOLD, low_open=True),
    "preference.kl_rate_limit": Limit(0.0, MAX_THRESHOLD, low_open=True),
    # A fall of more than 100% below the start is impossible (diversity is never negative).
    "preference.diversity_drop_pct": Limit(0.0, 100.0, low_open=True),
    "preference.sample_every": Limit(1, MAX_STEPS, whole=True),
    "preference.num_samples": Limit(1, 100_000, whole=True),
    # Long chain-of-thought RL generates up to 32k-64k tokens per completion.
    "preference.max_new_tokens": Limit(1, 2**17, whole=True),
    "hardware.gpu_memory_gb": Limit(0.0, MAX_GPU_MEMORY_GB, low_open=True),
    "hardware.num_gpus": Limit(1, 1024, whole=True),
}


def _shown(value: Any) -> str:
    """A value for a message: huge integers as a power of ten (Python refuses to print ints of 4300+ digits)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        if value.bit_length() < 1000:
            return f"{float(value):.3g}"
        return f"a number with about {int(value.bit_length() * 0.30103)} digits"
    return repr(value)


def _bound(number: float) -> str:
    """1000000.0 -> "1,000,000"; 0.5 -> "0.5"."""
    if float(number).is_integer() and abs(number) < 1e16:
        return f"{int(number):,}"
    return f"{number:g}"


def _range_text(limit: Limit) -> str:
    if limit.whole:
        return f"a whole number from {_bound(limit.low)} to {_bound(limit.high)}"
    if limit.low_open:
        return f"a number above {_bound(limit.low)} and at most {_bound(limit.high)}"
    return f"a number from {_bound(limit.low)} to {_bound(limit.high)}"


def check_number(dotted: str, value: Any, limit: Limit | None = None, name: str | None = None) -> None:
    """Refuse `value` for setting `dotted` unless it is a finite number in the setting's range
    (`FIELD_LIMITS`); the PlanError names the setting (or `name`, for inputs named otherwise) and the range."""
    limit = limit or FIELD_LIMITS[dotted]
    dotted = name or dotted
    wanted = f"must be {_range_text(limit)}"
    if limit.whole:
        ok_type = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok_type = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok_type:
        raise PlanError(dotted, f"{wanted}, got {_shown(value)}{limit.hint}")
    if isinstance(value, float) and not math.isfinite(value):
        raise PlanError(dotted, f"{wanted}, got {value!r} (not a finite number){limit.hint}")
    too_low = value <= limit.low if limit.low_open else value < limit.low
    if too_low or value > limit.high:
        raise PlanError(dotted, f"{wanted}, got {_shown(value)}{limit.hint}")


def _check_limits(group: str, settings: Any) -> None:
    """Check every numeric field of one settings group against FIELD_LIMITS (None passes where allowed)."""
    for f in fields(settings):
        dotted = f"{group}.{f.name}"
        limit = FIELD_LIMITS.get(dotted)
        if limit is None:
            continue
        value = getattr(settings, f.name)
        if value is None and "None" in str(f.type):
            continue
        check_number(dotted, value, limit)


@dataclass(frozen=True)
class ModelSettings:
    """Which base model to start from."""

    name: str = "demo"
    """Catalogue id or alias, hub id, local directory with config.json, a bare size ("7B"),
    or "demo" for the bundled offline model."""
    trust_remote_code: bool = False
    """Run the model repository's own Python code. Off unless you turn it on: it executes
    code from the model's authors on this machine."""
    revision: str | None = None
    """Hub revision (branch, tag or commit); None for the default branch."""

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name.strip():
            raise PlanError("model.name", "is empty: give a catalogue id, hub id, local path or 'demo'")


@dataclass(frozen=True)
class DataSettings:
    """The training data and how to read it."""

    dataset: str = "demo-sft"
    """A bundled name (demo-sft, demo-preference), a local JSONL/JSON/CSV/Parquet file,
    or a `datasets` hub name."""
    format: str = "auto"
    """auto (detect from columns), text, prompt_completion, messages or preference."""
    eval_fraction: float = 0.1
    """Share of examples held out for evaluation (0 disables eval)."""
    max_examples: int | None = None
    """Use at most this many training examples (None: all)."""
    packing: bool = False
    """Pack several short examples into each sequence (SFT only)."""
    examples: int | None = None
    """Number of examples, when known (used by the advisor)."""
    tokens: int | None = None
    """Total tokens, when known (used by the advisor)."""

    def __post_init__(self):
        if not isinstance(self.dataset, str) or not self.dataset.strip():
            raise PlanError("data.dataset", "is empty: give a file path or a bundled name such as demo-sft")
        _choice("data", "format", self.format, DATA_FORMATS)
        _check_limits("data", self)


@dataclass(frozen=True)
class MethodSettings:
    """How the weights are trained: full, LoRA or QLoRA, and the memory-relevant knobs."""

    method: str = "lora"
    """full (all weights), lora (adapters on a 16-bit base) or qlora (adapters on a quantized base)."""
    precision: str = "bf16"
    """bf16 / fp16 (pure 16-bit), fp32, or amp (16-bit compute with fp32 master weights)."""
    optimizer: str = "adamw"
    """adamw, adamw_8bit, paged_adamw_8bit, sgd or adafactor."""
    lora_rank: int = 16
    """LoRA rank r: the inner dimension of the low-rank update BA."""
    lora_alpha: float | None = None
    """LoRA alpha; scaling = alpha / rank. None means 2 x rank (the guide's typical choice)."""
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    """Module names to adapt, or ("all-linear",)."""
    lora_dropout: float = 0.05
    """Dropout on the LoRA input."""
    quant_bits: int = 4
    """QLoRA base precision: 4 (NF4) or 8 (LLM.int8)."""
    double_quant: bool = True
    """QLoRA: quantize the quantization constants too (saves ~0.37 bits/weight)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: much less memory, ~30% slower."""
    attn: str = "sdpa"
    """Attention kernel: eager (materializes the attention matrix) or sdpa (fused)."""

    def __post_init__(self):
        _choice("method", "method", self.method, METHODS)
        _choice("method", "precision", self.precision, PRECISIONS)
        _choice("method", "optimizer", self.optimizer, OPTIMIZERS)
        _choice("method", "attn", self.attn, ATTENTIONS)
        _check_limits("method", self)
        if isinstance(self.lora_targets, str):
            object.__setattr__(self, "lora_targets", tuple(t.strip() for t in self.lora_targets.split(",") if t.strip()))
        else:
            object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        if not self.lora_targets:
            raise PlanError("method.lora_targets", "is empty: name modules such as q_proj,v_proj or use all-linear")
        if self.quant_bits not in (4, 8):
            raise PlanError("method.quant_bits", f"must be 4 or 8, got {self.quant_bits!r}")
        if self.method == "qlora" and self.precision == "fp32":
            raise PlanError("method.precision", "QLoRA computes in 16 bit: choose bf16 or fp16")

    @property
    def alpha(self) -> float:
        """The effective alpha (2 x rank unless set)."""
        return float(self.lora_alpha) if self.lora_alpha is not None else 2.0 * self.lora_rank


@dataclass(frozen=True)
class TrainingSettings:
    """Optimisation schedule and batch shape."""

    learning_rate: float = 2e-4
    """Peak learning rate (guide: full 1e-5 to 5e-5, LoRA 1e-4 to 3e-4)."""
    warmup_ratio: float = 0.05
    """Share of steps spent warming up (guide: 5-10%)."""
    lr_scheduler: str = "cosine"
    """cosine, linear, constant or constant_with_warmup."""
    epochs: float = 1.0
    """Passes over the data (ignored when max_steps is set)."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (None: run the epochs)."""
    micro_batch: int = 4
    """Examples per device per forward pass."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    seq_len: int = 512
    """Maximum tokens per example (longer ones are truncated)."""
    seed: int = 42
    """Random seed: the same seed and plan give the same run."""
    logging_steps: int = 1
    """Log metrics every N steps."""
    eval_steps: int | None = None
    """Evaluate every N steps (None: at the end only)."""
    save_steps: int | None = None
    """Checkpoint every N steps (None: at the end only)."""
    keep_checkpoints: int | None = 2
    """Keep only the newest N checkpoints in checkpoints/ (None: keep all; a resume uses the newest)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm."""

    def __post_init__(self):
        _choice("training", "lr_scheduler", self.lr_scheduler, SCHEDULERS)
        _check_limits("training", self)


@dataclass(frozen=True)
class ForgettingSettings:
    """The guide's catastrophic-forgetting monitor and safeguards."""

    monitor: bool = True
    """Measure loss on original-domain data before training and every `eval_every` steps."""
    original_data: str = "demo-original"
    """Original-domain text for the monitor and for replay (bundled name or file)."""
    eval_every: int = 10
    """Steps between forgetting measurements."""
    threshold_pct: float = 20.0
    """Alert when original-domain loss rises more than this % above its baseline."""
    stop_on_threshold: bool = False
    """Stop the run early (saving first) when the threshold is crossed."""
    replay_fraction: float = 0.0
    """Mix this share of original-domain examples into training (guide: 0.01-0.10)."""
    ewc_lambda: float = 0.0
    """Elastic weight consolidation strength (0: off)."""
    max_eval_examples: int = 64
    """Original-domain examples used per measurement."""
    replay_data: str | None = None
    """Original-domain text to replay and to estimate EWC's Fisher information on (bundled name or
    file); None: the rows of `original_data` the monitor does not hold out."""
    ewc_batches: int = 8
    """Original-domain batches (of `training.micro_batch` examples) for EWC's Fisher estimate."""

    def __post_init__(self):
        _check_limits("forgetting", self)
        if self.replay_data is not None and (not isinstance(self.replay_data, str) or not self.replay_data.strip()):
            raise PlanError("forgetting.replay_data", "is empty: name a bundled dataset or a file, or leave it unset")


@dataclass(frozen=True)
class PreferenceSettings:
    """Reward model, DPO and PPO settings (the guide's RLHF and DPO sections)."""

    beta: float = 0.1
    """DPO beta: higher stays closer to the reference (guide: 0.1-0.5)."""
    kl_coef: float = 0.05
    """PPO KL penalty coefficient (guide: 0.01-0.1)."""
    adaptive_kl: bool = False
    """Adapt the KL coefficient towards `target_kl`."""
    target_kl: float = 6.0
    """Target KL (nats) for the adaptive controller."""
    algorithm: str = "ppo"
    """Online RL algorithm for the ppo stage: ppo, rloo or grpo."""
    reward_model: str | None = None
    """Reward model for ppo: a run id, run directory or model path (pipelines fill it in)."""
    sft_model: str | None = None
    """Starting policy for dpo / ppo: a run id, directory or model path (pipelines fill it in)."""
    kl_limit: float = 10.0
    """Alert (KL explosion) when KL exceeds this many nats."""
    kl_rate_limit: float = 2.0
    """Alert when KL grows faster than this many nats per 10 steps."""
    stop_on_alert: bool = False
    """Stop the run (saving first) when a KL-explosion alert fires."""
    diversity_drop_pct: float = 50.0
    """Alert (mode collapse) when sample diversity falls this % below its start."""
    sample_every: int = 10
    """Steps between policy-sample measurements (KL estimate, diversity)."""
    num_samples: int = 8
    """Held-out prompts sampled per measurement."""
    max_new_tokens: int = 32
    """Tokens generated per sample."""

    def __post_init__(self):
        _choice("preference", "algorithm", self.algorithm, ONLINE_RL)
        _check_limits("preference", self)


@dataclass(frozen=True)
class HardwareSettings:
    """Where the run executes, and the GPU the planner sizes it for."""

    gpu: str | None = None
    """GPU model name for planning (e.g. "A100-80GB"); None: plan for `gpu_memory_gb` or the CPU."""
    gpu_memory_gb: float | None = None
    """Memory per GPU in GB (1e9 bytes), when the GPU is not in the list."""
    num_gpus: int = 1
    """GPUs (or CPU processes when there is no GPU) to train on."""
    shard: str = "none"
    """none (DDP: full copy per GPU), zero2 (shard optimizer + gradients), zero3 (shard everything; FSDP full shard)."""
    cpu_offload: bool = False
    """Offload optimizer state (and with zero3, parameters) to CPU memory."""
    device: str = "auto"
    """auto, cpu or cuda."""

    def __post_init__(self):
        _check_limits("hardware", self)
        _choice("hardware", "shard", self.shard, SHARDINGS)
        _choice("hardware", "device", self.device, ("auto", "cpu", "cuda"))
        if self.cpu_offload and self.shard == "none":
            raise PlanError("hardware.cpu_offload", "needs sharding: set shard to zero2 or zero3")


@dataclass(frozen=True)
class Plan:
    """Everything needed to reproduce a run."""

    stage: str = "sft"
    """sft, rm (reward model), dpo or ppo."""
    pipeline: str = "none"
    """none (one stage), rlhf (sft -> rm -> ppo), dpo (sft -> dpo), compare (both, side by side)."""
    name: str | None = None
    """A label for the run (the run id is generated)."""
    output: str | None = None
    """Where the output goes (default: <run dir>/output)."""
    model: ModelSettings = field(default_factory=ModelSettings)
    data: DataSettings = field(default_factory=DataSettings)
    method: MethodSettings = field(default_factory=MethodSettings)
    training: TrainingSettings = field(default_factory=TrainingSettings)
    forgetting: ForgettingSettings = field(default_factory=ForgettingSettings)
    preference: PreferenceSettings = field(default_factory=PreferenceSettings)
    hardware: HardwareSettings = field(default_factory=HardwareSettings)

    def __post_init__(self):
        for name, allowed in (("stage", STAGES), ("pipeline", PIPELINES)):
            if getattr(self, name) not in allowed:
                raise PlanError(name, f"{getattr(self, name)!r} is not one of {', '.join(allowed)}")
        if self.stage == "ppo" and self.method.method == "qlora" and self.preference.algorithm == "ppo":
            # TRL's PPO needs a separate value model; quantized policies are not supported there.
            raise PlanError("method.method", "PPO does not support QLoRA in TRL: use lora or full, or choose rloo/grpo")

    # -- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict:
        def convert(value):
            if dataclasses.is_dataclass(value):
                return {f.name: convert(getattr(value, f.name)) for f in fields(value)}
            if isinstance(value, tuple):
                return list(value)
            return value

        return convert(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> "Plan":
        return _build(cls, data or {}, "plan")

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> "Plan":
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise PlanError("plan", f"is not valid YAML: {exc}") from None
        except ValueError as exc:  # e.g. an integer of more than 4300 digits
            raise PlanError("plan", f"holds a value Python cannot read: {exc}") from None
        if data is not None and not isinstance(data, dict):
            raise PlanError("plan", "must be a mapping of settings (key: value)")
        return cls.from_dict(data)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(self.to_yaml(), encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        path = Path(path)
        if not path.is_file():
            raise PlanError("plan", f"file {path} does not exist")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise PlanError("plan", f"file {path} is not UTF-8 text") from None
        return cls.from_yaml(text)

    def with_overrides(self, overrides: Mapping[str, Any]) -> "Plan":
        """Return a copy with dotted overrides applied: {"training.max_steps": 30, "stage": "dpo"}.

        None values are skipped (an unset CLI flag). Unknown names raise PlanError.
        """
        data = self.to_dict()
        for dotted, value in overrides.items():
            if value is None:
                continue
            parts = dotted.split(".")
            node = data
            for part in parts[:-1]:
                if part not in node or not isinstance(node[part], dict):
                    raise PlanError(dotted, "is not a plan setting")
                node = node[part]
            if parts[-1] not in node:
                raise PlanError(dotted, "is not a plan setting")
            node[parts[-1]] = value
        return Plan.from_dict(data)

    def summary(self) -> str:
        """One line describing the run, for lists and titles."""
        what = self.stage if self.pipeline == "none" else f"{self.pipeline} pipeline"
        return f"{what} {self.method.method} on {self.model.name} with {self.data.dataset}"


def _build(cls, data: Mapping[str, Any], where: str):
    if not isinstance(data, Mapping):
        raise PlanError(where, f"must be a mapping, got {type(data).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        prefix = "" if where == "plan" else f"{where}."
        raise PlanError(f"{prefix}{unknown[0]}", f"is not a known setting; known ones here: {', '.join(known)}")
    kwargs = {}
    for name, value in data.items():
        f = known[name]
        sub = _nested_type(cls, name)
        dotted = name if where == "plan" else f"{where}.{name}"
        if sub is not None:
            kwargs[name] = _build(sub, value or {}, name)
        else:
            kwargs[name] = _coerce(value, f, dotted)
    try:
        return cls(**kwargs)
    except TypeError as exc:  # pragma: no cover - defensive: wrong shapes
        raise PlanError(where, str(exc)) from None


_NESTED = {
    "model": ModelSettings,
    "data": DataSettings,
    "method": MethodSettings,
    "training": TrainingSettings,
    "forgetting": ForgettingSettings,
    "preference": PreferenceSettings,
    "hardware": HardwareSettings,
}


def _nested_type(cls, name):
    return _NESTED.get(name) if cls is Plan else None


def _coerce(value: Any, f: dataclasses.Field, dotted: str) -> Any:
    """Turn strings from CLI flags, YAML or widgets into the field's type."""
    annotation = str(f.type)
    if value is None:
        return None
    if annotation.startswith("tuple"):
        if isinstance(value, str):
            return tuple(v.strip() for v in value.split(",") if v.strip())
        if isinstance(value, (list, tuple)):
            return tuple(str(v) for v in value)
        raise PlanError(dotted, f"must be a list of names, got {value!r}")
    if annotation.startswith("bool"):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        raise PlanError(dotted, f"must be true or false, got {value!r}")
    if annotation.startswith("int"):
        if isinstance(value, bool):
            raise PlanError(dotted, f"must be a whole number, got {value!r}")
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                raise PlanError(dotted, f"must be a whole number, got {value!r}") from None
        if not isinstance(value, int):
            raise PlanError(dotted, f"must be a whole number, got {value!r}")
        return value
    if annotation.startswith("float"):
        if isinstance(value, bool):
            raise PlanError(dotted, f"must be a number, got {value!r}")
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                raise PlanError(dotted, f"must be a number, got {value!r}") from None
        if not isinstance(value, (int, float)):
            raise PlanError(dotted, f"must be a number, got {value!r}")
        try:
            return float(value)
        except OverflowError:  # an integer beyond the largest float (about 1.8e308)
            raise PlanError(dotted, f"must be a finite number, got {_shown(value)}") from None
    if annotation.startswith("str"):
        if not isinstance(value, str):
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return str(value)
            raise PlanError(dotted, f"must be text, got {value!r}")
        return value
    return value
