"""Where a stage's model comes from: a run id, a run directory or a model folder; adapters merged once.

The preference stages start from what an earlier run produced. A plan names
it in `preference.sft_model` (the policy's start) or `preference.reward_model`
as any of:

- a run id, looked up in the folders above this run (a pipeline's steps sit
  inside the pipeline's run) and in $TUNEWISE_RUNS_DIR (default ./runs);
- a run directory, whose output folder holds the model;
- a model folder (config.json) or an adapter folder (adapter_config.json).

`resolve_model_source` turns that into a model folder. `merged_model_dir`
merges an adapter output (LoRA SFT, a LoRA reward model) into a full model
once, saved under the run, so the next stage can put its own fresh adapter
on top and the adapter-disabled model is exactly the previous stage's
result. `policy_start` and `reward_model_dir` apply both to the plan.

torch, transformers and PEFT are imported inside `merged_model_dir`, so the
runner's pre-flight check can use `resolve_model_source` cheaply.
"""

from __future__ import annotations

import os
from pathlib import Path

from advisor.errors import TunewiseError
from advisor.plan import DEMO_MODEL_DIR, Plan
from trainer.models import base_of_adapter
from trainer.rundir import PLAN_FILE, RUNS_DIR_ENV, output_dir


def is_adapter_dir(path: Path) -> bool:
    """A PEFT adapter folder (adapter_config.json)."""
    return (Path(path) / "adapter_config.json").is_file()


def is_model_dir(path: Path) -> bool:
    """A model folder: a full model (config.json) or an adapter."""
    path = Path(path)
    return (path / "config.json").is_file() or is_adapter_dir(path)


def _run_output_dir(run_dir: Path) -> Path:
    """A run's output folder: its plan's `output`, else <run>/output (also when plan.yaml is missing or broken)."""
    try:
        plan = Plan.load(run_dir / PLAN_FILE)
    except (OSError, TunewiseError):
        return output_dir(run_dir)
    return output_dir(run_dir, plan.output)


def _output_of_run(run_dir: Path) -> Path | None:
    """A run directory's model output, or None when its output folder holds no model (yet)."""
    output = _run_output_dir(run_dir)
    return output if is_model_dir(output) else None


def _runs_dirs(hint: Path | None) -> list[Path]:
    dirs = []
    if hint is not None:
        dirs += [hint, *hint.parents]
    dirs.append(Path(os.environ.get(RUNS_DIR_ENV, "runs")))
    return dirs


def resolve_model_source(value: str, setting: str, run_dir: Path | None = None) -> Path:
    """A run id, run directory or model directory -> the model directory it names.

    `setting` is the plan field being resolved (named in the error). A run id is looked up in
    the folders above `run_dir` and in $TUNEWISE_RUNS_DIR (default ./runs).
    """
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


def merged_model_dir(source: Path, kind: str, work_dir: Path, trust_remote_code: bool = False) -> Path:
    """A full model directory for `source`; an adapter is merged into its base (saved once under `work_dir`).

    `kind` is "causal_lm" or "seq_cls" (a reward model's adapter carries its score head). The
    merge is in float32, whatever the plan's precision, so the merged weights are exact.
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

    base_path = base_of_adapter(source)
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
    elif plan.model.name == "demo" or Path(plan.model.name).expanduser().exists():
        source = resolve_model_source(plan.model.name, "model.name", ctx.run_dir)
    else:
        return Path(plan.model.name)  # a hub id: the model loader resolves it
    return merged_model_dir(source, "causal_lm", ctx.run_dir, plan.model.trust_remote_code)


def reward_model_dir(ctx) -> Path:
    """The reward model named by the plan, as a full seq-cls directory (an adapter is merged)."""
    value = ctx.plan.preference.reward_model
    if not value:
        raise TunewiseError("preference.reward_model: PPO needs a reward model: give a reward-model run id, its "
                            "directory or a model path (the rlhf pipeline fills it in)", field="preference.reward_model")
    source = resolve_model_source(value, "preference.reward_model", ctx.run_dir)
    return merged_model_dir(source, "seq_cls", ctx.run_dir, ctx.plan.model.trust_remote_code)
