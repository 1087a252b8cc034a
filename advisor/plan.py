"""The training plan: the one contract between the wizard, the CLI and the trainer.

A plan is a tree of frozen dataclasses, one per group of settings. Every field
is documented where it is declared; conflicting or impossible values are
rejected at construction with a `PlanError` naming the field and the fix.

A field is also the one description of its setting: its metadata gives the
wizard's label, the CLI flag, the range or choices, and whether the wizard and
the memory planner use it; its docstring is the help text. `settings()` reads
them all (the docstrings from this file's source), and the CLIs' flags, the
wizard's widgets and labels, the planner's memory setup and `FIELD_LIMITS`
are built from it, so a new setting is one edit here.

A plan round-trips through plain dicts and YAML (`to_dict`, `from_dict`,
`save`, `load`). Unknown keys are refused, so a typo in a plan file is an
error rather than a silently ignored setting. `with_overrides` applies dotted
`group.field` overrides (from CLI flags or wizard widgets) and re-validates.

Pure Python: no torch, transformers or gradio.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
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

#: The step that decides a pipeline's memory: PPO holds a policy, its reference, a reward and a value
#: model; DPO a policy and (for full fine-tuning) its reference; SFT only the policy.
PIPELINE_PEAK_STAGE = {"rlhf": "ppo", "compare": "ppo", "dpo": "dpo"}

#: The bundled datasets that hold the demo's invented world (towns, rivers): they say something about what
#: the demo model knows and nothing about a real model, so no real model is ever probed or replayed on them.
DEMO_WORLD_TEXTS = ("demo-original", "demo-pretrain")


def is_demo_model(name: Any) -> bool:
    """Whether a plan's model.name is the bundled demo model ("demo", or the path of its folder)."""
    if not isinstance(name, str) or not name.strip():
        return False
    if name.strip().lower() == "demo":
        return True
    try:
        return Path(name).expanduser().resolve() == DEMO_MODEL_DIR.resolve()
    except (OSError, ValueError):
        return False


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
DEVICES = ("auto", "cpu", "cuda")
#: RoPE scalings transformers applies through a config's `rope_parameters` (rope_type): position
#: interpolation (linear), dynamic NTK (dynamic) and YaRN (yarn); none keeps the model's window.
ROPE_SCALINGS = ("none", "linear", "dynamic", "yarn")
#: RoPE factors: YaRN's paper extends LLaMA 2 by 16-32x and Qwen's cards use 4; 64 covers every published one.
MAX_ROPE_FACTOR = 64.0
#: Experiment loggers the trainer can report to (transformers' `report_to` names).
REPORTERS = ("none", "tensorboard", "trackio", "wandb")


class PlanError(TunewiseError, ValueError):
    """A plan setting is invalid. `field` is the dotted name of the culprit."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}", field=field_name)


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
    unit: str = ""
    """What the number counts ("machines"), named in the message: "a whole number of machines from 1 to 1,024"."""


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
        return f"a whole number{f' of {limit.unit}' if limit.unit else ''} from {_bound(limit.low)} to {_bound(limit.high)}"
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


# -- one description per setting --------------------------------------------------------------------


def _setting(default: Any, *, label: str, flag: str | None, name: str | None = None, limit: Limit | None = None,
             choices: tuple = (), aliases: tuple[str, ...] = (), widget: bool = False, memory: bool | str = False,
             no_flag: str = "") -> Any:
    """A plan field and what the CLIs, the wizard and the planner need to know about it (see `Setting`);
    its help text is the docstring written under the field."""
    metadata = {"label": label, "flag": flag, "name": name, "limit": limit, "choices": tuple(choices),
                "aliases": tuple(aliases), "widget": widget, "memory": memory, "no_flag": no_flag}
    return field(default=default, metadata=metadata)


def _check_fields(group: str, settings: Any) -> None:
    """Check every field of one settings group against its choices and range (None passes where allowed)."""
    for f in fields(settings):
        dotted = f"{group}.{f.name}" if group else f.name
        value = getattr(settings, f.name)
        choices = f.metadata.get("choices")
        if choices and value not in choices:
            raise PlanError(dotted, f"{value!r} is not one of {', '.join(map(str, choices))}")
        limit = f.metadata.get("limit")
        if limit is None or (value is None and "None" in str(f.type)):
            continue
        check_number(dotted, value, limit)


@dataclass(frozen=True)
class ModelSettings:
    """Which base model to start from."""

    name: str = _setting("demo", label="Model", flag="--model", name="model", widget=True)
    """Catalogue id or alias, hub id, local directory with config.json, a bare size ("7B"),
    or "demo" for the bundled offline model."""
    trust_remote_code: bool = _setting(False, label="Trust remote code", flag="--trust-remote-code")
    """Run the model repository's own Python code. Off unless you turn it on: it executes
    code from the model's authors on this machine."""
    revision: str | None = _setting(None, label="Model revision", flag="--revision")
    """Hub revision (branch, tag or commit); None for the default branch."""

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name.strip():
            raise PlanError("model.name", "is empty: give a catalogue id, hub id, local path or 'demo'")


#: Why the data size has no flag: the advisor writes it down; training counts the data itself.
_ADVISOR_RECORD = "the advisor's record of the data size; training reads the data itself and never this"


@dataclass(frozen=True)
class DataSettings:
    """The training data and how to read it."""

    dataset: str = _setting("demo-sft", label="Dataset", flag="--dataset", widget=True)
    """A bundled name (demo-sft, demo-preference), a local JSONL/JSON/CSV/Parquet file,
    or a `datasets` hub name."""
    format: str = _setting("auto", label="Data format", flag="--format", choices=DATA_FORMATS)
    """auto (detect from columns), text, prompt_completion, messages or preference."""
    eval_fraction: float = _setting(0.1, label="Evaluation share", flag="--eval-fraction", limit=Limit(0.0, 0.5))
    """Share of examples held out for evaluation (0 disables eval)."""
    max_examples: int | None = _setting(None, label="Max training examples", flag="--max-examples",
                                        limit=Limit(1, MAX_EXAMPLES, whole=True))
    """Use at most this many training examples (None: all)."""
    packing: bool = _setting(False, label="Packing", flag="--packing", widget=True)
    """Pack several short examples into each sequence (SFT only)."""
    examples: int | None = _setting(None, label="Examples", flag=None, no_flag=_ADVISOR_RECORD,
                                    limit=Limit(1, MAX_EXAMPLES, whole=True))
    """Number of examples, when known (used by the advisor)."""
    tokens: int | None = _setting(None, label="Tokens", flag=None, no_flag=_ADVISOR_RECORD,
                                  limit=Limit(1, MAX_TOKENS, whole=True))
    """Total tokens, when known (used by the advisor)."""

    def __post_init__(self):
        if not isinstance(self.dataset, str) or not self.dataset.strip():
            raise PlanError("data.dataset", "is empty: give a file path or a bundled name such as demo-sft")
        _check_fields("data", self)


@dataclass(frozen=True)
class MethodSettings:
    """How the weights are trained: full, LoRA or QLoRA, and the memory-relevant knobs."""

    method: str = _setting("lora", label="Method", flag="--method", choices=METHODS, widget=True, memory=True)
    """full (all weights), lora (adapters on a 16-bit base) or qlora (adapters on a quantized base)."""
    precision: str = _setting("bf16", label="Precision", flag="--precision", choices=PRECISIONS, widget=True,
                              memory=True)
    """bf16 / fp16 (pure 16-bit), fp32, or amp (16-bit compute with fp32 master weights)."""
    optimizer: str = _setting("adamw", label="Optimizer", flag="--optimizer", choices=OPTIMIZERS, widget=True,
                              memory=True)
    """adamw, adamw_8bit, paged_adamw_8bit, sgd or adafactor."""
    # Beyond the adapted matrix's smaller side (the hidden size) a rank adds weights, not capacity.
    lora_rank: int = _setting(16, label="LoRA rank", flag="--lora-rank", widget=True, memory=True,
                              limit=Limit(1, MAX_LORA_RANK, whole=True, hint=" (the guide uses 4-256)"))
    """LoRA rank r: the inner dimension of the low-rank update BA."""
    # scaling = alpha / rank; twice the largest rank, doubled again, covers every published choice.
    lora_alpha: float | None = _setting(None, label="LoRA alpha", flag="--lora-alpha", widget=True,
                                        limit=Limit(0.0, 4.0 * MAX_LORA_RANK, low_open=True, hint=" (typical: 2 x rank)"))
    """LoRA alpha; scaling = alpha / rank. None means 2 x rank (the guide's typical choice)."""
    lora_targets: tuple[str, ...] = _setting(("q_proj", "k_proj", "v_proj", "o_proj"), label="Target modules",
                                             flag="--lora-targets", widget=True, memory=True)
    """Module names to adapt (comma-separated on the command line), or all-linear."""
    lora_dropout: float = _setting(0.05, label="LoRA dropout", flag="--lora-dropout", widget=True, memory=True,
                                   limit=Limit(0.0, 0.9))
    """Dropout on the LoRA input."""
    quant_bits: int = _setting(4, label="QLoRA base bits", flag="--quant-bits", choices=(4, 8), memory=True)
    """QLoRA base precision: 4 (NF4) or 8 (LLM.int8)."""
    double_quant: bool = _setting(True, label="Double quantization (QLoRA)", flag="--double-quant", widget=True,
                                  memory=True)
    """QLoRA: quantize the quantization constants too (saves ~0.37 bits/weight)."""
    gradient_checkpointing: bool = _setting(False, label="Gradient checkpointing", flag="--gradient-checkpointing",
                                            widget=True, memory=True)
    """Recompute activations in the backward pass: much less memory, ~30% slower."""
    attn: str = _setting("sdpa", label="Attention", flag="--attn", choices=ATTENTIONS, widget=True, memory=True)
    """Attention kernel: eager (materializes the attention matrix) or sdpa (fused)."""
    use_liger_kernel: bool = _setting(False, label="Liger kernel", flag="--liger-kernel", memory=True)
    """Liger's Triton kernels through TRL's use_liger_kernel: a fused lm_head + cross-entropy that never holds
    the full logits, and fused RMSNorm / SwiGLU / RoPE. CUDA GPUs only; needs the liger-kernel package."""
    use_dora: bool = _setting(False, label="DoRA (weight-decomposed LoRA)", flag="--dora", memory=True)
    """LoRA / QLoRA: train DoRA adapters (PEFT's use_dora): a magnitude vector per adapted layer on top of
    rank r, often better at low ranks, a little more memory and slower steps. Not for full fine-tuning."""

    def __post_init__(self):
        _check_fields("method", self)
        if isinstance(self.lora_targets, str):
            object.__setattr__(self, "lora_targets", tuple(t.strip() for t in self.lora_targets.split(",") if t.strip()))
        else:
            object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        if not self.lora_targets:
            raise PlanError("method.lora_targets", "is empty: name modules such as q_proj,v_proj or use all-linear")
        if self.method == "qlora" and self.precision == "fp32":
            raise PlanError("method.precision", "QLoRA computes in 16 bit: choose bf16 or fp16")
        if self.use_dora and self.method == "full":
            raise PlanError("method.use_dora", "DoRA is a kind of LoRA adapter and full fine-tuning trains no "
                            "adapters: choose method lora or qlora, or turn DoRA off")

    @property
    def alpha(self) -> float:
        """The effective alpha (2 x rank unless set)."""
        return float(self.lora_alpha) if self.lora_alpha is not None else 2.0 * self.lora_rank


def _steps(label: str, flag: str, default: int | None = None, **more) -> Any:
    """A setting counted in training steps (1 to MAX_STEPS)."""
    return _setting(default, label=label, flag=flag, limit=Limit(1, MAX_STEPS, whole=True), **more)


@dataclass(frozen=True)
class TrainingSettings:
    """Optimisation schedule and batch shape."""

    # Above 1.0 every optimizer diverges at once (Adam's step is about lr per weight).
    learning_rate: float = _setting(2e-4, label="Learning rate", flag="--lr", name="learning_rate", widget=True,
                                    limit=Limit(0.0, 1.0, low_open=True, hint=" (LoRA: 1e-4 to 3e-4; full: 1e-5 to 5e-5)"))
    """Peak learning rate (guide: full 1e-5 to 5e-5, LoRA 1e-4 to 3e-4)."""
    warmup_ratio: float = _setting(0.05, label="Warmup share", flag="--warmup-ratio", widget=True,
                                   limit=Limit(0.0, 0.5, hint=" (guide: 0.05-0.10)"))
    """Share of steps spent warming up (guide: 5-10%)."""
    lr_scheduler: str = _setting("cosine", label="LR schedule", flag="--scheduler", choices=SCHEDULERS, widget=True)
    """cosine, linear, constant or constant_with_warmup."""
    # Hundreds of passes already memorise any dataset.
    epochs: float = _setting(1.0, label="Epochs", flag="--epochs", widget=True,
                             limit=Limit(0.0, 10_000.0, low_open=True))
    """Passes over the data (ignored when max_steps is set)."""
    max_steps: int | None = _steps("Max steps (0: run the epochs)", "--max-steps", widget=True)
    """Stop after this many optimizer steps (None: run the epochs)."""
    micro_batch: int = _setting(4, label="Micro-batch", flag="--micro-batch", widget=True, memory=True,
                                limit=Limit(1, MAX_MICRO_BATCH, whole=True))
    """Examples per device per forward pass."""
    grad_accum: int = _setting(1, label="Gradient accumulation", flag="--grad-accum", widget=True, memory=True,
                               limit=Limit(1, MAX_GRAD_ACCUM, whole=True))
    """Micro-batches accumulated per optimizer step."""
    seq_len: int = _setting(512, label="Sequence length", flag="--seq-len", widget=True, memory=True,
                            limit=Limit(1, MAX_SEQ_LEN, whole=True))
    """Maximum tokens per example (longer ones are truncated)."""
    rope_scaling: str = _setting("none", label="RoPE scaling", flag="--rope-scaling", choices=ROPE_SCALINGS,
                                 memory=True)
    """Stretch a rotary model's position window to train sequences longer than it: none, linear (position
    interpolation), dynamic (dynamic NTK) or yarn (YaRN), set through the model config's rope_parameters."""
    rope_factor: float | None = _setting(None, label="RoPE factor", flag="--rope-factor", memory=True,
                                         limit=Limit(1.0, MAX_ROPE_FACTOR, hint=" (the window grows this many times)"))
    """RoPE scaling factor: the window becomes this many times the model's (None: seq_len / the window,
    rounded up)."""
    # NumPy's seed (set by transformers' set_seed) must fit in 32 bits.
    seed: int = _setting(42, label="Seed", flag="--seed", limit=Limit(0, 2**32 - 1, whole=True))
    """Random seed: the same seed and plan give the same run."""
    logging_steps: int = _steps("Log every (steps)", "--logging-steps", 1)
    """Log metrics every N steps."""
    eval_steps: int | None = _steps("Evaluate every (steps)", "--eval-steps")
    """Evaluate every N steps (None: at the end only)."""
    save_steps: int | None = _steps("Checkpoint every (steps)", "--save-steps")
    """Checkpoint every N steps (None: at the end only)."""
    keep_checkpoints: int | None = _setting(2, label="Checkpoints kept", flag="--keep-checkpoints",
                                            limit=Limit(1, 100_000, whole=True))
    """Keep only the newest N checkpoints in checkpoints/ (None: keep all; a resume uses the newest)."""
    weight_decay: float = _setting(0.0, label="Weight decay", flag="--weight-decay", limit=Limit(0.0, 1.0))
    """AdamW weight decay."""
    # A norm of 1e9 never clips in practice; above that only infinity is left to refuse.
    max_grad_norm: float = _setting(1.0, label="Gradient clipping norm", flag="--max-grad-norm",
                                    limit=Limit(0.0, 1e9, low_open=True))
    """Gradient clipping norm."""
    early_stopping_patience: int = _setting(0, label="Early stopping patience (evals)", flag="--early-stopping-patience",
                                            limit=Limit(0, 100_000, whole=True, hint=" (0 is off; typical: 3-5)"))
    """Stop when the eval loss has not improved for this many evaluations in a row (0: off), and keep the
    best checkpoint as the output (transformers' EarlyStoppingCallback; needs eval_steps and held-out data)."""
    # A loss improvement of 10 nats between two evaluations never happens after the first few steps.
    early_stopping_threshold: float = _setting(0.0, label="Early stopping threshold", flag="--early-stopping-threshold",
                                               limit=Limit(0.0, 10.0))
    """How much the eval loss must fall below the best so far to count as an improvement (0: any fall)."""
    report_to: str = _setting("none", label="Experiment logger", flag="--report-to", choices=REPORTERS)
    """Also send the metrics to an experiment logger: none, tensorboard (event files in <run>/tensorboard),
    trackio (pip install trackio) or wandb (pip install wandb; needs WANDB_API_KEY or WANDB_MODE=offline)."""

    def __post_init__(self):
        _check_fields("training", self)
        if self.rope_factor is not None and self.rope_scaling == "none":
            raise PlanError("training.rope_factor", "needs training.rope_scaling (linear, dynamic or yarn); "
                            "leave it unset without scaling")


def _threshold(default: float, label: str, flag: str, **more) -> Any:
    """An alert threshold: any number above 0 (MAX_THRESHOLD only refuses infinity)."""
    return _setting(default, label=label, flag=flag, limit=Limit(0.0, MAX_THRESHOLD, low_open=True), **more)


@dataclass(frozen=True)
class ForgettingSettings:
    """The guide's catastrophic-forgetting monitor and safeguards."""

    monitor: bool = _setting(True, label="Forgetting monitor", flag="--forgetting", name="forgetting_monitor")
    """Measure loss on original-domain data before training and every `eval_every` steps."""
    original_data: str = _setting("demo-original", label="Original-domain data", flag="--original-data")
    """Original-domain text for the monitor and for replay (bundled name or file)."""
    eval_every: int = _steps("Forgetting check every (steps)", "--forgetting-every", 10, name="forgetting_eval_every",
                             widget=True)
    """Steps between forgetting measurements."""
    threshold_pct: float = _threshold(20.0, "Forgetting alert at +% loss", "--forgetting-threshold",
                                      name="forgetting_threshold", widget=True)
    """Alert when original-domain loss rises more than this % above its baseline."""
    stop_on_threshold: bool = _setting(False, label="Stop when forgetting crosses it", flag="--stop-on-forgetting",
                                       widget=True)
    """Stop the run early (saving first) when the threshold is crossed."""
    replay_fraction: float = _setting(0.0, label="Replay share (forgetting)", flag="--replay", widget=True,
                                      limit=Limit(0.0, 0.5, hint=" (guide: 0.01-0.10)"))
    """Mix this share of original-domain examples into training (guide: 0.01-0.10)."""
    # The trainer normalises the Fisher information to mean 1 (trainer/forgetting.py) and starts at 1:
    # a million times that pins every weight it protects.
    ewc_lambda: float = _setting(0.0, label="EWC strength", flag="--ewc", widget=True,
                                 limit=Limit(0.0, 1e6, hint=" (0 is off; Tunewise starts at 1)"))
    """Elastic weight consolidation strength (0: off)."""
    max_eval_examples: int = _setting(64, label="Forgetting examples per check", flag="--forgetting-examples",
                                      limit=Limit(1, 100_000, whole=True))
    """Original-domain examples used per measurement."""
    replay_data: str | None = _setting(None, label="Replay data", flag="--replay-data")
    """Original-domain text to replay and to estimate EWC's Fisher information on (bundled name or
    file); None: the rows of `original_data` the monitor does not hold out."""
    ewc_batches: int = _setting(8, label="EWC Fisher batches", flag="--ewc-batches", limit=Limit(1, 100_000, whole=True))
    """Original-domain batches (of `training.micro_batch` examples) for EWC's Fisher estimate."""

    def __post_init__(self):
        _check_fields("forgetting", self)
        if self.replay_data is not None and (not isinstance(self.replay_data, str) or not self.replay_data.strip()):
            raise PlanError("forgetting.replay_data", "is empty: name a bundled dataset or a file, or leave it unset")


@dataclass(frozen=True)
class PreferenceSettings:
    """Reward model, DPO and PPO settings (the guide's RLHF and DPO sections)."""

    # The guide's ranges are 0.1-0.5 (beta) and 0.01-0.1 (KL); 100 is far past any use of either.
    beta: float = _setting(0.1, label="DPO beta", flag="--beta", widget=True,
                           limit=Limit(0.0, 100.0, low_open=True, hint=" (guide: 0.1-0.5)"))
    """DPO beta: higher stays closer to the reference (guide: 0.1-0.5)."""
    kl_coef: float = _setting(0.05, label="PPO KL coefficient", flag="--kl-coef", widget=True,
                              limit=Limit(0.0, 100.0, low_open=True, hint=" (guide: 0.01-0.1)"))
    """PPO KL penalty coefficient (guide: 0.01-0.1)."""
    # The same bound as training.learning_rate: above 1.0 every optimizer diverges at once.
    learning_rate: float | None = _setting(None, label="Preference learning rate", flag="--pref-lr",
                                           name="preference_lr",
                                           limit=Limit(0.0, 1.0, low_open=True, hint=" (DPO paper: 1e-6, full, 6B)"))
    """Peak learning rate of the DPO and PPO / RLOO / GRPO steps of a pipeline (None: the learning rate above);
    preference objectives want far smaller steps than SFT."""
    adaptive_kl: bool = _setting(False, label="Adaptive KL", flag="--adaptive-kl")
    """Adapt the KL coefficient towards `target_kl`."""
    target_kl: float = _threshold(6.0, "Target KL", "--target-kl")
    """Target KL (nats) for the adaptive controller."""
    algorithm: str = _setting("ppo", label="Online RL algorithm", flag="--algorithm", choices=ONLINE_RL)
    """Online RL algorithm for the ppo stage: ppo, rloo or grpo."""
    reward_model: str | None = _setting(None, label="Reward model", flag="--reward-model")
    """Reward model for ppo: a run id, run directory or model path (pipelines fill it in)."""
    sft_model: str | None = _setting(None, label="Starting policy", flag="--sft-model")
    """Starting policy for dpo / ppo: a run id, directory or model path (pipelines fill it in)."""
    kl_limit: float = _threshold(10.0, "KL alert limit", "--kl-limit")
    """Alert (KL explosion) when KL exceeds this many nats."""
    kl_rate_limit: float = _threshold(2.0, "KL growth alert", "--kl-rate-limit")
    """Alert when KL grows faster than this many nats per 10 steps."""
    stop_on_alert: bool = _setting(False, label="Stop on KL alert", flag="--stop-on-alert")
    """Stop the run (saving first) when a KL-explosion alert fires."""
    # A fall of more than 100% below the start is impossible (diversity is never negative).
    diversity_drop_pct: float = _setting(50.0, label="Diversity drop alert %", flag="--diversity-drop",
                                         limit=Limit(0.0, 100.0, low_open=True))
    """Alert (mode collapse) when sample diversity falls this % below its start."""
    sample_every: int = _steps("Sample every (steps)", "--sample-every", 10)
    """Steps between policy-sample measurements (KL estimate, diversity)."""
    num_samples: int = _setting(8, label="Samples per check", flag="--num-samples", limit=Limit(1, 100_000, whole=True))
    """Held-out prompts sampled per measurement."""
    # Long chain-of-thought RL generates up to 32k-64k tokens per completion.
    max_new_tokens: int = _setting(32, label="Tokens per sample", flag="--max-new-tokens", memory="generation_len",
                                   limit=Limit(1, 2**17, whole=True))
    """Tokens generated per sample."""

    def __post_init__(self):
        _check_fields("preference", self)


def check_gpus_per_node(gpu: str | None, gpus_per_node: int, nodes: int = 1) -> None:
    """Refuse more GPUs per node than a node of that type holds (PlanError on hardware.num_gpus),
    suggesting a layout with the same total."""
    from advisor.gpus import max_gpus_per_node

    try:
        most, why = max_gpus_per_node(gpu)
    except TunewiseError:  # an unknown GPU name is reported by the planner, not here
        return
    if gpus_per_node > most:
        total = gpus_per_node * nodes
        raise PlanError("hardware.num_gpus", f"{gpus_per_node} GPUs per node is more than {why}: spread the {total} "
                        f"GPUs over more nodes, e.g. {-(-total // most)} nodes x {most} GPUs")


@dataclass(frozen=True)
class HardwareSettings:
    """Where the run executes, and the GPU the planner sizes it for."""

    gpu: str | None = _setting(None, label="GPU", flag="--gpu", widget=True)
    """GPU model name for planning (e.g. "A100-80GB"); None: plan for `gpu_memory_gb` or the CPU."""
    gpu_memory_gb: float | None = _setting(None, label="GPU memory (GB)", flag="--gpu-memory-gb",
                                           limit=Limit(0.0, MAX_GPU_MEMORY_GB, low_open=True))
    """Memory per GPU in GB (1e9 bytes), when the GPU is not in the list."""
    num_gpus: int = _setting(1, label="Number of GPUs", flag="--num-processes", aliases=("--gpus",), widget=True,
                             memory=True, limit=Limit(1, 1024, whole=True))
    """GPUs (or CPU processes when there is no GPU) to train on; more than 1 uses accelerate launch. With
    `num_nodes` above 1, the GPUs of each node (so num_nodes x num_gpus train together)."""
    num_nodes: int = _setting(1, label="Nodes", flag="--nodes", widget=True, memory=True,
                              limit=Limit(1, 1024, whole=True, unit="machines"))
    """Machines training together (data parallel across nodes). Above 1 the run goes to a cluster
    scheduler as a job (`tunewise job`: Slurm, SkyPilot or torchrun by hand), not a local launch, and
    `num_gpus` per node may not exceed what a node of the GPU type holds (8 for every listed type but
    the A100-40GB's 16; 16 for any other GPU)."""
    shard: str = _setting("none", label="Sharding", flag="--shard", choices=SHARDINGS, widget=True, memory=True)
    """none (DDP: full copy per GPU), zero2 (shard optimizer + gradients), zero3 (shard everything; FSDP full shard)."""
    cpu_offload: bool = _setting(False, label="CPU offload", flag="--cpu-offload", memory=True)
    """Offload optimizer state (and with zero3, parameters) to CPU memory."""
    device: str = _setting("auto", label="Device", flag="--device", choices=DEVICES)
    """auto, cpu or cuda."""

    def __post_init__(self):
        _check_fields("hardware", self)
        if self.num_nodes > 1:
            # One node keeps the old meaning (all the GPUs training together, up to 1024: the memory only
            # depends on the total); across nodes num_gpus is per node and must fit in one.
            check_gpus_per_node(self.gpu, self.num_gpus, self.num_nodes)
        if self.cpu_offload and self.shard == "none":
            raise PlanError("hardware.cpu_offload", "needs sharding: set shard to zero2 or zero3")


@dataclass(frozen=True)
class Plan:
    """Everything needed to reproduce a run."""

    stage: str = _setting("sft", label="Stage", flag="--stage", choices=STAGES, memory=True)
    """sft, rm (reward model), dpo or ppo."""
    pipeline: str = _setting("none", label="Pipeline", flag="--pipeline", choices=PIPELINES)
    """none (one stage), rlhf (sft -> rm -> ppo), dpo (sft -> dpo), compare (both, side by side)."""
    name: str | None = _setting(None, label="Run name", flag="--name")
    """A label for the run (part of its id, which is generated)."""
    output: str | None = _setting(None, label="Output folder", flag="--output")
    """Where the final adapter or model goes (default: <run dir>/output)."""
    model: ModelSettings = field(default_factory=ModelSettings)
    data: DataSettings = field(default_factory=DataSettings)
    method: MethodSettings = field(default_factory=MethodSettings)
    training: TrainingSettings = field(default_factory=TrainingSettings)
    forgetting: ForgettingSettings = field(default_factory=ForgettingSettings)
    preference: PreferenceSettings = field(default_factory=PreferenceSettings)
    hardware: HardwareSettings = field(default_factory=HardwareSettings)

    def __post_init__(self):
        _check_fields("", self)
        if self.training.early_stopping_patience:
            stages = PIPELINE_STAGES.get(self.pipeline, (self.stage,))
            if not self.training.eval_steps:
                raise PlanError("training.early_stopping_patience", "early stopping compares evaluations during "
                                "training: set training.eval_steps (Evaluate every), or set the patience to 0")
            if not self.data.eval_fraction:
                raise PlanError("training.early_stopping_patience", "early stopping needs held-out data to "
                                "evaluate on: set data.eval_fraction above 0 (e.g. 0.1), or set the patience to 0")
            if stages == ("ppo",):
                raise PlanError("training.early_stopping_patience", "PPO has no eval loss to stop on: set the "
                                "patience to 0 (the KL and reward alerts can stop a PPO run)")
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


# -- the settings, as the CLIs, the wizard and the planner see them ------------------------------------------


@dataclass(frozen=True)
class Setting:
    """One plan setting, described once: read from its field's metadata and docstring by `settings()`."""

    dotted: str
    """Where it lives in the plan: "method.lora_rank" ("stage" for a top-level setting)."""
    name: str
    """Its short name, unique in the plan: the wizard's widget (an API parameter name), the advisor's name
    for its advice, `tunewise recommend --set NAME=...`. The field's name unless the field gives one."""
    label: str
    """How the wizard names it, on the page and in its messages."""
    flag: str | None
    """Its `tunewise train` / `launch` flag ("--lora-rank"); None when it has none (`no_flag` says why)."""
    type: type
    """int, float, str, bool or tuple (of names; comma-separated on the command line)."""
    optional: bool
    """None is one of its values (the help says what None means)."""
    default: Any
    """Its value in a fresh `Plan()`."""
    help: str
    """What it means: the docstring under the field, on one line (the CLIs' help, the wizard's info)."""
    limit: Limit | None = None
    """The range of a numeric setting (checked wherever a Plan is built)."""
    choices: tuple = ()
    """The values it may take, when it is a choice (checked wherever a Plan is built)."""
    aliases: tuple[str, ...] = ()
    """More flags that set it ("--gpus" for "--num-processes")."""
    widget: bool = False
    """The wizard's plan step has a widget for it, named `name`."""
    memory: str | None = None
    """The `advisor.memory.TrainingSetup` field it feeds (None: the memory estimate does not read it)."""
    no_flag: str = ""
    """Why it has no flag (empty when it has one)."""

    def value(self, plan: "Plan") -> Any:
        """This setting's value in `plan`."""
        node: Any = plan
        for part in self.dotted.split("."):
            node = getattr(node, part)
        return node


_TYPES = {"int": int, "float": float, "str": str, "bool": bool, "tuple": tuple}


def _field_docs() -> dict[tuple[str, str], str]:
    """(class name, field name) -> the docstring under the field, read from this module's source: the help
    text is written once, where the field is declared (as LitGPT's and TRL's configs document theirs)."""
    tree = ast.parse(Path(__file__).read_text(encoding="utf-8"))
    docs = {}
    for node in tree.body:
        if not isinstance(node, ast.ClassDef):
            continue
        for stmt, after in zip(node.body, node.body[1:]):
            if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and isinstance(after, ast.Expr)
                    and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
                docs[(node.name, stmt.target.id)] = " ".join(after.value.value.split())
    return docs


@functools.cache
def settings() -> tuple[Setting, ...]:
    """Every plan setting (every leaf of the Plan dataclasses), in declaration order."""
    docs = _field_docs()
    found: list[Setting] = []

    def walk(cls, prefix: str) -> None:
        for f in fields(cls):
            if cls is Plan and f.name in _NESTED:
                walk(_NESTED[f.name], f"{f.name}.")
                continue
            meta = f.metadata
            annotation = str(f.type)
            name = meta["name"] or f.name
            memory = meta["memory"]
            found.append(Setting(
                dotted=prefix + f.name, name=name, label=meta["label"], flag=meta["flag"],
                type=_TYPES[annotation.split("[")[0].split(" ")[0]], optional="None" in annotation,
                default=f.default, help=docs.get((cls.__name__, f.name), ""), limit=meta["limit"],
                choices=meta["choices"], aliases=meta["aliases"], widget=meta["widget"],
                memory=(name if memory is True else memory or None), no_flag=meta["no_flag"],
            ))

    walk(Plan, "")
    for key in ("name", "flag"):
        seen: dict = {}
        for item in found:
            for value in [getattr(item, key)] + (list(item.aliases) if key == "flag" else []):
                if value is not None and seen.setdefault(value, item.dotted) != item.dotted:
                    raise AssertionError(f"{item.dotted} and {seen[value]} share the {key} {value!r}")
    return tuple(found)


@functools.cache
def _by_key() -> dict[str, Setting]:
    return {**{s.name: s for s in settings()}, **{s.dotted: s for s in settings()}}


def find_setting(key: str) -> Setting:
    """The setting named `key`, by its dotted name ("method.lora_rank") or its short name ("lora_rank");
    KeyError when there is none."""
    return _by_key()[key]


#: Every numeric plan setting's range, by dotted name (the fields declare them; this is their index, for
#: the planner's memory setup, the wizard's number boxes and messages that name a range).
FIELD_LIMITS: dict[str, Limit] = {s.dotted: s.limit for s in settings() if s.limit is not None}
