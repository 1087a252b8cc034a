"""Plumbing the preference stages (rm, dpo, ppo) still share (models and their sources: trainer.models, trainer.sources).

- The data: `load_preference_rows` reads prompt/chosen/rejected rows with
  the profiler's readers, refuses a bad row before any training (the
  message names the row), and splits off held-out pairs.
- The settings: `trl_args` maps the plan's training settings onto the
  keyword arguments every TRL config shares.
- Events: `monitored_context` installs the preference monitors on the
  run's event writer; `callbacks_for` gives the log, stop and non-finite
  callbacks (trainer.callbacks', or minimal ones when that module is absent).

Runs inside the training process only; torch & co are imported in functions
so that the pipeline module can import this cheaply.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

from advisor.errors import DatasetError


# -- data -------------------------------------------------------------------------------------

def load_preference_rows(plan) -> tuple[list[dict], list[dict]]:
    """(train rows, held-out rows) of {"prompt", "chosen", "rejected"}; DatasetError naming the first bad row.

    Every row is checked before training starts: a missing `rejected`, an empty string or identical
    chosen / rejected answers are refused with the row's line number.
    """
    from advisor.plan import DEMO_DATASETS
    from advisor.profile import detect_format, normalize_record, read_records, resolve_dataset, validate_records

    name = plan.data.dataset
    path = DEMO_DATASETS.get(name) or resolve_dataset(name)
    if not Path(path).is_file():
        raise DatasetError(f"data.dataset: {name} does not exist (the demo data is built by assets/make_demo_data.py)")
    rows = list(read_records(path))
    if not rows:
        raise DatasetError(f"{path} has no rows: a preference stage needs prompt/chosen/rejected pairs")
    expected = "preference"
    detected = detect_format((record for _, record in rows[:200]), expected, str(path)) if plan.data.format in (
        "auto", "preference") else detect_format((r for _, r in rows[:200]), plan.data.format, str(path))
    if detected.format != expected:
        raise DatasetError(f"{path}: a preference stage needs prompt/chosen/rejected pairs, this is {detected.format} data")
    # Detection samples the first rows; re-detect over every row's columns so a later row that lacks
    # a column is named rather than silently skipped.
    detected = detect_format((record for _, record in rows), expected, str(path))
    validate_records(rows, detected, path)
    records = [normalize_record(record, detected) for _, record in rows]
    if any("prompt" not in r for r in records):
        raise DatasetError(f"{path}: preference rows need a prompt column (prompt, question or instruction) so that "
                           f"the policy can be sampled on held-out prompts")
    rng = random.Random(plan.training.seed)
    order = list(range(len(records)))
    rng.shuffle(order)
    held = int(round(len(records) * plan.data.eval_fraction))
    if plan.data.eval_fraction > 0:
        held = max(held, 2)
    if held >= len(records):
        raise DatasetError(f"{path} has only {len(records)} pairs: too few to hold {plan.data.eval_fraction:.0%} out")
    heldout = [records[i] for i in order[:held]]
    train = [records[i] for i in order[held:]]
    if plan.data.max_examples:
        train = train[: plan.data.max_examples]
    return train, heldout


def conversational(rows: list[dict], tokenizer) -> list[dict]:
    """Plain-text prompts become chat turns when the tokenizer has a chat template (TRL then applies it)."""
    if not getattr(tokenizer, "chat_template", None):
        return rows
    out = []
    for row in rows:
        prompt = row["prompt"]
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        chosen, rejected = row["chosen"], row["rejected"]
        if isinstance(chosen, str):
            chosen = [{"role": "assistant", "content": chosen.strip()}]
        if isinstance(rejected, str):
            rejected = [{"role": "assistant", "content": rejected.strip()}]
        out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return out


# -- settings -----------------------------------------------------------------------------------

def trl_args(ctx, has_eval: bool, config_cls) -> dict:
    """Keyword arguments for a TRL config class (RewardConfig, DPOConfig, PPOConfig, RLOOConfig,
    GRPOConfig): trainer.training_args' mapping of the plan, so every stage reads it the same way,
    keeping only the fields `config_cls` has."""
    from trainer.models import resolve_precision
    from trainer.training_args import training_kwargs

    args = training_kwargs(ctx, resolve_precision(ctx.plan), has_eval)
    # TRL's preference collators need their own columns (prompt/chosen/rejected, chosen_ids, ...).
    args["remove_unused_columns"] = False
    known = {f.name for f in dataclasses.fields(config_cls)}
    return {key: value for key, value in args.items() if key in known}


# -- events -------------------------------------------------------------------------------------

def monitored_context(ctx):
    """A copy of `ctx` whose event writer feeds the preference monitors (see trainer/monitors.py)."""
    from trainer.context import STOP_FILE
    from trainer.monitors import MonitoredEvents, PreferenceMonitors

    if isinstance(ctx.events, MonitoredEvents):
        return ctx
    events = MonitoredEvents(ctx.events, PreferenceMonitors.from_plan(ctx.plan), stop_file=ctx.run_dir / STOP_FILE)
    return dataclasses.replace(ctx, events=events)


def preference_forgetting_ctx(ctx):
    """The context handed to `setup_forgetting`: replay mixes text rows into the training set, which a
    preference dataset cannot hold, so replay is switched off here (with a `note` event)."""
    if ctx.plan.forgetting.replay_fraction <= 0:
        return ctx
    ctx.emit("note", message="Replay mixes original-domain text into the training data; preference stages train on "
                             "pairs, so replay is off for this stage (the monitor and EWC still apply).")
    plan = ctx.plan.with_overrides({"forgetting.replay_fraction": 0.0})
    return dataclasses.replace(ctx, plan=plan)


def callbacks_for(ctx) -> list:
    """The run's log, stop and non-finite callbacks: trainer.callbacks' when present, else the minimal ones here."""
    try:
        from trainer.callbacks import EventsCallback, NonFiniteCallback, StopCallback

        return [EventsCallback(ctx), StopCallback(ctx), NonFiniteCallback(ctx)]
    except ImportError:
        log_events, stop_on_request = _define_callbacks()
        return [log_events(ctx), stop_on_request(ctx)]


def policy_result(ctx, stopped: bool, samples: list[dict], forgetting_callbacks: list, **fields) -> dict:
    """What a policy stage (DPO, PPO / RLOO / GRPO) returns: its status, its own `fields`, the last
    policy sample's held-out numbers (the comparison report reads these), the alert count and the
    forgetting monitor's summary."""
    from trainer.forgetting import forgetting_stop_reason

    stop_reason = forgetting_stop_reason(forgetting_callbacks)
    stopped = stopped or ctx.stop_requested() or stop_reason is not None
    last = samples[-1] if samples else {}
    result = {
        "status": "stopped" if stopped else "finished",
        "output_dir": str(ctx.output_dir),
        **fields,
        **{key: last.get(key) for key in ("heldout_accuracy", "kl", "kl_sequence", "reward", "reward_source")},
        "alerts": len(ctx.events.alerts),
    }
    if stopped:
        result["reason"] = stop_reason or next((a.message for a in ctx.events.alerts if a.stop), "stop requested")
    for callback in forgetting_callbacks:
        if hasattr(callback, "summary"):
            result.update(callback.summary())
    return result


def _define_callbacks():
    from transformers import TrainerCallback

    class _LogEvents(TrainerCallback):
        """Writes each trainer log as a `log` event, metric keys unchanged."""

        def __init__(self, ctx):
            self.ctx = ctx

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs:
                self.ctx.emit("log", step=state.global_step, **logs)

    class _StopOnRequest(TrainerCallback):
        """Ends training (saving first) once a stop is requested."""

        def __init__(self, ctx):
            self.ctx = ctx
            self.stopped = False

        def on_step_end(self, args, state, control, **kwargs):
            if self.ctx.stop_requested():
                self.stopped = True
                control.should_save = True
                control.should_training_stop = True

    return _LogEvents, _StopOnRequest
