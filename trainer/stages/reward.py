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
- forgetting: EWC only, its penalty added once per optimizer step
  (`trainer.callbacks.with_penalty`); replay (pairs hold no text) and the
  monitor (a classifier has no language-model loss) are off, with a note.
- output: the model (or adapter) with its tokenizer; the ppo stage loads it
  as its reward model (`preference.reward_model`).
"""

from __future__ import annotations

import math

import torch
from datasets import Dataset
from trl import RewardConfig, RewardTrainer

from trainer.callbacks import best_checkpoint, callbacks_for, metric_history, with_penalty
from trainer.data import conversational, load_preference_rows
from trainer.forgetting import PAIRS_NO_REPLAY, setup_forgetting
from trainer.models import load_model, load_tokenizer, lora_config
from trainer.monitors import monitored_context
from trainer.sources import policy_start
from trainer.training_args import trl_args

#: The forgetting monitor measures language-model loss; a classifier has none, so only EWC applies.
NO_MONITOR = ("The forgetting monitor measures a language model's loss on original-domain text; a reward model has "
              "no language-model head, so it is off for this stage.")


def run(ctx) -> dict:
    # -- setup ------------------------------------------------------------------------------------
    ctx = monitored_context(ctx)
    plan = ctx.plan
    torch.manual_seed(plan.training.seed)
    policy_dir = policy_start(ctx)
    tokenizer = load_tokenizer(plan, model_name=str(policy_dir))
    tokenizer.padding_side = "right"
    train_rows, heldout = load_preference_rows(plan)
    train_dataset = Dataset.from_list(conversational(train_rows, tokenizer))
    eval_dataset = Dataset.from_list(conversational(heldout, tokenizer)) if heldout else None

    model = load_model(plan, "seq_cls", trainable=True, model_name=str(policy_dir), adapters=False)
    # The classifier reads the score at the last non-pad token, so it must know the pad id.
    model.config.pad_token_id = tokenizer.pad_token_id
    use_adapter = plan.method.method in ("lora", "qlora")

    forgetting = setup_forgetting(ctx, model, tokenizer, train_dataset, replay=PAIRS_NO_REPLAY, monitor=NO_MONITOR)
    config = RewardConfig(
        **trl_args(ctx, eval_dataset is not None, RewardConfig),
        max_length=plan.training.seq_len,
    )
    trainer = with_penalty(RewardTrainer, forgetting.penalty)(
        model=model,
        args=config,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=lora_config(plan, "seq_cls") if use_adapter else None,
        callbacks=[*forgetting.callbacks, *callbacks_for(ctx, eval_dataset is not None)],
    )

    # -- train ------------------------------------------------------------------------------------
    trainer.train(resume_from_checkpoint=str(ctx.resume_from) if ctx.resume_from else None)
    best = best_checkpoint(ctx, trainer, eval_dataset is not None)
    metrics = trainer.evaluate() if eval_dataset is not None else {}

    # -- save -------------------------------------------------------------------------------------
    ctx.output_dir.mkdir(parents=True, exist_ok=True)
    trainer.save_model(str(ctx.output_dir))
    tokenizer.save_pretrained(str(ctx.output_dir))

    # A reward model is not a policy: no samples; its held-out numbers come from the evaluation.
    history = trainer.state.log_history
    accuracy = metric_history(history, "accuracy")
    margin = metric_history(history, "margin")
    losses = metric_history(history, "loss")
    stop_reason = forgetting.stop_reason()
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
        **best,
    }
    if stopped:
        result["reason"] = stop_reason or "stop requested"
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in result.items()}
