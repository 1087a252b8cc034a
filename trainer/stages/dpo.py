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
- the forgetting monitor and EWC from trainer/forgetting.py.
"""

from __future__ import annotations

import math

import torch
from datasets import Dataset
from trl import DPOConfig, DPOTrainer

from trainer.forgetting import setup_forgetting
from trainer.models import load_model, load_tokenizer, lora_config
from trainer.preference import (
    callbacks_for,
    conversational,
    load_preference_rows,
    monitored_context,
    policy_result,
    preference_forgetting_ctx,
    trl_args,
)
from trainer.sources import merged_model_dir, policy_start, resolve_model_source
from trainer.sampling import SampleCallback


def _with_penalty(trainer_cls, penalty_fn):
    """The trainer class with EWC's penalty added to its training loss (unchanged when None)."""
    if penalty_fn is None:
        return trainer_cls

    class WithPenalty(trainer_cls):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                          num_items_in_batch=num_items_in_batch)
            if return_outputs:
                loss, outputs = result
                return loss + penalty_fn(model), outputs
            return result + penalty_fn(model)

    return WithPenalty


def _history(log_history: list[dict], key: str) -> list[float]:
    return [entry[key] for entry in log_history if isinstance(entry.get(key), (int, float))
            and math.isfinite(entry[key])]


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

    use_adapter = plan.method.method in ("lora", "qlora")
    model = load_model(plan, "causal_lm", trainable=True, model_name=str(start), adapters=False)
    # Full fine-tuning: a frozen copy is the reference. LoRA/QLoRA: None, and TRL disables the adapter.
    reference = None if use_adapter else load_model(plan, "causal_lm", trainable=False, model_name=str(start),
                                                     adapters=False)

    reward_model = None
    if plan.preference.reward_model:
        rm_dir = merged_model_dir(resolve_model_source(plan.preference.reward_model, "preference.reward_model",
                                                      ctx.run_dir), "seq_cls", ctx.run_dir)
        reward_model = load_model(plan.with_overrides({"method.method": "full"}), "seq_cls", trainable=False,
                                  model_name=str(rm_dir), adapters=False)

    fctx = preference_forgetting_ctx(ctx)
    train_dataset, forgetting_callbacks, penalty_fn = setup_forgetting(fctx, model, tokenizer, train_dataset)
    sampler = SampleCallback(ctx, tokenizer, [r["prompt"] for r in heldout], pairs=heldout, reference=reference,
                             reward_model=reward_model, beta=plan.preference.beta)

    t = plan.training
    config = DPOConfig(
        **trl_args(ctx, eval_dataset is not None, DPOConfig),
        beta=plan.preference.beta,
        max_length=t.seq_len,
        precompute_ref_log_probs=False,
    )
    trainer_cls = _with_penalty(DPOTrainer, penalty_fn)
    trainer = trainer_cls(
        model=model,
        ref_model=reference,
        args=config,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=lora_config(plan, "causal_lm") if use_adapter else None,
        # Forgetting first (its callback adds keys to the logs), then sampling, then events and stop.
        callbacks=forgetting_callbacks + [sampler] + callbacks_for(ctx),
    )
    trainer.train(resume_from_checkpoint=str(ctx.resume_from) if ctx.resume_from else None)
    if eval_dataset is not None:
        trainer.evaluate()
    ctx.output_dir.mkdir(parents=True, exist_ok=True)
    trainer.save_model(str(ctx.output_dir))
    tokenizer.save_pretrained(str(ctx.output_dir))

    history = trainer.state.log_history
    losses = _history(history, "loss")
    margins = _history(history, "rewards/margins")
    return policy_result(
        ctx, False, sampler.history, forgetting_callbacks,
        steps=trainer.state.global_step,
        first_loss=losses[0] if losses else None,
        last_loss=losses[-1] if losses else None,
        first_margin=margins[0] if margins else None,
        last_margin=margins[-1] if margins else None,
    )
