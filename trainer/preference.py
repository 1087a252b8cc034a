"""Plumbing the preference stages (rm, dpo, ppo) share.

- Where a stage starts from: `resolve_model_source` turns a run id, a run
  directory or a model path into a model directory; `start_model_dir` merges
  an adapter output (LoRA SFT, LoRA reward model) into a full 16-bit model
  once, so the next stage can put its own fresh adapter on top and the
  adapter-disabled model is exactly the previous stage's result.
- The data: `load_preference_rows` reads prompt/chosen/rejected rows with
  the profiler's readers, refuses a bad row before any training (the
  message names the row), and splits off held-out pairs.
- The settings: `trl_args` maps the plan's training settings onto the
  keyword arguments every TRL config shares; `lora_config` builds the PEFT
  config; `load_base` loads a causal LM or a one-logit classifier in the
  plan's precision (4-bit for QLoRA).
- Events: `monitored_context` installs the preference monitors on the
  run's event writer; `callbacks_for` gives the log, stop and non-finite
  callbacks (trainer.callbacks', or minimal ones when that module is absent).

Runs inside the training process only; torch & co are imported in functions
so that the pipeline module can import this cheaply.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from pathlib import Path
from typing import Any

from advisor.errors import DatasetError, TunewiseError

RUNS_DIR_ENV = "TUNEWISE_RUNS_DIR"


# -- where a stage starts from -----------------------------------------------------------------

def _runs_dirs(hint: Path | None) -> list[Path]:
    dirs = []
    if hint is not None:
        dirs += [hint, *hint.parents]
    dirs.append(Path(os.environ.get(RUNS_DIR_ENV, "runs")))
    return dirs


def _output_of_run(run_dir: Path) -> Path | None:
    """A run directory's model output: output/ (or the plan's `output`), when it holds a model."""
    candidates = [run_dir / "output"]
    plan_file = run_dir / "plan.yaml"
    if plan_file.is_file():
        try:
            import yaml

            output = (yaml.safe_load(plan_file.read_text(encoding="utf-8")) or {}).get("output")
            if output:
                candidates.insert(0, Path(output))
        except Exception:  # a broken plan file: fall back to output/
            pass
    for candidate in candidates:
        if is_model_dir(candidate):
            return candidate
    return None


def is_adapter_dir(path: Path) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def is_model_dir(path: Path) -> bool:
    path = Path(path)
    return (path / "config.json").is_file() or is_adapter_dir(path)


def resolve_model_source(value: str, setting: str, run_dir: Path | None = None) -> Path:
    """A run id, run directory or model directory -> the model directory it names.

    `setting` is the plan field being resolved (named in the error). A run id is looked up in
    the folders above `run_dir` and in $TUNEWISE_RUNS_DIR (default ./runs).
    """
    from advisor.plan import DEMO_MODEL_DIR

    if value == "demo":
        return DEMO_MODEL_DIR
    path = Path(value).expanduser()
    if is_model_dir(path):
        return path
    if path.is_dir():
        output = _output_of_run(path)
        if output is not None:
            return output
        raise TunewiseError(f"{setting}: {value} is a folder without a model (no config.json, no adapter_config.json, "
                            f"no output/ of a finished run): give the output of a finished run", field=setting)
    for runs in _runs_dirs(run_dir):
        candidate = runs / value
        if candidate.is_dir():
            output = _output_of_run(candidate)
            if output is not None:
                return output
            raise TunewiseError(f"{setting}: run {value} has no model output yet (did it finish?)", field=setting)
    raise TunewiseError(f"{setting}: {value!r} is neither a run id in the runs folder, a run directory, nor a model "
                        f"directory with config.json", field=setting)


def adapter_base(adapter_dir: Path) -> str:
    config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text(encoding="utf-8"))
    return config["base_model_name_or_path"]


def start_model_dir(source: Path, kind: str, work_dir: Path, trust_remote_code: bool = False) -> Path:
    """A full model directory for `source`; an adapter is merged into its base (saved once under `work_dir`).

    `kind` is "causal_lm" or "seq_cls" (a reward model's adapter carries its score head).
    """
    source = Path(source)
    if not is_adapter_dir(source):
        return source
    target = Path(work_dir) / f"merged-{kind}"
    if (target / "config.json").is_file():
        return target
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    base_path = adapter_base(source)
    if kind == "seq_cls":
        base = AutoModelForSequenceClassification.from_pretrained(base_path, num_labels=1, dtype=torch.float32,
                                                                  trust_remote_code=trust_remote_code)
    else:
        base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32, trust_remote_code=trust_remote_code)
    merged = PeftModel.from_pretrained(base, str(source)).merge_and_unload()
    tokenizer_dir = source if (source / "tokenizer_config.json").is_file() else Path(base_path)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=trust_remote_code)
    if kind == "seq_cls":
        merged.config.pad_token_id = tokenizer.pad_token_id
    target.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def policy_start(ctx) -> Path:
    """The directory the policy starts from: the plan's sft_model (merged if an adapter) or the base model."""
    plan = ctx.plan
    if plan.preference.sft_model:
        source = resolve_model_source(plan.preference.sft_model, "preference.sft_model", ctx.run_dir)
    else:
        source = resolve_model_source(plan.model.name, "model.name", ctx.run_dir) if plan.model.name == "demo" or \
            Path(plan.model.name).expanduser().exists() else Path(plan.model.name)
        if not isinstance(source, Path):
            source = Path(source)
    if is_model_dir(source):
        return start_model_dir(source, "causal_lm", ctx.run_dir, plan.model.trust_remote_code)
    return source  # a hub id: from_pretrained resolves it


def reward_model_dir(ctx) -> Path:
    """The reward model named by the plan, as a full seq-cls directory (an adapter is merged)."""
    value = ctx.plan.preference.reward_model
    if not value:
        raise TunewiseError("preference.reward_model: PPO needs a reward model: give a reward-model run id, its "
                            "directory or a model path (the rlhf pipeline fills it in)", field="preference.reward_model")
    source = resolve_model_source(value, "preference.reward_model", ctx.run_dir)
    return start_model_dir(source, "seq_cls", ctx.run_dir, ctx.plan.model.trust_remote_code)


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


def lora_config(plan, kind: str = "causal_lm"):
    """PEFT LoRA config from the plan (kind causal_lm or seq_cls)."""
    from trainer.models import lora_config as plan_lora_config

    return plan_lora_config(plan, kind)


def load_base(path: Path | str, plan, kind: str = "causal_lm", trainable: bool = True):
    """A causal LM or one-logit classifier at `path`, in the precision this machine really uses
    (trainer.models.resolve_precision), quantized for QLoRA, and without adapters.

    The preference stages hand LoRA to TRL as a `peft_config`, so TRL wraps a bare base and
    computes the reference with the adapter disabled (no second copy, no "ref" adapter).
    trainable=False: eval mode, gradients off (a reference, reward model, or frozen base).
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from trainer.models import _hub_kwargs, quantization_config, resolve_precision

    precision = resolve_precision(plan)
    kwargs: dict[str, Any] = dict(_hub_kwargs(plan, str(path)))
    kwargs["dtype"] = precision.torch_dtype
    kwargs["attn_implementation"] = plan.method.attn
    quant = quantization_config(plan, precision)
    if quant is not None:
        kwargs["quantization_config"] = quant
        kwargs["device_map"] = {"": f"cuda:{int(os.environ.get('LOCAL_RANK', '0') or 0)}"
                                if precision.device == "cuda" else "cpu"}
    if kind == "seq_cls":
        model = AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=1, **kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    if quant is not None and trainable:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=plan.method.gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    if not trainable:
        model.requires_grad_(False)
        model.eval()
    return model


def load_tokenizer_for(path: Path | str, plan, padding_side: str = "right"):
    """The tokenizer saved with `path` (its base's for an adapter), with a pad token."""
    from trainer.models import load_tokenizer

    tokenizer = load_tokenizer(plan, model_name=str(path))
    tokenizer.padding_side = padding_side
    return tokenizer


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
