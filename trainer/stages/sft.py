"""SFT stage: TRL's SFTTrainer with full fine-tuning, LoRA or QLoRA, mapped from the plan.

setup -> train -> save:

- setup: precision for this machine (`trainer.models.resolve_precision`),
  tokenizer, data (`trainer.data`: text, prompt/completion or chat messages,
  loss on the completion / assistant turns), the model with the plan's
  method (`trainer.models.load_model`), the forgetting monitor, replay and
  EWC (`trainer.forgetting.setup_forgetting`), and an `SFTConfig` carrying
  every plan setting (`trainer.training_args.training_kwargs` plus
  max_length = seq_len and packing).
- train: `SFTTrainer.train(resume_from_checkpoint=ctx.resume_from)` with
  `EventsCallback` (events.jsonl), `StopCallback` (cooperative stop) and
  `NonFiniteCallback` (a NaN / infinite loss fails the run, unsaved); with
  EWC the loss gets the penalty added in a small `SFTTrainer` subclass
  (`trainer.callbacks.with_penalty`, once per optimizer step).
- save: the adapter (LoRA / QLoRA) or the whole model, with the tokenizer,
  in `ctx.output_dir`, also when stopped early (a checkpoint for resuming is
  written then too); a learning-rate pilot's candidate (`ctx.measure_only`)
  saves nothing.

Returns {"status": "finished" | "stopped", "reason", "output_dir", "step",
"first_loss", "last_loss", "train_loss", eval metrics, forgetting summary}.
This module only runs inside the training process, so it imports torch and
TRL at the top.
"""

from __future__ import annotations

from transformers import set_seed
from trl import SFTConfig, SFTTrainer

from trainer.callbacks import (EventsCallback, NonFiniteCallback, StopCallback, best_checkpoint, early_stopping_callbacks,
                               metric_history, with_penalty)
from trainer.context import RunContext
from trainer.data import load_training_data, sft_loss_options
from trainer.forgetting import setup_forgetting
from trainer.models import load_model, load_tokenizer, resolve_precision, trainable_parameters
from trainer.training_args import optimizer_name, training_kwargs


def run(ctx: RunContext) -> dict:
    plan = ctx.plan

    def notify(message: str) -> None:
        ctx.emit("notice", message=message)

    # -- setup ------------------------------------------------------------------------------------
    precision = resolve_precision(plan)
    if precision.note:
        notify(precision.note)
    _, optimizer_note = optimizer_name(plan)
    if optimizer_note:
        notify(optimizer_note)
    set_seed(plan.training.seed)  # LoRA's initial A matrices and the data order depend on it

    tokenizer = load_tokenizer(plan)
    tokenizer.padding_side = "right"
    train_dataset, eval_dataset = load_training_data(plan, tokenizer, kind="sft", notify=notify)
    model = load_model(plan, "causal_lm", trainable=True, notify=notify)
    ctx.emit(
        "model_loaded",
        method=plan.method.method,
        device=precision.device,
        weights_dtype=precision.weights_dtype,
        quantized_bits=plan.method.quant_bits if plan.method.method == "qlora" else None,
        train_examples=len(train_dataset),
        eval_examples=len(eval_dataset) if eval_dataset is not None else 0,
        **trainable_parameters(model),
    )

    forgetting = setup_forgetting(ctx, model, tokenizer, train_dataset)
    train_dataset = forgetting.train_dataset

    config = SFTConfig(
        **training_kwargs(ctx, precision, has_eval=eval_dataset is not None),
        max_length=plan.training.seq_len,
        packing=plan.data.packing,
        dataset_text_field="text",
        **sft_loss_options(tokenizer, train_dataset),
    )
    stop = StopCallback(ctx)
    trainer = with_penalty(SFTTrainer, forgetting.penalty)(
        model=model,
        args=config,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        # The forgetting callbacks first: EWC adds `ewc_penalty` to each log before EventsCallback writes it;
        # NonFiniteCallback last, so the log it fails on is written first.
        callbacks=[*forgetting.callbacks, EventsCallback(ctx), stop,
                   *early_stopping_callbacks(ctx, eval_dataset is not None), NonFiniteCallback(ctx)],
    )
    if ctx.stop_requested() and ctx.resume_from is None:
        return {"status": "stopped", "reason": "stopped before training started", "step": 0}

    # -- train ------------------------------------------------------------------------------------
    result = trainer.train(resume_from_checkpoint=str(ctx.resume_from) if ctx.resume_from else None)
    state = trainer.state
    reason = stop.reason if stop.stopped else None
    if reason is None:
        reason = forgetting.stop_reason()

    summary: dict = {"step": state.global_step, "max_steps": state.max_steps, "train_loss": result.training_loss}
    losses = metric_history(state.log_history, "loss")
    if losses:
        summary.update(first_loss=losses[0], last_loss=losses[-1])
    if reason is None and eval_dataset is not None and not plan.training.eval_steps:
        summary.update(trainer.evaluate())  # "eval at the end only" (EventsCallback writes the event)
    summary.update(forgetting.summary())
    summary.update(best_checkpoint(ctx, trainer, eval_dataset is not None))

    # -- save -------------------------------------------------------------------------------------
    if ctx.measure_only:  # a pilot's candidate: the held-out loss is the result, not the weights
        return {"status": "stopped" if reason else "finished", "reason": reason, **summary}
    output_dir = ctx.output_dir
    trainer.save_model(str(output_dir))  # the adapter for LoRA / QLoRA, the whole model for full
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(str(output_dir))
    summary["output_dir"] = str(output_dir)
    if reason is not None:
        checkpoint = ctx.checkpoints_dir / f"checkpoint-{state.global_step}"
        return {"status": "stopped", "reason": reason, "checkpoint": str(checkpoint), **summary}
    return {"status": "finished", **summary}
