"""The trainer's side effects as `transformers.TrainerCallback`s: events out, stop requests in.

- `EventsCallback(ctx)` turns the Trainer's hooks into events.jsonl records:
  `train_begin` (max_steps, num_train_epochs, start_step), `log` (the
  trainer's metric keys unchanged: loss, learning_rate, grad_norm, and the TRL
  stages' rewards/margins, objective/kl, ...; plus epoch), `eval` (eval
  metrics), `checkpoint` (its path) and `train_end` (the Trainer's run summary:
  train_runtime, train_loss, ...).
- `StopCallback(ctx)` ends training cleanly when a stop was requested (STOP
  file or SIGTERM): after the current optimizer step it asks the Trainer to
  save a checkpoint and stop. Under DDP the ranks agree first (a stop seen by
  any rank stops them all at the same step), so no rank waits forever in a
  collective the others skipped. `request_stop(ctx, reason)` is how a
  monitor inside the process asks for the same thing.

Only rank 0 writes events (`ctx.emit` does that). Every stage uses both
callbacks, so SFT, reward model, DPO and PPO runs report the same way.
"""

from __future__ import annotations

from pathlib import Path

from transformers import TrainerCallback

from trainer.context import STOP_FILE, RunContext

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
