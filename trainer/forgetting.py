"""Catastrophic forgetting: the guide's monitor and two of its safeguards.

The guide ("Catastrophic Forgetting") asks for four things; this module does
the two that act inside a run and the monitor:

* Monitor: measure the loss (and perplexity) on original-domain text before
  training and every `forgetting.eval_every` steps; record the baseline, the
  current value and the degradation in `forgetting` events; when the loss
  rises more than `threshold_pct` above the baseline, raise an `alert` (once)
  and, if the plan says so, save and stop the run.
* Replay buffer: mix `replay_fraction` of original-domain examples into the
  training set ("1-10% pretraining data typically sufficient").
* Elastic weight consolidation: estimate the diagonal Fisher information of
  the trainable weights on original-domain batches before the first step and
  penalise moving important weights away from where they started.
* Lower learning rate and LoRA are choices the advisor makes in the plan;
  nothing here changes them.

Where the original-domain rows go. The file named by `original_data` is
split once, seeded: up to `max_eval_examples` rows are the monitor's held-out
set; the rest (or `replay_data`, when the plan names a separate file) feed
replay and the Fisher estimate, so neither safeguard trains on the very rows
the monitor measures. When replay or EWC needs rows from the same file, the
monitor takes at most half of it.

The one entry point a stage calls:

    forgetting = setup_forgetting(ctx, model, tokenizer, train_dataset)

returns a `Forgetting`: the `train_dataset` (with replay rows mixed in),
the `callbacks` for the Trainer (before the events callback, so the
`ewc_penalty` key they add to each log reaches events.jsonl) and the
`penalty` (None unless EWC is on; otherwise the stage's trainer adds
`penalty(model)` to its training loss, see `trainer.callbacks.with_penalty`).
A stage that cannot use a part switches it off (`replay=`, `monitor=`,
`ewc=`, with the reason it tells the user). After training,
`forgetting.stop_reason()` says whether the monitor stopped the run and
`forgetting.summary()` gives its numbers for the stage's result.

This module only runs inside the training process, so it imports torch at the top.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import TrainerCallback

from advisor.errors import DatasetError, TunewiseError
from trainer.callbacks import request_stop

STOP_REASON = "forgetting threshold exceeded"
EWC_STATE_FILE = "ewc_state.pt"
#: Why the preference stages (reward model, DPO, PPO) switch replay off: `setup_forgetting(..., replay=PAIRS_NO_REPLAY)`.
PAIRS_NO_REPLAY = ("Replay mixes original-domain text into the training data; preference stages train on pairs, so "
                   "replay is off for this stage (the monitor and EWC still apply).")


# -- original-domain text ----------------------------------------------------------------------


def load_texts(name: str, setting: str = "forgetting.original_data") -> list[str]:
    """Original-domain texts from a bundled name ("demo-original") or a file.

    Read with the dataset profiler's readers, so the files and errors are the
    training data's: JSONL / JSON / CSV / Parquet rows with a text column
    (text or content), or a .txt file with one text per non-blank line. A
    DatasetError names `setting`, the file and the bad row.
    """
    from advisor.profile import detect_format, normalize_record, read_records, resolve_dataset, validate_records

    try:
        path = resolve_dataset(name)
        rows = list(read_records(path))
        detected = detect_format((record for _, record in rows[:200]), "text", source=path.name)
        validate_records(rows, detected, path)
    except DatasetError as exc:
        raise DatasetError(
            f"{setting}: {exc} (original-domain data is plain text: a bundled name such as demo-original, "
            "or a JSONL/JSON/CSV/Parquet file with a text column, or a .txt file)",
            field=setting,
        ) from None
    texts = [normalize_record(record, detected)["text"] for _, record in rows]
    texts = [text for text in texts if text.strip()]
    if not texts:
        raise DatasetError(f"{setting}: {path} has no text", field=setting)
    return texts


@dataclass(frozen=True)
class OriginalSplit:
    """The original-domain rows, split between the monitor and the safeguards."""

    monitor: list[str]
    """Held-out texts the monitor measures."""
    pool: list[str]
    """Texts replay and the Fisher estimate may train on (never the monitor's)."""
    pool_source: str
    """Where the pool came from, in words, for events."""


def split_original(settings, seed: int, pool: bool | None = None) -> OriginalSplit:
    """Split `original_data` into the monitor's held-out rows and the safeguards' pool (seeded).

    `pool`: whether replay or EWC will draw on the pool (default: whether the settings turn either on).
    """
    needs_pool = (settings.replay_fraction > 0 or settings.ewc_lambda > 0) if pool is None else pool
    separate = getattr(settings, "replay_data", None)
    texts = load_texts(settings.original_data)
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    monitor_count = settings.max_eval_examples
    if needs_pool and not separate:
        # Keep at least half the file for replay / Fisher so they never see the monitor's rows.
        monitor_count = min(monitor_count, len(texts) // 2)
    monitor_count = max(1, min(monitor_count, len(texts)))
    monitor = [texts[i] for i in sorted(order[:monitor_count])]
    if separate:
        pool, source = load_texts(separate, "forgetting.replay_data"), separate
    else:
        pool = [texts[i] for i in sorted(order[monitor_count:])]
        source = f"{settings.original_data} (rows the monitor does not use)"
    if needs_pool and not pool:
        raise DatasetError(
            f"forgetting.original_data: {settings.original_data!r} has only {len(texts)} row(s), all needed by "
            "the monitor; replay and EWC need more original-domain rows: use a larger file or set forgetting.replay_data",
            field="forgetting.original_data",
        )
    return OriginalSplit(monitor=monitor, pool=pool, pool_source=source)


# -- batching and loss -------------------------------------------------------------------------


def make_batches(tokenizer, texts: list[str], seq_len: int, batch_size: int) -> list[dict]:
    """Tokenize (truncated to `seq_len` tokens) and pad into CPU batches with labels.

    Texts are sorted by length so a batch pads little; padding is masked out of
    the loss with label -100. Each batch records `tokens`, the number of
    predicted positions (length - 1 per row), for token-weighted averaging.
    """
    encoded = [tokenizer(text, truncation=True, max_length=seq_len)["input_ids"] for text in texts]
    encoded = sorted((ids for ids in encoded if len(ids) >= 2), key=len)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    batches = []
    for start in range(0, len(encoded), batch_size):
        rows = encoded[start : start + batch_size]
        width = max(len(ids) for ids in rows)
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, ids in enumerate(rows):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            attention_mask[i, : len(ids)] = 1
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        batches.append(
            {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "tokens": sum(len(r) - 1 for r in rows)}
        )
    if not batches:
        raise DatasetError("forgetting.original_data: every original-domain text is shorter than two tokens")
    return batches


def _device_of(model) -> torch.device:
    for parameter in model.parameters():
        if parameter.device.type != "meta":
            return parameter.device
    return torch.device("cpu")


def _batch_loss(model, batch: dict, device) -> torch.Tensor:
    """Mean next-token loss of one batch (the model's own loss: it shifts the labels)."""
    return model(
        input_ids=batch["input_ids"].to(device),
        attention_mask=batch["attention_mask"].to(device),
        labels=batch["labels"].to(device),
        use_cache=False,
    ).loss


def _autocast(device, precision: str):
    """The training precision's autocast for `amp` plans on a GPU; plain dtype otherwise."""
    if precision == "amp" and device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


@torch.no_grad()
def original_domain_loss(model, batches: list[dict], precision: str = "bf16") -> float:
    """Token-weighted mean loss over `batches`, in eval mode without gradients; restores the mode."""
    was_training = model.training
    model.eval()
    device = _device_of(model)
    total = torch.zeros((), dtype=torch.float32, device=device)
    tokens = 0
    try:
        with _autocast(device, precision):
            for batch in batches:
                # The model averages over the batch's predicted positions; weight by their count.
                # Summed on the device: one synchronisation per measurement, not per batch.
                total += _batch_loss(model, batch, device).float() * batch["tokens"]
                tokens += batch["tokens"]
    finally:
        if was_training:
            model.train()
    return float(total) / tokens


def _perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf


# -- elastic weight consolidation -------------------------------------------------------------


class EWC:
    """Elastic weight consolidation (Kirkpatrick et al., 2017), diagonal Fisher.

    penalty = ewc_lambda / 2 * sum_i F_i * (theta_i - theta*_i)^2

    theta* are the trainable weights before the first step; F_i is the mean of
    the squared gradients of the LM loss over original-domain batches (the
    usual batch-level empirical Fisher), normalised so that its mean over all
    trainable weights is 1. Raw Fisher values are tiny (about 1e-8 to 1e-4) and
    scale with the loss, so without normalisation a useful lambda would be
    anywhere from 1e2 to 1e8; normalised, ewc_lambda is the weight of a
    Fisher-weighted squared distance and comparable across models. The classic
    lambda is ewc_lambda / raw mean (reported as `classic_lambda`).

    Only trainable weights are anchored: with LoRA these are the adapters,
    which start at B = 0 and are already a small change, so EWC matters most
    for full fine-tuning. Memory: two fp32 copies of the trainable weights
    (anchor and Fisher), 8 bytes per trainable parameter. Not supported with
    zero3 / FSDP sharding (parameters are flattened and sharded there).
    """

    def __init__(self, ewc_lambda: float, batches: list[dict], precision: str, state_path: Path):
        self.ewc_lambda = float(ewc_lambda)
        self.batches = batches
        self.precision = precision
        self.state_path = state_path
        self.entries: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        """(parameter, anchor, normalised Fisher) per trainable tensor; parameters by reference,
        so a DDP wrapper or a `module.` prefix does not matter."""
        self.last_penalty: torch.Tensor | None = None
        self.stats: dict = {}

    def prepare(self, model, resume: bool) -> dict:
        """Compute (or, on resume, reload) the anchor and Fisher; returns stats for the `ewc` event."""
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise TunewiseError("forgetting.ewc_lambda: the model has no trainable parameters to protect")
        if resume and self.state_path.is_file():
            saved = torch.load(self.state_path, map_location="cpu", weights_only=True)  # tensors and numbers only: no pickle code
            if set(saved["anchor"]) == {name for name, _ in named}:
                self.entries = [
                    (p, saved["anchor"][name].to(p.device), saved["fisher"][name].to(p.device)) for name, p in named
                ]
                self.stats = dict(saved["stats"], reloaded=True)
                return self.stats
        started = time.perf_counter()
        fisher = self._fisher(model, named)
        raw_mean = sum(float(f.sum()) for f in fisher) / sum(f.numel() for f in fisher)
        raw_max = max(float(f.max()) for f in fisher)
        scale = 1.0 / raw_mean if raw_mean > 0 else 0.0
        self.entries = [(p, p.detach().float().clone(), f.mul_(scale)) for (_, p), f in zip(named, fisher)]
        self.stats = {
            "ewc_lambda": self.ewc_lambda,
            "classic_lambda": self.ewc_lambda * scale,
            "fisher_mean": raw_mean,
            "fisher_max": raw_max,
            "tensors": len(named),
            "parameters": sum(p.numel() for _, p in named),
            "batches": len(self.batches),
            "examples": sum(int(b["input_ids"].shape[0]) for b in self.batches),
            "seconds": round(time.perf_counter() - started, 3),
            "reloaded": False,
        }
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(
            {
                "anchor": {name: a.cpu() for (name, _), (_, a, _) in zip(named, self.entries)},
                "fisher": {name: f.cpu() for (name, _), (_, _, f) in zip(named, self.entries)},
                "stats": self.stats,
            },
            self.state_path,
        )
        return self.stats

    def _fisher(self, model, named) -> list[torch.Tensor]:
        was_training = model.training
        # Eval mode (no dropout) unless gradient checkpointing is on: in eval mode it is
        # skipped, and the full activations of a batch might not fit where training does.
        checkpointing = getattr(model, "is_activation_checkpointing", None)
        if checkpointing is None:  # transformers before the rename
            checkpointing = getattr(model, "is_gradient_checkpointing", False)
        if not checkpointing:
            model.eval()
        device = _device_of(model)
        fisher = [torch.zeros_like(p, dtype=torch.float32) for _, p in named]
        try:
            for batch in self.batches:
                for _, p in named:
                    p.grad = None
                with _autocast(device, self.precision):
                    loss = _batch_loss(model, batch, device)
                loss.backward()
                for f, (_, p) in zip(fisher, named):
                    if p.grad is not None:
                        f.add_(p.grad.detach().float().pow(2), alpha=1.0 / len(self.batches))
        finally:
            for _, p in named:
                p.grad = None  # leave no gradient behind for the first optimizer step
            model.train(was_training)
        return fisher

    def penalty(self, model=None) -> torch.Tensor:
        """ewc_lambda / 2 * sum F (theta - theta*)^2, differentiable; 0 before `prepare`."""
        if not self.entries:
            return torch.zeros(())
        total = sum((fisher * (p.float() - anchor).pow(2)).sum() for p, anchor, fisher in self.entries)
        value = 0.5 * self.ewc_lambda * total
        self.last_penalty = value.detach()
        return value


# -- the callback ----------------------------------------------------------------------------


class ForgettingCallback(TrainerCallback):
    """Measures original-domain loss, raises the forgetting alert, stops when asked; prepares EWC.

    After training: `stop_reason` (None, or "forgetting threshold exceeded"),
    `history` (one dict per measurement) and `summary()`.
    """

    def __init__(self, ctx, model, batches: list[dict] | None, ewc: EWC | None):
        self.ctx = ctx
        self.settings = ctx.plan.forgetting
        self.precision = ctx.plan.method.precision
        self.model = model
        self.batches = batches
        self.ewc = ewc
        self.baseline: float | None = None
        self.history: list[dict] = []
        self.alerted = False
        self.stop_reason: str | None = None
        self._last_step: int | None = None
        self._train_started: float | None = None
        self._monitor_seconds = 0.0

    # Trainer hooks
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        model = model if model is not None else self.model
        resumed = self.ctx.resume_from is not None
        self._train_started = time.perf_counter()
        if self.ewc is not None:
            stats = self.ewc.prepare(model, resume=resumed)
            self.ctx.emit("ewc", step=state.global_step, **stats)
        if self.batches is not None:
            self.baseline = self._previous_baseline() if resumed else None
            self._measure(model, state.global_step, control)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        # A stop saves first: at the step it is asked for, the checkpoint is written before anything is
        # measured (the measurement follows in on_train_end, after the save), so a forced kill cannot
        # catch the run measuring instead of saving.
        if self.ctx.stop_requested():
            return
        if self.batches is not None and state.global_step % self.settings.eval_every == 0:
            self._measure(model if model is not None else self.model, state.global_step, control)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        # A final measurement when the last step was not a multiple of eval_every.
        if self.batches is not None and self._last_step != state.global_step:
            self._measure(model if model is not None else self.model, state.global_step, control, final=True)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.ewc is not None and self.ewc.last_penalty is not None and logs is not None and "loss" in logs:
            logs["ewc_penalty"] = round(float(self.ewc.last_penalty), 6)

    # Measurement
    def _measure(self, model, step: int, control, final: bool = False) -> None:
        started = time.perf_counter()
        loss = original_domain_loss(model, self.batches, self.precision)
        finished = time.perf_counter()
        eval_ms = (finished - started) * 1000
        self._monitor_seconds += finished - started
        self._last_step = step
        if self.baseline is None:
            self.baseline = loss
        degradation = (loss - self.baseline) / self.baseline * 100 if self.baseline > 0 else 0.0
        record = {
            "baseline_loss": round(self.baseline, 6),
            "loss": round(loss, 6),
            "perplexity": round(_perplexity(loss), 4),
            "degradation_pct": round(degradation, 3),
            "threshold_pct": self.settings.threshold_pct,
            "examples": sum(int(b["input_ids"].shape[0]) for b in self.batches),
            "tokens": sum(b["tokens"] for b in self.batches),
            "eval_ms": round(eval_ms, 2),
        }
        if self._train_started is not None and step > 0:
            # Share of the training wall time so far spent measuring (baseline included).
            record["monitor_cost_pct"] = round(100 * self._monitor_seconds / (finished - self._train_started), 2)
        if self.ewc is not None and self.ewc.last_penalty is not None:
            record["ewc_penalty"] = round(float(self.ewc.last_penalty), 6)
        if final:
            record["final"] = True
        self.history.append(dict(record, step=step))
        self.ctx.emit("forgetting", step=step, **record)
        if degradation > self.settings.threshold_pct and not self.alerted:
            self.alerted = True
            stopping = self.settings.stop_on_threshold and not final
            message = (
                f"Original-domain loss rose {degradation:.1f}% above its starting value "
                f"({self.baseline:.3f} -> {loss:.3f}, perplexity {_perplexity(self.baseline):.1f} -> {_perplexity(loss):.1f}), "
                f"past the {self.settings.threshold_pct:g}% threshold: the model is forgetting what it knew. "
                + (
                    "Stopping the run (the checkpoint is saved)."
                    if stopping
                    else "Consider a lower learning rate, LoRA, a replay buffer or EWC."
                )
            )
            self.ctx.emit(
                "alert",
                step=step,
                kind="forgetting",
                message=message,
                degradation_pct=round(degradation, 3),
                threshold_pct=self.settings.threshold_pct,
                action="stop" if stopping else "warn",
            )
            if stopping:
                self.stop_reason = STOP_REASON
                # Save and stop at this step; the stage's stop path (STOP file, which every
                # DDP rank checks) records the reason and reports the run as stopped.
                control.should_save = True
                control.should_training_stop = True
                request_stop(self.ctx, STOP_REASON)

    def _previous_baseline(self) -> float | None:
        """On resume, the baseline this run measured before it was interrupted."""
        from trainer.events import read_all_events

        for event in read_all_events(self.ctx.events.path):
            if event.get("event") == "forgetting" and event.get("baseline_loss") is not None:
                return float(event["baseline_loss"])
        return None

    def summary(self) -> dict:
        """Key numbers for the stage's result dict."""
        if not self.history:
            return {}
        last = self.history[-1]
        costs = [h["eval_ms"] for h in self.history]
        return {
            "forgetting_baseline_loss": last["baseline_loss"],
            "forgetting_loss": last["loss"],
            "forgetting_degradation_pct": last["degradation_pct"],
            "forgetting_eval_ms": round(sum(costs) / len(costs), 2),
            "forgetting_monitor_cost_pct": last.get("monitor_cost_pct"),
        }


# -- replay ------------------------------------------------------------------------------------


def replay_rows(train_dataset, texts: list[str]) -> list[dict]:
    """Original-domain texts shaped like the training rows.

    * text datasets: a `text` row.
    * prompt/completion: an empty prompt and the text as the completion, so the
      loss (completion-only) covers the whole text, as in pretraining.
    * messages (chat): one assistant message holding the text. A dataset has one
      schema, so a bare `text` row cannot sit beside `messages` rows; rendering
      everything to text instead would put loss on the user turns and change
      the SFT objective. As an assistant turn the text is trained token by token
      (with assistant-only loss, the template's markers are not), which keeps
      the original domain's next-token statistics close to plain replay.
    Other columns of the training set are filled with None.
    """
    columns = train_dataset.column_names
    if "text" in columns:
        shaped = [{"text": t} for t in texts]
    elif "messages" in columns:
        shaped = [{"messages": [{"role": "assistant", "content": t}]} for t in texts]
    elif "prompt" in columns and "completion" in columns:
        if isinstance(train_dataset[0]["prompt"], list):  # conversational prompt/completion
            shaped = [
                {"prompt": [{"role": "user", "content": ""}], "completion": [{"role": "assistant", "content": t}]}
                for t in texts
            ]
        else:
            shaped = [{"prompt": "", "completion": t} for t in texts]
    else:
        raise TunewiseError(
            f"forgetting.replay_fraction: cannot mix original-domain text into a dataset with columns "
            f"{', '.join(columns)}; replay works with text, prompt/completion or messages datasets",
            field="forgetting.replay_fraction",
        )
    for row in shaped:
        for column in columns:
            row.setdefault(column, None)
    return shaped


def replay_count(train_rows: int, fraction: float) -> int:
    """Replay rows so that they make up `fraction` of the mixed set: r / (n + r) = fraction."""
    return round(fraction * train_rows / (1.0 - fraction))


def mix_replay(train_dataset, pool: list[str], fraction: float, seed: int):
    """The training set with original-domain rows appended; returns (dataset, details).

    Rows are drawn from `pool` without replacement while it lasts (then it is
    reused, reshuffled), seeded. They are appended: the Trainer's sampler
    shuffles the mixed set every epoch.
    """
    from datasets import Dataset, concatenate_datasets

    count = replay_count(len(train_dataset), fraction)
    if count == 0:
        return train_dataset, {"rows": 0, "train_rows": len(train_dataset), "fraction": fraction}
    rng = random.Random(seed)
    chosen: list[str] = []
    while len(chosen) < count:
        order = list(range(len(pool)))
        rng.shuffle(order)
        chosen.extend(pool[i] for i in order[: count - len(chosen)])
    rows = replay_rows(train_dataset, chosen)
    extra = Dataset.from_list(rows, features=train_dataset.features)
    mixed = concatenate_datasets([train_dataset, extra])
    details = {
        "rows": count,
        "train_rows": len(train_dataset),
        "mixed_rows": len(mixed),
        "fraction": round(count / len(mixed), 4),
        "requested_fraction": fraction,
        "distinct_texts": len(set(chosen)),
        "repeated": count > len(pool),
    }
    return mixed, details


# -- the entry point --------------------------------------------------------------------------


@dataclass(frozen=True)
class Forgetting:
    """What `setup_forgetting` gives a stage."""

    train_dataset: Any
    """The training set, with replay rows mixed in when replay is on."""
    callbacks: tuple
    """Trainer callbacks (the monitor, EWC's preparation and logging); empty when everything is off."""
    penalty: Callable | None
    """EWC's `penalty(model)` for the training loss (`trainer.callbacks.with_penalty`), or None."""

    def stop_reason(self) -> str | None:
        """The reason the forgetting monitor stopped training, or None."""
        return next((callback.stop_reason for callback in self.callbacks if callback.stop_reason), None)

    def summary(self) -> dict:
        """The monitor's numbers for the stage's result dict ({} when it did not measure)."""
        summary: dict = {}
        for callback in self.callbacks:
            summary.update(callback.summary())
        return summary


#: Why the monitor is off for a real model probed with the demo's text.
DEMO_TEXT_NOTE = ("The forgetting monitor is off: forgetting.original_data is the demo's invented-world text, which says "
                  "nothing about what this model knows. Give a few hundred rows of general text (a held-out slice of "
                  "pretraining-like data) as Original-domain data (--original-data FILE) to measure forgetting.")


def demo_text_for_real_model(plan) -> bool:
    """Whether the plan would measure (or replay) a real model on the demo's invented-world text."""
    from advisor.plan import DEMO_WORLD_TEXTS, is_demo_model

    texts = {plan.forgetting.original_data, plan.forgetting.replay_data or plan.forgetting.original_data}
    return not is_demo_model(plan.model.name) and bool(texts & set(DEMO_WORLD_TEXTS))


def check_original_text(plan) -> None:
    """Refuse replay or EWC that would train a real model on the demo's text (TunewiseError naming the field)."""
    if not demo_text_for_real_model(plan):
        return
    for dotted, on in (("forgetting.replay_fraction", plan.forgetting.replay_fraction > 0),
                       ("forgetting.ewc_lambda", plan.forgetting.ewc_lambda > 0)):
        if on:
            raise TunewiseError(f"{dotted}: replay and EWC use original-domain text, and forgetting.original_data is the "
                                "demo's invented-world text, which would teach a real model the demo's towns. Give "
                                "general text (--original-data FILE, or Original-domain data in the wizard), or set "
                                f"{dotted.split('.')[1]} to 0", field=dotted)


def setup_forgetting(ctx, model, tokenizer, train_dataset, *, replay: bool | str = True,
                     monitor: bool | str = True, ewc: bool | str = True) -> Forgetting:
    """Apply the plan's forgetting settings for one stage.

    Reads the original-domain data (DatasetError if it is missing or malformed,
    before any training), mixes replay rows into `train_dataset` and emits a
    `replay` event, builds the monitor and EWC. Nothing heavy runs here: the
    baseline and the Fisher estimate are computed in `on_train_begin`, once the
    Trainer has placed the model on its device.

    `replay`, `monitor`, `ewc`: True uses the part as the plan says. A stage that
    cannot use one passes a string instead, the reason in words; when the plan
    asks for that part, a `note` event tells the user it is off for this stage.
    """
    settings = ctx.plan.forgetting
    training = ctx.plan.training
    check_original_text(ctx.plan)  # replay / EWC on the demo's text for a real model: refused (pre-flight did too)
    if demo_text_for_real_model(ctx.plan) and monitor is True:
        monitor = DEMO_TEXT_NOTE  # the monitor would measure nothing meaningful: off, saying how to turn it on
    wanted = {"replay": settings.replay_fraction > 0, "monitor": settings.monitor, "ewc": settings.ewc_lambda > 0}
    allowed = {"replay": replay, "monitor": monitor, "ewc": ewc}
    for part, reason in allowed.items():
        if wanted[part] and isinstance(reason, str):
            ctx.emit("note", message=reason)
    use_replay, use_monitor, use_ewc = (wanted[part] and allowed[part] is True for part in ("replay", "monitor", "ewc"))
    if not (use_monitor or use_replay or use_ewc):
        return Forgetting(train_dataset, (), None)
    if use_ewc and ctx.plan.hardware.shard == "zero3":
        raise TunewiseError(
            "forgetting.ewc_lambda: EWC needs whole parameters and zero3 shards them: set ewc_lambda to 0 "
            "or use shard none / zero2",
            field="forgetting.ewc_lambda",
        )
    split = split_original(settings, training.seed, pool=use_replay or use_ewc)

    if use_replay:
        train_dataset, details = mix_replay(train_dataset, split.pool, settings.replay_fraction, training.seed)
        ctx.emit("replay", source=split.pool_source, **details)

    batch_size = training.micro_batch
    monitor_batches = make_batches(tokenizer, split.monitor, training.seq_len, batch_size) if use_monitor else None
    ewc_state = None
    if use_ewc:
        fisher_texts = split.pool[: settings.ewc_batches * batch_size]
        ewc_state = EWC(
            settings.ewc_lambda,
            make_batches(tokenizer, fisher_texts, training.seq_len, batch_size),
            ctx.plan.method.precision,
            Path(ctx.run_dir) / EWC_STATE_FILE,
        )
    callback = ForgettingCallback(ctx, model, monitor_batches, ewc_state)
    return Forgetting(train_dataset, (callback,), ewc_state.penalty if ewc_state is not None else None)
