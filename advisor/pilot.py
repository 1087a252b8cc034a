"""The learning-rate pilot's design: which rates to try, for how many steps, and what it will cost.

`tunewise pilot` and the wizard's "Check the learning rate on my data" measure the learning rate on the
user's own model, data and hardware instead of trusting a rule. The search (justified by
bench/advice_quality.py, which compares it with a plain grid at the same cost):

1. five peak rates, half a decade apart (x sqrt(10)), centred on the plan's rate snapped to that ladder,
   so they span a factor of 100: wider than the gap between the guide and the evidence;
2. round 1: each trains `steps` optimizer steps from the same start, with the plan's own schedule
   compressed to those steps, and is scored by its loss on a held-out split;
3. round 2 (successive halving): the best rate and its two neighbours train twice as long; when the best
   of round 1 sits at an end of the ladder, the rate beyond that end joins it, so a rule that is far off
   still finds its optimum;
4. the best rate at each round's horizon is the vertex of a parabola in log(rate) through the best
   candidate and its two neighbours (`horizon_optimum`; the best candidate itself when it sits at an end);
   a run that diverges (NaN, infinite loss) scores as infinitely bad, so a known-bad rate is never chosen;
5. the horizon transfer (`transfer`): the pilot's candidates train a few dozen steps, and the best rate of
   a short run is higher than the best rate of a long one (measured on the demo in bench/RESULTS.md: full
   fine-tuning's best is ~2e-3 at 17-68 steps and ~1e-3 at 600). Bjorck et al., "Scaling Optimal LR Across
   Token Horizons" (ICLR 2025) fit LR* = C N^-0.23 D^-0.32: at a fixed model the best rate falls as the
   horizon D to the power 0.32. The pilot moves the best rate of its longest round to the run's length:
   rate x (pilot steps / run steps) ** 0.32. It fits the exponent on the user's own rounds only when they
   are far enough apart to resolve one (`fit_exponent`; its two rounds, 2x apart, are not: on the demo
   such fits were noise, and the reason says what they gave). A pilot as long as the run moves nothing;
   the chosen rate need not be one of the candidates.

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
#: Round 2 keeps this many rates (the best and its two neighbours: enough to place the optimum again at the
#: longer horizon) and trains each this many times longer.
KEEP, STRETCH = 3, 2
#: Bjorck et al. (ICLR 2025), "Scaling Optimal LR Across Token Horizons": LR* = C N^-0.23 D^-0.32, so at a
#: fixed model the best peak rate scales as the token horizon to the -0.32 (the same fixed batch: steps).
HORIZON_EXPONENT = 0.32
HORIZON_SOURCE = "Bjorck et al. 2025"
#: An exponent fitted on the pilot's own rounds is used only when they are at least MIN_FIT_SPAN times apart in
#: steps and it falls inside FIT_RANGE. Measured on the demo (bench/RESULTS.md): fits over a factor 2 in steps
#: ranged from -0.09 to 1.0 (a factor 2 moves the optimum by only 2 ** 0.32 = 1.25x, within the noise of a
#: vertex), while 0.32 moved the optimum of every horizon from 6 to 68 steps to within 1.5x of the same rate
#: at 600. So the default pilot (rounds 2x apart) reports its own exponent and uses the published one.
MIN_FIT_SPAN = 4
#: Below this the rounds do not disagree; above it the fit is noise (published exponents: 0.28-0.32).
FIT_RANGE = (0.1, 0.6)
#: A vertex is trusted only when a neighbour's loss rises above the best by at least this share: a bottom
#: flat on both sides puts the vertex anywhere between them. One neighbour tying the best (within this share)
#: while the other rises puts it between the two that tie, where the optimum is (not on the one noise picked).
MIN_RISE = 0.005
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
                 share: float = DEFAULT_SHARE, measured_step_s: float | None = None, rounds: int = 2,
                 budget_name: str = "--budget-minutes") -> PilotDesign:
    """The pilot for `plan`: its rates, steps and expected cost (`rounds=1`: a plain grid, no halving; the
    benchmark compares the two at the same cost; `budget_name`: what the messages call the budget, the CLI's
    flag or the page's box). TunewiseError (naming the field) for a stage
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
        budget_s, budget_source = float(budget_minutes) * 60, budget_name
    elif run_steps is None:
        raise TunewiseError("budget_minutes: the run's length is unknown (no max steps and no example count): give "
                            f"{budget_name}, or --max-steps for the run", field="budget_minutes")
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
            f"give it at least {math.ceil(needed / 6) / 10:g} minutes ({budget_name}), or plan a longer run",
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
    """Round 2's rates from round 1's held-out losses (inf for a failed candidate): the best and its
    neighbours on the ladder, `keep` in all. When the best is at an end of the ladder, the rung beyond that
    end comes first (the optimum may lie outside the range the rule suggested), then the neighbour with the
    lower loss; a neighbour that failed in round 1 is left out."""
    order = sorted(range(len(rates)), key=lambda index: (losses[index], index))
    best = order[0]
    if not math.isfinite(losses[best]):
        return []
    measured = {rung_of(rate): loss for rate, loss in zip(rates, losses)}
    rung = rung_of(rates[best])
    neighbours = [r for r in (rung - 1, rung + 1) if math.isfinite(measured.get(r, 0.0))]
    # Beyond the ladder (not measured) first, then the lower loss.
    neighbours.sort(key=lambda r: (r in measured, measured.get(r, 0.0)))
    return [rates[best]] + [rung_rate(r) for r in neighbours][:keep - 1]


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


def _vertex(points: list[tuple[float, float]]) -> float | None:
    """log10 of the vertex of the parabola in log10(rate) through three (rate, loss) points; None when the
    three are not convex (no minimum between them)."""
    (x1, y1), (x2, y2), (x3, y3) = [(math.log10(rate), loss) for rate, loss in points]
    denominator = (x1 - x2) * (x1 - x3) * (x2 - x3)
    a = (x3 * (y2 - y1) + x2 * (y1 - y3) + x1 * (y3 - y2)) / denominator
    b = (x3 * x3 * (y1 - y2) + x2 * x2 * (y3 - y1) + x1 * x1 * (y2 - y3)) / denominator
    return -b / (2 * a) if a > 0 else None


def horizon_optimum(points: list[tuple[float, float]]) -> tuple[float, bool]:
    """The best rate of one round, from its (rate, held-out loss) points (inf: failed): (rate, bracketed).
    Bracketed: the best candidate has a finite neighbour on each side, at least one of them `MIN_RISE` worse,
    and the rate is the vertex of the parabola in log(rate) through the three, kept between the neighbours
    (a neighbour that ties the best draws the vertex towards itself). Otherwise (the best at an end, a
    neighbour failed, a bottom flat on both sides) the best candidate's own rate."""
    ordered = sorted(points)
    finite = [index for index, (_, loss) in enumerate(ordered) if math.isfinite(loss)]
    if not finite:
        raise ValueError("no finite loss to place an optimum by")
    best = min(finite, key=lambda index: (ordered[index][1], index))
    rate, loss = ordered[best]
    if best in (0, len(ordered) - 1):
        return rate, False
    left, right = ordered[best - 1], ordered[best + 1]
    if not (math.isfinite(left[1]) and math.isfinite(right[1])) or max(left[1], right[1]) < loss * (1 + MIN_RISE):
        return rate, False
    vertex = _vertex([left, ordered[best], right])
    if vertex is None:
        return rate, False
    low, high = math.log10(left[0]), math.log10(right[0])
    return float(f"{10 ** min(max(vertex, low), high):.3g}"), True


def fit_exponent(short: tuple[int, float], long: tuple[int, float]) -> float | None:
    """The horizon exponent of two (steps, best rate) measurements, LR* proportional to steps ** -exponent;
    None (use the published one) when the horizons are under `MIN_FIT_SPAN` apart (too close to resolve) or
    the exponent is outside `FIT_RANGE` (the rounds do not disagree, or the fit is noise)."""
    (steps1, rate1), (steps2, rate2) = sorted([short, long])
    if steps2 < MIN_FIT_SPAN * steps1 or rate1 <= 0 or rate2 <= 0:
        return None
    exponent = measured_exponent(short, long)
    return exponent if FIT_RANGE[0] <= exponent <= FIT_RANGE[1] else None


def measured_exponent(short: tuple[int, float], long: tuple[int, float]) -> float:
    """-log(rate2 / rate1) / log(steps2 / steps1) of two (steps, best rate) measurements at different steps."""
    (steps1, rate1), (steps2, rate2) = short, long
    return -math.log(rate2 / rate1) / math.log(steps2 / steps1)


def transfer(rate: float, measured_steps: int, run_steps: int, exponent: float = HORIZON_EXPONENT) -> float:
    """`rate`, the best at `measured_steps`, moved to a run of `run_steps`: rate x (measured / run) ** exponent
    (3 significant figures). A pilot as long as the run (or longer) moves nothing."""
    if run_steps <= measured_steps:
        return rate
    return float(f"{rate * (measured_steps / run_steps) ** exponent:.3g}")


@dataclass(frozen=True)
class Transfer:
    """What the pilot measured at its own horizon and the rate it moved to the run's."""

    measured_rate: float
    """The best rate of the pilot's longest round (the vertex when bracketed, else its best candidate)."""
    measured_steps: int
    """That round's steps per candidate."""
    measured_loss: float
    """The held-out loss of that round's best candidate."""
    bracketed: bool
    """The measured rate is a vertex between two worse neighbours (not the best candidate at an end)."""
    exponent: float
    """The horizon exponent used."""
    exponent_source: str
    """Where the exponent comes from, in words."""
    run_steps: int
    """The planned run's optimizer steps."""
    rate: float
    """The chosen rate for the run."""
    edge: str = ""
    """"top" or "bottom" when the measured rate is the highest or lowest that round tried (the optimum may lie
    beyond it), else ""."""

    def text(self) -> str:
        """"best at 34 steps 2.1e-03 (...); moved to the run's 600 steps by (34/600)^0.32 (...) -> 8.2e-04"."""
        how = "vertex of the parabola through the best 3" if self.bracketed else "the best candidate"
        if self.edge:
            how += (f", the {'highest' if self.edge == 'top' else 'lowest'} rate it tried: the best may lie "
                    f"{'higher' if self.edge == 'top' else 'lower'}")
        text = f"best at {self.measured_steps} steps {self.measured_rate:.1e} ({how})"
        if self.rate == self.measured_rate:
            return text + f"; the pilot was as long as the run's {self.run_steps} steps, so it moves nothing"
        return (text + f"; moved to the run's {self.run_steps} steps by ({self.measured_steps}/{self.run_steps})"
                f"^{self.exponent:.2g} ({self.exponent_source}) -> {self.rate:.1e}")

    def to_dict(self) -> dict:
        return asdict(self)


def transfer_choice(results: list[dict], run_steps: int) -> Transfer | None:
    """The pilot's rate for a run of `run_steps`: the best rate of its longest round (`horizon_optimum`), moved
    by `transfer` with the exponent fitted on its two rounds when both bracket an optimum and the fit is
    within `FIT_RANGE`, else `HORIZON_EXPONENT`. None when no candidate finished with a finite loss."""
    best = choose(results)
    if best is None:
        return None
    rounds = {}
    for r in results:
        if r.get("status") in ("finished", "diverged", "failed"):
            loss = r["eval_loss"] if r.get("status") == "finished" and _finite(r.get("eval_loss")) else math.inf
            rounds.setdefault(r["round"], {"steps": r["steps"], "points": []})["points"].append((r["rate"], loss))
    optima = {}
    for number, data in rounds.items():
        if any(math.isfinite(loss) for _, loss in data["points"]):
            optima[number] = (data["steps"], *horizon_optimum(data["points"]))
    last = best["round"]
    steps, rate, bracketed = optima[last]
    exponent, source = HORIZON_EXPONENT, HORIZON_SOURCE
    earlier = [optima[n] for n in sorted(optima) if n < last and optima[n][2] and optima[n][0] != steps]
    if bracketed and earlier:
        short_steps, short_rate, _ = earlier[-1]
        fitted = fit_exponent((short_steps, short_rate), (steps, rate))
        found = measured_exponent((short_steps, short_rate), (steps, rate))
        if fitted is not None:
            exponent, source = fitted, (f"fitted on this pilot's rounds: {short_rate:.1e} at {short_steps} steps, "
                                        f"{rate:.1e} at {steps}")
        else:
            why = (f"{steps / short_steps:g}x apart, too close to fit one" if steps < MIN_FIT_SPAN * short_steps else
                   f"outside {FIT_RANGE[0]:g}-{FIT_RANGE[1]:g}")
            source = (f"{HORIZON_SOURCE}; this pilot's own rounds ({short_rate:.1e} at {short_steps} steps, {rate:.1e} "
                      f"at {steps}) give {found:.2f}, {why}")
    tried = [point_rate for point_rate, _ in rounds[last]["points"]]
    edge = "" if bracketed or len(tried) < 2 else "top" if rate == max(tried) else "bottom" if rate == min(tried) else ""
    return Transfer(measured_rate=rate, measured_steps=steps, measured_loss=best["eval_loss"], bracketed=bracketed,
                    exponent=exponent, exponent_source=source, run_steps=run_steps,
                    rate=transfer(rate, steps, run_steps, exponent), edge=edge)


def lr_reason(design: PilotDesign, results: list[dict], chosen: Transfer, eval_examples: int, spent_s: float) -> str:
    """The learning rate's reason after a pilot: what was measured, what was moved to the run, and what was
    chosen."""
    first = sorted((r for r in results if r["round"] == 1), key=lambda r: r["rate"])
    losses = ", ".join(f"{r['rate']:.1e}: {_loss_text(r)}" for r in first)
    text = (f"pilot: {len(first)} rates x {design.steps} steps on {eval_examples} held-out examples, eval loss "
            f"{losses}")
    second = sorted((r for r in results if r["round"] == 2), key=lambda r: r["rate"])
    if second:
        text += f"; best {len(second)} x {second[0]['steps']} steps: " + ", ".join(
            f"{r['rate']:.1e}: {_loss_text(r)}" for r in second)
    return text + f"; {chosen.text()}; chosen {chosen.rate:.1e} (spent {minutes(spent_s)})"


def _loss_text(result: dict) -> str:
    if result.get("status") == "finished" and _finite(result.get("eval_loss")):
        return f"{result['eval_loss']:.3f}"
    return result.get("status") or "?"


def plan_pilot(plan, *, budget_minutes: float | None = None, share: float = DEFAULT_SHARE,
               examples: int | None = None, tokens: int | None = None, measured_step_s: float | None = None,
               rounds: int = 2, budget_name: str = "--budget-minutes") -> PilotDesign:
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
                        share=share, measured_step_s=measured_step_s, rounds=rounds, budget_name=budget_name)


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
