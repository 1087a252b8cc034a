"""Turn the plan's dataset into the `datasets.Dataset`s a TRL trainer takes.

Reading, format detection and row validation are the profiler's
(`advisor.profile`): a file that profiles cleanly also trains, and a
malformed row is reported the same way ("line 7 of data.jsonl: ...") before
any model is loaded. This module adds what training needs on top:

- `check_dataset(plan, kind)`: the cheap pre-flight check the runner calls
  (file exists, every row well formed, the columns fit the stage).
- `load_training_data(plan, tokenizer, kind)`: canonical columns (`text`;
  `prompt`/`completion`; `messages`; `prompt`/`chosen`/`rejected`; `prompt`),
  a seeded eval split of `data.eval_fraction`, `data.max_examples`.
- `sft_loss_options(tokenizer, dataset)`: where SFT's loss goes. Chat data
  trains on the assistant turns only: with TRL's `assistant_only_loss` when
  the chat template marks them with `{% generation %}`, otherwise by turning
  each conversation into prompt (the turns before the last reply) and
  completion (the last reply), which TRL trains completion-only.

Kinds: "sft" (text, prompt_completion or messages; preference data trains on
prompt + chosen), "preference" (prompt/chosen/rejected, for reward models and
DPO) and "prompts" (prompts only, for online RL: the prompt of any format).

`datasets` is imported inside the functions.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from advisor.errors import DatasetError, TunewiseError
from advisor.plan import Plan

DATA_KINDS = ("sft", "preference", "prompts")

#: Formats each kind accepts (the rest are refused with a message saying what is needed).
ACCEPTED_FORMATS = {
    "sft": ("text", "prompt_completion", "messages", "preference"),
    "preference": ("preference",),
    "prompts": ("prompt_completion", "messages", "preference", "text"),
}

_NEEDS = {
    "sft": "text, prompt/completion, chat messages, or prompt/chosen/rejected columns",
    "preference": "prompt, chosen and rejected columns (a preference pair per row)",
    "prompts": "a prompt column (or chat messages)",
}


@dataclass(frozen=True)
class LoadedRecords:
    """A dataset read, validated and normalized to canonical columns."""

    records: list[dict]
    """One dict per example with canonical keys."""
    format: str
    """text, prompt_completion, messages or preference (as detected in the file)."""
    source: str
    """Where it came from (file path or hub name), for messages and events."""


def _hub_records(name: str) -> tuple[list[dict], str]:
    """Rows of a `datasets` hub dataset's train split (online only)."""
    from advisor.profile import hub_dataset_message

    from trainer.models import _hub_reachable

    if not _hub_reachable():
        raise DatasetError(hub_dataset_message(name))
    try:
        import datasets

        loaded = datasets.load_dataset(name, split="train")
    except Exception as exc:  # unknown name, gated, network: all user-fixable
        raise DatasetError(f"could not load hub dataset {name!r}: {type(exc).__name__}: {exc}") from None
    return [dict(row) for row in loaded], name


def read_dataset(name: str, expected_format: str = "auto") -> LoadedRecords:
    """Read and validate a bundled name, local file or hub dataset; normalize every row.

    Raises `DatasetError` naming the file and row for anything malformed, and
    listing the columns found when the format cannot be told.
    """
    from advisor.profile import (
        SUFFIX_FORMATS,
        detect_format,
        normalize_record,
        read_records,
        resolve_dataset,
        validate_records,
    )

    try:
        path = resolve_dataset(name)
    except DatasetError:
        from trainer.models import _HUB_ID

        text = str(name).strip()
        maybe_hub = _HUB_ID.match(text) and Path(text).suffix.lower() not in SUFFIX_FORMATS
        if not maybe_hub or Path(text).expanduser().exists():
            raise
        raw_rows, source = _hub_records(text)
        rows = list(enumerate(raw_rows, start=1))
    else:
        rows = list(read_records(path))
        source = str(path)
    source_name = Path(source).name if Path(source).exists() else source
    detected = detect_format((record for _, record in rows[:200]), expected_format, source=source_name)
    validate_records(rows, detected, source)
    return LoadedRecords([normalize_record(record, detected) for _, record in rows], detected.format, source)


def _adapt(loaded: LoadedRecords, kind: str) -> tuple[list[dict], str | None]:
    """Records with the columns `kind` needs, and a note when the data was reshaped."""
    if kind not in DATA_KINDS:
        raise ValueError(f"kind must be one of {DATA_KINDS}, got {kind!r}")
    fmt = loaded.format
    if fmt not in ACCEPTED_FORMATS[kind]:
        raise DatasetError(
            f"{Path(loaded.source).name} holds {fmt} data, but this stage needs {_NEEDS[kind]}"
        )
    records = loaded.records
    if kind == "sft" and fmt == "preference":
        if "prompt" not in records[0]:
            raise DatasetError(f"{Path(loaded.source).name}: preference data without a prompt column cannot train SFT")
        return (
            [{"prompt": r["prompt"], "completion": r["chosen"]} for r in records],
            "SFT on preference data: training on prompt + chosen reply",
        )
    if kind == "preference" and "prompt" not in records[0]:
        # Implicit-prompt pairs (the prompt inside chosen/rejected) are what TRL accepts too.
        return records, None
    if kind == "prompts":
        if fmt == "text":
            raise DatasetError(f"{Path(loaded.source).name} holds plain text: online RL needs prompts ({_NEEDS[kind]})")
        prompts = []
        for r in records:
            if fmt == "messages":
                turns = r["messages"]
                last_reply = max(i for i, t in enumerate(turns) if t["role"] == "assistant")
                prompts.append({"prompt": turns[:last_reply]})
            else:
                prompts.append({"prompt": r["prompt"]})
        return prompts, None
    return records, None


def check_dataset(plan: Plan, kind: str = "sft") -> str:
    """Pre-flight: the dataset exists, every row is well formed, the columns fit `kind`.

    Returns the detected format. Raises `DatasetError` naming the problem.
    """
    loaded = read_dataset(plan.data.dataset, plan.data.format)
    _adapt(loaded, kind)
    return loaded.format


def has_generation_markers(tokenizer) -> bool:
    """Whether the tokenizer's chat template marks assistant replies with {% generation %}."""
    template = getattr(tokenizer, "chat_template", None) or ""
    return "{% generation %}" in template or "{%- generation %}" in template or "generation -%}" in template


def _split_last_reply(records: list[dict]) -> list[dict]:
    """Chat conversations -> conversational prompt/completion: loss on the last assistant reply."""
    out = []
    for r in records:
        turns = r["messages"]
        last = max(i for i, t in enumerate(turns) if t["role"] == "assistant")
        out.append({"prompt": turns[:last], "completion": [turns[last]]})
    return out


def load_training_data(
    plan: Plan,
    tokenizer=None,
    kind: str = "sft",
    notify: Callable[[str], None] | None = None,
):
    """(train_dataset, eval_dataset or None) as `datasets.Dataset`s for `kind`.

    The eval split holds `data.eval_fraction` of the examples (at least one when
    the fraction is above 0 and there are 2+ examples), drawn with the plan's
    seed, so the same plan splits the same way. `data.max_examples` caps the
    training split. For SFT chat data without generation markers in the chat
    template, conversations become prompt/completion pairs (see module doc).
    """
    import datasets

    say = notify or (lambda message: None)
    loaded = read_dataset(plan.data.dataset, plan.data.format)
    records, note = _adapt(loaded, kind)
    if note:
        say(note)
    if kind == "sft" and loaded.format == "messages":
        if tokenizer is not None and not getattr(tokenizer, "chat_template", None):
            raise TunewiseError(
                f"{Path(loaded.source).name} holds chat messages but the model's tokenizer has no chat template: "
                "use prompt/completion data, or a model (or tokenizer) with a chat template",
                field="data.dataset",
            )
        if tokenizer is not None and not has_generation_markers(tokenizer):
            records = _split_last_reply(records)
            say(
                "the chat template has no {% generation %} markers: training on each conversation's last "
                "assistant reply (its earlier turns are the prompt)"
            )
    dataset = datasets.Dataset.from_list(records)
    eval_dataset = None
    fraction = plan.data.eval_fraction
    if fraction > 0 and len(dataset) >= 2:
        # At least one eval example, and at least one left to train on.
        eval_count = min(len(dataset) - 1, max(1, round(len(dataset) * fraction)))
        split = dataset.train_test_split(test_size=eval_count, seed=plan.training.seed, shuffle=True)
        dataset, eval_dataset = split["train"], split["test"]
    if plan.data.max_examples is not None and len(dataset) > plan.data.max_examples:
        dataset = dataset.select(range(plan.data.max_examples))
    return dataset, eval_dataset


def sft_loss_options(tokenizer, dataset) -> dict:
    """SFTConfig keywords saying where the loss goes for this dataset.

    Chat messages with a generation-marked template: assistant_only_loss.
    prompt/completion (plain or conversational): TRL's default completion-only
    loss. Plain text: every token.
    """
    columns = set(dataset.column_names)
    if "messages" in columns and has_generation_markers(tokenizer):
        return {"assistant_only_loss": True}
    if {"prompt", "completion"} <= columns:
        return {"completion_only_loss": True}
    return {}
