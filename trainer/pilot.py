"""The learning-rate pilot: short trainings at a few rates on the user's own model, data and hardware.

A pilot is a run like any other (`supervisor.launch(plan, pilot=design)`): its directory holds the plan
being checked (plan.yaml), the pilot's design (pilot.json, from advisor.pilot), events, and STOP works
as for a training run. The runner sees pilot.json and calls `run_pilot(ctx)` instead of the stage.
The search itself is described in advisor/pilot.py; here it is executed:

- each candidate is the plan's own stage (trainer/stages/sft.py or dpo.py, so full, LoRA and QLoRA all
  work) in `candidates/<n>-lr<rate>/`, at its rate, for the design's steps, with the forgetting monitor
  off, scored by the stage's held-out evaluation on a fixed split (at most MAX_EVAL_EXAMPLES examples);
  candidates save no weights (`RunContext.measure_only`), only their plan.yaml and events.jsonl;
- a candidate whose loss turns NaN or infinite is recorded as `diverged` (infinitely bad) and the pilot
  goes on;
- the first candidate's measured step time replaces the estimate: round 2 is trimmed (or skipped) to
  stay inside the budget, and the pilot reports what it spent against what it was allowed;
- a stop request ends the current candidate (it saves nothing) and the pilot ends `stopped`, keeping
  what it measured.

Events (for `figures.pilot_loss_figure` / `pilot_rate_figure` and the monitor): `pilot` (the design),
`train_begin` (the pilot's total steps), each candidate's `log` and `eval` copied with `candidate`,
`rate`, `round` and `local_step` added (`step` counts the pilot's steps so far), `candidate` (status
started / finished / diverged / stopped, eval_loss, steps, seconds) and `pilot_result` (every candidate,
`measured`: the best rate at the pilot's horizon and how it was moved to the run's (advisor.pilot.Transfer),
the chosen rate for the run and its reason, seconds spent). pilot_result.json holds the same, rewritten after each
candidate so that even a killed pilot keeps its measurements.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from advisor.errors import TunewiseError
from advisor.pilot import (KEEP, STRETCH, FALLBACK_EVAL_FRACTION, PilotDesign, check_split, choose,
                           eval_held_out, lr_reason, minutes, second_round, transfer_choice)
from advisor.plan import Plan
from trainer.context import RunContext
from trainer.events import EVENTS_FILE, EventWriter
from trainer.rundir import CANDIDATES_DIR, CHECKPOINTS_DIR, PILOT_FILE, PILOT_RESULT_FILE, PLAN_FILE, read_json, write_json_atomic

#: Events a candidate copies to the pilot's own log.
FORWARDED = ("log", "eval", "alert")
#: The data each pilot stage reads (trainer.data.DATA_KINDS).
DATA_KIND = {"sft": "sft", "dpo": "preference"}


@dataclass
class CandidateContext(RunContext):
    """A candidate's context: stopping the pilot stops the candidate."""

    parent: RunContext | None = field(default=None, repr=False)

    def stop_requested(self) -> bool:
        return super().stop_requested() or (self.parent is not None and self.parent.stop_requested())


class CandidateEvents:
    """A candidate's event writer that also copies its loss and evaluations to the pilot's log."""

    def __init__(self, inner: EventWriter, pilot: RunContext, candidate: int, rate: float, round_no: int,
                 offset: int):
        self.inner, self.pilot = inner, pilot
        self.candidate, self.rate, self.round, self.offset = candidate, rate, round_no, offset
        self.eval_loss: float | None = None
        self.runtime_s: float | None = None
        self.steps = 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def emit(self, event: str, step: int | None = None, **fields) -> dict:
        record = self.inner.emit(event, step=step, **fields)
        local = int(record.get("step") or 0)
        if event == "eval" and isinstance(record.get("eval_loss"), (int, float)):
            self.eval_loss = float(record["eval_loss"])
        if event == "train_end" and isinstance(record.get("train_runtime"), (int, float)):
            self.runtime_s, self.steps = float(record["train_runtime"]), local
        if event in FORWARDED:
            copy = {k: v for k, v in record.items() if k not in ("event", "time", "step")}
            self.pilot.emit(event, step=self.offset + local, candidate=self.candidate, rate=self.rate,
                            round=self.round, local_step=local, **copy)
        return record


def is_pilot(run_dir: Path) -> bool:
    """A run directory holding a pilot (its pilot.json)."""
    return (Path(run_dir) / PILOT_FILE).is_file()


def read_result(run_dir: Path) -> dict:
    """pilot_result.json ({} before the first candidate ends)."""
    return read_json(Path(run_dir) / PILOT_RESULT_FILE)


def pilot_design(plan: Plan, budget_minutes: float | None = None, share: float | None = None,
                 budget_name: str = "--budget-minutes"):
    """The pilot's design for `plan` (advisor.pilot.plan_pilot), counting the dataset's examples and tokens
    with the profiler when the plan does not record them; refuses data too small to hold out a split.
    Reads the data only (no torch): the CLI and the app call it before launching."""
    from advisor.pilot import DEFAULT_SHARE, check_split, plan_pilot
    from advisor.profile import profile_dataset

    examples, tokens = plan.data.examples, plan.data.tokens
    if examples is None:
        try:
            profile = profile_dataset(plan.data.dataset, plan.model.name, expected_format=plan.data.format)
            examples, tokens = profile.examples, profile.estimated_total_tokens
        except TunewiseError:
            pass  # the pilot reads the data itself and refuses it there if it must
    if examples is not None:
        check_split(examples, eval_held_out(examples, plan.data.eval_fraction or FALLBACK_EVAL_FRACTION))
    return plan_pilot(plan, budget_minutes=budget_minutes, share=DEFAULT_SHARE if share is None else share,
                      examples=examples, tokens=tokens, budget_name=budget_name)


def candidate_plan(plan: Plan, rate: float, steps: int, eval_fraction: float) -> Plan:
    """The plan a candidate trains: the user's, at `rate` for `steps` steps, evaluated once at the end on the
    pilot's split, with no forgetting measurements and no checkpoints."""
    data = plan.to_dict()
    data["training"].update(learning_rate=rate, max_steps=steps, eval_steps=None, save_steps=None, logging_steps=1)
    if plan.stage in ("dpo", "ppo"):
        data["preference"]["learning_rate"] = None  # the stage trains at `rate`
    data["data"]["eval_fraction"] = eval_fraction
    data["forgetting"]["monitor"] = False
    data["output"] = None
    return Plan.from_dict(data)


def _count_examples(plan: Plan) -> int:
    from trainer.data import _adapt, read_dataset

    records, _ = _adapt(read_dataset(plan.data.dataset, plan.data.format), DATA_KIND[plan.stage])
    return len(records)


def run_pilot(ctx: RunContext) -> dict:
    """Run the design in pilot.json on ctx.plan; returns the runner's result dict (chosen rate and reason)."""
    from trainer.callbacks import NonFiniteTraining
    from trainer.stages import get_stage

    plan = ctx.plan
    design = PilotDesign.from_dict(read_json(ctx.run_dir / PILOT_FILE).get("design") or {})
    if plan.pipeline != "none" or plan.stage not in DATA_KIND:
        raise TunewiseError("stage: the pilot measures SFT and DPO learning rates (see `tunewise pilot --help`)",
                            field="stage")
    examples = _count_examples(plan)
    held_out = eval_held_out(examples, plan.data.eval_fraction or FALLBACK_EVAL_FRACTION)
    check_split(examples, held_out)
    eval_fraction = held_out / examples
    ctx.emit("pilot", **design.to_dict(), examples=examples, eval_examples=held_out,
             message=f"learning-rate pilot: {design.describe()}")
    ctx.emit("train_begin", step=0, max_steps=design.train_steps, start_step=0)

    started = time.monotonic()
    results: list[dict] = []
    offset = 0
    step_s: float | None = None
    overhead_s: float | None = None

    def spent() -> float:
        return time.monotonic() - started

    def save(status: str, chosen: dict | None, note: str = "") -> dict:
        # The chosen rate is the best measured at the pilot's horizon moved to the run's (advisor.pilot.transfer).
        moved = transfer_choice(results, design.run_steps) if chosen else None
        reason = lr_reason(design, results, moved, held_out, spent()) if moved else None
        summary = {"status": status, "design": design.to_dict(), "examples": examples, "eval_examples": held_out,
                   "candidates": results, "chosen_rate": moved.rate if moved else None,
                   "chosen_eval_loss": chosen["eval_loss"] if chosen else None,
                   "measured": moved.to_dict() if moved else None, "reason": reason,
                   "spent_s": round(spent(), 1), "budget_s": round(design.budget_s, 1), "note": note}
        write_json_atomic(ctx.run_dir / PILOT_RESULT_FILE, summary)
        return summary

    def train(rate: float, steps: int, round_no: int) -> dict:
        nonlocal offset
        index = len(results) + 1
        directory = ctx.run_dir / CANDIDATES_DIR / f"{index:02d}-lr{rate:.2e}"
        directory.mkdir(parents=True, exist_ok=True)
        cplan = candidate_plan(plan, rate, steps, eval_fraction)
        cplan.save(directory / PLAN_FILE)
        writer = CandidateEvents(EventWriter(directory / EVENTS_FILE), ctx, index, rate, round_no, offset)
        cctx = CandidateContext(plan=cplan, run_dir=directory, events=writer, rank=ctx.rank, measure_only=True,
                                parent=ctx)
        ctx.emit("candidate", step=offset, status="started", candidate=index, rate=rate, round=round_no, steps=steps)
        began = time.monotonic()
        entry = {"candidate": index, "rate": rate, "round": round_no, "steps": steps}
        try:
            outcome = dict(get_stage(plan.stage)(cctx) or {})
            entry["status"] = "stopped" if outcome.get("status") == "stopped" else "finished"
        except NonFiniteTraining as exc:  # this rate diverged: infinitely bad, and the search goes on
            entry.update(status="diverged", error=str(exc))
        finally:
            shutil.rmtree(directory / CHECKPOINTS_DIR, ignore_errors=True)  # a stop's checkpoint: not needed
        wall = time.monotonic() - began
        entry.update(eval_loss=writer.eval_loss if entry["status"] == "finished" else None,
                     seconds=round(wall, 2), train_s=writer.runtime_s)
        if entry["status"] == "finished" and writer.eval_loss is None:
            entry.update(status="failed", error="no held-out loss was reported")
        offset += writer.steps or steps
        results.append(entry)
        ctx.emit("candidate", step=offset, **entry)
        return entry

    def stopped_result() -> dict:
        chosen = choose(results)
        measured = sum(1 for r in results if r.get("status") == "finished")
        note = (f"stopped after {measured} of {design.candidates} candidates; what was measured is kept"
                + (f"; the best so far is {chosen['rate']:.1e} at {chosen['steps']} steps (eval loss "
                   f"{chosen['eval_loss']:.3f})" if chosen else ""))
        summary = save("stopped", chosen, note)
        ctx.emit("pilot_result", **summary)
        return {"status": "stopped", "reason": note, "chosen_rate": summary["chosen_rate"],
                "spent_s": summary["spent_s"]}

    # -- round 1: the middle rate first, then outwards, so that a budget overrun drops the extremes ---------
    order = sorted(design.rates, key=lambda rate: (abs(design.rates.index(rate) - (len(design.rates) - 1) / 2), rate))
    notes: list[str] = []
    for position, rate in enumerate(order):
        if ctx.stop_requested():
            return stopped_result()
        if position == 3:
            per_candidate = spent() / position
            if spent() + (len(order) - position) * per_candidate > 1.5 * design.budget_s:
                notes.append(f"a candidate took {per_candidate:.0f} s against the {design.step_s * design.steps + design.candidate_s:.0f} s "
                             f"estimated: round 1 kept the {position} middle rates to stay near the budget")
                break
        entry = train(rate, design.steps, 1)
        save("running", None)
        if entry["status"] == "stopped":
            return stopped_result()
        if step_s is None and entry.get("train_s") and entry["steps"]:
            step_s = entry["train_s"] / entry["steps"]
            overhead_s = max(0.0, entry["seconds"] - entry["train_s"])
    first = sorted((r for r in results if r["round"] == 1), key=lambda r: r["rate"])
    rates = [r["rate"] for r in first]
    losses = [r["eval_loss"] if r["status"] == "finished" and r["eval_loss"] is not None else math.inf for r in first]

    # -- round 2: the best and its neighbours, twice as long (trimmed to the budget) ------------------------
    if design.keep and any(math.isfinite(loss) for loss in losses):
        finalists = second_round(tuple(rates), losses, KEEP)
        steps2 = design.steps * STRETCH
        left = design.budget_s - spent()
        per_step = step_s or design.step_s
        per_candidate = overhead_s if overhead_s is not None else design.candidate_s
        need = len(finalists) * (steps2 * per_step + per_candidate)
        if need > left:
            affordable = int((left / max(1, len(finalists)) - per_candidate) / per_step)
            if affordable > design.steps:
                steps2 = affordable
                notes.append(f"round 2 trimmed to {steps2} steps to stay inside the budget")
            else:
                finalists = []
                notes.append(f"round 2 skipped: it needed about {minutes(need)} and {minutes(max(0.0, left))} of "
                             "the budget was left")
        for rate in finalists:
            if ctx.stop_requested():
                return stopped_result()
            entry = train(rate, steps2, 2)
            save("running", None)
            if entry["status"] == "stopped":
                return stopped_result()

    chosen = choose(results)
    if chosen is None:
        summary = save("failed", None, "; ".join(notes))
        ctx.emit("pilot_result", **summary)
        tried = ", ".join(f"{r['rate']:.1e}: {r['status']}" for r in results)
        raise TunewiseError(f"training.learning_rate: every rate the pilot tried failed or diverged ({tried}); lower "
                            "the learning rate, or check the data and the model", field="training.learning_rate")
    summary = save("finished", chosen, "; ".join(notes))
    ctx.emit("pilot_result", **summary)
    return {"status": "finished", "chosen_rate": summary["chosen_rate"], "chosen_eval_loss": chosen["eval_loss"],
            "lr_reason": summary["reason"], "spent_s": summary["spent_s"], "budget_s": summary["budget_s"],
            "candidates": len(results)}
