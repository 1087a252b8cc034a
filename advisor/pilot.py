"""The learning-rate pilot's design: which rates to try, for how many steps, and what it will cost.

`tunewise pilot` and the wizard's "Check the learning rate on my data" measure the learning rate on the
user's own model, data and hardware instead of trusting a rule. The search (justified by
bench/advice_quality.py, which compares it with a plain grid at the same cost):

1. five peak rates, half a decade apart (x sqrt(10)), centred on the plan's rate snapped to that ladder,
   so they span a factor of 100: wider than the gap between the guide and the evidence;
2. round 1: each trains `steps` optimizer steps from the same start, with the plan's own schedule
   compressed to those steps, and is scored by its loss on a held-out split;
3. round 2 (successive halving): the best two train twice as long; when the best of round 1 sits at an
   end of the ladder, the rate beyond that end replaces the runner-up, so a rule that is far off still
   finds its optimum;
4. the lowest held-out loss of the last round wins; a run that diverges (NaN, infinite loss) scores
   as infinitely bad, so a known-bad rate is never chosen.

Its cost is bounded: by default `DEFAULT_SHARE` of the planned run's training time (at least a minute), or
`budget_minutes`;
`design_pilot` refuses a budget too small for two candidates. Time is estimated before the click from the
model's size (`step_seconds`: forward-backward FLOPs at a rough device rate); the trainer measures the real
step time after the first candidate and trims round 2 to stay inside the budget, and reports what it spent.

It covers the stages whose rate the guide and the evidence disagree on and whose objective has a held-out
loss: SFT (full, LoRA, QLoRA) and DPO. A reward model, PPO / RLOO / GRPO (no held-out loss to compare: the
reward moves with the policy) and pipelines are refused with a message saying how to pilot their SFT or
DPO step instead.

Pure Python: no torch, transformers or gradio.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from advisor.errors import TunewiseError

#: The stages the pilot measures.
PILOT_STAGES = ("sft", "dpo")
#: Rates tried in round 1.
CANDIDATES = 5
#: Rates per decade on the ladder the candidates are taken from (1, 3.16, 10, ...).
PER_DECADE = 2
#: Fewest optimizer steps a candidate trains: below this the warmup and the first noisy steps are the run.
MIN_STEPS = 5
#: Default cost: this share of the planned run's training time, but at least MIN_BUDGET_S: below a minute a
#: pilot buys mostly model loading (bench/advice_quality.py: on the demo, a 1.5-minute run's 10% is 9 s).
DEFAULT_SHARE = 0.10
MIN_BUDGET_S = 60.0
#: Round 2 keeps this many rates and trains each this many times longer.
KEEP, STRETCH = 2, 2
#: At most this many held-out examples score a candidate (a fixed split, the same for every candidate):
#: enough for a loss to two decimals on the demo, and cheap next to the training steps on large data.
MAX_EVAL_EXAMPLES = 256
#: At least this many held-out and this many training examples, or the pilot refuses.
MIN_EVAL_EXAMPLES, MIN_TRAIN_EXAMPLES = 8, 8
#: The held-out share the pilot uses when the plan holds out none.
FALLBACK_EVAL_FRACTION = 0.1

#: Rough step time on a CPU: a fixed cost per micro-batch (the Trainer's Python work, measured at about
#: 50 ms on the demo model, bench/advice_quality.py) plus FLOPs at 50 GFLOP/s (one core of the machine
#: bench/RESULTS.md names; the demo's measured 0.09 s per LoRA step of 8 examples is reproduced).
CPU_STEP_OVERHEAD_S, CPU_FLOPS = 0.05, 50e9
#: Rough GPU utilisation of the datasheet's dense bf16 rate for fine-tuning (a guess the pilot's own
#: measurement replaces).
GPU_UTILISATION = 0.35
#: Model load, data preparation and the held-out evaluation per candidate, beyond its steps: seconds per GB
#: of weights read (a local SSD) plus a fixed part (measured at ~1.5 s per candidate on the demo).
CANDIDATE_FIXED_S, LOAD_S_PER_GB = 1.5, 0.5


def ladder(center: float, count: int = CANDIDATES) -> tuple[float, ...]:
    """`count` rates on the half-decade ladder around `center` (snapped to the nearest rung), ascending."""
    if not (isinstance(center, (int, float)) and center > 0 and math.isfinite(center)):
        raise TunewiseError(f"training.learning_rate: the pilot centres on the plan's rate, got {center!r}",
                            field="training.learning_rate")
    rung = round(math.log10(center) * PER_DECADE)
    first = rung - (count - 1) // 2
    return tuple(rung_rate(first + index) for index in range(count))


def rung_rate(rung: int) -> float:
    """The rate of ladder rung `rung` (10 ** (rung / PER_DECADE)), rounded to 3 significant figures."""
    value = 10 ** (rung / PER_DECADE)
    return float(f"{value:.3g}")


def rung_of(rate: float) -> int:
    return round(math.log10(rate) * PER_DECADE)


@dataclass(frozen=True)
class PilotDesign:
    """What a pilot will do and what it should cost (estimated before it starts)."""

    stage: str
    """sft or dpo."""
    rates: tuple[float, ...]
    """Round 1's peak learning rates, ascending."""
    steps: int
    """Optimizer steps per candidate in round 1 (round 2: `STRETCH` times as many)."""
    keep: int
    """Rates round 2 keeps (0: one round only)."""
    train_steps: int
    """Optimizer steps of the whole pilot."""
    run_steps: int
    """The planned run's optimizer steps (what the budget is a share of)."""
    step_s: float
    """Estimated seconds per optimizer step."""
    step_source: str
    """Where the step time comes from, in words."""
    candidate_s: float
    """Estimated seconds per candidate beyond its steps (load, data, evaluation)."""
    expected_s: float
    """Estimated seconds for the whole pilot."""
    budget_s: float
    """The most the pilot may spend (seconds): it trims round 2 to stay inside."""
    budget_source: str
    """How the budget was set, in words."""

    @property
    def candidates(self) -> int:
        """Candidate trainings in all (round 1 plus round 2)."""
        return len(self.rates) + self.keep

    def to_dict(self) -> dict:
        return asdict(self) | {"rates": list(self.rates)}

    @classmethod
    def from_dict(cls, data: dict) -> "PilotDesign":
        names = {name for name in cls.__dataclass_fields__}
        values = {key: value for key, value in data.items() if key in names}
        values["rates"] = tuple(float(rate) for rate in values["rates"])
        return cls(**values)

    def describe(self) -> str:
        """One sentence for the page and the terminal, before the pilot starts."""
        rounds = f"{len(self.rates)} rates x {self.steps} steps"
        if self.keep:
            rounds += f", then the best {self.keep} x {self.steps * STRETCH}"
        return (f"{rounds} ({self.train_steps} steps, {self.train_steps / max(1, self.run_steps):.0%} of the run's "
                f"{self.run_steps}): about {minutes(self.expected_s)} ({self.step_source}); budget {minutes(self.budget_s)} "
                f"({self.budget_source})")


def minutes(seconds: float) -> str:
    """45 -> "45 s", 150 -> "2.5 min"."""
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def run_steps_of(plan, train_examples: int | None) -> int | None:
    """The planned run's optimizer steps: max_steps, else epochs over the training examples (None: unknown)."""
    if plan.training.max_steps:
        return int(plan.training.max_steps)
    if not train_examples:
        return None
    per_step = plan.training.micro_batch * plan.training.grad_accum * max(1, plan.hardware.num_gpus)
    return max(1, math.ceil(math.ceil(train_examples / per_step) * float(plan.training.epochs)))


def step_seconds(plan, params: int, tokens_per_example: float, gpu_tflops: float | None) -> tuple[float, str]:
    """A rough optimizer-step time: forward and backward FLOPs (6 x parameters per token for full
    fine-tuning, 4 for LoRA, whose frozen weights take no gradient; DPO doubles the sequences and adds the
    reference's forward pass) at `GPU_UTILISATION` of the GPU's dense bf16 rate, or on a CPU at `CPU_FLOPS`
    plus `CPU_STEP_OVERHEAD_S` per micro-batch."""
    per_token = 6 if plan.method.method == "full" else 4
    if plan.stage == "dpo":
        per_token = 2 * per_token + 2 * 2  # chosen and rejected, plus the reference's forward on both
    examples = plan.training.micro_batch * plan.training.grad_accum
    flops = per_token * params * tokens_per_example * examples
    if gpu_tflops:
        seconds = flops / (gpu_tflops * 1e12 * GPU_UTILISATION)
        return seconds, f"estimated at {GPU_UTILISATION:.0%} of the GPU's {gpu_tflops:g} bf16 TFLOPS"
    seconds = flops / CPU_FLOPS + CPU_STEP_OVERHEAD_S * plan.training.grad_accum
    return seconds, "estimated for one CPU core"


def design_pilot(plan, *, params: int, train_examples: int | None, tokens_per_example: float,
                 weight_bytes: int, gpu_tflops: float | None = None, budget_minutes: float | None = None,
                 share: float = DEFAULT_SHARE, measured_step_s: float | None = None, rounds: int = 2) -> PilotDesign:
    """The pilot for `plan`: its rates, steps and expected cost (`rounds=1`: a plain grid, no halving; the
    benchmark compares the two at the same cost). TunewiseError (naming the field) for a stage
    the pilot does not measure, a run whose length is unknown without a budget, or a budget too small for
    two candidates."""
    if plan.pipeline != "none":
        raise TunewiseError(
            f"pipeline: the pilot measures one stage's learning rate, not a {plan.pipeline} pipeline: pilot its SFT "
            "step (--pipeline none --stage sft) and its DPO step (--stage dpo --sft-model RUN) one at a time",
            field="pipeline")
    if plan.stage not in PILOT_STAGES:
        why = ("a reward model's rate matters less than its data" if plan.stage == "rm" else
               "online RL has no held-out loss to compare rates by (the reward moves with the policy)")
        raise TunewiseError(f"stage: the pilot measures SFT and DPO learning rates, not {plan.stage} ({why}); "
                            "start from the advised rate and watch the run's alerts", field="stage")
    if not (isinstance(share, (int, float)) and 0 < share <= 1):
        raise TunewiseError(f"pilot share: must be above 0 and at most 1, got {share!r}", field="share")
    if budget_minutes is not None and not (isinstance(budget_minutes, (int, float)) and budget_minutes > 0
                                           and math.isfinite(budget_minutes)):
        raise TunewiseError(f"budget_minutes: must be a number of minutes above 0, got {budget_minutes!r}",
                            field="budget_minutes")
    run_steps = run_steps_of(plan, train_examples)
    if measured_step_s:
        step_s, source = measured_step_s, "step time measured on this machine"
    else:
        step_s, source = step_seconds(plan, params, tokens_per_example, gpu_tflops)
    candidate_s = CANDIDATE_FIXED_S + LOAD_S_PER_GB * weight_bytes / 1e9
    if budget_minutes is not None:
        budget_s, budget_source = float(budget_minutes) * 60, "--budget-minutes"
    elif run_steps is None:
        raise TunewiseError("budget_minutes: the run's length is unknown (no max steps and no example count): give "
                            "--budget-minutes, or --max-steps for the run", field="budget_minutes")
    else:
        budget_s = share * run_steps * step_s
        budget_source = f"{share:.0%} of the run's ~{minutes(run_steps * step_s)} of training"
        if budget_s < MIN_BUDGET_S:
            budget_s, budget_source = MIN_BUDGET_S, (f"the {minutes(MIN_BUDGET_S)} floor: {share:.0%} of the run's "
                                                     f"~{minutes(run_steps * step_s)} would buy mostly loading")
    full = ladder(plan.training.learning_rate)
    # The largest search the budget affords: five rates and a second round, five rates, the middle three,
    # or the plan's rate and the rung below; round 1 costs rates x steps, round 2 KEEP x STRETCH x steps.
    options = ((full, KEEP), (full, 0), (full[1:-1], 0), (full[1:3], 0))
    for rates, keep in options if rounds == 2 else options[1:]:
        units = len(rates) + keep * STRETCH
        spendable = budget_s - (len(rates) + keep) * candidate_s
        steps = int(spendable / (units * step_s)) if spendable > 0 else 0
        if steps >= MIN_STEPS:
            break
    else:
        needed = 2 * (MIN_STEPS * step_s + candidate_s)
        raise TunewiseError(
            f"budget_minutes: {minutes(budget_s)} ({budget_source}) is too small for two candidates: each needs at least "
            f"{MIN_STEPS} steps ({minutes(MIN_STEPS * step_s + candidate_s)} with loading and evaluation, {source}); "
            f"give it at least {math.ceil(needed / 6) / 10:g} minutes (--budget-minutes), or plan a longer run",
            field="budget_minutes")
    if run_steps is not None:
        # Never train a candidate longer than the run itself.
        steps = min(steps, max(MIN_STEPS, run_steps // (STRETCH if keep else 1)))
    train_steps = len(rates) * steps + keep * STRETCH * steps
    expected_s = train_steps * step_s + (len(rates) + keep) * candidate_s
    return PilotDesign(stage=plan.stage, rates=rates, steps=steps, keep=keep, train_steps=train_steps,
                       run_steps=run_steps or train_steps, step_s=step_s, step_source=source,
                       candidate_s=candidate_s, expected_s=expected_s, budget_s=budget_s, budget_source=budget_source)


def second_round(rates: tuple[float, ...], losses: list[float], keep: int = KEEP) -> list[float]:
    """Round 2's rates from round 1's held-out losses (inf for a failed candidate): the best `keep`, but when
    the best is at an end of the ladder, the rung beyond that end instead of the runner-up (the optimum may
    lie outside the range the rule suggested)."""
    order = sorted(range(len(rates)), key=lambda index: (losses[index], index))
    best = order[0]
    if not math.isfinite(losses[best]):
        return []
    if best in (0, len(rates) - 1) and keep >= 2:
        beyond = rung_rate(rung_of(rates[best]) + (-1 if best == 0 else 1))
        return [rates[best], beyond] + [rates[index] for index in order[1:keep - 1]]
    return [rates[index] for index in order[:keep] if math.isfinite(losses[index])]


def choose(results: list[dict]) -> dict | None:
    """The winning candidate: the lowest finite held-out loss among the last round measured (round 2 when
    it ran, else round 1); None when no candidate finished with a finite loss."""
    finished = [r for r in results if r.get("status") == "finished" and _finite(r.get("eval_loss"))]
    if not finished:
        return None
    last_round = max(r["round"] for r in finished)
    return min((r for r in finished if r["round"] == last_round), key=lambda r: (r["eval_loss"], r["rate"]))


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def lr_reason(design: PilotDesign, results: list[dict], chosen: dict, eval_examples: int, spent_s: float) -> str:
    """The learning rate's reason after a pilot: what was measured, and what was chosen."""
    first = sorted((r for r in results if r["round"] == 1), key=lambda r: r["rate"])
    losses = ", ".join(f"{r['rate']:.1e}: {_loss_text(r)}" for r in first)
    text = (f"pilot: {len(first)} rates x {design.steps} steps on {eval_examples} held-out examples, eval loss "
            f"{losses}")
    second = sorted((r for r in results if r["round"] == 2), key=lambda r: r["rate"])
    if second:
        text += "; best " + " and ".join(f"{r['rate']:.1e}" for r in second) + f" x {second[0]['steps']} steps: " + ", ".join(
            _loss_text(r) for r in second)
    return text + f"; chosen {chosen['rate']:.1e} (spent {minutes(spent_s)})"


def _loss_text(result: dict) -> str:
    if result.get("status") == "finished" and _finite(result.get("eval_loss")):
        return f"{result['eval_loss']:.3f}"
    return result.get("status") or "?"


def plan_pilot(plan, *, budget_minutes: float | None = None, share: float = DEFAULT_SHARE,
               examples: int | None = None, tokens: int | None = None, measured_step_s: float | None = None,
               rounds: int = 2) -> PilotDesign:
    """`design_pilot` for a plan, filling in what it needs from the model's description and the plan's data
    record (or `examples` / `tokens` counted by the caller, e.g. from the dataset profile)."""
    from advisor import gpus, specs

    spec = specs.resolve_model(plan.model.name)
    params = specs.param_counts(spec).total
    examples = examples or plan.data.examples
    tokens = tokens or plan.data.tokens
    eval_fraction = plan.data.eval_fraction or FALLBACK_EVAL_FRACTION
    train_examples = None if not examples else examples - eval_held_out(examples, eval_fraction)
    if plan.data.max_examples and train_examples:
        train_examples = min(train_examples, plan.data.max_examples)
    # Padded to the longest of each batch: the mean is a floor, the sequence length a ceiling.
    per_example = min(plan.training.seq_len, tokens / examples) if tokens and examples else plan.training.seq_len / 2
    bytes_per_param = 0.5 if plan.method.method == "qlora" else 4 if plan.method.precision == "fp32" else 2
    tflops = None
    if plan.hardware.device != "cpu" and (plan.hardware.gpu or plan.hardware.gpu_memory_gb):
        tflops = gpus.get_gpu(plan.hardware.gpu).dense_tflops if plan.hardware.gpu else None
    return design_pilot(plan, params=params, train_examples=train_examples, tokens_per_example=per_example,
                        weight_bytes=int(params * bytes_per_param), gpu_tflops=tflops, budget_minutes=budget_minutes,
                        share=share, measured_step_s=measured_step_s, rounds=rounds)


def eval_held_out(examples: int, fraction: float) -> int:
    """Examples the pilot holds out to score candidates: the plan's share, at most MAX_EVAL_EXAMPLES (the
    trainer's split rule: at least one when there are two or more)."""
    if examples < 2 or fraction <= 0:
        return 0
    return min(MAX_EVAL_EXAMPLES, examples - 1, max(1, round(examples * fraction)))


def check_split(examples: int, held_out: int) -> None:
    """Refuse data too small to hold out an eval split and still train (TunewiseError naming data.dataset)."""
    if held_out < MIN_EVAL_EXAMPLES or examples - held_out < MIN_TRAIN_EXAMPLES:
        raise TunewiseError(
            f"data.dataset: {examples} examples are too few for the pilot: it scores each rate on a held-out split "
            f"of at least {MIN_EVAL_EXAMPLES} examples and trains on at least {MIN_TRAIN_EXAMPLES} others "
            f"({MIN_EVAL_EXAMPLES + MIN_TRAIN_EXAMPLES} or more in all, with an evaluation share that holds "
            f"{MIN_EVAL_EXAMPLES} out); add data or raise the evaluation share, or keep the advised rate",
            field="data.dataset")
