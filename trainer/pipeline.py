"""Chained preference pipelines: one plan, several stages, one pipeline run directory.

- rlhf: SFT -> reward model -> PPO (the guide's three-step RLHF; the online
  algorithm is `preference.algorithm`: ppo, rloo or grpo);
- dpo: SFT -> DPO;
- compare: SFT once, then both branches on the same data (RM -> PPO and DPO),
  and a side-by-side report (held-out preference accuracy, reward-model
  score of held-out samples, KL, forgetting) in `comparison.json` and a
  `comparison` event. In compare mode the DPO step is scored by the same
  reward model, so both policies' rewards are on one scale.

Each step is a run directory `<pipeline>/steps/<n>-<stage>/` with its own
plan.yaml, events.jsonl (started / ... / finished) and result.json; each
output feeds the next step (`preference.sft_model`, `preference.reward_model`).
The SFT step trains on the plan's dataset: preference data gives prompt +
chosen reply (trainer/data.py does that reshaping).

The pipeline's events.jsonl gets `stage` events (`status` started / finished /
stopped / skipped, `stage`, `index`, `step_dir`, `output_dir`, the step's key
numbers) and a copy of each step's `log`, `eval`, `sample`, `alert` and
`forgetting` events with `stage` added and `step` offset by the steps of the
earlier stages (the original is `local_step`), so one pipeline plots as one
timeline.

Stopping: a stop request for the pipeline (its STOP file or a signal) reaches
the running step, which saves and stops; the pipeline then ends `stopped`.
Resuming: running the pipeline again skips steps whose result.json says
finished, and continues an interrupted step from its newest checkpoint.

Imports nothing heavy itself; the stages import torch when they run.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from advisor.plan import PIPELINE_STAGES
from trainer.context import RunContext
from trainer.events import EVENTS_FILE, EventWriter
from trainer.rundir import COMPARISON_FILE, PLAN_FILE, RESULT_FILE, last_checkpoint, step_dirs

FORWARDED_EVENTS = ("train_begin", "log", "eval", "sample", "alert", "forgetting")


@dataclass
class StepContext(RunContext):
    """A step's context: stopping the pipeline stops the step."""

    parent: RunContext | None = field(default=None, repr=False)

    def stop_requested(self) -> bool:
        return super().stop_requested() or (self.parent is not None and self.parent.stop_requested())


class ForwardingEvents:
    """A step's event writer that also copies the key events to the pipeline's log."""

    def __init__(self, inner: EventWriter, pipeline_ctx: RunContext, stage: str, offset: int):
        self.inner = inner
        self.pipeline_ctx = pipeline_ctx
        self.stage = stage
        self.offset = offset

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def emit(self, event: str, step: int | None = None, **fields) -> dict:
        record = self.inner.emit(event, step=step, **fields)
        if event in FORWARDED_EVENTS:
            local = int(record.get("step") or 0)
            copy = {k: v for k, v in record.items() if k not in ("event", "time", "step", "stage", "local_step")}
            self.pipeline_ctx.emit(event, step=self.offset + local, stage=self.stage, local_step=local, **copy)
        return record




def _read_result(step_dir: Path) -> dict | None:
    try:
        return json.loads((step_dir / RESULT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _step_plan(plan, stage: str, outputs: dict):
    overrides = {"stage": stage, "pipeline": "none", "output": None, "name": f"{plan.name or plan.pipeline}: {stage}"}
    if stage in ("rm", "dpo", "ppo") and "sft" in outputs:
        overrides["preference.sft_model"] = outputs["sft"]
    if stage == "ppo" and "rm" in outputs:
        overrides["preference.reward_model"] = outputs["rm"]
    if stage == "dpo" and plan.pipeline == "compare" and "rm" in outputs:
        # Score DPO's samples with the same reward model as PPO's, for a like-for-like comparison.
        overrides["preference.reward_model"] = outputs["rm"]
    data = plan.to_dict()
    data.update({k: v for k, v in overrides.items() if "." not in k})
    from advisor.plan import Plan

    step_plan = Plan.from_dict(data)
    return step_plan.with_overrides({k: v for k, v in overrides.items() if "." in k})


def _steps_of(result: dict) -> int:
    """Optimizer steps a finished step took (SFT reports `step`, the preference stages `steps`)."""
    return int(result.get("steps") or result.get("step") or 0)


def _extra(result: dict) -> dict:
    """A step's result as event fields, without the names the event itself uses."""
    return {k: v for k, v in result.items() if k not in ("status", "step", "stage", "index", "of", "step_dir")}


def _clean(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value


def run_pipeline(ctx: RunContext) -> dict:
    """Run (or continue) the plan's pipeline; returns the runner's result dict."""
    from trainer.stages import get_stage

    plan = ctx.plan
    if plan.pipeline not in PIPELINE_STAGES:
        raise ValueError(f"unknown pipeline {plan.pipeline!r}")
    outputs: dict[str, str] = {}
    results: dict[str, dict] = {}
    offset = 0
    steps = step_dirs(ctx.run_dir, plan.pipeline)
    for index, (stage, step_dir) in enumerate(steps, 1):
        previous = _read_result(step_dir)
        if previous and previous.get("status") == "finished":
            outputs[stage] = previous["output_dir"]
            results[stage] = previous
            offset += _steps_of(previous)
            ctx.emit("stage", step=offset, status="skipped", stage=stage, index=index, step_dir=str(step_dir),
                     output_dir=previous["output_dir"], message=f"step {index} ({stage}) already finished")
            continue
        if ctx.stop_requested():
            return {"status": "stopped", "reason": "stop requested", "completed": list(outputs),
                    "outputs": outputs}
        step_dir.mkdir(parents=True, exist_ok=True)
        step_plan = _step_plan(plan, stage, outputs)
        step_plan.save(step_dir / PLAN_FILE)
        resume = last_checkpoint(step_dir)  # an interrupted or stopped step continues from its checkpoint
        writer = EventWriter(step_dir / EVENTS_FILE)
        events = ForwardingEvents(writer, ctx, stage, offset)
        step_ctx = StepContext(plan=step_plan, run_dir=step_dir, events=events, resume_from=resume, rank=ctx.rank,
                               parent=ctx)
        ctx.emit("stage", step=offset, status="started", stage=stage, index=index, of=len(steps),
                 step_dir=str(step_dir), resume_from=str(resume) if resume else None,
                 inputs={k: v for k, v in outputs.items()})
        writer.emit("started", summary=step_plan.summary(), stage=stage, pipeline_run=str(ctx.run_dir),
                    resume_from=str(resume) if resume else None)
        started = time.time()
        try:
            result = dict(get_stage(stage)(step_ctx) or {})
        except Exception as exc:
            writer.emit("failed", error=f"{type(exc).__name__}: {exc}")
            ctx.emit("stage", step=offset, status="failed", stage=stage, index=index, step_dir=str(step_dir),
                     error=f"{type(exc).__name__}: {exc}")
            raise
        result = {k: _clean(v) for k, v in result.items()}
        result["wall_s"] = round(time.time() - started, 2)
        terminal = "stopped" if result.get("status") == "stopped" else "finished"
        writer.emit(terminal, **_extra(result))
        (step_dir / RESULT_FILE).write_text(json.dumps(result, indent=2), encoding="utf-8")
        offset += _steps_of(result)
        ctx.emit("stage", step=offset, status=terminal, stage=stage, index=index, of=len(steps),
                 step_dir=str(step_dir), **_extra(result))
        if terminal == "stopped":
            return {"status": "stopped", "reason": result.get("reason") or "stop requested",
                    "completed": list(outputs), "stopped_at": stage, "outputs": outputs}
        outputs[stage] = result["output_dir"]
        results[stage] = result

    summary = {"status": "finished", "output_dir": outputs[PIPELINE_STAGES[plan.pipeline][-1]], "outputs": outputs,
               "steps": offset}
    report = comparison(results, plan.pipeline)
    (ctx.run_dir / COMPARISON_FILE).write_text(json.dumps(report, indent=2), encoding="utf-8")
    ctx.emit("comparison", step=offset, **report)
    summary.update({f"{branch}_{key}": value for branch, numbers in report["branches"].items()
                    for key, value in numbers.items() if not isinstance(value, (dict, list))})
    return summary


def comparison(results: dict[str, dict], pipeline: str) -> dict:
    """The side-by-side numbers of each branch's final policy (rlhf: PPO, dpo: DPO)."""
    branches = {}
    for branch, stage in (("rlhf", "ppo"), ("dpo", "dpo")):
        result = results.get(stage)
        if not result:
            continue
        numbers = {
            "stage": stage,
            "output_dir": result.get("output_dir"),
            "heldout_accuracy": result.get("heldout_accuracy"),
            "reward": result.get("reward"),
            "reward_source": result.get("reward_source"),
            "kl": result.get("kl"),
            "kl_sequence": result.get("kl_sequence"),
            "forgetting_degradation_pct": result.get("forgetting_degradation_pct"),
            "alerts": result.get("alerts"),
            "wall_s": result.get("wall_s"),
        }
        if branch == "rlhf" and "rm" in results:
            numbers["reward_model_heldout_accuracy"] = results["rm"].get("heldout_accuracy")
            numbers["wall_s"] = round(sum(results[s].get("wall_s") or 0 for s in ("rm", "ppo")), 2)
        branches[branch] = numbers
    notes = ("heldout_accuracy: share of held-out pairs whose chosen answer gains more log-probability over the "
             "SFT model than the rejected one; reward: mean score of samples on held-out prompts (the reward "
             "model's when reward_source is reward_model, else DPO's implicit reward); kl: per-token KL to the "
             "SFT model on those samples (kl_sequence: per completion); forgetting: original-domain loss change.")
    return {"pipeline": pipeline, "branches": branches, "sft": results.get("sft", {}).get("output_dir"),
            "notes": notes}
