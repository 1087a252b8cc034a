"""DPO stage: TRL's DPOTrainer on prompt/chosen/rejected pairs (the guide's DPO section).

setup -> train -> save, mapped from the plan:

- policy: the plan's `preference.sft_model` (a run id, run directory or model;
  an SFT adapter is merged first) or the base model;
- reference: with LoRA / QLoRA none is loaded: TRL computes the reference
  log-probs with the adapter disabled. With full fine-tuning a frozen copy in
  the plan's precision. (The planner's memory model assumes exactly this.)
- beta from `preference.beta`; TRL's metrics are logged unchanged:
  `loss`, `rewards/chosen`, `rewards/rejected`, `rewards/margins`,
  `rewards/accuracies`, `logps/chosen`, `logps/rejected`, ...
- every `preference.sample_every` steps (and at step 0) a `sample` event
  with a real KL estimate on policy samples, the reward (implicit, or the
  reward model's when `preference.reward_model` is set), diversity and
  held-out preference accuracy (see trainer/sampling.py), so a DPO run has
  a reward-vs-KL curve too;
- the preference monitors watch every event (trainer/monitors.py);
- the forgetting monitor and EWC from trainer/forgetting.py (replay is off:
  a preference set holds pairs, not text); EWC's penalty is added to the
  training loss once per optimizer step (`trainer.callbacks.with_penalty`).
"""

from __future__ import annotations

import torch
from datasets import Dataset
from trl import DPOConfig, DPOTrainer

from trainer.callbacks import best_checkpoint, callbacks_for, metric_history, with_penalty
from trainer.context import stage_result
from trainer.data import conversational, load_preference_rows
from trainer.forgetting import PAIRS_NO_REPLAY, setup_forgetting
from trainer.models import load_model, load_tokenizer, lora_config
from trainer.monitors import monitored_context
from trainer.sampling import SampleCallback
from trainer.sources import policy_start, reward_model_dir
from trainer.training_args import trl_args


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

    use_adapter = plan.method.method in ("lora", "qlora")
    model = load_model(plan, "causal_lm", trainable=True, model_name=str(policy_dir), adapters=False)
    # Full fine-tuning: a frozen copy is the reference. LoRA/QLoRA: None, and TRL disables the adapter.
    reference = None if use_adapter else load_model(plan, "causal_lm", trainable=False, model_name=str(policy_dir),
                                                     adapters=False)
    reward_model = None
    if plan.preference.reward_model:  # scores the samples (the compare pipeline: the same scale as PPO's)
        reward_model = load_model(plan.with_overrides({"method.method": "full"}), "seq_cls", trainable=False,
                                  model_name=str(reward_model_dir(ctx)), adapters=False)

    forgetting = setup_forgetting(ctx, model, tokenizer, train_dataset, replay=PAIRS_NO_REPLAY)
    # A pilot's candidate is scored by its held-out DPO loss alone: no policy samples.
    prompts = [] if ctx.measure_only else [r["prompt"] for r in heldout]
    sampler = SampleCallback(ctx, tokenizer, prompts, pairs=heldout, reference=reference,
                             reward_model=reward_model, beta=plan.preference.beta)
    config = DPOConfig(
        **trl_args(ctx, eval_dataset is not None, DPOConfig),
        beta=plan.preference.beta,
        max_length=plan.training.seq_len,
        precompute_ref_log_probs=False,
    )
    trainer = with_penalty(DPOTrainer, forgetting.penalty)(
        model=model,
        ref_model=reference,
        args=config,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=lora_config(plan, "causal_lm") if use_adapter else None,
        # Forgetting first (its callback adds keys to the logs), then sampling, then events and stop.
        callbacks=[*forgetting.callbacks, sampler, *callbacks_for(ctx, eval_dataset is not None)],
    )

    # -- train ------------------------------------------------------------------------------------
    trainer.train(resume_from_checkpoint=str(ctx.resume_from) if ctx.resume_from else None)
    best = best_checkpoint(ctx, trainer, eval_dataset is not None)
    if eval_dataset is not None:
        trainer.evaluate()

    # -- save (not for a pilot's candidate) ---------------------------------------------------------
    if not ctx.measure_only:
        ctx.output_dir.mkdir(parents=True, exist_ok=True)
        trainer.save_model(str(ctx.output_dir))
        tokenizer.save_pretrained(str(ctx.output_dir))

    history = trainer.state.log_history
    losses = metric_history(history, "loss")
    margins = metric_history(history, "rewards/margins")
    return stage_result(
        ctx, False, forgetting, sampler.history,
        steps=trainer.state.global_step,
        first_loss=losses[0] if losses else None,
        last_loss=losses[-1] if losses else None,
        first_margin=margins[0] if margins else None,
        last_margin=margins[-1] if margins else None,
        **best,
    )
