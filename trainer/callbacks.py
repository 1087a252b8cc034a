"""The trainer's side effects as `transformers.TrainerCallback`s: events out, stop requests in.

- `EventsCallback(ctx)` turns the Trainer's hooks into events.jsonl records:
  `train_begin` (max_steps, num_train_epochs, start_step), `log` (the
  trainer's metric keys unchanged: loss, learning_rate, grad_norm, and the TRL
  stages' rewards/margins, objective/kl, ...; plus epoch and the measured
  memory, `memory/...`, see trainer.memwatch), `eval` (eval metrics),
  `checkpoint` (its path) and `train_end` (the Trainer's run summary:
  train_runtime, train_loss, ...).
- `StopCallback(ctx)` ends training cleanly when a stop was requested (STOP
  file or SIGTERM): after the current optimizer step it asks the Trainer to
  save a checkpoint and stop. Under DDP the ranks agree first (a stop seen by
  any rank stops them all at the same step), so no rank waits forever in a
  collective the others skipped. `request_stop(ctx, reason)` is how a
  monitor inside the process asks for the same thing.
- `NonFiniteCallback(ctx)` fails the run the moment training stops being
  numbers: a NaN or infinite training loss (`loss`, PPO's `loss/*`, the
  final `train_loss`) or gradient norm in a log, or non-finite trainable
  weights at the end. It writes an `alert` event (kind `non_finite`) and
  raises `NonFiniteTraining`, so the stage saves nothing and the runner
  records `failed` with the message (what, at which step, what to do).

Only rank 0 writes events (`ctx.emit` does that). Every stage uses these
callbacks (`callbacks_for(ctx)` gives all three), so SFT, reward model, DPO
and PPO runs report the same way.

Two helpers every stage shares sit beside them: `with_penalty(trainer_cls,
penalty_fn)`, the Trainer subclass that adds EWC's penalty to the training
loss once per optimizer step, and `metric_history(log_history, key)`, one
metric's finite values from `trainer.state.log_history`.
"""

from __future__ import annotations

import math
from pathlib import Path

from transformers import TrainerCallback

from advisor.errors import TunewiseError
from trainer.context import RunContext
from trainer.rundir import STOP_FILE

#: Keys of the Trainer's end-of-training summary log (reported as `train_end`, not `log`).
_SUMMARY_KEYS = ("train_runtime", "train_samples_per_second", "train_steps_per_second", "total_flos")


class EventsCallback(TrainerCallback):
    """Writes the Trainer's progress to events.jsonl."""

    def __init__(self, ctx: RunContext):
        self.ctx = ctx

    def on_train_begin(self, args, state, control, **kwargs):
        self.ctx.emit(
            "train_begin",
            step=state.global_step,
            max_steps=state.max_steps,
            num_train_epochs=state.num_train_epochs,
            start_step=state.global_step,
            resumed_from=str(self.ctx.resume_from) if self.ctx.resume_from else None,
        )

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = dict(logs or {})
        if not logs:
            return
        if any(key in logs for key in _SUMMARY_KEYS):
            self.ctx.emit("train_end", step=state.global_step, **logs)
            return
        if any(key.startswith("eval_") for key in logs):
            return  # on_evaluate reports these
        logs.setdefault("epoch", state.epoch)
        # Every rank logs at the same steps, so the per-rank gather inside meets all of them.
        from trainer.memwatch import measured_memory

        logs.update(measured_memory())
        self.ctx.emit("log", step=state.global_step, **logs)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        metrics = dict(metrics or {})
        metrics.setdefault("epoch", state.epoch)
        self.ctx.emit("eval", step=state.global_step, **metrics)

    def on_save(self, args, state, control, **kwargs):
        path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        self.ctx.emit("checkpoint", step=state.global_step, path=str(path))


def _any_rank(flag: bool) -> bool:
    """True when `flag` is true on any process (a no-op outside torch.distributed)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return flag
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    if device == "cuda":
        device = f"cuda:{torch.cuda.current_device()}"
    value = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def stop_reason(ctx: RunContext) -> str:
    """Why a stop was requested: the STOP file's text (written by `tunewise stop` or a monitor), else a signal."""
    try:
        text = (ctx.run_dir / STOP_FILE).read_text(encoding="utf-8").strip()
    except OSError:
        text = ""
    return text or "stop requested (signal)"


def request_stop(ctx: RunContext, reason: str) -> None:
    """Ask the running training to save and stop after the current step, saying why.

    For monitors inside the training process (forgetting threshold, KL alerts):
    writes the STOP file, which every rank checks at each step end.
    """
    if ctx.rank == 0:
        (ctx.run_dir / STOP_FILE).write_text(reason + "\n", encoding="utf-8")
    ctx._signalled.set()


class StopCallback(TrainerCallback):
    """Saves and stops after the current step once a stop is requested; `stopped`/`reason` tell the stage."""

    def __init__(self, ctx: RunContext):
        self.ctx = ctx
        self.stopped = False
        self.reason: str | None = None

    def on_step_end(self, args, state, control, **kwargs):
        if self.stopped:
            return control
        if _any_rank(self.ctx.stop_requested()):
            self.stopped = True
            self.reason = stop_reason(self.ctx)
            control.should_save = True
            control.should_training_stop = True
        return control


def callbacks_for(ctx: RunContext, has_eval: bool = False) -> list:
    """The callbacks every stage ends its list with: events, cooperative stop, early stopping when the plan
    asks for it and the stage evaluates, non-finite failure (last, so the log it fails on is written first)."""
    return [EventsCallback(ctx), StopCallback(ctx), *early_stopping_callbacks(ctx, has_eval), NonFiniteCallback(ctx)]


def early_stopping_callbacks(ctx: RunContext, has_eval: bool) -> list:
    """transformers' EarlyStoppingCallback with the plan's patience and threshold (empty when off); says so in
    a notice, with the checkpoint interval's change if there was one (trainer.training_args)."""
    from transformers import EarlyStoppingCallback

    from trainer.training_args import early_stopping_kwargs, early_stopping_on

    plan = ctx.plan
    if not early_stopping_on(plan, has_eval):
        if plan.training.early_stopping_patience:
            ctx.emit("notice", message="early stopping is off for this stage: it has no held-out data to evaluate")
        return []
    _, note = early_stopping_kwargs(plan, has_eval)
    if note:
        ctx.emit("notice", message=note)
    training = plan.training
    ctx.emit("notice", message=f"early stopping: the run stops after {training.early_stopping_patience} evaluations "
             f"(every {training.eval_steps} steps) without an eval loss {training.early_stopping_threshold:g} below "
             "the best, and the output keeps the best checkpoint")
    return [EarlyStoppingCallback(early_stopping_patience=training.early_stopping_patience,
                                  early_stopping_threshold=training.early_stopping_threshold)]


def best_checkpoint(ctx: RunContext, trainer, has_eval: bool) -> dict:
    """After training with early stopping: emit `best_checkpoint` (its step, eval loss and path, whether the
    run stopped early) and return those numbers for the stage's result; {} when early stopping is off."""
    from trainer.rundir import checkpoint_step
    from trainer.training_args import early_stopping_on

    state = trainer.state
    if not early_stopping_on(ctx.plan, has_eval) or not state.best_model_checkpoint:
        return {}
    path = Path(state.best_model_checkpoint)
    best = {"best_step": checkpoint_step(path), "best_eval_loss": state.best_metric,
            "early_stopped": state.global_step < state.max_steps and not ctx.stop_requested()}
    ctx.emit("best_checkpoint", step=best["best_step"], eval_loss=state.best_metric, path=str(path),
             stopped_at=state.global_step, early_stopped=best["early_stopped"])
    return best


def metric_history(log_history: list[dict], key: str) -> list[float]:
    """The finite values `key` took in a Trainer's `state.log_history`, in order."""
    return [entry[key] for entry in log_history
            if isinstance(entry.get(key), (int, float)) and math.isfinite(entry[key])]


def with_penalty(trainer_cls, penalty_fn):
    """`trainer_cls` whose training loss has `penalty_fn(model)` added (EWC); unchanged when penalty_fn is None.

    The penalty counts once per optimizer step, and only while training (an eval loss stays the
    task's loss). `Trainer.training_step` divides each micro-batch's loss by the accumulation steps
    unless the loss is already normalised over the whole accumulated batch; the subclass asks the
    Trainer's own rule which case it is in:

    - SFTTrainer: the model accepts loss kwargs, so with `num_items_in_batch` the loss is a sum over
      the accumulated batch's tokens divided by their count and is not divided again; the penalty is
      divided here, so the accumulated micro-batches add up to one penalty.
    - DPOTrainer, RewardTrainer (TRL 1.12): they compute their own per-batch mean loss and set
      `model_accepts_loss_kwargs = False`, so the Trainer divides loss + penalty by the accumulation
      steps itself; the penalty is left as it is.
    """
    if penalty_fn is None:
        return trainer_cls

    class PenalizedTrainer(trainer_cls):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss, outputs = super().compute_loss(
                model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
            )
            if model.training:
                penalty = penalty_fn(model)
                if _loss_scaled_for_accumulation(self, num_items_in_batch):
                    penalty = penalty / self.current_gradient_accumulation_steps
                loss = loss + penalty
            return (loss, outputs) if return_outputs else loss

    PenalizedTrainer.__name__ = f"Penalized{trainer_cls.__name__}"
    return PenalizedTrainer


def _loss_scaled_for_accumulation(trainer, num_items_in_batch) -> bool:
    """Whether `Trainer.training_step` will take this loss as already scaled for gradient accumulation
    (its own test, transformers 5.24: `loss_is_scaled_for_ga` when a subclass sets it, else a loss
    normalised by `num_items_in_batch` in the model or in `compute_loss_func`)."""
    explicit = getattr(trainer, "loss_is_scaled_for_ga", None)
    if explicit is not None:
        return bool(explicit)
    return bool((trainer.model_accepts_loss_kwargs and num_items_in_batch is not None)
                or trainer.compute_loss_func is not None)


# -- non-finite training ---------------------------------------------------------------------------

#: A float16 loss scaler skips a step whose gradients overflowed and halves its scale; after this many
#: logs in a row with a non-finite gradient norm (the scale down by 2^10) it is divergence, not overflow.
FP16_OVERFLOW_LOGS = 10


class NonFiniteTraining(TunewiseError):
    """Training produced a NaN or infinite loss, gradient norm or weight; the run fails instead of saving it."""


def _watched(key: str) -> bool:
    """Log keys that must stay finite: the training loss of every stage (`loss`; PPO's `loss/policy_avg`,
    `loss/value_avg`; the run's mean `train_loss`) and the gradient norm before clipping."""
    return key in ("loss", "train_loss", "grad_norm") or key.startswith("loss/")


def _as_float(value) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if hasattr(value, "item") and getattr(value, "numel", lambda: 1)() == 1:  # a 0-d tensor
        try:
            return float(value.item())
        except (TypeError, ValueError, RuntimeError):
            return None
    return None


class NonFiniteCallback(TrainerCallback):
    """Ends the run with a clear failure when the loss, the gradient norm or the weights stop being numbers.

    Once a loss is NaN the optimizer writes NaN into every weight it updates, and nothing after that step
    can recover; saving would hand on a model that only produces NaN. So: an `alert` event, then
    `NonFiniteTraining` raised from the hook, which ends `Trainer.train()` before any save of that step
    (the Trainer logs, then evaluates, then saves). The logged numbers are the same on every rank (the
    Trainer averages the loss over processes and the gradient norm is global), so under DDP every rank
    raises at the same step. The runner turns the error into the `failed` event.
    """

    def __init__(self, ctx: RunContext):
        self.ctx = ctx
        self.overflow_logs = 0

    def on_log(self, args, state, control, logs=None, **kwargs):
        bad = {}
        for key, value in (logs or {}).items():
            number = _as_float(value)
            if _watched(key) and number is not None and not math.isfinite(number):
                bad[key] = number
        if not bad:
            self.overflow_logs = 0
            return
        if set(bad) == {"grad_norm"} and getattr(args, "fp16", False):
            # With a float16 loss scaler an overflowing step is skipped (weights untouched) and the scale
            # halved: normal at the start of fp16 training. Only a long run of them is divergence.
            self.overflow_logs += 1
            if self.overflow_logs < FP16_OVERFLOW_LOGS:
                return
        self._fail(args, state, ", ".join(f"{key} is {value}" for key, value in bad.items()), sorted(bad))

    def on_train_end(self, args, state, control, model=None, **kwargs):
        # The logs see every optimizer step's loss; this catches the rest (a last step that was not logged,
        # a model that arrived with broken weights and was never updated). Trainable weights only: a frozen
        # (possibly quantized) base is not what this run produced.
        bad_names = []
        if model is not None:
            import torch

            with torch.no_grad():
                for name, parameter in model.named_parameters():
                    # A sum is NaN or infinite when any element is (trained weights are far below fp32's
                    # 3e38), and unlike isfinite(parameter) it needs no temporary the size of the tensor.
                    if parameter.requires_grad and parameter.numel() and not math.isfinite(
                            float(parameter.sum(dtype=torch.float32))):
                        bad_names.append(name)
        if _any_rank(bool(bad_names)):  # under sharding each rank holds a slice: agree before failing
            where = f" ({len(bad_names)} tensors, e.g. {bad_names[0]})" if bad_names else " (on another process)"
            self._fail(args, state, f"the trained weights hold NaN or infinite values{where}", ["weights"])

    def _fail(self, args, state, what: str, keys: list[str]) -> None:
        step = state.global_step
        plan = self.ctx.plan
        advice = []
        if getattr(args, "fp16", False):
            advice.append("float16 overflows above 65504: use bf16 (or fp32) if the GPU has it")
        advice.append(f"lower the learning rate (now {plan.training.learning_rate:g}) by 10x or more, with warmup")
        if plan.forgetting.ewc_lambda > 0:
            advice.append(f"lower forgetting.ewc_lambda (now {plan.forgetting.ewc_lambda:g})")
        advice.append("check the data for empty, enormous or garbled examples")
        advice.append("check that the starting model's weights are finite (a damaged download or checkpoint)")
        message = (f"training diverged at step {step}: {what}. The run stopped without saving these weights "
                   f"(they are no longer numbers). To fix it: {'; '.join(advice)}.")
        self.ctx.emit("alert", step=step, kind="non_finite", message=message, action="stop", non_finite=keys)
        raise NonFiniteTraining(message)
