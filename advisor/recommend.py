"""The advisor: the guide's rules and the published evidence turned into a recommended plan, every value
with its reason.

`recommend(AdvisorInputs(...))` applies the rules of the fine-tuning guide
(`../shared/guide/fine-tuning-guide.md`) to the user's model, data, goal and
hardware, and returns a `Recommendation`: one `Advice(value, reason, rule,
overridden)` per setting, warnings drawn from the guide's risks, and notes.

Each `reason` quotes the guide rule that produced the value ("guide: LoRA rank
table, complex (instruction following) -> 64-128"); values the guide does not
fix (epochs, effective batch) are labelled "Tunewise heuristic" with the
reasoning, and figures from elsewhere carry their source. Where published
evidence since the guide disagrees (LoRA Without Regret, the Tinker LoRA primer
and sweep, the QLoRA and DPO papers: see "the published evidence" below), the
value is the evidence's, labelled "evidence: ...", and the guide's value stays
in the reason beside it. A measured learning rate (`tunewise pilot`, or the
`measured_advice.json` a model folder carries, as the demo model does) replaces
the rules, and the reason says what was measured and what the rules gave.

Memory is never guessed: the method, gradient checkpointing, optimizer,
sharding and micro-batch are chosen by asking the estimator
(`advisor.memory.gpu_fit`) whether each candidate fits the chosen GPUs, in
the order the guide prefers, falling back (full -> LoRA -> QLoRA) and saying
why. When nothing fits, the recommendation says so and names the closest fixes
(more GPUs with ZeRO-3, a larger GPU, a smaller model) instead of pretending.

`Recommendation.with_override(name, value)` re-runs the rules with the user's
value fixed (marked "set by you"), so dependent values and the memory fit
follow; `Recommendation.to_plan(base)` maps the advice onto a `Plan`.

Pure Python: no torch, transformers or gradio.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from advisor.errors import TunewiseError
from advisor.plan import PIPELINE_STAGES, PIPELINES, STAGES, find_setting

TASKS = ("classification", "qa", "summarization", "instruction", "max")
DOMAIN_SHIFTS = ("low", "medium", "high")
PRIORITIES = ("quality", "balanced", "memory")
SET_BY_YOU = "set by you"

#: Why the forgetting safeguards are off for a real model the user gave no general text for.
NO_ORIGINAL_TEXT = ("off: the forgetting monitor, replay and EWC need general text from the model's original domain, "
                    "and the bundled demo text (an invented world) says nothing about a real model. Give a few hundred "
                    "rows of general text (e.g. a held-out slice of pretraining-like data) as Original-domain data "
                    "(--original-data FILE) to turn them on")

# -- the guide's tables, as data -------------------------------------------------------------------

#: Guide, LoRA "Rank (r)" table: task complexity -> (low, high) of the recommended rank.
RANK_TABLE = {
    "classification": (4, 8),
    "qa": (16, 32),
    "summarization": (16, 32),
    "instruction": (64, 128),
    "max": (256, 256),
}

#: The table's row names, quoted in reasons.
RANK_TABLE_ROWS = {
    "classification": "simple (classification) -> 4-8",
    "qa": "medium (QA, summarization) -> 16-32",
    "summarization": "medium (QA, summarization) -> 16-32",
    "instruction": "complex (instruction following) -> 64-128",
    "max": "maximum adaptation -> 256",
}

#: Guide learning-rate ranges: full fine-tuning "1e-5 to 5e-5"; LoRA "1e-4 to 3e-4" (QLoRA trains LoRA adapters too).
LR_RANGES = {"full": (1e-5, 5e-5), "lora": (1e-4, 3e-4), "qlora": (1e-4, 3e-4)}

#: Guide: "Short warmup (5-10% of steps)".
WARMUP_RANGE = (0.05, 0.10)

#: Guide, DPO: "Typical: 0.1-0.5".
DPO_BETA_RANGE = (0.1, 0.5)

#: Guide, PPO: "Typical KL coefficient: 0.01-0.1".
PPO_KL_RANGE = (0.01, 0.1)

#: Guide, replay buffer: "1-10% pretraining data typically sufficient".
REPLAY_RANGE = (0.01, 0.10)

#: Guide, full fine-tuning "when to use": "Large dataset (>100k examples)".
FULL_FT_MIN_EXAMPLES = 100_000

#: Guide, SFT stage: "10k-100k examples typically".
SFT_TYPICAL_EXAMPLES = (10_000, 100_000)

#: "Far below" the guide's 10k: an order of magnitude under it.
SFT_FAR_BELOW = 1_000

#: Guide, target modules: which set each task gets before the priority adjusts it.
TARGET_SET_BY_TASK = {
    "classification": "minimum",
    "qa": "recommended",
    "summarization": "recommended",
    "instruction": "recommended",
    "max": "maximum",
}
TARGET_SETS = ("minimum", "recommended", "maximum")

#: QLoRA paper (Dettmers et al. 2023, appendix on hyperparameters): "We set LoRA dropout to 0.1 for
#: models up to 13B and to 0.05 for 33B and 65B models."
LORA_DROPOUT_SMALL, LORA_DROPOUT_LARGE, LORA_DROPOUT_SIZE_SPLIT = 0.1, 0.05, 20e9

#: Our starting EWC strength for the trainer's normalised Fisher (see trainer/forgetting.py): a
#: starting point to tune with the forgetting monitor, not a figure from the guide.
EWC_START_LAMBDA = 1.0

#: Micro-batch sizes tried, largest first.
MICRO_BATCHES = (64, 32, 16, 8, 4, 2, 1)

#: GPU counts tried when suggesting "more GPUs" for a plan that does not fit.
GPU_COUNTS = (2, 4, 8, 16, 32, 64)

#: Values shown with the advice for information only: no plan setting holds them.
INFO_ONLY = ("effective_batch", "total_steps", "preference_method")

#: What the advisor advises, in display order: plan settings by their short name (`Setting.name` in
#: advisor.plan.settings()), and the INFO_ONLY values.
ADVICE = (
    "method", "precision", "optimizer", "gradient_checkpointing", "attn", "lora_rank", "lora_alpha", "lora_targets",
    "lora_dropout", "quant_bits", "double_quant", "shard", "seq_len", "rope_scaling", "rope_factor", "micro_batch",
    "grad_accum", "effective_batch",
    "learning_rate", "warmup_ratio", "epochs", "total_steps", "eval_steps", "early_stopping_patience",
    "forgetting_monitor", "forgetting_eval_every",
    "replay_fraction", "ewc_lambda", "preference_lr", "beta", "kl_coef", "preference_method",
)

#: Advice name -> the dotted plan setting it fills in (None: information only).
PLAN_FIELDS: dict[str, str | None] = {name: None if name in INFO_ONLY else find_setting(name).dotted for name in ADVICE}


# -- the published evidence since the guide, as data ---------------------------------------------------
#
# Where later evidence disagrees with the guide, the advisor recommends the evidence and shows the guide's
# value beside it in the reason, each with its source.

#: The sources, as reasons quote them.
LWR = "LoRA Without Regret (Schulman et al., Thinking Machines 2025)"
TINKER_PRIMER = "Tinker LoRA primer"
TINKER_SWEEP = "Tinker cookbook SFT sweep (Tulu-3, batch 128, 780 steps)"
QLORA_PAPER = "QLoRA paper (Dettmers et al. 2023)"
DPO_PAPER = "DPO paper (Rafailov et al. 2023)"
INSTRUCTGPT = "InstructGPT (Ouyang et al. 2022)"

#: LoRA Without Regret: LoRA's optimal learning rate is about 10x full fine-tuning's, in their parameterization
#: (PEFT's alpha / rank with alpha fixed at 32); the Tinker cookbook divides its LoRA rates by 10 for full FT.
LORA_LR_OVER_FULL = 10.0
#: Tinker LoRA primer: LoRA needs a 20-100x larger LR than full fine-tuning depending on model size, e.g. 32 for
#: Llama-3.2-1B and 128 for Llama-3.1-70B (against its own full-FT formula; quoted, not used for the value).
PRIMER_LORA_FACTORS = {"meta-llama/Llama-3.2-1B": 32, "meta-llama/Llama-3.1-70B": 128}
#: The alpha LoRA Without Regret and Tinker train with: fixed, so PEFT's alpha / rank scaling divides the update
#: by the rank and the best learning rate barely moves when the rank changes.
EVIDENCE_ALPHA = 32.0
#: Tinker's sweep: the best LoRA learning rate of each model it shares with our catalogue.
SWEEP_LORA_LR = {
    "meta-llama/Llama-3.2-1B": 1e-3,
    "meta-llama/Llama-3.2-3B": 1e-3,
    "meta-llama/Llama-3.1-8B": 3e-4,
    "meta-llama/Llama-3.1-70B": 3e-4,
}
#: QLoRA paper's learning rates by model size (LoRA on all linear layers of a 4-bit base, batch 16-32).
QLORA_PAPER_LR = ((20e9, 2e-4, "7B and 13B"), (math.inf, 1e-4, "33B and 65B"))
#: LoRA Without Regret: policy-gradient RL absorbs about one bit per episode, and rank 1 matched full fine-tuning.
RL_LORA_RANK = 1
#: DPO learns from one preference (about a bit) per pair too: Tunewise keeps the top of the guide's smallest
#: rank row (4-8) rather than rank 1, as margin for DPO's log-likelihood terms (the evidence tested RL, not DPO).
DPO_LORA_RANK = 8
#: LoRA Without Regret and the Tinker primer: LoRA pays a larger loss penalty than full fine-tuning as the batch
#: grows, and a higher rank does not remove it. They give no threshold; Tunewise flags effective batches above
#: the batch Tinker's sweep calibrated its rates at.
LORA_LARGE_BATCH = 128
#: DPO paper: full fine-tuning at LR 1e-6 (batch 64) on models up to GPT-J 6B; TRL's DPOConfig defaults to 1e-6.
DPO_PAPER_LR, DPO_PAPER_PARAMS = 1e-6, 6.05e9
#: DPO paper's beta for its dialogue and most other runs (TRL's default too).
DPO_PAPER_BETA = 0.1
#: InstructGPT's KL reward coefficient for PPO.
INSTRUCTGPT_KL = 0.02

# -- inputs and outputs -------------------------------------------------------------------------------


def _bad(field_name: str, message: str) -> TunewiseError:
    return TunewiseError(f"{field_name}: {message}", field=field_name)


@dataclass(frozen=True)
class AdvisorInputs:
    """What the advisor needs to know about the model, the data, the goal and the hardware."""

    model: str
    """Catalogue id or alias, local directory with config.json, or a bare size ("7B")."""
    examples: int
    """Training examples (pairs, for preference stages)."""
    tokens: int | None = None
    """Total training tokens, when known (e.g. from the dataset profile)."""
    task: str = "instruction"
    """Task complexity, the guide's rank table rows: classification, qa, summarization, instruction, max."""
    domain_shift: str = "medium"
    """How different the task is from pretraining: low, medium or high."""
    gpu: str | None = None
    """GPU model name from the GPU list (e.g. "A100-80GB", "T4"); None with no gpu_memory_gb: no memory check."""
    gpu_memory_gb: float | None = None
    """Memory per GPU in GB (1e9 bytes) for a GPU not in the list; overrides the named GPU's memory."""
    num_gpus: int = 1
    """GPUs available (per node when num_nodes is above 1)."""
    num_nodes: int = 1
    """Machines training together (num_nodes x num_gpus GPUs)."""
    priority: str = "balanced"
    """quality (quality-critical), balanced, or memory (memory-constrained)."""
    quantized_inference: bool = False
    """The tuned model will be served quantized (the guide's QLoRA case)."""
    stage: str = "sft"
    """sft, rm, dpo or ppo (the stage trained; pipelines set the heaviest one)."""
    pipeline: str = "none"
    """none, rlhf (sft -> rm -> ppo), dpo (sft -> dpo) or compare (both)."""
    will_merge: bool = False
    """The adapter will be merged back into a 16-bit model (the guide's LoRA case)."""
    preserve_original: bool = False
    """Forgetting the original abilities is a concern: choose the conservative options."""
    seq_len: int | None = None
    """Training sequence length, when known (e.g. the profile's recommendation)."""
    sft_model: str | None = None
    """For dpo / ppo: the SFT model the stage starts from (None: the base model)."""
    max_steps: int | None = None
    """A cap on optimizer steps the run will use (e.g. the demo's), when the user has set one."""
    completion_tokens: int | None = None
    """Training tokens that carry the loss (completions, assistant turns), when known (the dataset profile's
    `estimated_completion`): what the Tinker primer compares LoRA's capacity with."""
    dataset: str | None = None
    """The dataset's name (bundled name or path), for advice measured on that data (`measured_advice`)."""
    measured_lr: float | None = None
    """A learning rate measured on this model, data and hardware (`tunewise pilot`): it replaces the rules'."""
    measured_lr_reason: str | None = None
    """What the measurement was ("pilot: 5 rates x 20 steps on 180 held-out examples, ...")."""
    measured_lr_method: str | None = None
    """The method the rate was measured with (full, lora, qlora); it applies only to that method."""
    original_data: str | None = None
    """General text the forgetting monitor measures (and replay / EWC use), when the user has given some;
    None: the demo's text, which only the demo model can be measured on."""

    def __post_init__(self):
        if not isinstance(self.model, str) or not self.model.strip():
            raise _bad("model", "is empty: give a catalogue id, a local model directory or a size such as 7B")
        from advisor.plan import check_number

        # The plan's ranges (advisor.plan.FIELD_LIMITS): no search or sum below meets a number beyond them.
        for name, dotted in (("examples", "data.examples"), ("tokens", "data.tokens"), ("seq_len", "training.seq_len"),
                             ("max_steps", "training.max_steps"), ("gpu_memory_gb", "hardware.gpu_memory_gb"),
                             ("completion_tokens", "data.tokens"), ("measured_lr", "training.learning_rate")):
            value = getattr(self, name)
            if value is not None or name == "examples":
                check_number(dotted, value, name=name)
        for name, allowed in (("task", TASKS), ("domain_shift", DOMAIN_SHIFTS), ("priority", PRIORITIES),
                              ("stage", STAGES), ("pipeline", PIPELINES)):
            if getattr(self, name) not in allowed:
                raise _bad(name, f"{getattr(self, name)!r} is not one of {', '.join(allowed)}")
        if not isinstance(self.num_gpus, int) or isinstance(self.num_gpus, bool) or not 1 <= self.num_gpus <= 1024:
            raise _bad("num_gpus", f"must be a whole number from 1 to 1024, got {self.num_gpus!r}")
        if not isinstance(self.num_nodes, int) or isinstance(self.num_nodes, bool) or not 1 <= self.num_nodes <= 1024:
            raise _bad("num_nodes", f"must be a whole number of machines from 1 to 1024, got {self.num_nodes!r}")

    @property
    def world_size(self) -> int:
        """GPUs training together over every node."""
        return self.num_gpus * self.num_nodes

    @property
    def heaviest_stage(self) -> str:
        """The stage whose memory decides the fit: a pipeline's PPO or DPO step, else the stage itself."""
        return {"rlhf": "ppo", "compare": "ppo", "dpo": "dpo"}.get(self.pipeline, self.stage)

    @property
    def preference_stages(self) -> tuple[str, ...]:
        """The preference stages this run includes (a pipeline's steps after SFT)."""
        stages = PIPELINE_STAGES.get(self.pipeline, (self.stage,))
        return tuple(stage for stage in stages if stage != "sft")


@dataclass(frozen=True)
class Advice:
    """One recommended value and why."""

    value: Any
    """The value (None: does not apply to this plan, e.g. a LoRA rank for full fine-tuning)."""
    reason: str
    """The rule that produced it, quoted ("guide: ..."), or "set by you"."""
    rule: str
    """Short id of the rule (method_when_to_use, lora_rank_table, ...), for tests and the UI."""
    overridden: bool = False
    """True when the user set this value."""


@dataclass(frozen=True)
class MemoryCheck:
    """How the recommended setup fits the GPUs, from the estimator."""

    checked: bool
    """False when no GPU (or GPU memory) was given: nothing was checked."""
    fits: bool
    """The recommended setup fits at its micro-batch (True when not checked)."""
    gpu: str | None
    """The GPU planned for, in words ("1 x A100-80GB (80.00 GB)")."""
    gpu_bytes: int | None
    """Memory per GPU in bytes."""
    total_bytes: int | None
    """Estimated memory per GPU for the recommended setup (what the GPU must hold)."""
    peak_allocated_bytes: int | None
    """Estimated peak of allocated tensors per GPU."""
    max_micro_batch: int | None
    """Largest micro-batch that fits at the recommended sequence length."""
    fixes: tuple[str, ...] = ()
    """When it does not fit: the closest changes that would make it fit."""


@dataclass(frozen=True)
class Recommendation:
    """The advisor's answer: an Advice per setting, warnings, notes and the memory check."""

    inputs: AdvisorInputs
    """What the advice was computed for."""
    values: Mapping[str, Advice]
    """Advice by name, in display order (see PLAN_FIELDS)."""
    warnings: tuple[str, ...]
    """The guide's risks that apply to this plan."""
    notes: tuple[str, ...]
    """Other guidance (RLHF vs DPO, forgetting monitoring, fallbacks)."""
    memory: MemoryCheck
    """The estimator's verdict on the recommended setup."""
    overrides: Mapping[str, Any] = field(default_factory=dict)
    """Values the user set (name -> value)."""

    def __getitem__(self, name: str) -> Advice:
        return self.values[name]

    @property
    def fits(self) -> bool:
        """The recommended setup fits the GPUs (or no GPU was given)."""
        return self.memory.fits

    def with_override(self, name: str, value: Any) -> "Recommendation":
        """Re-run the rules with `name` fixed to `value` (marked "set by you"); the fit is re-checked."""
        return recommend(self.inputs, {**self.overrides, name: value})

    def plan_advice(self) -> dict[str, Advice]:
        """Advice keyed by the dotted plan setting it maps onto ("method.lora_rank": Advice), for the wizard's table."""
        return {PLAN_FIELDS[name]: advice for name, advice in self.values.items() if PLAN_FIELDS.get(name)}

    def plan_overrides(self) -> dict[str, Any]:
        """Dotted plan settings for every applicable advice value (None values are left out)."""
        out: dict[str, Any] = {}
        for name, advice in self.values.items():
            target = PLAN_FIELDS.get(name)
            if target is None or advice.value is None:
                continue
            value = advice.value
            out[target] = list(value) if isinstance(value, tuple) else value
        return out

    def to_plan(self, base=None, allow_unfit: bool = False):
        """The advice as a `Plan` (on top of `base`, default a fresh Plan).

        Also sets model name, stage, pipeline, GPU settings and the data size. Raises
        `TunewiseError` when the setup does not fit the GPUs, naming the fixes, unless
        `allow_unfit` (the wizard shows an unfitting plan the user insists on).
        """
        from advisor.plan import Plan

        if not self.memory.fits and not allow_unfit:
            raise TunewiseError(
                f"no setup of {self.inputs.model} fits {self.memory.gpu}: "
                + ("; or ".join(self.memory.fixes) if self.memory.fixes else "use a larger GPU or a smaller model")
            )
        plan = base if base is not None else Plan()
        settings: dict[str, Any] = {
            "model.name": self.inputs.model,
            "stage": self.inputs.stage,
            "pipeline": self.inputs.pipeline,
            "data.examples": self.inputs.examples,
            "data.tokens": self.inputs.tokens,
            "hardware.num_gpus": self.inputs.num_gpus,
            "hardware.num_nodes": self.inputs.num_nodes,
            "hardware.gpu": self.inputs.gpu,
            "hardware.gpu_memory_gb": self.inputs.gpu_memory_gb,
        }
        if self.inputs.sft_model:
            settings["preference.sft_model"] = self.inputs.sft_model
        settings.update(self.plan_overrides())
        return plan.with_overrides(settings)

    def to_dict(self) -> dict:
        """JSON-ready dict (for `tunewise recommend --json` and the UI)."""

        def plain(value):
            return list(value) if isinstance(value, tuple) else value

        return {
            "inputs": dataclasses.asdict(self.inputs),
            "values": {
                name: {"value": plain(a.value), "reason": a.reason, "rule": a.rule, "overridden": a.overridden}
                for name, a in self.values.items()
            },
            "warnings": list(self.warnings),
            "notes": list(self.notes),
            "memory": dataclasses.asdict(self.memory) | {"fixes": list(self.memory.fixes)},
        }


# -- helpers ---------------------------------------------------------------------------------------------


def _gb(num_bytes: int | float | None) -> str:
    return "?" if num_bytes is None else f"{num_bytes / 1e9:.2f} GB"


def _round_sig(value: float, digits: int = 2) -> float:
    """Round to `digits` significant figures (2.13e-4 -> 2.1e-4)."""
    if value == 0:
        return 0.0
    return round(value, -int(math.floor(math.log10(abs(value)))) + digits - 1)


def _lookup_gpu(name: str):
    """(display name, bytes per GPU, supports bf16) for a GPU from advisor.gpus; TunewiseError if unknown."""
    from advisor import gpus

    gpu = gpus.find_gpu(name)
    return gpu.name, int(gpu.memory_bytes), bool(getattr(gpu, "bf16", True))


def _gpu_budget(inputs: AdvisorInputs) -> tuple[str | None, int | None, bool]:
    """(description, bytes per GPU, bf16 supported) from the inputs; (None, None, True) when no GPU was given."""
    bf16 = True
    name = None
    gpu_bytes = None
    if inputs.gpu:
        name, gpu_bytes, bf16 = _lookup_gpu(inputs.gpu)
    if inputs.gpu_memory_gb is not None:
        gpu_bytes = int(inputs.gpu_memory_gb * 1e9)
        name = name or "GPU"
    if gpu_bytes is None:
        return None, None, True
    nodes = f"{inputs.num_nodes} nodes x " if inputs.num_nodes > 1 else ""
    return f"{nodes}{inputs.num_gpus} x {name} ({_gb(gpu_bytes)})", gpu_bytes, bf16


class _Rules:
    """One advisor run: collects Advice, warnings and notes, honouring the user's overrides."""

    def __init__(self, inputs: AdvisorInputs, overrides: Mapping[str, Any]):
        self.inputs = inputs
        self.overrides = dict(overrides)
        self.values: dict[str, Advice] = {}
        self.warnings: list[str] = []
        self.notes: list[str] = []

    def put(self, name: str, value: Any, reason: str, rule: str) -> Any:
        if name in self.overrides:
            advice = Advice(self.overrides[name], SET_BY_YOU, rule, True)
        else:
            advice = Advice(value, reason, rule, False)
        self.values[name] = advice
        return advice.value

    def fixed(self, name: str) -> bool:
        return name in self.overrides


# -- the rules -------------------------------------------------------------------------------------------

#: The forgetting monitor's share of training compute we aim for (with the wrapper's own ~1%, the
#: issue's "wrapper and monitoring under 3%").
MONITOR_BUDGET = 0.02
#: Original-domain texts per forgetting measurement (plan default forgetting.max_eval_examples).
MONITOR_TEXTS = 64
#: A training step's cost per example in forward passes (see monitor_share).
STEP_COST_IN_FORWARDS = 2.0
#: More measurements than this per run only crowd the chart.
MAX_MEASUREMENTS = 200
#: Round intervals up to one of these (times powers of ten).
_NICE = (1, 2, 2.5, 5, 10)


def _nice_up(value: float) -> int:
    if value <= 1:
        return 1
    scale = 10 ** math.floor(math.log10(value))
    for step in _NICE:
        if step * scale >= value and float(step * scale).is_integer():
            return int(step * scale)
    return int(10 * scale)


def monitor_share(every: int, effective_batch: int, texts: int = MONITOR_TEXTS) -> float:
    """The forgetting monitor's cost as a share of training compute.

    A measurement is a forward pass over `texts` examples; a training step is a forward and a
    backward pass over `effective_batch` examples, which costs about 2 forward passes per example
    in practice (calibrated on bench/train_throughput.py: 29% measured at batch 8 every 10 steps,
    29% here; in theory backward doubles the forward, but the optimizer step and the original texts'
    greater length narrow the gap)."""
    per_eval_in_steps = _eval_cost_in_steps(effective_batch, texts)
    return per_eval_in_steps / (every + per_eval_in_steps)


def _eval_cost_in_steps(effective_batch: int, texts: int = MONITOR_TEXTS) -> float:
    return texts / (STEP_COST_IN_FORWARDS * max(1, effective_batch))


def forgetting_interval(total_steps: int, effective_batch: int, texts: int = MONITOR_TEXTS) -> tuple[int, str]:
    """Steps between forgetting measurements: within the compute budget (2%), yet at least 4 points a run."""
    per_eval = _eval_cost_in_steps(effective_batch, texts)
    budget_every = max(_nice_up(per_eval * (1 - MONITOR_BUDGET) / MONITOR_BUDGET),
                       _nice_up(total_steps / MAX_MEASUREMENTS))
    curve_cap = max(1, total_steps // 4)
    if budget_every <= curve_cap:
        every = budget_every
        why = (f"a measurement ({texts} original-domain texts, forward only) costs about {per_eval:.1f} training steps "
               f"at an effective batch of {effective_batch}; every {every} steps keeps the monitor near "
               f"{monitor_share(every, effective_batch, texts):.1%} of training ({total_steps:,} steps: "
               f"{total_steps // every} measurements)")
    else:
        every = curve_cap
        why = (f"only {total_steps:,} steps: every {every} gives at least 4 measurements to draw a curve, at about "
               f"{monitor_share(every, effective_batch, texts):.0%} of training time (a measurement costs about "
               f"{per_eval:.1f} steps at an effective batch of {effective_batch}); on a longer run Tunewise keeps it under "
               f"{MONITOR_BUDGET:.0%}")
    return every, why


#: Evaluation's share of training compute we aim for, and the fewest evaluations a run gets (a curve, and
#: room for early stopping's patience).
EVAL_BUDGET = 0.10
EVAL_POINTS = 5
#: The plan's default held-out share (data.eval_fraction), which sizes an evaluation.
EVAL_SHARE = 0.1


def held_out_of(examples: int, share: float = EVAL_SHARE) -> int:
    """The examples a run holds out for evaluation, counted as the trainer splits them
    (trainer.data.split_heldout: at least one held out, at least one left to train on)."""
    if share <= 0 or examples < 2:
        return 0
    return min(examples - 1, max(1, round(examples * share)))


def train_examples_of(examples: int, share: float = EVAL_SHARE) -> int:
    """The examples a run trains on once its eval split (`held_out_of`) is held out."""
    return examples - held_out_of(examples, share)


def eval_interval(total_steps: int, effective_batch: int, examples: int, share: float = EVAL_SHARE) -> tuple[int, str]:
    """Steps between evaluations: within the compute budget (10%) on a long run, yet at least 5 a run."""
    held_out = max(1, held_out_of(examples, share))
    per_eval = _eval_cost_in_steps(effective_batch, held_out)
    budget_every = max(_nice_up(per_eval * (1 - EVAL_BUDGET) / EVAL_BUDGET), _nice_up(total_steps / MAX_MEASUREMENTS))
    curve_cap = max(1, total_steps // EVAL_POINTS)
    cost = f"an evaluation ({held_out:,} held-out examples, the default {share:.0%}, forward only) costs about " \
           f"{per_eval:.1f} training steps at an effective batch of {effective_batch}"
    if budget_every <= curve_cap:
        every = budget_every
        why = (f"{cost}; every {every} steps keeps evaluation near {per_eval / (every + per_eval):.1%} of training "
               f"({total_steps:,} steps: {total_steps // every} evaluations)")
    else:
        every = curve_cap
        why = (f"only {total_steps:,} steps: every {every} gives at least {min(EVAL_POINTS, total_steps)} evaluations for "
               f"the eval-loss curve (and early stopping), at about {per_eval / (every + per_eval):.0%} of training time; "
               f"{cost}; a smaller data.eval_fraction makes each evaluation cheaper (the aim is {EVAL_BUDGET:.0%})")
    return every, why


#: A model folder may hold what was measured on it (bench/advice_quality.py writes the demo model's): per
#: dataset, the method, learning rate, batch and steps that trained best at the measured budget.
MEASURED_ADVICE_FILE = "measured_advice.json"


def measured_advice(model: str, dataset: str | None) -> dict | None:
    """The measurement `MEASURED_ADVICE_FILE` records for this local model and dataset, or None. Keys: method,
    learning_rate, effective_batch, steps (numbers), `summary` (what was measured, to quote) and, for LoRA,
    lora_rank."""
    import json
    from pathlib import Path

    from advisor.plan import DEMO_MODEL_DIR

    if not dataset:
        return None
    directory = DEMO_MODEL_DIR if model.strip().lower() == "demo" else Path(model).expanduser()
    try:
        entry = json.loads((directory / MEASURED_ADVICE_FILE).read_text(encoding="utf-8"))["datasets"][dataset]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    wanted = {"method": str, "learning_rate": float, "effective_batch": int, "steps": int, "summary": str}
    if not isinstance(entry, dict) or any(not isinstance(entry.get(key), kind) for key, kind in wanted.items()):
        return None
    if entry["method"] not in ("full", "lora", "qlora"):
        return None
    if entry.get("lora_rank") is not None and not (isinstance(entry["lora_rank"], int) and entry["lora_rank"] >= 1):
        return None
    return entry


def preferred_method(inputs: AdvisorInputs) -> tuple[str, str]:
    """The guide's "when to use" choice between full, LoRA and QLoRA, before memory is checked."""
    if inputs.priority == "memory" or inputs.quantized_inference:
        why = []
        if inputs.priority == "memory":
            why.append("memory-constrained")
        if inputs.quantized_inference:
            why.append("inference will also be quantized")
        return "qlora", f"guide: When QLoRA vs LoRA, QLoRA: {' and '.join(why)}"
    full_signals = []
    if inputs.domain_shift == "high":
        full_signals.append("task very different from pretraining")
    if inputs.task == "max" or inputs.priority == "quality":
        full_signals.append("maximum performance needed")
    if inputs.examples > FULL_FT_MIN_EXAMPLES and full_signals:
        return "full", (
            f"guide: Full fine-tuning, when to use: large dataset (>100k examples; you have {inputs.examples:,}), "
            + ", ".join(full_signals)
        )
    if inputs.priority == "quality" or inputs.will_merge:
        why = ["quality-critical"] if inputs.priority == "quality" else []
        if inputs.will_merge:
            why.append("will merge back to fp16")
        tail = "" if inputs.examples > FULL_FT_MIN_EXAMPLES else f"; full fine-tuning needs >100k examples (you have {inputs.examples:,})"
        return "lora", f"guide: When QLoRA vs LoRA, LoRA: {' and '.join(why)}{tail}"
    reason = "guide: LoRA keeps the original weights frozen (naturally prevents forgetting)"
    if inputs.examples <= FULL_FT_MIN_EXAMPLES:
        reason += f"; full fine-tuning is for >100k examples (you have {inputs.examples:,}) and risks overfitting on small datasets"
    else:
        reason += "; full fine-tuning also wants the task very different from pretraining or maximum performance"
    return "lora", reason


def rank_for(inputs: AdvisorInputs) -> tuple[int, str]:
    """The guide's rank table; the low end for small data or a memory priority, else the high end."""
    low, high = RANK_TABLE[inputs.task]
    row = RANK_TABLE_ROWS[inputs.task]
    if low == high:
        return low, f"guide: LoRA rank table, {row}"
    if inputs.priority == "memory":
        return low, f"guide: LoRA rank table, {row}; low end for a memory priority"
    if inputs.examples < SFT_TYPICAL_EXAMPLES[0]:
        return low, f"guide: LoRA rank table, {row}; low end: {inputs.examples:,} examples (< 10k) cannot fill a larger rank without overfitting"
    return high, f"guide: LoRA rank table, {row}; high end: {inputs.examples:,} examples give enough signal for the larger rank"


#: The largest rank the capacity check raises to: the guide's "maximum adaptation" row.
MAX_CAPACITY_RANK = 256


def rank_with_evidence(inputs: AdvisorInputs, spec, targets) -> tuple[int, str, str | None]:
    """The LoRA rank: the guide's table, raised when the data would not fit in it (Tinker primer's capacity
    rule), and small for a DPO or RL stage of its own (LoRA Without Regret). Returns (rank, reason, warning)."""
    guide_rank, guide_reason = rank_for(inputs)
    if inputs.pipeline == "none" and inputs.stage in ("dpo", "ppo"):
        if inputs.stage == "ppo":
            rank, why = RL_LORA_RANK, f"rank {RL_LORA_RANK} matched full fine-tuning"
        else:
            rank, why = DPO_LORA_RANK, (f"a DPO pair also carries about a bit, so Tunewise takes {DPO_LORA_RANK}, the top of "
                                        "the guide's smallest row (4-8), as margin (the evidence tested RL, not DPO)")
        return rank, (f"evidence: {LWR}: reinforcement learning takes in about one bit per episode and even a small "
                      f"rank suffices; {why}; {guide_reason} (a table for SFT)"), None
    tokens = inputs.completion_tokens or inputs.tokens
    exact = inputs.completion_tokens is not None
    _, sentence, holds = lora_capacity(spec, guide_rank, targets, tokens, exact)
    shared = ("; a pipeline's steps share this rank: its preference steps need far less (rank 1 sufficed for RL, "
              f"{LWR})" if inputs.pipeline != "none" else "")
    if holds:
        return guide_rank, f"{guide_reason}; {sentence}{shared}", None
    rank, raised = guide_rank, sentence
    while rank < MAX_CAPACITY_RANK:
        rank = min(MAX_CAPACITY_RANK, rank * 2)
        _, raised, holds = lora_capacity(spec, rank, targets, tokens, exact)
        if holds:
            return rank, (f"evidence: raised from the guide's {guide_rank} until the adapter holds the data: {raised}; "
                          f"{guide_reason}{shared}"), None
    warning = (f"the data exceeds what LoRA can hold even at rank {rank}: {raised}; there LoRA learns less efficiently "
               f"than full fine-tuning ({TINKER_PRIMER}): consider full fine-tuning, or train on fewer tokens")
    return rank, f"evidence: raised from the guide's {guide_rank} to the largest rank Tunewise advises; {guide_reason}{shared}", warning


def guide_learning_rate(method: str, rank: int | None, inputs: AdvisorInputs) -> tuple[float, str]:
    """The guide's rule: a point in its LR range; higher rank and smaller data move it down."""
    low, high = LR_RANGES[method]
    adjustments = []
    if method == "full":
        position = 0.5
        adjustments.append("middle of the range")
    else:
        # Rank 4 -> top of the range, rank 256 -> bottom, log-linear in between:
        # bigger adapters take bigger steps in weight space per unit of LR.
        rank = max(4, min(256, rank or 4))
        position = (math.log2(256) - math.log2(rank)) / (math.log2(256) - math.log2(4))
        adjustments.append(f"rank {rank} places it at {position:.0%} of the range (higher rank -> lower end)")
    if inputs.examples < SFT_TYPICAL_EXAMPLES[0]:
        position *= 0.5
        adjustments.append(f"halved towards the low end for {inputs.examples:,} examples (< 10k: small data overfits)")
    if inputs.preserve_original:
        position *= 0.5
        adjustments.append("halved again to limit forgetting (guide: lower learning rate, less aggressive updates)")
    value = _round_sig(low + position * (high - low))
    which = "Full fine-tuning: lower LR than pretraining (1e-5 to 5e-5)" if method == "full" else "LoRA: higher than full fine-tuning, 1e-4 to 3e-4"
    return value, f"guide: {which}; " + "; ".join(adjustments) + f" -> {value:.1e}"


def _size(params: float) -> str:
    """1.585e6 -> "1.6M", 8.03e9 -> "8.0B"."""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if params >= scale:
            return f"{params / scale:.1f}{suffix}"
    return str(int(params))


def _anchor_sizes() -> dict[str, int]:
    """Parameters of the sweep's models, counted from our catalogue (the same count the advisor uses)."""
    from advisor import specs

    return {model_id: specs.param_counts(specs.catalogue()[model_id]).total for model_id in SWEEP_LORA_LR}


def evidence_learning_rate(method: str, params: int, alpha: float | None = None) -> tuple[float, str, bool]:
    """The evidence's learning rate for SFT of a `params`-parameter model: (value, reason, extrapolated).

    Tinker's sweep measured the best LoRA LR of Llama 1B-70B; another size takes the nearest one (in log size)
    times sqrt(its parameters / these), Tinker's own transfer rule (LR proportional to 1/sqrt(parameters)).
    Full fine-tuning takes a tenth (LoRA Without Regret). The rates hold for alpha 32: PEFT's update scales with
    alpha, so another alpha takes 32 / alpha of the rate. `extrapolated`: the model is smaller than the
    sweep's smallest, where the transfer has not been measured."""
    sizes = _anchor_sizes()
    anchor = min(sizes, key=lambda model_id: abs(math.log(sizes[model_id] / params)))
    anchor_lr, anchor_params = SWEEP_LORA_LR[anchor], sizes[anchor]
    lora = anchor_lr * math.sqrt(anchor_params / params)
    reason = (f"{TINKER_SWEEP}: LoRA {anchor_lr:.0e} for {anchor.split('/')[-1]} ({_size(anchor_params)} parameters)"
              + ("" if anchor_params == params else
                 f", x sqrt({_size(anchor_params)} / {_size(params)}) for this model (Tinker's transfer: LR proportional "
                 f"to 1/sqrt(parameters)) -> {lora:.1e}"))
    value = lora
    if method == "full":
        value = lora / LORA_LR_OVER_FULL
        reason += (f"; full fine-tuning takes a tenth ({LWR}: LoRA's best LR is about 10x full fine-tuning's; the "
                   f"{TINKER_PRIMER} says 20-100x by size, 32 for Llama-3.2-1B and 128 for Llama-3.1-70B) -> {value:.1e}")
    else:
        reason += f"; nearly independent of the rank with alpha fixed at {EVIDENCE_ALPHA:g} ({LWR})"
        if alpha is not None and abs(alpha - EVIDENCE_ALPHA) > 1e-9:
            value = lora * EVIDENCE_ALPHA / alpha
            reason += (f"; your alpha {alpha:g} scales every update by {alpha / EVIDENCE_ALPHA:g}x, so the rate takes "
                       f"{EVIDENCE_ALPHA:g} / {alpha:g} of it -> {value:.1e}")
        if method == "qlora":
            paper = next((lr, which) for limit, lr, which in QLORA_PAPER_LR if params < limit)
            reason += f"; {QLORA_PAPER} used {paper[0]:.0e} for {paper[1]}"
    extrapolated = params < min(sizes.values())
    if extrapolated:
        reason += (f"; extrapolated: this model is {min(sizes.values()) / params:,.0f}x smaller than the sweep's "
                   "smallest, so check it on your data (`tunewise pilot`, or the plan step's check)")
    return _round_sig(value), reason, extrapolated


def preference_learning_rate(method: str, params: int, stage: str) -> tuple[float, str]:
    """DPO (and the online RL stages): the DPO paper's 1e-6 for full fine-tuning of GPT-J 6B, moved to this
    size by the same 1/sqrt(parameters) transfer as SFT, and x10 for LoRA (LoRA Without Regret)."""
    full = DPO_PAPER_LR * math.sqrt(DPO_PAPER_PARAMS / params)
    value = full if method == "full" else full * LORA_LR_OVER_FULL
    reason = (f"{DPO_PAPER}: 1e-6 for full fine-tuning up to GPT-J 6B (TRL's DPOConfig default too), x sqrt(6.1B / "
              f"{_size(params)}) for this model (Tinker's transfer) -> {full:.1e}")
    if method != "full":
        reason += f", x10 for LoRA ({LWR}) -> {value:.1e}"
    if stage == "ppo":
        reason += "; neither the guide nor these sources give a PPO rate: Tunewise starts online RL at the DPO rate"
    reason += "; guide: no rate for preference stages (its LR ranges are for SFT)"
    return _round_sig(value), reason


def learning_rate_for(method: str, rank: int | None, inputs: AdvisorInputs, params: int | None = None,
                      alpha: float | None = None) -> tuple[float, str]:
    """The SFT learning rate: a pilot's measurement when there is one, else the evidence
    (`evidence_learning_rate`), halved when forgetting is a concern; the guide's value is shown beside it."""
    if params is None:
        from advisor import specs

        params = specs.param_counts(specs.resolve_model(inputs.model)).total
    guide_value, guide_reason = guide_learning_rate(method, rank, inputs)
    value, reason, _ = evidence_learning_rate(method, params, alpha)
    if inputs.preserve_original:
        value = _round_sig(value / 2)
        reason += f"; halved to limit forgetting (guide: lower learning rate, less forgetting) -> {value:.1e}"
    if method != "full":
        tail = (f" (the guide's lower rate for higher ranks matches its alpha = 2 x rank, which grows the update with "
                f"the rank; alpha {EVIDENCE_ALPHA:g} keeps it level)")
    else:
        tail = ""
    rules_text = f"evidence: {reason}; {guide_reason}{tail}"
    if inputs.measured_lr is not None:
        return inputs.measured_lr, f"{inputs.measured_lr_reason or 'measured'}; rules gave {value:.1e} ({rules_text})"
    return value, rules_text


def epochs_for(inputs: AdvisorInputs) -> tuple[float, str]:
    """Tunewise heuristic (the guide gives no epoch count): small data more passes, capped."""
    n = inputs.examples
    if inputs.stage != "sft" or inputs.pipeline != "none":
        cap = 3
    else:
        cap = 5
    if n < 1_000:
        epochs = 5
    elif n < 10_000:
        epochs = 3
    elif n < FULL_FT_MIN_EXAMPLES:
        epochs = 2
    else:
        epochs = 1
    epochs = min(epochs, cap)
    reason = (
        f"Tunewise heuristic (not in the guide): {n:,} examples -> {epochs} epoch{'s' if epochs > 1 else ''}"
        f" (fewer examples, more passes; capped at {cap})"
    )
    if epochs > 1:
        reason += "; watch the eval loss and stop when it rises (guide: overfitting on small datasets)"
    return float(epochs), reason


def effective_batch_for(inputs: AdvisorInputs) -> tuple[int, str]:
    """Tunewise heuristic: 16 / 32 / 64 examples per optimizer step by dataset size, and at least ~20 steps per epoch."""
    n = inputs.examples
    target = 16 if n < 10_000 else 32 if n < FULL_FT_MIN_EXAMPLES else 64
    # Keep at least ~20 optimizer steps per epoch so warmup and the schedule have room.
    while target > 1 and n / target < 20:
        target //= 2
    return target, (
        f"Tunewise heuristic (not in the guide): {target} examples per optimizer step for {n:,} examples "
        "(16 under 10k, 32 under 100k, else 64; halved until an epoch has at least 20 steps)"
    )


def seq_len_for(inputs: AdvisorInputs) -> tuple[int, str]:
    """From the inputs (e.g. the profile), else from tokens per example, else 512."""
    from advisor.profile import recommend_seq_len

    if inputs.seq_len is not None:
        return inputs.seq_len, "from your data (the dataset profile's p95, rounded up)"
    if inputs.tokens is not None:
        mean = inputs.tokens / inputs.examples
        # Without the distribution assume the 95th percentile is about twice the mean
        # (our rule of thumb for right-skewed length distributions); profile for the real p95.
        value, _ = recommend_seq_len(math.ceil(2 * mean), None)
        return value, f"Tunewise heuristic: {mean:.0f} tokens per example on average, p95 taken as 2x the mean -> {value}; profile the dataset for the real p95"
    return 512, "Tunewise default: no token counts given; profile the dataset (`tunewise profile`) for a measured length"


def targets_for(inputs: AdvisorInputs, module_sets: Mapping[str, list[str]], experts: int = 0) -> tuple[tuple[str, ...], str, str]:
    """Every linear layer of the blocks (the evidence), with the guide's set for this task shown beside it.

    The guide picks minimum / recommended / maximum by task, one step up for quality and down for memory;
    LoRA Without Regret found attention-only LoRA behind even at a matched parameter count, and the QLoRA paper
    needed all linear layers to match full fine-tuning. A memory priority lowers the rank instead (rank_for).

    Returns (module names, set name, reason)."""
    level = TARGET_SETS.index(TARGET_SET_BY_TASK[inputs.task])
    why = f"{TARGET_SET_BY_TASK[inputs.task]} for {inputs.task}"
    if inputs.priority == "quality" and level < 2:
        level += 1
        why += ", one step up for quality"
    elif inputs.priority == "memory" and level > 0:
        level -= 1
        why += ", one step down for memory"
    guide_sets = {
        "minimum": "Minimum (query, value projections)",
        "recommended": "Recommended (all attention)",
        "maximum": "Maximum (attention + MLP)",
    }
    guide_name = TARGET_SETS[level]
    modules = tuple(module_sets["maximum"])
    reason = (f"evidence: all linear layers, MLP included ({LWR}: attention-only LoRA underperforms even at a "
              f"matched parameter count, MLP and MoE layers matter most; {QLORA_PAPER}: LoRA on all linear layers "
              f"is needed to match full fine-tuning), as this architecture names them: {', '.join(modules)}")
    if experts and not any(name not in module_sets["recommended"] for name in modules):
        reason += (f"; its {experts} experts are fused tensors in transformers, not linear modules, so LoRA by "
                   "name cannot reach them: attention only here")
    if guide_name == "maximum":
        reason += f"; the guide agrees: {guide_sets['maximum']} ({why})"
    else:
        reason += (f"; guide: {guide_sets[guide_name]} ({why}) -> {', '.join(module_sets[guide_name])}"
                   + ("; for less memory the evidence keeps all layers at a lower rank" if inputs.priority == "memory" else ""))
    return modules, "maximum", reason


def lora_alpha_for(rank: int, inputs: AdvisorInputs) -> tuple[float, str]:
    """The evidence's fixed alpha 32, the guide's alpha = 2 x rank (or = rank) shown beside it."""
    if inputs.preserve_original or inputs.domain_shift == "low":
        why = "forgetting is a concern" if inputs.preserve_original else "the task is close to pretraining"
        guide = f"guide: alpha = rank (scaling 1) when {why} -> {rank}"
    else:
        guide = f"guide: typical alpha = 2 x rank (scaling 2) -> {2 * rank}"
    return EVIDENCE_ALPHA, (
        f"evidence: alpha fixed at {EVIDENCE_ALPHA:g} ({LWR}, {TINKER_PRIMER}): PEFT scales the update by alpha / rank "
        f"({EVIDENCE_ALPHA / rank:g} at rank {rank}), so the best learning rate stays put when the rank changes; "
        f"{guide}, which grows the update with the rank (why the guide lowers the LR for higher ranks)")


def lora_capacity(spec, rank: int, targets, tokens: int | None, exact: bool) -> tuple[int, str, bool]:
    """Does a rank hold the data? The Tinker primer: LoRA does well while its parameters are at least the
    completion tokens (the tokens with a loss). Returns (adapter parameters, sentence, fits)."""
    from advisor import specs

    params = specs.lora_trainable_params(spec, rank, targets)
    if tokens is None:
        return params, f"rank {rank} trains {params:,} parameters; profile the data to check them against its tokens", True
    what = "completion tokens" if exact else "tokens (all of them: completions alone are not known)"
    fits = params >= tokens
    verdict = "hold" if fits else "do not hold"
    return params, (f"{TINKER_PRIMER}: LoRA does well while its parameters are at least the completion tokens; "
                    f"rank {rank} trains {params:,}, which {verdict} the data's {tokens:,} {what}"), fits


def _params(count: int) -> str:
    """A parameter count for a reason: "1.6M", "7.2B" (a tiny model is not "0.0B")."""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if count >= scale:
            return f"{count / scale:.3g}{suffix}"
    return str(count)


def dropout_for(params_total: int) -> tuple[float, str]:
    """QLoRA paper's dropout by model size (the guide gives none)."""
    if params_total >= LORA_DROPOUT_SIZE_SPLIT:
        value = LORA_DROPOUT_LARGE
    else:
        value = LORA_DROPOUT_SMALL
    return value, (
        f"QLoRA paper (Dettmers et al. 2023): dropout 0.1 up to 13B parameters, 0.05 for 33B and 65B; "
        f"this model has {_params(params_total)} -> {value}"
    )


# -- memory search ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Candidate:
    """One setup tried against the GPU, with how it was reached."""

    method: str
    setup: Any
    steps: tuple[str, ...]
    """Memory savers applied to reach it ("gradient checkpointing", "8-bit AdamW", ...)."""


def _ladder(method: str, base_setup, rules: _Rules, bf16: bool) -> list[_Candidate]:
    """Setups for `method` from the most comfortable to the most frugal (the order savings are applied).

    User-set values are kept fixed on every rung.
    """
    half = "bf16" if bf16 else "fp16"
    inputs = rules.inputs
    if method == "full":
        steps = [
            ({"precision": "amp", "optimizer": "adamw", "gradient_checkpointing": False, "shard": "none"}, ()),
            ({"gradient_checkpointing": True}, ("gradient checkpointing",)),
        ]
        if inputs.world_size > 1:
            steps += [({"shard": "zero2"}, ("ZeRO-2",)), ({"shard": "zero3"}, ("ZeRO-3",))]
        steps += [({"precision": half}, (f"pure {half} (no fp32 master weights)",)),
                  ({"optimizer": "adamw_8bit"}, ("8-bit AdamW",))]
    elif method == "lora":
        steps = [({"precision": half, "optimizer": "adamw", "gradient_checkpointing": False, "shard": "none"}, ()),
                 ({"gradient_checkpointing": True}, ("gradient checkpointing",))]
        if inputs.world_size > 1:
            steps += [({"shard": "zero3"}, ("ZeRO-3 (shards the frozen base)",))]
    else:
        steps = [({"precision": half, "optimizer": "paged_adamw_8bit", "gradient_checkpointing": False, "shard": "none",
                   "quant_bits": 4, "double_quant": True}, ()),
                 ({"gradient_checkpointing": True}, ("gradient checkpointing",))]
        if inputs.world_size > 1:
            steps += [({"shard": "zero3"}, ("ZeRO-3",))]
    # What a rung changes, the user may have fixed: their value wins on every rung.
    user_fixed = {name: rules.overrides[name] for change, _ in steps for name in change if name in rules.overrides}
    candidates = []
    settings: dict[str, Any] = {}
    applied: tuple[str, ...] = ()
    seen = set()
    for change, label in steps:
        settings.update(change)
        applied = applied + label
        merged = {**settings, **user_fixed}
        key = tuple(sorted(merged.items()))
        if key in seen:
            continue
        seen.add(key)
        setup = dataclasses.replace(base_setup, method=method, **{k: v for k, v in merged.items() if hasattr(base_setup, k)})
        candidates.append(_Candidate(method, setup, applied))
    return candidates


def _fit(spec, setup, gpu_bytes: int):
    """The estimator's full verdict (searches the largest micro-batch and sequence: use sparingly)."""
    from advisor import memory

    return memory.gpu_fit(spec, setup, gpu_bytes)


def _total(spec, setup) -> int:
    from advisor import memory

    return int(memory.estimate(spec, setup).total_bytes)


def _fits_at_one(spec, setup, gpu_bytes: int) -> bool:
    """Does `setup` fit at micro-batch 1 (no accumulation)?"""
    return _total(spec, dataclasses.replace(setup, micro_batch=1, grad_accum=1)) <= gpu_bytes


def _closest_fixes(spec, inputs: AdvisorInputs, last: _Candidate, gpu_bytes: int, target_set: str) -> list[str]:
    """For a plan that fits nowhere: more GPUs with ZeRO-3, a larger GPU, a smaller model, a shorter sequence."""
    from advisor import gpus

    fixes = []
    frugal = dataclasses.replace(last.setup, micro_batch=1, grad_accum=1)
    need = _total(spec, frugal)
    for count in GPU_COUNTS:
        if count <= inputs.world_size:
            continue
        # Up to 8 GPUs on one node (advisor.gpus.TYPICAL_GPUS_PER_NODE), then whole nodes of 8.
        nodes, per_node = (1, count) if count <= 8 else (count // 8, 8)
        if _fits_at_one(spec, dataclasses.replace(frugal, num_gpus=per_node, num_nodes=nodes, shard="zero3"), gpu_bytes):
            layout = f", {nodes} nodes x {per_node}: `tunewise job` writes the cluster job" if nodes > 1 else ""
            fixes.append(f"use {count} of these GPUs with ZeRO-3 / FSDP full shard ({last.method}, micro-batch 1{layout})")
            break
    bigger = [gpu for gpu in gpus.GPUS if int(gpu.memory_bytes) >= need]
    if bigger:
        smallest = min(bigger, key=lambda gpu: gpu.memory_bytes)
        fixes.append(f"use a GPU with at least {_gb(need)}, e.g. {smallest.name} ({_gb(smallest.memory_bytes)})")
    smaller = _largest_model_that_fits(frugal, gpu_bytes, spec, target_set)
    if smaller:
        fixes.append(f"use a smaller model: {smaller} fits with {last.method} at micro-batch 1")
    if frugal.seq_len > 128:
        short = dataclasses.replace(frugal, seq_len=128)
        if _fits_at_one(spec, short, gpu_bytes):
            fixes.append(f"train on shorter sequences: {frugal.seq_len} tokens do not fit, 128 do")
    return fixes


def _largest_model_that_fits(setup, gpu_bytes: int, spec, target_set: str) -> str | None:
    """The biggest catalogue model smaller than `spec` that fits `setup` on the GPU (None when none does)."""
    from advisor import specs

    size = specs.param_counts(spec).total
    best = None
    for model_id in specs.catalogue_names():
        other = specs.catalogue()[model_id]
        total = specs.param_counts(other).total
        if total >= size or (best is not None and total <= best[0]):
            continue
        # The same guide target set, in the other architecture's module names.
        candidate = dataclasses.replace(setup, lora_targets=(target_set,))
        try:
            ok = _fits_at_one(other, candidate, gpu_bytes)
        except TunewiseError:
            continue
        if ok:
            best = (total, model_id)
    return None if best is None else f"{best[1]} ({_params(best[0])} parameters)"


# -- the entry point -------------------------------------------------------------------------------------


def recommend(inputs: AdvisorInputs, overrides: Mapping[str, Any] | None = None) -> Recommendation:
    """Apply the guide's rules to `inputs`; `overrides` (advice name -> value) are kept as "set by you".

    Raises TunewiseError for an unknown model or GPU, an unknown advice name, or an
    overridden value the plan would reject (the message names the setting).
    """
    from advisor import memory, specs

    overrides = dict(overrides or {})
    settable = [name for name, target in PLAN_FIELDS.items() if target is not None]
    unknown = sorted(set(overrides) - set(settable))
    if unknown:
        raise _bad(unknown[0], f"is not an advised setting you can set; these are: {', '.join(settable)}")
    _validate_overrides(overrides)
    rules = _Rules(inputs, overrides)
    spec = specs.resolve_model(inputs.model)
    counts = specs.param_counts(spec)
    gpu_text, gpu_bytes, bf16 = _gpu_budget(inputs)
    stage = inputs.heaviest_stage

    # 1. Sequence length and the batch we aim for (they size the memory search).
    seq_value, seq_reason = seq_len_for(inputs)
    window = spec.max_position_embeddings
    rotary = spec.model_type in specs.ROTARY_MODEL_TYPES
    if not spec.rough and seq_value > window and not rotary:
        # Longer than a model with learned positions holds: the trainer (and the planner) refuse it.
        seq_value, seq_reason = window, f"{seq_reason}; capped at the model's maximum of {window} tokens"
    seq_len = rules.put("seq_len", seq_value, seq_reason, "seq_len_from_data")
    if not spec.rough and seq_len > window and rotary:
        # Longer than the model's window: stretch a rotary model's positions rather than cut the data.
        rules.put("rope_scaling", "yarn",
                  f"the data's {seq_len}-token sequences are longer than {spec.id}'s window of {window} positions: "
                  "YaRN stretches a rotary model's window with the least loss on short inputs of the scalings "
                  "transformers offers (Peng et al. 2023, YaRN; Qwen2.5's model cards use it for long context)",
                  "rope_scaling_for_long_data")
        rules.put("rope_factor", specs.rope_factor_for(window, seq_len, None),
                  f"{seq_len} tokens / the {window}-position window = {seq_len / window:.2f}, rounded up to "
                  f"{specs.rope_factor_for(window, seq_len, None):g} (LLaMA-Factory's rule)",
                  "rope_factor_from_data")
    effective, effective_reason = effective_batch_for(inputs)
    measured = measured_advice(inputs.model, inputs.dataset) if inputs.pipeline == "none" and inputs.stage == "sft" else None
    if measured:
        effective, effective_reason = measured["effective_batch"], (
            f"measured on this model and data: {measured['effective_batch']} per step trained best ({effective_reason.split(':')[0]} "
            f"would give {effective})")

    # 2. Method, by the guide's "when to use" rules, then the fallbacks memory forces.
    wanted, method_reason = preferred_method(inputs)
    if measured:
        method_reason = f"measured on this model and data: {measured['summary']}; rules: {method_reason}"
        wanted = measured["method"]
    if "method" in overrides:
        order = [overrides["method"]]
    else:
        order = {"full": ["full", "lora", "qlora"], "lora": ["lora", "qlora"], "qlora": ["qlora"]}[wanted]
    if stage == "ppo":
        # TRL's PPOTrainer does not train a quantized policy (see advisor.plan.Plan).
        if "qlora" in order and len(order) > 1:
            order.remove("qlora")
    module_sets = specs.target_module_sets(spec)
    targets, target_set, targets_reason = targets_for(inputs, module_sets, spec.num_experts or 0)
    targets_value = tuple(overrides["lora_targets"]) if "lora_targets" in overrides else targets
    if isinstance(overrides.get("lora_targets"), str):
        targets_value = tuple(t.strip() for t in overrides["lora_targets"].split(",") if t.strip())
    rank, rank_reason, capacity_warning = rank_with_evidence(inputs, spec, targets_value)
    if measured and measured.get("lora_rank") and measured["method"] != "full":
        rank, rank_reason = measured["lora_rank"], (f"measured on this model and data: rank {measured['lora_rank']} "
                                                    f"trained best at the measured rate; rules: {rank} ({rank_reason})")
    rank_value = overrides.get("lora_rank", rank)

    chosen: _Candidate | None = None
    last: _Candidate | None = None
    rejected: list[str] = []
    for method in order:
        base_setup = memory.TrainingSetup(
            **memory.trainer_loss(stage, False),
            method=method,
            micro_batch=int(overrides.get("micro_batch", 1)),
            seq_len=int(overrides.get("seq_len", seq_len)),
            lora_rank=int(rank_value or 8),
            lora_targets=tuple(targets_value),
            attn=overrides.get("attn", "sdpa"),
            grad_accum=1,
            stage=stage,
            num_gpus=inputs.num_gpus,
            num_nodes=inputs.num_nodes,
        )
        ladder = _ladder(method, base_setup, rules, bf16)
        if gpu_bytes is None:
            chosen = ladder[0]
            break
        for candidate in ladder:
            last = candidate
            if "micro_batch" in overrides:
                ok = _total(spec, candidate.setup) <= gpu_bytes
            else:
                ok = _fits_at_one(spec, candidate.setup, gpu_bytes)
            if ok:
                chosen = candidate
                break
        if chosen is not None:
            break
        need = _total(spec, dataclasses.replace(last.setup, micro_batch=1))
        rejected.append(
            f"{method} does not fit {gpu_text} even with "
            + (", ".join(last.steps) if last.steps else "its leanest settings")
            + f" at micro-batch 1 (needs {_gb(need)} per GPU)"
        )

    fits = chosen is not None
    if chosen is None:
        chosen = last
    method = chosen.method
    setup = chosen.setup

    if rejected and fits:
        method_reason += "; but " + "; ".join(rejected) + f" -> {method}"
    elif not fits:
        method_reason += "; " + "; ".join(rejected) + f"; {method} is the closest, see the fixes"
    rules.put("method", method, method_reason, "method_when_to_use")

    # 3. Memory-relevant settings from the search.
    steps_text = ", ".join(chosen.steps)
    if gpu_bytes is None:
        fit_reason = "no GPU given: not checked against memory"
    elif fits:
        fit_reason = f"the estimator's first setup that fits {gpu_text}" + (f" (after {steps_text})" if steps_text else "")
    else:
        fit_reason = f"the leanest setup tried ({steps_text or 'defaults'}); even this does not fit {gpu_text}"
    precision_reason = {
        "amp": "mixed precision with fp32 master weights (most stable for full fine-tuning)",
        "bf16": "16-bit compute in bf16",
        "fp16": "16-bit compute in fp16 (this GPU has no bf16)",
    }.get(setup.precision, setup.precision)
    rules.put("precision", setup.precision, f"{precision_reason}; {fit_reason}", "memory_fit")
    optimizer_reason = {
        "paged_adamw_8bit": "guide: QLoRA best practices, paged optimizers for memory spikes",
        "adamw_8bit": "8-bit AdamW states (about 2 bytes per parameter instead of 8)",
        "adamw": "AdamW",
    }.get(setup.optimizer, setup.optimizer)
    rules.put("optimizer", setup.optimizer, f"{optimizer_reason}; {fit_reason}", "memory_fit")
    rules.put("gradient_checkpointing", setup.gradient_checkpointing,
              ("recompute activations in the backward pass (less memory, ~30% slower); " if setup.gradient_checkpointing
               else "off: faster, and the activations fit; ") + fit_reason, "memory_fit")
    rules.put("attn", "sdpa", "fused attention (SDPA) never materialises the attention matrix, so activations grow linearly with the sequence", "attention_kernel")
    rules.put("shard", setup.shard, ("one full copy per GPU (DDP)" if setup.shard == "none" else f"{setup.shard}: shards across {inputs.world_size} GPUs") + f"; {fit_reason}", "memory_fit")

    # 4. LoRA settings (None for full fine-tuning).
    if method == "full":
        not_used = "not used: full fine-tuning trains all weights"
        for name in ("lora_rank", "lora_alpha", "lora_targets", "lora_dropout", "quant_bits", "double_quant"):
            rules.put(name, None, not_used, "not_applicable")
    else:
        rank_value = rules.put("lora_rank", rank, rank_reason, "lora_rank_table")
        if capacity_warning and not rules.fixed("lora_rank"):
            rules.warnings.append(capacity_warning)
        elif rules.fixed("lora_rank"):
            _, sentence, holds = lora_capacity(spec, int(rank_value), targets_value,
                                               inputs.completion_tokens or inputs.tokens, inputs.completion_tokens is not None)
            if not holds:
                rules.warnings.append(f"your rank {rank_value} may be too small for the data: {sentence}")
        rules.put("lora_alpha", *lora_alpha_for(int(rank_value), inputs), "lora_alpha")
        rules.put("lora_targets", targets, targets_reason, "target_modules")
        rules.put("lora_dropout", *dropout_for(counts.total), "lora_dropout")
        if method == "qlora":
            rules.put("quant_bits", 4, "guide: QLoRA best practices, use NF4 quantization (better than INT4)", "qlora_nf4")
            rules.put("double_quant", True, "guide: QLoRA best practices, double quantization saves extra memory", "qlora_double_quant")
        else:
            rules.put("quant_bits", None, "not used: LoRA keeps the base in 16 bit", "not_applicable")
            rules.put("double_quant", None, "not used: LoRA keeps the base in 16 bit", "not_applicable")

    # 5. Batch: the largest power-of-two micro-batch (up to the effective batch per GPU) whose
    # setup, with the gradient accumulation it implies, fits; accumulation makes up the rest.
    per_gpu_target = max(1, effective // inputs.world_size)
    if gpu_bytes is None:
        micro = min(8, per_gpu_target)
        micro_reason = f"{micro} per device toward an effective batch of {effective}; no GPU given: not checked against memory"
    elif not fits or "micro_batch" in overrides:
        micro = 1
        micro_reason = "1: the smallest there is (nothing larger fits)"
    else:
        micro = 1
        for size in MICRO_BATCHES:
            if size > per_gpu_target:
                continue
            accum_at = max(1, math.ceil(effective / (size * inputs.world_size)))
            if _total(spec, dataclasses.replace(setup, micro_batch=size, grad_accum=accum_at)) <= gpu_bytes:
                micro = size
                break
        micro_reason = (f"the largest power of two up to {per_gpu_target} per GPU (an effective batch of {effective}) "
                        f"that the estimator fits on {gpu_text} at {setup.seq_len} tokens")
    micro = rules.put("micro_batch", micro, micro_reason, "micro_batch_fit")
    accum = max(1, math.ceil(effective / (micro * inputs.world_size)))
    accum = rules.put("grad_accum", accum, f"{effective} examples per step / ({micro} per micro-batch x {inputs.world_size} GPU{'s' if inputs.world_size > 1 else ''}) -> {accum}", "grad_accum")
    effective_actual = micro * accum * inputs.world_size
    if method in ("lora", "qlora") and effective_actual <= LORA_LARGE_BATCH:
        effective_reason += f"; small enough for LoRA, which pays more than full fine-tuning for large batches ({LWR})"
    rules.put("effective_batch", effective_actual, effective_reason + (f"; {micro} x {accum} x {inputs.world_size} = {effective_actual}" if effective_actual != effective else ""), "effective_batch")
    if method in ("lora", "qlora") and effective_actual > LORA_LARGE_BATCH:
        rules.warnings.append(
            f"effective batch {effective_actual} with {method}: {LWR} and the {TINKER_PRIMER} found that LoRA pays a larger "
            "loss penalty than full fine-tuning as the batch grows, and a higher rank does not remove it; prefer "
            f"{LORA_LARGE_BATCH} or fewer examples per optimizer step (more, smaller steps)")

    # 6. Optimisation schedule.
    if inputs.measured_lr is not None and inputs.measured_lr_method not in (None, method):
        rules.notes.append(f"the pilot measured the learning rate for {inputs.measured_lr_method}, not {method}: "
                           "check it again for this method")
    lr_inputs = inputs if inputs.measured_lr_method in (None, method) else dataclasses.replace(
        inputs, measured_lr=None, measured_lr_reason=None)
    alpha_now = rules.values["lora_alpha"].value if method != "full" else None
    solo_preference = inputs.pipeline == "none" and inputs.stage in ("dpo", "ppo")
    if solo_preference:
        lr, lr_reason = preference_learning_rate(method, counts.total, inputs.stage)
        if lr_inputs.measured_lr is not None:
            lr, lr_reason = lr_inputs.measured_lr, f"{lr_inputs.measured_lr_reason or 'measured'}; rules gave {lr:.1e} ({lr_reason})"
    else:
        lr, lr_reason = learning_rate_for(method, rank_value if method != "full" else None, lr_inputs, counts.total, alpha_now)
    lr_rule = ("measured_lr" if lr_inputs.measured_lr is not None else "preference_lr" if solo_preference
               else "learning_rate_evidence")
    if measured and lr_inputs.measured_lr is None and method == measured["method"]:
        lr, lr_reason, lr_rule = measured["learning_rate"], (f"measured on this model and data: {measured['summary']}; "
                                                             f"rules gave {lr:.1e} ({lr_reason})"), "measured_lr"
    rules.put("learning_rate", lr, lr_reason, lr_rule)
    preference_steps = [name for name in ("dpo", "ppo") if name in inputs.preference_stages]
    if solo_preference:
        rules.put("preference_lr", None, "not needed: this run is one preference stage, trained at the learning rate above",
                  "not_applicable")
    elif preference_steps:
        rules.put("preference_lr", *preference_learning_rate(method, counts.total, "ppo" if "ppo" in preference_steps else "dpo"),
                  "preference_lr")
    else:
        rules.put("preference_lr", None, "not used: no DPO or PPO step", "not_applicable")
    epochs_value, epochs_reason = epochs_for(inputs)
    train_examples = train_examples_of(inputs.examples)  # what the run trains on: the eval split is held out first
    if measured:
        # The measured steps, as passes over the training examples.
        # Rounded down at 3 decimals: the trainer takes ceil(epochs x steps per epoch), which then gives the
        # measured steps exactly (2.67 epochs of 225 steps would be 601).
        epochs_value = math.floor(measured["steps"] / math.ceil(train_examples / effective_actual) * 1000) / 1000
        epochs_reason = (f"measured on this model and data: {measured['steps']} steps of {effective_actual} examples "
                         f"({epochs_value:g} passes over ~{train_examples:,} training examples) learn the task; {epochs_reason}")
    epochs_value = rules.put("epochs", epochs_value, epochs_reason, "epochs_by_size")
    steps_per_epoch = max(1, math.ceil(train_examples / effective_actual))
    total_steps = max(1, math.ceil(steps_per_epoch * float(epochs_value)))
    split = ("" if train_examples == inputs.examples else
             f" (of {inputs.examples:,}, after the {EVAL_SHARE:.0%} eval split the run holds out)")
    rules.put("total_steps", total_steps, f"{train_examples:,} training examples{split} / {effective_actual} per step = "
              f"{steps_per_epoch} steps per epoch x {float(epochs_value):g} epochs", "steps")
    if method == "full" or total_steps < 100:
        why = "full fine-tuning updates every weight" if method == "full" else f"only {total_steps} steps"
        warmup, warmup_reason = WARMUP_RANGE[1], f"guide: short warmup (5-10% of steps); the long end, 10%, because {why}"
    else:
        warmup, warmup_reason = WARMUP_RANGE[0], f"guide: short warmup (5-10% of steps); 5% of {total_steps} steps is {max(1, round(0.05 * total_steps))} steps"
    rules.put("warmup_ratio", warmup, warmup_reason, "warmup_range")
    run_steps = inputs.max_steps or total_steps  # max steps, when set, replace the epochs (HF Trainer's rule)
    eval_every = rules.put("eval_steps", *eval_interval(run_steps, effective_actual, inputs.examples), "eval_cost")
    rules.put("early_stopping_patience", 0,
              f"off: Tunewise runs the planned steps; set 3-5 to stop once the eval loss has not improved (by the "
              f"threshold) for that many evaluations in a row (every {eval_every} steps), keeping the best checkpoint "
              "as the output; worth it on small data, where the eval loss turns up (overfitting)", "early_stopping")

    # 7. Forgetting safeguards, scaled by the domain shift and the method. They need original-domain text: the
    # demo model has its own; a real model needs some from the user (never the demo's invented-world text).
    from advisor.plan import DEMO_WORLD_TEXTS, is_demo_model

    has_text = is_demo_model(inputs.model) or (inputs.original_data not in (None, *DEMO_WORLD_TEXTS))
    if has_text:
        rules.put("forgetting_monitor", True, "guide: monitor for catastrophic forgetting; keep a validation set from the original domain", "forgetting_monitor")
    else:
        rules.put("forgetting_monitor", False, NO_ORIGINAL_TEXT, "forgetting_monitor")
    rules.put("forgetting_eval_every", *forgetting_interval(run_steps, effective_actual), "monitor_cost")
    adapters = method in ("lora", "qlora")
    replay_table = {"full": {"low": 0.01, "medium": 0.05, "high": 0.10}, "adapter": {"low": 0.0, "medium": 0.01, "high": 0.05}}
    replay = replay_table["adapter" if adapters else "full"][inputs.domain_shift]
    if inputs.preserve_original:
        replay = min(REPLAY_RANGE[1], max(REPLAY_RANGE[0], replay * 2))
    replay_reason = (f"guide: replay buffer, mix 1-10% original data; {inputs.domain_shift} domain shift with "
                     + ("LoRA (frozen base already limits forgetting)" if adapters else "full fine-tuning"))
    if replay == 0:
        replay_reason = "off: guide, LoRA keeps the original weights frozen and the task is close to pretraining; turn on replay (1-10%) if the monitor alerts"
    elif inputs.preserve_original:
        replay_reason += "; doubled because forgetting is a concern"
    if not has_text and replay:
        replay, replay_reason = 0.0, f"off (the guide would mix {replay:.0%}): {NO_ORIGINAL_TEXT}"
    rules.put("replay_fraction", replay, replay_reason + ("" if not has_text else f" -> {replay:.0%}"), "replay_buffer")
    if not has_text and method == "full" and (inputs.domain_shift == "high" or inputs.preserve_original):
        rules.put("ewc_lambda", 0.0, f"off (the guide would use EWC here): {NO_ORIGINAL_TEXT}", "ewc")
    elif method == "full" and (inputs.domain_shift == "high" or inputs.preserve_original) and setup.shard != "zero3":
        rules.put("ewc_lambda", EWC_START_LAMBDA,
                  "guide: elastic weight consolidation penalises changes to important weights (Fisher information on the original data); "
                  f"on for full fine-tuning with {'forgetting concerns' if inputs.preserve_original else 'a high domain shift'}; "
                  f"{EWC_START_LAMBDA:g} is Tunewise's starting strength: raise it if the forgetting monitor alerts, lower it if the loss stalls",
                  "ewc")
    else:
        why = ("LoRA keeps the original weights frozen, which already prevents most forgetting" if adapters
               else "EWC needs whole parameters and ZeRO-3 shards them" if setup.shard == "zero3"
               else f"{inputs.domain_shift} domain shift: replay and a lower LR suffice")
        rules.put("ewc_lambda", 0.0, f"off: {why}", "ewc")

    # 8. Preference stages.
    pref = inputs.preference_stages
    if "dpo" in pref:
        small = inputs.examples < 5_000
        if small and inputs.preserve_original:
            beta, why = 0.5, "top of the range: few pairs and forgetting is a concern, so stay close to the reference"
        elif small or inputs.preserve_original:
            beta, why = 0.25, ("few preference pairs (< 5k): stay closer to the reference" if small else "forgetting is a concern: stay closer to the reference")
        else:
            beta, why = 0.1, "low end: enough pairs to move further from the reference"
        rules.put("beta", beta, f"guide: DPO beta typical 0.1-0.5, higher beta = stay closer to reference; {why} "
                  f"({DPO_PAPER} and TRL default to {DPO_PAPER_BETA:g})", "dpo_beta")
    else:
        rules.put("beta", None, "not used: no DPO stage", "not_applicable")
    if "ppo" in pref:
        if inputs.examples < 5_000 or inputs.preserve_original:
            kl, why = 0.1, "top of the range: a reward model from few pairs is easy to hack, and a strong KL penalty keeps the policy near the reference"
        else:
            kl, why = 0.05, "middle of the range; raise it if KL explodes or the reward looks hacked, lower it if the reward stays flat"
        rules.put("kl_coef", kl, f"guide: PPO, typical KL coefficient 0.01-0.1 to prevent reward hacking; {why} "
                  f"({INSTRUCTGPT} used {INSTRUCTGPT_KL:g})", "ppo_kl")
    else:
        rules.put("kl_coef", None, "not used: no PPO stage", "not_applicable")
    if pref:
        if "ppo" in pref and "dpo" not in pref:
            choice, tail = "rlhf", "you chose RLHF (SFT -> reward model -> PPO)"
        elif "dpo" in pref and "ppo" not in pref:
            choice, tail = "dpo", "DPO is the simpler start"
        elif "rm" in pref and len(pref) == 1:
            choice, tail = "rlhf", "a reward model is the second step of RLHF"
        else:
            choice, tail = "compare", "running both"
        rules.put("preference_method", choice,
                  "guide: DPO is simpler (no reward model, no RL), more stable, often comparable to RLHF; "
                  f"compare to RLHF on your specific task (pipeline compare); {tail}", "rlhf_vs_dpo")
        rules.notes.append("guide: compare DPO to RLHF on your specific task: `pipeline: compare` runs both on the same data side by side")

    # 9. Warnings from the guide's risks.
    method = rules.values["method"].value
    if method == "full" and inputs.examples <= FULL_FT_MIN_EXAMPLES:
        rules.warnings.append(
            f"full fine-tuning on {inputs.examples:,} examples: guide risk, overfitting on small datasets (full fine-tuning is for >100k); "
            "LoRA is the safer choice"
        )
    if "sft" in (inputs.stage,) or inputs.pipeline != "none":
        if inputs.examples < SFT_FAR_BELOW:
            rules.warnings.append(
                f"{inputs.examples:,} SFT examples is far below the guide's typical 10k-100k: expect overfitting; "
                "use more data, fewer epochs, and watch the eval loss"
            )
    if inputs.stage in ("dpo", "ppo") and inputs.pipeline == "none" and not inputs.sft_model:
        rules.warnings.append(
            f"{inputs.stage} without an SFT start: guide, DPO best practice is to start from a good SFT model (and RLHF's step 1 is SFT); "
            "set the SFT model or use the dpo / rlhf pipeline"
        )
    if method == "qlora" and inputs.will_merge and inputs.priority == "quality":
        rules.warnings.append(
            "QLoRA while you will merge back to 16 bit for quality-critical use: guide, LoRA is for quality-critical work "
            "merged back to fp16 (the adapter learned against a 4-bit base); use LoRA if it fits"
        )
    rank_now = rules.values["lora_rank"].value
    if rank_now is not None and rules.values["lora_rank"].overridden:
        low, high = RANK_TABLE[inputs.task]
        if not low <= rank_now <= high:
            rules.warnings.append(f"rank {rank_now} is outside the guide's {low}-{high} for {inputs.task}")
    lr_advice = rules.values["learning_rate"]
    lr_low, lr_high = LR_RANGES[method]
    if not solo_preference and not lr_low <= lr_advice.value <= lr_high:
        if lr_advice.overridden:
            rules.warnings.append(f"learning rate {lr_advice.value:g} is outside the guide's {lr_low:g}-{lr_high:g} for {method}")
        else:
            rules.notes.append(
                f"learning rate {lr_advice.value:.1e} is outside the guide's {lr_low:g}-{lr_high:g} for {method}: "
                + ("measured on your data (see its reason)" if lr_advice.rule == "measured_lr" else
                   "the published evidence for a model of this size (see its reason); check it with the pilot"))

    # 10. The memory verdict for the final values (overrides included).
    memory_check = _final_check(spec, rules, setup, gpu_text, gpu_bytes, fits, inputs, chosen, target_set)
    if not memory_check.fits and memory_check.checked:
        rules.warnings.insert(0, f"does not fit {gpu_text}: " + ("; or ".join(memory_check.fixes) or "no fix found"))
    return Recommendation(
        inputs=inputs,
        values={name: rules.values[name] for name in PLAN_FIELDS if name in rules.values},
        warnings=tuple(rules.warnings),
        notes=tuple(rules.notes),
        memory=memory_check,
        overrides=overrides,
    )


def _setup_from_values(base_setup, values: Mapping[str, Advice]):
    """The estimator's TrainingSetup for the final advice values (those the estimate reads)."""
    changes = {}
    read = {f.name for f in dataclasses.fields(base_setup)}
    for name, advice in values.items():
        if name in read and advice.value is not None:
            changes[name] = tuple(advice.value) if name == "lora_targets" else advice.value
    return dataclasses.replace(base_setup, **changes)


def _final_check(spec, rules: _Rules, setup, gpu_text, gpu_bytes, fits_search, inputs, chosen, target_set) -> MemoryCheck:
    from advisor import memory

    final = _setup_from_values(setup, rules.values)
    if gpu_bytes is None:
        estimate = memory.estimate(spec, final)
        return MemoryCheck(False, True, None, None, int(estimate.total_bytes), int(estimate.peak_allocated_bytes), None)
    estimate = memory.estimate(spec, final)
    result = _fit(spec, final, gpu_bytes)
    fits = bool(result.fits)
    fixes: tuple[str, ...] = ()
    if not fits:
        if rules.overrides and fits_search:
            own = getattr(result, "cheapest_fix", None)
            fixes = (f"your settings need {_gb(estimate.total_bytes)} per GPU"
                     + (f"; estimator: {own}" if own else "; undo an override or change the GPU"),)
        else:
            fixes = tuple(_closest_fixes(spec, inputs, chosen, gpu_bytes, target_set))
    return MemoryCheck(
        checked=True,
        fits=fits,
        gpu=gpu_text,
        gpu_bytes=gpu_bytes,
        total_bytes=int(estimate.total_bytes),
        peak_allocated_bytes=int(estimate.peak_allocated_bytes),
        max_micro_batch=int(result.max_micro_batch or 0),
        fixes=fixes,
    )


def _validate_overrides(overrides: Mapping[str, Any]) -> None:
    """Reject an override the plan would refuse, naming the setting (through Plan's own validation)."""
    from advisor.plan import Plan, PlanError

    dotted = {}
    for name, value in overrides.items():
        target = PLAN_FIELDS.get(name)
        if target is None:
            continue
        dotted[target] = list(value) if isinstance(value, tuple) else value
    try:
        Plan().with_overrides(dotted)
    except PlanError as exc:
        raise exc from None


def format_recommendation(rec: Recommendation) -> str:
    """A readable report: each value with its reason, then warnings and notes."""
    lines = [f"Recommendation for {rec.inputs.model}: {rec.inputs.examples:,} examples, task {rec.inputs.task}, "
             f"stage {rec.inputs.stage if rec.inputs.pipeline == 'none' else rec.inputs.pipeline + ' pipeline'}"]
    if rec.memory.checked:
        verdict = "fits" if rec.memory.fits else "DOES NOT FIT"
        lines.append(f"memory: {_gb(rec.memory.total_bytes)} per GPU on {rec.memory.gpu}: {verdict}")
    else:
        lines.append(f"memory: {_gb(rec.memory.total_bytes)} per GPU (no GPU given: not checked)")
    lines.append("")
    width = max(len(name) for name in rec.values)
    for name, advice in rec.values.items():
        if advice.value is None:
            continue
        value = advice.value
        if isinstance(value, (list, tuple)):
            value = ",".join(value)
        elif isinstance(value, float):
            value = f"{value:.1e}" if 0 < abs(value) < 1e-3 else f"{value:g}"
        mark = " (set by you)" if advice.overridden else ""
        lines.append(f"{name:<{width}}  {value}{mark}")
        if not advice.overridden:
            lines.append(f"{'':<{width}}    {advice.reason}")
    for warning in rec.warnings:
        lines.append(f"warning: {warning}")
    for note in rec.notes:
        lines.append(f"note: {note}")
    return "\n".join(lines)
