"""Benchmark: is the advice any good? The advised plan against a learning-rate x rank grid, on the demo.

    python bench/advice_quality.py [--steps 600] [--dpo-steps 100] [--batch 8] [--no-write]

On the bundled demo model, for the SFT task (demo-sft) and the DPO task (demo-preference), every plan
trains the same number of optimizer steps at the same batch (the demo's step cap for SFT), with the same
seed, and is scored by its held-out loss (SFT: the eval split's loss; DPO: the held-out DPO loss):

- the grid: LoRA (all linear layers, alpha 32) at two ranks (SFT) or LoRA and full fine-tuning (DPO), each at
  rates of a half-decade ladder; its best cell is the target;
- with --with-guide, the guide's plan, literally (its rank, alpha = 2 x rank, attention-only targets, its LR
  range);
- the rules-only plan (`advisor.recommend` without any measurement): the evidence's rank, alpha, targets
  and learning rate;
- the pilot-advised plan: `tunewise pilot` on the rules plan (and on the grid's best method and rank, or full
  fine-tuning), its chosen rate (the best at its own horizon moved to the run's by (pilot steps / run
  steps) ** 0.32, advisor.pilot.transfer) trained for the whole budget (looked up in the grid, or trained
  and added);
- the pilot's method: successive halving (5 rates, then the best 3 twice as long) against a plain grid of
  5 rates at the same cost, both at the product's default budget, with the cost each spent;
- a second seed for the grid's best rate and the pilots' chosen rates on the grid's best method (how much of a
  gap is the seed), and rates between the rungs near full fine-tuning's best (NEAR_BEST);
- the horizon study that chose the transfer (skip with --no-horizons): full fine-tuning and LoRA r64 at 4
  rates each, trained 6-150 steps with the schedule compressed as a pilot's candidate is, the best rate at
  each horizon (the vertex advisor.pilot.horizon_optimum places), where 0.32 moves it at the run's length,
  and the exponent each pair of horizons 2x apart would fit.

It prints the gap of each plan to the grid's best, writes its section of bench/RESULTS.md, and writes
assets/demo-model/measured_advice.json: the SFT grid's best method, rate, batch and steps, which the
advisor then recommends for the demo model on demo-sft (with these numbers as the reason), so the
newcomer's default demo run is one that was measured to learn. It also checks what a person sees: the
tuned model's answers to the wizard's two default prompts and to 40 fresh dates.

About 40-60 minutes on 2 busy shared CPU cores with --jobs 2 (a 600-step SFT run takes 1.5-9 minutes,
depending on what else the cores run).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "assets"))

from advisor import recommend as rec_mod  # noqa: E402
from advisor.errors import TunewiseError  # noqa: E402
from advisor.pilot import HORIZON_EXPONENT, horizon_optimum, measured_exponent, plan_pilot, transfer  # noqa: E402
from advisor.plan import DEMO_MODEL_DIR, Plan  # noqa: E402
from advisor.wizard import DemoLimits  # noqa: E402
from bench.results import markdown_table, write_section  # noqa: E402
from trainer.events import read_all_events  # noqa: E402

#: The pilots compared, each at the product's default budget (advisor.pilot's DEFAULT_SHARE of the run's time,
#: with its one-minute floor): rounds 2 is successive halving (5 rates, then the best 2 twice as long), rounds 1
#: a plain grid of 5 rates at the same cost.
PILOTS = ((2, None), (1, None))
#: When the default budget is refused (a short run on a slow machine: too small for two candidates), the rules
#: plan's pilot once more with this share of the run's time, as a user would with --budget-minutes.
FALLBACK_SHARE = 0.75
#: The grid: each method at rates of the pilot's half-decade ladder around where the rules put it and where it
#: trains best, so most rates a pilot chooses are in it (any other is trained and added). Sized to run in
#: well under an hour on 2 shared CPU cores.
SFT_LADDER = (3.16e-4, 1e-3, 3.16e-3, 1e-2, 3.16e-2)
SFT_METHODS = {("lora", 8): SFT_LADDER, ("lora", 64): SFT_LADDER, ("full", None): SFT_LADDER[:4]}
DPO_LADDER = (3.16e-5, 1e-4, 3.16e-4, 1e-3)
DPO_METHODS = {("lora", 8): DPO_LADDER[2:], ("full", None): DPO_LADDER[:2]}
#: The seed of the second measurement of the grid's best rate and the pilots' chosen rates on its method.
SECOND_SEED = 1
#: Rates between the ladder's rungs around full fine-tuning's best at 600 steps (1e-3): how sharp, and how noisy
#: with one seed, the optimum the pilot is scored against is.
NEAR_BEST = (6e-4, 8e-4, 1.35e-3)
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DEFAULT_PROMPTS = (("Convert 2011-09-24 to day, month and year.", "24 September 2011"),
                   ("Please spell out the date 2016-05-11.", "11 May 2016"))


def base_plan(task: str, steps: int, batch: int) -> Plan:
    dataset, stage = {"sft": ("demo-sft", "sft"), "dpo": ("demo-preference", "dpo")}[task]
    return Plan.from_dict({
        "stage": stage, "model": {"name": "demo"},
        "data": {"dataset": dataset, "eval_fraction": 0.1},
        "method": {"method": "lora", "precision": "fp32", "lora_rank": 8, "lora_alpha": 32.0,
                   "lora_targets": ALL_LINEAR, "lora_dropout": 0.0},
        "training": {"learning_rate": 1e-3, "warmup_ratio": 0.05, "lr_scheduler": "cosine", "max_steps": steps,
                     "micro_batch": batch, "grad_accum": 1, "seq_len": 64 if task == "sft" else 128,
                     "logging_steps": 10, "seed": 0},
        "forgetting": {"monitor": False}, "hardware": {"device": "cpu"},
    })


def variant(plan: Plan, method: str, rank: int | None, rate: float, alpha: float | None = 32.0,
            targets: list[str] | None = None) -> Plan:
    changes = {"method.method": method, "training.learning_rate": rate}
    if method != "full":
        changes.update({"method.lora_rank": rank, "method.lora_alpha": alpha, "method.lora_targets": targets or ALL_LINEAR})
    return plan.with_overrides(changes)


def _train_in_child(run_dir: str) -> int:
    """One plan trained in a worker process (`--jobs`): the runner, as the app's trainer runs it."""
    from trainer.runner import run

    return run(Path(run_dir))


class Bench:
    """Trains plans and pilots in `root`, recording each result in progress.jsonl; a rerun with the same `--work`
    folder picks up the finished ones."""

    def __init__(self, root: Path, jobs: int = 1):
        self.root, self.jobs = root, jobs
        self.log = root / "progress.jsonl"
        self.cache: dict[str, dict] = {}
        self.trained_now: set[str] = set()  # tags measured by this invocation (the rest came from the log)
        if self.log.is_file():
            for line in self.log.read_text(encoding="utf-8").splitlines():
                record = json.loads(line)
                if "eval_loss" in record or "chosen" in record:
                    self.cache[record["tag"]] = record

    def _note(self, record: dict) -> None:
        self.cache[record["tag"]] = record
        self.trained_now.add(record["tag"])
        with open(self.log, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        print(json.dumps(record), flush=True)

    def _prepare(self, tag: str, plan: Plan) -> Path:
        run_dir = self.root / tag
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        plan.save(run_dir / "plan.yaml")
        return run_dir

    def _collect(self, tag: str, plan: Plan, run_dir: Path, code: int, wall_s: float) -> dict:
        events = read_all_events(run_dir / "events.jsonl")
        if code != 0:
            raise SystemExit(f"{tag} failed: {events[-1]}")
        evals = [e["eval_loss"] for e in events if e["event"] == "eval" and isinstance(e.get("eval_loss"), (int, float))]
        end = next(e for e in events if e["event"] == "train_end")
        result = {"tag": tag, "eval_loss": evals[-1] if evals else math.inf, "train_s": end["train_runtime"],
                  "wall_s": round(wall_s, 1), "step_s": end["train_runtime"] / max(1, plan.training.max_steps),
                  "run_dir": str(run_dir)}
        self._note(result)
        return result

    def train(self, tag: str, plan: Plan) -> dict:
        """Train `plan` in this process (trainer.runner.run); its held-out loss and times."""
        from trainer.runner import run

        if tag in self.cache:
            return self.cache[tag]
        run_dir = self._prepare(tag, plan)
        started = time.monotonic()
        return self._collect(tag, plan, run_dir, run(run_dir), time.monotonic() - started)

    def train_all(self, jobs: list[tuple[str, Plan]]) -> None:
        """Train every (tag, plan) not done yet, `self.jobs` at a time in worker processes."""
        todo = [(tag, plan) for tag, plan in jobs if tag not in self.cache]
        if self.jobs <= 1 or len(todo) < 2:
            for tag, plan in todo:
                self.train(tag, plan)
            return
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(self.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            started = {tag: time.monotonic() for tag, _ in todo}
            futures = {tag: (plan, pool.submit(_train_in_child, str(self._prepare(tag, plan)))) for tag, plan in todo}
            for tag, (plan, future) in futures.items():
                self._collect(tag, plan, self.root / tag, future.result(), time.monotonic() - started[tag])

    def pilot(self, tag: str, plan: Plan, rounds: int, share: float | None, step_s: float, examples: int,
              tokens: int) -> dict:
        """A pilot of `plan` in this process (the runner sees pilot.json), budgeted at `share` of the run's time
        measured in the grid (`step_s`), or at the product's default when `share` is None."""
        from trainer.pilot import read_result
        from trainer.runner import run

        budget = None if share is None else share * plan.training.max_steps * step_s / 60
        design = plan_pilot(plan, examples=examples, tokens=tokens, measured_step_s=step_s, rounds=rounds,
                            budget_minutes=budget)
        cached = self.cache.get(tag)
        if cached and cached.get("design") == design.describe() and cached.get("measured"):
            return {**cached, "trained_steps": trained_steps(self.root / tag)}  # the same design: reused
        run_dir = self.root / tag
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        plan.save(run_dir / "plan.yaml")
        (run_dir / "pilot.json").write_text(json.dumps({"design": design.to_dict()}), encoding="utf-8")
        if run(run_dir) != 0:
            raise SystemExit(f"{tag} failed: {read_all_events(run_dir / 'events.jsonl')[-1]}")
        result = read_result(run_dir)
        record = {"tag": tag, "design": design.describe(), "chosen": result["chosen_rate"], "spent_s": result["spent_s"],
                  "budget_s": result["budget_s"], "reason": result["reason"], "note": result.get("note"),
                  "measured": result.get("measured"), "train_steps": design.train_steps, "run_steps": design.run_steps,
                  "trained_steps": trained_steps(run_dir)}
        self._note(record)
        return record


def trained_steps(run_dir: Path) -> int | None:
    """The steps a pilot's candidates trained (its design's plan, less what the budget guard trimmed)."""
    from trainer.pilot import read_result

    candidates = read_result(run_dir).get("candidates") if Path(run_dir).is_dir() else None
    return sum(int(c.get("steps") or 0) for c in candidates) if candidates else None


def date_accuracy(run_dir: str, fresh: int = 40) -> dict:
    """The tuned model's greedy answers to the wizard's two default prompts, and exact matches on fresh dates."""
    import make_demo_data as demo_data
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(DEMO_MODEL_DIR))
    output = Path(run_dir) / "output"
    if (output / "adapter_config.json").is_file():
        from peft import PeftModel

        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(DEMO_MODEL_DIR), dtype=torch.float32),
                                          str(output))
    else:
        model = AutoModelForCausalLM.from_pretrained(str(output), dtype=torch.float32)
    model.eval()
    rng = random.Random(777)
    cases = list(DEFAULT_PROMPTS)
    for _ in range(fresh):
        date = demo_data.random_date(rng)
        cases.append((demo_data.date_prompt(rng, date), demo_data.in_words(*date)))
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
             for prompt, _ in cases]
    tokenizer.padding_side = "left"
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        generated = model.generate(**batch, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    answers = [tokenizer.decode(row[batch["input_ids"].shape[1]:], skip_special_tokens=True).strip() for row in generated]
    right = [answer == expected for answer, (_, expected) in zip(answers, cases)]
    return {"default_answers": answers[:2], "default_right": sum(right[:2]), "fresh_right": sum(right[2:]), "fresh": fresh}


def wizard_default_check(bench: Bench) -> str:
    """Train the plan a newcomer gets on the wizard's defaults in demo mode (now that the measured advice is
    written): its held-out loss, the dates it writes, its time, and the forgetting monitor's share of it."""
    from advisor import wizard
    from advisor.profile import profile_dataset

    profile = profile_dataset("demo-sft", "demo")
    values = {"model": "demo", "dataset": "demo-sft", "goal": "sft", "gpu": wizard.NO_GPU, "num_gpus": 1,
              "task": "instruction", "domain": "medium", "priority": "balanced", "quantized_inference": False}
    advised = wizard.advise(values, profile.to_dict(), None, max_steps=DemoLimits().max_steps)
    plan = wizard.plan_from_widgets(wizard.widgets_from_plan(advised.plan))
    cached = bench.cache.get("sft-wizard-default")
    if cached and Plan.load(Path(cached["run_dir"]) / "plan.yaml").to_dict() != plan.to_dict():
        bench.cache.pop("sft-wizard-default")  # measured afresh whenever the advice changed the plan
    import os

    load_before = os.getloadavg()[0]
    result = bench.train("sft-wizard-default", plan)
    if "sft-wizard-default" in bench.trained_now and "load" not in result:
        result = {**result, "load": f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after, on the 2 "
                                    "shared cores"}
        bench._note(result)  # recorded, so that a rerun reusing it still says under what load it ran
    load = result.get("load") or "reused from --work: its load average was not recorded"
    seen = date_accuracy(result["run_dir"])
    events = read_all_events(Path(result["run_dir"]) / "events.jsonl")
    checks = [e for e in events if e["event"] == "forgetting"]
    share = checks[-1].get("monitor_cost_pct") if checks else None
    return (f"The wizard's default demo plan after this measurement ({plan.method.method}, learning rate "
            f"{plan.training.learning_rate:.2e}, {plan.training.max_steps} steps of "
            f"{plan.training.micro_batch * plan.training.grad_accum}, replay {plan.forgetting.replay_fraction:.0%}, "
            f"forgetting checks every {plan.forgetting.eval_every} steps): held-out loss {result['eval_loss']:.3f}, "
            f"{result['train_s']:.0f} s of training ({result['wall_s']:.0f} s with loading and evaluation; {load}); the default "
            f"prompts answered {seen['default_answers']} ({seen['default_right']} of 2 right), {seen['fresh_right']} of "
            f"{seen['fresh']} fresh dates right; the forgetting monitor took {share}% of the run in {len(checks)} "
            "measurements.")


#: The horizon study: each method at these rates, trained these steps (the schedule compressed to them, as a
#: pilot's candidate is), on the SFT task at the bench's batch.
HORIZONS = {("full", None): ((3.16e-4, 1e-3, 3.16e-3, 1e-2), (17, 34, 68, 150)),
            ("lora", 64): ((1e-3, 3.16e-3, 1e-2, 3.16e-2), (6, 12, 24, 48))}


def horizon_study(bench: Bench, steps: int, batch: int, grid: dict) -> str:
    """How the best rate moves with the run's length, on the demo: the measurement that chose the pilot's
    transfer. Per method: the held-out loss of each rate after n steps, the best rate there
    (advisor.pilot.horizon_optimum), where (n / steps) ** 0.32 moves it, and the exponent two horizons 2x apart
    would fit; the last row is the grid's own `steps`-step cells."""
    plan = base_plan("sft", steps, batch)
    jobs = [(f"h{n}-{label(m, r).replace(' ', '')}-{rate:.2e}", variant(plan.with_overrides({"training.max_steps": n}),
                                                                        m, r, rate))
            for (m, r), (rates, horizons) in HORIZONS.items() for n in horizons for rate in rates]
    bench.train_all(jobs)
    rows, notes = [], []
    for (m, r), (rates, horizons) in HORIZONS.items():
        optima = []
        for n in horizons:
            points = [(rate, bench.cache[f"h{n}-{label(m, r).replace(' ', '')}-{rate:.2e}"]["eval_loss"]) for rate in rates]
            optima.append((n, points))
        at_run = [(rate, grid[(m, r, rate)]["eval_loss"]) for rate in rates if (m, r, rate) in grid]
        optima.append((steps, at_run))
        # The run's own best from every ladder cell of the method (the table shows the study's four).
        ladder_cells = sorted((rate, cell["eval_loss"]) for (m2, r2, rate), cell in grid.items()
                              if (m2, r2) == (m, r) and rate in SFT_LADDER)
        previous, moved_all, fits = None, [], []
        for n, points in optima:
            best, bracketed = horizon_optimum(ladder_cells if n == steps else points)
            fitted = "-" if previous is None else f"{measured_exponent(previous, (n, best)):.2f}"
            if previous is not None and n < steps:
                fits.append(measured_exponent(previous, (n, best)))
            if n < steps:
                moved_all.append(transfer(best, n, steps))
            moved = f"{transfer(best, n, steps):.1e}" if n < steps else "(the run)"
            rows.append([label(m, r), str(n)] + [f"{loss:.3f}" for _, loss in points]
                        + [f"{best:.1e}" + ("" if bracketed else " (edge)"), moved, fitted])
            previous = (n, best)
        first_n, first_best = optima[0][0], horizon_optimum(optima[0][1])[0]
        end_best = horizon_optimum(ladder_cells)[0] if ladder_cells else None
        if end_best:
            notes.append(f"{label(m, r)}: from {first_n} to {steps} steps the best rate fell {first_best / end_best:.1f}x, "
                         f"an exponent of {measured_exponent((first_n, first_best), (steps, end_best)):.2f} end to end; "
                         f"moved by ^{HORIZON_EXPONENT:g}, its short horizons give {min(moved_all):.1e}-{max(moved_all):.1e} "
                         f"(a factor {max(moved_all) / min(moved_all):.2f} apart) against the grid's {end_best:.1e}; the "
                         f"exponents fitted between horizons 2x apart range {min(fits):.2f} to {max(fits):.2f}")
    header = ["method", "steps"] + [f"rate {i + 1}" for i in range(4)] + [
        "best rate (vertex)", f"moved to {steps} by ^{HORIZON_EXPONENT:g}", "exponent from the row above"]
    rates_text = "; ".join(f"{label(m, r)}: " + ", ".join(f"{rate:.2e}" for rate in rates)
                           for (m, r), (rates, _) in HORIZONS.items())
    return "\n".join([
        f"### How the best rate moves with the run's length (the pilot's horizon transfer)", "",
        f"Held-out loss after n steps of {batch} on demo-sft, the schedule compressed to n steps as a pilot's candidate "
        f"is (rates 1-4 = {rates_text}); the best rate is the vertex of the parabola in log(rate) through the best "
        "three, as the pilot places it.", "",
        markdown_table(header, rows), "",
        ". ".join(notes) + ". Bjorck et al. (ICLR 2025) fit LR* = C N^-0.23 D^-0.32: the published exponent moves "
        "every short horizon's best rate to nearly the same rate, while exponents fitted between horizons 2x apart "
        "(what a pilot's two rounds are) scatter; so the pilot uses the published exponent and reports the one its "
        "own rounds give (advisor.pilot.fit_exponent fits one only on rounds 4x or more apart)."])


def rules_plan(task: str, plan: Plan, profile) -> tuple[Plan, dict]:
    """The advisor's rules (no measurement: no dataset name, so no measured advice) mapped onto the bench plan:
    its method, rank, alpha, targets and learning rate; the batch and steps stay the bench's."""
    inputs = rec_mod.AdvisorInputs(model="demo", examples=profile.examples, tokens=profile.estimated_total_tokens,
                                   completion_tokens=profile.estimated_completion_tokens, task="instruction",
                                   stage=plan.stage, max_steps=plan.training.max_steps)
    rec = rec_mod.recommend(inputs)
    values = {name: advice.value for name, advice in rec.values.items()}
    advised = variant(plan, values["method"], values["lora_rank"], values["learning_rate"], values["lora_alpha"],
                      list(values["lora_targets"] or ALL_LINEAR))
    return advised, values


def guide_plan(plan: Plan, inputs_examples: int) -> tuple[Plan, float]:
    """The guide read literally: its rank for instruction following on < 10k examples (64), alpha = 2 x rank,
    all attention, its LoRA rate placed by rank and data size."""
    inputs = rec_mod.AdvisorInputs(model="demo", examples=inputs_examples, task="instruction")
    rank, _ = rec_mod.rank_for(inputs)
    rate, _ = rec_mod.guide_learning_rate("lora", rank, inputs)
    return variant(plan, "lora", rank, rate, 2.0 * rank, ["q_proj", "k_proj", "v_proj", "o_proj"]), rate


def label(method: str, rank: int | None) -> str:
    return "full" if method == "full" else f"LoRA r{rank}"


def gap(loss: float, best: float) -> str:
    return f"{(loss - best) / best:+.1%}" if math.isfinite(loss) else "diverged"


def run_task(bench: Bench, task: str, steps: int, batch: int, ladder, methods, with_guide: bool = False,
             extras: bool = True) -> dict:
    from advisor.profile import profile_dataset

    plan = base_plan(task, steps, batch)
    profile = profile_dataset(plan.data.dataset, "demo")
    cells = {(method, rank, rate): (f"{task}-{label(method, rank).replace(' ', '')}-{rate:.2e}", variant(plan, method, rank, rate))
             for (method, rank), rates in methods.items() for rate in rates}
    advised, values = rules_plan(task, plan, profile)
    extra = [(f"{task}-rules", advised)]
    if task == "sft" and with_guide:
        guide, guide_rate = guide_plan(plan, profile.examples)
        extra.append((f"{task}-guide", guide))
    bench.train_all(list(cells.values()) + extra)
    grid = {key: bench.train(*job) for key, job in cells.items()}
    best_key = min(grid, key=lambda key: grid[key]["eval_loss"])
    best = grid[best_key]["eval_loss"]

    rules = bench.train(f"{task}-rules", advised)
    rows = {"grid": grid, "best_key": best_key, "best": best, "rules": rules, "rules_values": values, "pilots": []}
    if task == "sft" and with_guide:
        rows["guide"] = bench.train(f"{task}-guide", guide)
        rows["guide_rate"] = guide_rate

    # Pilots: on the rules plan's method and rank, and on the grid's best method and rank (full fine-tuning when
    # that is the rules' too); halving vs a plain grid on the rules plan.
    pilot_methods = [(values["method"], values["lora_rank"] if values["method"] != "full" else None)]
    second = best_key[:2] if best_key[:2] not in pilot_methods else ("full", None)
    if second not in pilot_methods:
        pilot_methods.append(second)
    for method, rank in pilot_methods:
        start = variant(plan, method, rank, values["learning_rate"] if method == values["method"] else
                        values["learning_rate"] / (10 if method == "full" and values["method"] != "full" else 1))
        step_s = statistics_median([cell["step_s"] for (m, r, _), cell in grid.items() if (m, r) == (method, rank)]
                                   or [grid[best_key]["step_s"]])
        # The method comparison (halving vs a plain grid) on the rules plan; full fine-tuning with halving only.
        tries = list(PILOTS if (method, rank) == pilot_methods[0] else PILOTS[:1])
        for rounds, share in tries:
            tag = (f"{task}-pilot-{label(method, rank).replace(' ', '')}-{'halving' if rounds == 2 else 'grid'}-"
                   f"{'default' if share is None else f'{share:.0%}'}")
            try:
                result = bench.pilot(tag, start, rounds, share, step_s, profile.examples, profile.estimated_total_tokens)
            except TunewiseError as exc:  # e.g. a budget too small for two candidates: reported as such
                rows["pilots"].append({"method": method, "rank": rank, "rounds": rounds, "share": share,
                                       "refused": str(exc)})
                if share is None and rounds == 2 and (method, rank) == pilot_methods[0]:
                    tries.append((2, FALLBACK_SHARE))
                continue
            key = (method, rank, result["chosen"])
            extra_tag = f"{task}-{label(method, rank).replace(' ', '')}-{result['chosen']:.2e}"
            if key not in grid and (extras or extra_tag in bench.cache):
                grid[key] = bench.train(extra_tag, variant(plan, method, rank, result["chosen"]))
            run_s = steps * step_s
            own = [(cell["eval_loss"], r) for (m, k, r), cell in grid.items() if (m, k) == (method, rank) and
                   (m, k, r) in cells]
            rows["pilots"].append({**result, "method": method, "rank": rank, "rounds": rounds, "share": share,
                                   "loss": grid[key]["eval_loss"] if key in grid else None, "run_s": run_s,
                                   "own_best": min(own) if own else None})
    if task == "sft" and extras and best_key[0] == "full":
        near = [(f"{task}-full-{rate:.2e}", variant(plan, "full", None, rate)) for rate in NEAR_BEST]
        bench.train_all(near)
        for (tag, _), rate in zip(near, NEAR_BEST):
            grid.setdefault(("full", None, rate), bench.train(tag, variant(plan, "full", None, rate)))
    # The target stays the grid's best: a pilot's chosen rate off the ladder is measured and listed, not added.
    rows["extras"] = {key: cell for key, cell in grid.items() if key not in cells}
    # A second seed for the grid's best rate and each pilot's chosen rate on that method: how much of a gap is noise.
    rows["seed"] = {}
    if extras:
        chosen = sorted({p["chosen"] for p in rows["pilots"] if "chosen" in p and (p["method"], p["rank"]) == best_key[:2]})
        method, rank, _ = best_key
        jobs = [(f"{task}-seed{SECOND_SEED}-{label(method, rank).replace(' ', '')}-{rate:.2e}",
                 variant(plan.with_overrides({"training.seed": SECOND_SEED}), method, rank, rate))
                for rate in sorted({best_key[2], *chosen})] if chosen else []
        bench.train_all(jobs)
        for (tag, job), rate in zip(jobs, sorted({best_key[2], *chosen})):
            rows["seed"][rate] = bench.train(tag, job)["eval_loss"]
    return rows


def budget_text(share: float | None) -> str:
    return "default budget" if share is None else f"budget {share:.0%} of the run"


def statistics_median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def section(name: str, rows: dict, ladder, methods, steps: int, batch: int) -> str:
    best = rows["best"]
    method, rank, rate = rows["best_key"]
    grid_rows = []
    for m, r in methods:
        cells = []  # "-": a rate this method was not trained at
        for value in ladder:
            cell = rows["grid"].get((m, r, value))
            loss = cell["eval_loss"] if cell else None
            text = "-" if loss is None else ("diverged" if not math.isfinite(loss) else f"{loss:.3f}")
            cells.append(f"**{text}**" if (m, r, value) == rows["best_key"] else text)
        grid_rows.append([label(m, r)] + cells)
    lines = [f"### {name}: {steps} steps of {batch}, held-out loss", "",
             markdown_table(["plan"] + [f"{value:.2e}" for value in ladder], grid_rows), "",
             f"Grid best: {label(method, rank)} at {rate:.2e}, {best:.3f}."
             + ("" if not rows.get("extras") else " Also trained for the whole budget, at the pilots' chosen rates and "
                "between the rungs near the best (one seed each): "
                + ", ".join(f"{label(m, r)} {value:.2e}: {cell['eval_loss']:.3f}"
                            for (m, r, value), cell in sorted(rows["extras"].items(), key=lambda item: (str(item[0][:2]), item[0][2])))
                + "."), ""]
    table = []
    if "guide" in rows:
        table.append(["the guide, literally (LoRA r64, alpha 128, attention only)", f"{rows['guide_rate']:.2e}",
                      f"{rows['guide']['eval_loss']:.3f}", gap(rows["guide"]["eval_loss"], best), "-"])
    values = rows["rules_values"]
    alpha = f", alpha {values['lora_alpha']:g}" if values.get("lora_alpha") else ""
    table.append([f"rules only ({label(values['method'], values['lora_rank'])}{alpha})",
                  f"{values['learning_rate']:.2e}", f"{rows['rules']['eval_loss']:.3f}",
                  gap(rows["rules"]["eval_loss"], best), "-"])
    for pilot in rows["pilots"]:
        if "refused" in pilot:
            table.append([f"pilot on {label(pilot['method'], pilot['rank'])}: "
                          f"{'halving' if pilot['rounds'] == 2 else 'plain grid'}, {budget_text(pilot['share'])}",
                          "-", "-", "-", "-", "refused: " + pilot["refused"].split(": ", 1)[-1].split(";")[0]])
            continue
        loss = pilot["loss"]
        table.append([f"pilot on {label(pilot['method'], pilot['rank'])}: {'halving' if pilot['rounds'] == 2 else 'plain grid'}, "
                      f"{budget_text(pilot['share'])}", f"{pilot['chosen']:.2e}", measured_text(pilot),
                      "not trained (--no-extras)" if loss is None else f"{loss:.3f}",
                      "-" if loss is None else gap(loss, best), cost_text(pilot)])
    for row in table:
        if len(row) == 5:
            row.insert(2, "-")
    lines += [markdown_table(["plan", "learning rate", "pilot measured", "held-out loss", "gap to the grid's best",
                              "pilot cost"], table)]
    lines += ["", *explain(rows), "", target_summary(rows)]
    note = rules_note(rows) if name.startswith("SFT") else ""
    if note:
        lines += ["", note]
    return "\n".join(lines)


def target_summary(rows: dict) -> str:
    """Issue 12's target, per pilot: the pilot-advised plan within 5% of the grid's best; where not, why, and how
    noisy the grid's best itself is (one seed) when rates between its rungs were measured."""
    best_method, best_rank, best_rate = rows["best_key"]
    parts = []
    for pilot in rows["pilots"]:
        name = f"{label(pilot['method'], pilot['rank'])} ({'halving' if pilot['rounds'] == 2 else 'plain grid'}, {budget_text(pilot['share'])})"
        if "refused" in pilot:
            parts.append(f"{name}: no plan (refused: the budget buys fewer than two candidates)")
            continue
        if pilot["loss"] is None or not math.isfinite(pilot["loss"]):
            continue
        verdict = "met" if (pilot["loss"] - rows["best"]) / rows["best"] <= 0.05 else "not met"
        text = f"{name}: {verdict} ({pilot['loss']:.3f}, {gap(pilot['loss'], rows['best'])})"
        seeded = rows.get("seed") or {}
        if pilot["chosen"] in seeded and best_rate in seeded and pilot["chosen"] != best_rate:
            again = (seeded[pilot["chosen"]] - seeded[best_rate]) / seeded[best_rate] <= 0.05
            text += (f"; with seed {SECOND_SEED} {'also met' if again else 'not met'}: {seeded[pilot['chosen']]:.3f} against "
                     f"the grid's best rate's {seeded[best_rate]:.3f} ({gap(seeded[pilot['chosen']], seeded[best_rate])})")
        own_loss, own_rate = pilot.get("own_best") or (math.inf, None)
        if (pilot["method"], pilot["rank"]) != (best_method, best_rank):
            text += f"; against its own method's grid best {own_loss:.3f}: {gap(pilot['loss'], own_loss)} (the rest is the method)"
        elif verdict == "met":
            near = [cell["eval_loss"] for (m, r, rate), cell in rows["grid"].items()
                    if (m, r) == (best_method, best_rank) and best_rate / 2 <= rate <= best_rate * 2]
            if len(near) > 2:
                text += (f"; but {len(near)} rates within 2x of the grid's best scatter from {min(near):.3f} to {max(near):.3f} "
                         "with one seed, so here the target is met inside the seed's noise: what the pilot controls is "
                         "landing in that basin")
        measured = pilot.get("measured") or {}
        if verdict == "not met" and measured and own_rate and (pilot["method"], pilot["rank"]) == (best_method, best_rank):
            needed = measured_exponent((measured["measured_steps"], measured["measured_rate"]), (measured["run_steps"], own_rate))
            text += (f"; its best at {measured['measured_steps']} steps ({measured['measured_rate']:.1e}"
                     f"{'' if measured['bracketed'] else ', at the edge of what it tried'}) is {measured['measured_rate'] / own_rate:.0f}x "
                     f"the run's best rate ({own_rate:.0e}): an exponent of {needed:.2f} would have been needed, not "
                     f"{measured['exponent']:.2f}")
        parts.append(text)
    return "The 5% target (the pilot-advised plan within 5% of the grid's best): " + "; ".join(parts) + "."


def rules_note(rows: dict) -> str:
    """The rules' SFT rate for the demo model against what the grid measured (issue 12: should Tinker's size
    transfer be bounded below the smallest model its sweep measured?)."""
    values = rows["rules_values"]
    if values["method"] == "full":
        return ""
    sizes = rec_mod._anchor_sizes()
    smallest = min(sizes, key=sizes.get)
    from advisor import specs

    params = specs.param_counts(specs.resolve_model("demo")).total
    best = {}
    for (m, r, rate), cell in rows["grid"].items():
        if m != "full" and (m, r, rate) not in rows.get("extras", {}):
            if (r not in best) or cell["eval_loss"] < best[r][1]:
                best[r] = (rate, cell["eval_loss"])
    measured = ", ".join(f"r{r} {rate:.0e} ({loss:.3f})" for r, (rate, loss) in sorted(best.items()))
    return (f"The rules' LoRA rate for the demo model, {values['learning_rate']:.1e}, is Tinker's sweep rate for "
            f"{smallest.split('/')[-1]} (LoRA {rec_mod.SWEEP_LORA_LR[smallest]:.0e}) x sqrt({sizes[smallest]:,} / "
            f"{params:,}) parameters: extrapolated {sizes[smallest] / params:,.0f}x below the smallest model the sweep "
            f"measured. The grid's best LoRA rates here are {measured}: the extrapolation overshoots them "
            f"{values['learning_rate'] / min(rate for rate, _ in best.values()):.0f}x. Held at the sweep's smallest "
            f"model (no rise below {sizes[smallest] / 1e9:.1f}B parameters) the rule would give LoRA "
            f"{rec_mod.SWEEP_LORA_LR[smallest]:.0e}, the measured best, and full fine-tuning a tenth of it, 10x below "
            "full fine-tuning's measured best (on this 1.6M-parameter model LoRA and full fine-tuning peak at the same "
            "rate, not 10x apart). So a bound below the sweep's range is supported for LoRA; this session did not change "
            "the rule (its 0.028 for the demo is pinned by the app's and the wizard's tests and warnings), and the "
            "rule's reason already says it is an extrapolation to check with the pilot, which finds ~1e-3 (above).")


def measured_text(pilot: dict) -> str:
    """What the pilot measured and how it moved it: "2.1e-03 at 26 steps, x (26/600)^0.32"."""
    measured = pilot.get("measured") or {}
    if not measured:
        return "-"
    text = f"{measured['measured_rate']:.1e} at {measured['measured_steps']} steps"
    if measured["rate"] != measured["measured_rate"]:
        text += f", x ({measured['measured_steps']}/{measured['run_steps']})^{measured['exponent']:.2g}"
    return text


def cost_text(pilot: dict) -> str:
    """Seconds spent now, and the steps it trained against the run's (machine-independent)."""
    planned, steps = pilot.get("train_steps"), pilot.get("trained_steps") or pilot.get("train_steps")
    share = f"; {steps} steps = {steps / pilot['run_steps']:.0%} of the run's {pilot['run_steps']}" if steps else ""
    if planned and steps and steps < planned:
        share += f" (of {planned} planned: the budget guard trimmed the rest)"
    return f"{pilot['spent_s']:.0f} s{share}"


def explain(rows: dict) -> list[str]:
    """Where a pilot-advised plan is not within 5% of the grid's best, why (from the numbers themselves)."""
    best_method, best_rank, best_rate = rows["best_key"]
    out = []
    for pilot in rows["pilots"]:
        if "refused" in pilot or pilot["loss"] is None or not math.isfinite(pilot["loss"]):
            continue
        name = f"the pilot on {label(pilot['method'], pilot['rank'])} ({budget_text(pilot['share'])}, "
        name += "halving)" if pilot["rounds"] == 2 else "plain grid)"
        within = (pilot["loss"] - rows["best"]) / rows["best"] <= 0.05
        own_best, own_rate = pilot.get("own_best") or (math.inf, None)
        if within:
            out.append(f"- {name}: within 5% of the grid's best ({gap(pilot['loss'], rows['best'])}).")
        elif (pilot["method"], pilot["rank"]) != (best_method, best_rank) and (pilot["loss"] - own_best) / own_best <= 0.05:
            out.append(f"- {name}: within 5% of the best rate for its own method ({own_best:.3f}); the gap is the method: "
                       f"the grid's best is {label(best_method, best_rank)}, and a pilot tunes the rate, not the method.")
        else:
            measured = pilot.get("measured") or {}
            where = "" if own_rate is None else f" (its grid best, {own_best:.3f} at {own_rate:.2e})"
            moved = ("" if not measured else
                     f"; it measured {measured['measured_rate']:.1e} best at {measured['measured_steps']} steps and moved it "
                     f"to {pilot['chosen']:.2e} for the run's {measured['run_steps']}: the transfer "
                     + ("undershot" if own_rate and pilot["chosen"] < own_rate else "overshot" if own_rate else "missed")
                     + " the full run's optimum")
            out.append(f"- {name}: {gap(pilot['loss'], own_best)} from its method's best rate{where}{moved}"
                       + ("; the grid's best is " + label(best_method, best_rank) + ", and a pilot tunes the rate, not "
                          "the method" if (pilot["method"], pilot["rank"]) != (best_method, best_rank) else "") + ".")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=DemoLimits().max_steps, help="SFT steps per plan (the demo cap)")
    parser.add_argument("--dpo-steps", type=int, default=100, help="DPO steps per plan")
    parser.add_argument("--batch", type=int, default=8, help="examples per step for every plan")
    parser.add_argument("--only", choices=("sft", "dpo"), help="run one task")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md and the demo's advice alone")
    parser.add_argument("--jobs", type=int, default=1, help="grid plans trained at once, one process each")
    parser.add_argument("--work", help="keep the runs here (a rerun with the same folder skips finished ones)")
    parser.add_argument("--note", help="a paragraph to add to the section (how the runs were made)")
    parser.add_argument("--no-extras", action="store_true",
                        help="do not train a pilot's chosen rate for the whole budget when the grid lacks it")
    parser.add_argument("--with-guide", action="store_true", help="also train the guide's plan read literally")
    parser.add_argument("--no-wizard-check", action="store_true",
                        help="skip training the wizard's default demo plan after writing the measured advice")
    parser.add_argument("--no-horizons", action="store_true",
                        help="skip the horizon study (the best rate after 6-150 steps, which chose the pilot's transfer)")
    parser.add_argument("--quick", action="store_true", help="a smoke test: three rates, two methods (implies --no-write)")
    args = parser.parse_args(argv)
    global SFT_LADDER, DPO_LADDER, SFT_METHODS, DPO_METHODS
    if args.quick:
        args.no_write = True
        SFT_METHODS = {("lora", 8): SFT_LADDER[1:4], ("full", None): SFT_LADDER[1:4]}
        DPO_METHODS = {("lora", 8): DPO_LADDER[1:4], ("full", None): DPO_LADDER[1:4]}

    root = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="advice-quality-"))
    root.mkdir(parents=True, exist_ok=True)
    bench = Bench(root, args.jobs)
    began = time.monotonic()
    body = [f"`python bench/advice_quality.py --steps {args.steps} --dpo-steps {args.dpo_steps} --batch {args.batch}` on "
            "the demo model: every plan trains the same steps at the same batch and seed, scored by held-out loss "
            "(the eval split: 200 SFT examples, 100 DPO pairs). LoRA is on all linear layers at alpha 32 unless said."]
    results = {}
    if args.only in (None, "sft"):
        results["sft"] = run_task(bench, "sft", args.steps, args.batch, SFT_LADDER, SFT_METHODS, args.with_guide,
                                  not args.no_extras)
        body.append(section("SFT on demo-sft", results["sft"], SFT_LADDER, SFT_METHODS, args.steps, args.batch))
        if not args.no_horizons and not args.quick:
            body.append(horizon_study(bench, args.steps, args.batch, results["sft"]["grid"]))
    if args.only in (None, "dpo"):
        results["dpo"] = run_task(bench, "dpo", args.dpo_steps, args.batch, DPO_LADDER, DPO_METHODS,
                                  extras=not args.no_extras)
        body.append(section("DPO on demo-preference", results["dpo"], DPO_LADDER, DPO_METHODS, args.dpo_steps, args.batch))

    if "sft" in results:
        sft = results["sft"]
        method, rank, rate = sft["best_key"]
        best_cell = sft["grid"][sft["best_key"]]
        seen = date_accuracy(best_cell["run_dir"])
        rules_seen = date_accuracy(sft["rules"]["run_dir"])
        body.append(
            f"What a person sees after the grid's best ({label(method, rank)} at {rate:.2e}, {best_cell['train_s']:.0f} s of "
            f"training): the wizard's two default prompts answered {seen['default_answers']} ({seen['default_right']} of 2 "
            f"right), {seen['fresh_right']} of {seen['fresh']} fresh dates exactly right; after the rules-only plan: "
            f"{rules_seen['default_answers']}, {rules_seen['fresh_right']} of {rules_seen['fresh']}.")
        summary = (f"bench/advice_quality.py ({time.strftime('%Y-%m-%d')}): {args.steps} steps of {args.batch} on demo-sft, "
                   f"{label(method, rank)} at {rate:.2e} reached held-out loss {best_cell['eval_loss']:.3f}, the best of a "
                   f"{len(sft['grid']) - len(sft['extras'])}-plan grid; the tuned model then wrote {seen['fresh_right']} of {seen['fresh']} "
                   "fresh dates exactly right")
        advice = {"about": "Written by bench/advice_quality.py: what trained best on this model, per dataset; "
                           "advisor.recommend recommends it for the demo model on that data (MEASURED_ADVICE_FILE).",
                  "datasets": {"demo-sft": {"method": method, "learning_rate": rate, "effective_batch": args.batch,
                                            **({"lora_rank": rank} if method != "full" else {}),
                                            "steps": args.steps, "eval_loss": round(best_cell["eval_loss"], 4),
                                            "default_prompts_right": seen["default_right"],
                                            "fresh_dates_right": f"{seen['fresh_right']}/{seen['fresh']}",
                                            "summary": summary}}}
        if not args.no_write:
            (DEMO_MODEL_DIR / rec_mod.MEASURED_ADVICE_FILE).write_text(json.dumps(advice, indent=1) + "\n", encoding="utf-8")
            if not args.no_wizard_check:
                body.append(wizard_default_check(bench))
    if args.note:
        body.append(args.note)
    reused = sum(1 for tag in bench.cache if tag not in bench.trained_now)
    body.append(f"Wall time of this invocation: {(time.monotonic() - began) / 60:.0f} min"
                + (f" ({reused} results reused from --work)." if reused else "."))
    text = "\n\n".join(body)
    print(text)
    if not args.no_write:
        write_section("advice_quality", text)
    if not args.work:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
