"""Reward-model stage: TRL's RewardTrainer on prompt/chosen/rejected pairs (the guide's RLHF step 2).

- model: one sequence classifier with a single output (num_labels=1) and its
  pad token set, started from the plan's `preference.sft_model` (an SFT run,
  merged if it is an adapter) or the base model; full, LoRA (the score head
  trains alongside the adapter) or QLoRA. This is the planner's memory model
  for the rm stage: one seq-cls model, nothing else.
- TRL's metrics unchanged: `loss`, `accuracy` (chosen scored above rejected),
  `margin` (mean chosen - rejected score), `mean_reward`, ...; evaluation on
  the held-out pairs gives `eval_accuracy` and `eval_margin` (an `eval`
  event), every `training.eval_steps` and at the end.
- output: the model (or adapter) with its tokenizer; the ppo stage loads it
  as its reward model (`preference.reward_model`).
"""

from __future__ import annotations

import math

import torch
from datasets import Dataset
from trl import RewardConfig, RewardTrainer

from trainer.forgetting import forgetting_stop_reason, setup_forgetting
from trainer.models import load_model, load_tokenizer, lora_config
from trainer.preference import (
    callbacks_for,
    conversational,
    load_preference_rows,
    monitored_context,
    preference_forgetting_ctx,
    trl_args,
)
from trainer.sources import policy_start
from trainer.stages.dpo import _history, _with_penalty


def run(ctx) -> dict:
    ctx = monitored_context(ctx)
    plan = ctx.plan
    torch.manual_seed(plan.training.seed)
    start = policy_start(ctx)
    tokenizer = load_tokenizer(plan, model_name=str(start))
    tokenizer.padding_side = "right"
    train_rows, heldout = load_preference_rows(plan)
    train_dataset = Dataset.from_list(conversational(train_rows, tokenizer))
    eval_dataset = Dataset.from_list(conversational(heldout, tokenizer)) if heldout else None

    model = load_model(plan, "seq_cls", trainable=True, model_name=str(start), adapters=False)
    # The classifier reads the score at the last non-pad token, so it must know the pad id.
    model.config.pad_token_id = tokenizer.pad_token_id
    use_adapter = plan.method.method in ("lora", "qlora")

    # The forgetting monitor measures language-model loss; a classifier has none, so only EWC applies.
    fctx = preference_forgetting_ctx(ctx)
    if fctx.plan.forgetting.monitor:
        ctx.emit("note", message="The forgetting monitor measures a language model's loss on original-domain text; "
                                 "a reward model has no language-model head, so it is off for this stage.")
        fctx = type(fctx)(**{**fctx.__dict__, "plan": fctx.plan.with_overrides({"forgetting.monitor": False})})
    train_dataset, forgetting_callbacks, penalty_fn = setup_forgetting(fctx, model, tokenizer, train_dataset)

    config = RewardConfig(
        **trl_args(ctx, eval_dataset is not None, RewardConfig),
        max_length=plan.training.seq_len,
    )
    trainer = _with_penalty(RewardTrainer, penalty_fn)(
        model=model,
        args=config,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=lora_config(plan, "seq_cls") if use_adapter else None,
        callbacks=forgetting_callbacks + callbacks_for(ctx),
    )
    trainer.train(resume_from_checkpoint=str(ctx.resume_from) if ctx.resume_from else None)
    metrics = trainer.evaluate() if eval_dataset is not None else {}
    ctx.output_dir.mkdir(parents=True, exist_ok=True)
    trainer.save_model(str(ctx.output_dir))
    tokenizer.save_pretrained(str(ctx.output_dir))

    history = trainer.state.log_history
    accuracy = _history(history, "accuracy")
    margin = _history(history, "margin")
    losses = _history(history, "loss")
    stop_reason = forgetting_stop_reason(forgetting_callbacks)
    stopped = ctx.stop_requested() or stop_reason is not None
    result = {
        "status": "stopped" if stopped else "finished",
        "output_dir": str(ctx.output_dir),
        "steps": trainer.state.global_step,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "train_accuracy": accuracy[-1] if accuracy else None,
        "train_margin": margin[-1] if margin else None,
        "heldout_accuracy": metrics.get("eval_accuracy"),
        "heldout_margin": metrics.get("eval_margin"),
        "heldout_pairs": len(heldout),
    }
    if stopped:
        result["reason"] = stop_reason or "stop requested"
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in result.items()}
