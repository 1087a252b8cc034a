"""The plan's optimisation settings as `transformers.TrainingArguments` keywords, shared by every stage.

Each stage builds its TRL config (SFTConfig, RewardConfig, DPOConfig, ...)
from `training_kwargs(ctx, precision, has_eval)` plus its own fields, so the
learning rate, schedule, batch shape, precision, optimizer, seed and the
logging / eval / checkpoint intervals mean the same thing in every stage.
The preference stages use `trl_args(ctx, has_eval, config_cls)`: the same
mapping, kept to the fields their config class has, with DPO and PPO at
`preference.learning_rate` when the plan sets one.

Pure mapping: imports transformers only to ask which checkpointing option name it has.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from advisor.plan import Plan
from trainer.context import RunContext
from trainer.models import Precision, resolve_precision
from trainer.rundir import TENSORBOARD_DIR

#: The plan's optimizer names -> transformers' `optim` names.
OPTIMIZERS = {
    "adamw": "adamw_torch",
    "adamw_8bit": "adamw_bnb_8bit",
    "paged_adamw_8bit": "paged_adamw_8bit",
    "sgd": "sgd",
    "adafactor": "adafactor",
}


def optimizer_name(plan: Plan) -> tuple[str, str | None]:
    """transformers' optimizer name for the plan, and a note when it had to change (no bitsandbytes)."""
    name = OPTIMIZERS[plan.method.optimizer]
    if name in ("adamw_bnb_8bit", "paged_adamw_8bit"):
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            return "adamw_torch", f"optimizer {plan.method.optimizer} needs bitsandbytes, which is not installed: using adamw"
    return name, None


def training_kwargs(ctx: RunContext, precision: Precision, has_eval: bool) -> dict:
    """TrainingArguments keywords for the plan: every optimisation setting, mapped.

    Checkpoints go to `ctx.checkpoints_dir` (checkpoint-<step>/); metrics go to
    the plan's experiment logger (`report_to`) besides events.jsonl; progress bars are off (events.jsonl is the progress
    report). Without `save_steps` a checkpoint is written only when a stop is
    requested (the final weights go to the output directory); without
    `eval_steps` the stage evaluates once at the end.
    """
    plan = ctx.plan
    training = plan.training
    optim, _ = optimizer_name(plan)
    kwargs = dict(
        output_dir=str(ctx.checkpoints_dir),
        learning_rate=training.learning_rate,
        # transformers reads a float below 1 as a share of the total steps.
        warmup_steps=float(training.warmup_ratio),
        lr_scheduler_type=training.lr_scheduler,
        num_train_epochs=float(training.epochs),
        max_steps=training.max_steps if training.max_steps is not None else -1,
        per_device_train_batch_size=training.micro_batch,
        per_device_eval_batch_size=training.micro_batch,
        gradient_accumulation_steps=training.grad_accum,
        weight_decay=training.weight_decay,
        max_grad_norm=training.max_grad_norm,
        optim=optim,
        seed=training.seed,
        data_seed=training.seed,
        bf16=precision.bf16,
        fp16=precision.fp16,
        use_cpu=precision.device == "cpu",
        logging_strategy="steps",
        logging_steps=training.logging_steps,
        logging_first_step=True,
        # Log a NaN or infinite loss as it is (transformers' default reports the running mean instead), so
        # trainer.callbacks.NonFiniteCallback sees it and the run fails rather than "finishing" with loss 0.0.
        logging_nan_inf_filter=False,
        save_strategy="steps" if training.save_steps else "no",
        save_steps=training.save_steps or 500,
        save_total_limit=training.keep_checkpoints,
        eval_strategy="steps" if (has_eval and training.eval_steps) else "no",
        eval_steps=training.eval_steps if (has_eval and training.eval_steps) else None,
        report_to=report_to(ctx),
        run_name=ctx.run_dir.name,
        project="tunewise",  # Trackio's project (local logging unless the environment names a Space)
        disable_tqdm=True,
        dataloader_num_workers=0,
        remove_unused_columns=True,
        # Under DDP only some LoRA parameters may be used in a step on tiny batches;
        # with frozen bases, unused-parameter detection just costs time.
        ddp_find_unused_parameters=False,
        # Liger's kernels (pre-flight refused them without a GPU or the package): transformers patches the
        # model's RMSNorm / SwiGLU / RoPE, TRL's SFT and DPO use its fused linear cross-entropy.
        use_liger_kernel=bool(plan.method.use_liger_kernel),
    )
    kwargs.update(_checkpointing_kwargs(plan.method.gradient_checkpointing))
    kwargs.update(early_stopping_kwargs(plan, has_eval)[0])
    return kwargs


def early_stopping_on(plan: Plan, has_eval: bool) -> bool:
    """Early stopping applies: a patience is set and this stage evaluates during training."""
    return bool(plan.training.early_stopping_patience) and has_eval and bool(plan.training.eval_steps)


def early_stopping_kwargs(plan: Plan, has_eval: bool) -> tuple[dict, str | None]:
    """TrainingArguments for early stopping, and a note when the checkpoint interval had to change.

    transformers' EarlyStoppingCallback needs the best model tracked (load_best_model_at_end on
    eval_loss, lower is better), and the best is only known at a save, so checkpoints are written at
    evaluations: save_steps must be a multiple of eval_steps. Unset, it becomes eval_steps; not a multiple,
    it becomes eval_steps too (said in a notice). At the end the Trainer loads the best checkpoint, so the
    output folder (what merge, export and samples read) holds the best weights."""
    if not early_stopping_on(plan, has_eval):
        return {}, None
    every = plan.training.eval_steps
    save = plan.training.save_steps
    note = None
    if save is None:
        save = every
    elif save % every:
        note = (f"early stopping keeps the best checkpoint, so one is saved at every evaluation: checkpoint "
                f"interval {save} is not a multiple of the eval interval {every}, using {every}")
        save = every
    kwargs = dict(load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=False,
                  save_strategy="steps", save_steps=save)
    return kwargs, note


#: The package each experiment logger needs, and how to get it.
LOGGER_PACKAGES = {"tensorboard": ("tensorboard", "pip install tensorboard"),
                   "trackio": ("trackio", "pip install trackio"),
                   "wandb": ("wandb", "pip install wandb")}


def check_report_to(plan: Plan) -> None:
    """Refuse an experiment logger that cannot run here (pre-flight): its package missing, or for Weights &
    Biases no way to log in; the message names the install or the setting."""
    import importlib.util

    from advisor.errors import TunewiseError

    chosen = plan.training.report_to
    if chosen == "none":
        return
    module, install = LOGGER_PACKAGES[chosen]
    if importlib.util.find_spec(module) is None:
        raise TunewiseError(f"training.report_to: {chosen} is not installed here: run `{install}`, "
                            "or set report_to to none (events.jsonl and the wizard's charts need nothing)",
                            field="training.report_to")
    if chosen == "wandb" and not os.environ.get("WANDB_API_KEY") and os.environ.get("WANDB_MODE") not in (
            "offline", "disabled", "dryrun") and not _wandb_logged_in():
        raise TunewiseError("training.report_to: wandb needs an account: set WANDB_API_KEY (or run `wandb login`), "
                            "or set WANDB_MODE=offline to keep the logs on this machine (`wandb sync` uploads them later)",
                            field="training.report_to")


def _wandb_logged_in() -> bool:
    """`wandb login` writes the key into ~/.netrc under api.wandb.ai."""
    netrc = Path(os.environ.get("NETRC") or Path.home() / ".netrc")
    try:
        return "api.wandb.ai" in netrc.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False


def report_to(ctx: RunContext) -> str:
    """transformers' `report_to` for the plan. TensorBoard writes into <run>/tensorboard (transformers 5 reads
    the folder from TENSORBOARD_LOGGING_DIR; this process is the run's own); Trackio and W&B name the run by
    its id, in a project named "tunewise" (for W&B unless WANDB_PROJECT names another)."""
    chosen = ctx.plan.training.report_to
    if chosen == "tensorboard":
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(ctx.run_dir / TENSORBOARD_DIR)
    elif chosen == "wandb":
        os.environ.setdefault("WANDB_PROJECT", "tunewise")
    return chosen


def trl_args(ctx: RunContext, has_eval: bool, config_cls) -> dict:
    """Keyword arguments for a TRL config class (RewardConfig, DPOConfig, PPOConfig, RLOOConfig,
    GRPOConfig): `training_kwargs` for this machine's precision, keeping only the fields
    `config_cls` has."""
    args = training_kwargs(ctx, resolve_precision(ctx.plan), has_eval)
    if ctx.plan.stage in ("dpo", "ppo") and ctx.plan.preference.learning_rate is not None:
        # A pipeline's preference steps train at their own (much smaller) rate; its SFT and RM steps do not.
        args["learning_rate"] = ctx.plan.preference.learning_rate
    # TRL's preference collators need their own columns (prompt/chosen/rejected, chosen_ids, ...).
    args["remove_unused_columns"] = False
    known = {f.name for f in dataclasses.fields(config_cls)}
    return {key: value for key, value in args.items() if key in known}


def _checkpointing_kwargs(enabled: bool) -> dict:
    """Activation (gradient) checkpointing, under the name this transformers version uses.

    Always explicit: TRL's configs default it to on, the plan decides. Non-reentrant
    checkpointing works with a frozen base (LoRA) without forcing gradients on the inputs.
    """
    from transformers import TrainingArguments

    options = {"use_reentrant": False} if enabled else None
    if "activation_checkpointing" in TrainingArguments.__dataclass_fields__:  # transformers >= 5.24
        return {"activation_checkpointing": enabled, "activation_checkpointing_kwargs": options}
    return {"gradient_checkpointing": enabled, "gradient_checkpointing_kwargs": options}
