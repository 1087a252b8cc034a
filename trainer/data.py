"""Turn the plan's dataset into what a stage trains on: `datasets.Dataset`s or plain rows.

Reading, format detection and row validation are the profiler's
(`advisor.profile`): a file that profiles cleanly also trains, and a
malformed row is reported the same way ("line 7 of data.jsonl: ...") before
any model is loaded. So is the rule for a hub dataset: a name that is not a
local file but has a hub id's shape (`resolve_dataset` raises
`HubDatasetName`), read only when Hugging Face access is on and the Hub
answers, with the profiler's offline message otherwise. This module adds
what training needs on top, one loader per kind of data, which the runner's
pre-flight check calls too, so pre-flight accepts exactly what a stage loads:

- `load_training_data(plan, tokenizer, kind)`: SFT's `Dataset`s, canonical
  columns (`text`; `prompt`/`completion`; `messages`), a seeded eval split of
  `data.eval_fraction`, `data.max_examples`.
- `load_preference_rows(plan)`: the reward model's and DPO's
  prompt/chosen/rejected rows and held-out pairs.
- `load_prompt_rows(plan)`: online RL's prompts (from any format with
  prompts) and held-out rows, which are pairs when the data has them.
- `training_records(plan, tokenizer, kind)`: every row in file order, reshaped as the stage trains on it
  (what `load_training_data` splits; the loss preview, trainer.preview, renders it).
- `check_dataset(plan, kind)`: the pre-flight check (the loader of `kind`).
- `split_heldout(records, fraction, seed)`: the one eval split they share.
- `sft_loss_options(tokenizer, dataset)`: where SFT's loss goes. Chat data
  trains on the assistant turns only: with TRL's `assistant_only_loss` when
  the chat template marks them with `{% generation %}`, otherwise by turning
  each conversation into prompt (the turns before the last reply) and
  completion (the last reply), which TRL trains completion-only.
- `conversational(rows, tokenizer)`: plain-text prompts and replies as chat
  turns, for a tokenizer with a chat template.

Kinds: "sft" (text, prompt_completion or messages; preference data trains on
prompt + chosen), "preference" (prompt/chosen/rejected, for reward models and
DPO) and "prompts" (prompts only, for online RL: the prompt of any format).

`datasets` and NumPy are imported inside the functions.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from advisor.errors import DatasetError, TunewiseError
from advisor.plan import Plan
from advisor.profile import (
    HubDatasetName,
    detect_format,
    hub_offline,
    normalize_record,
    read_records,
    resolve_dataset,
    validate_records,
)

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


def _hub_rows(name: str) -> list[tuple[int, dict]]:
    """`(row_number, record)` for every row of hub dataset `name`'s train split.

    Hugging Face access switched off (`hub_offline`, the profiler's rule) or a Hub that does not
    answer (`trainer.models.hub_reachable`: a TCP connect of a few seconds, so an offline machine is
    told so at once instead of after the download's retries) gives the profiler's offline message,
    as does a download that fails.
    """
    from trainer.models import hub_reachable

    if hub_offline() or not hub_reachable():
        raise HubDatasetName(name)
    try:
        import datasets

        loaded = datasets.load_dataset(name, split="train")
    except Exception as exc:  # unknown name, gated, network: all mean "not available here"
        raise HubDatasetName(name, f"{type(exc).__name__}: {exc}") from None
    return list(enumerate((dict(row) for row in loaded), start=1))


def read_dataset(name: str, expected_format: str = "auto") -> LoadedRecords:
    """Read and validate a bundled name, local file or hub dataset; normalize every row.

    Raises `DatasetError` naming the file and row for anything malformed, and
    listing the columns found when the format cannot be told.
    """
    try:
        path = resolve_dataset(name)
    except HubDatasetName as hub:
        rows, source = _hub_rows(hub.name), hub.name
    else:
        rows, source = list(read_records(path)), str(path)
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
    if fmt == "preference" and "prompt" not in records[0]:
        # Implicit-prompt pairs (the prompt inside chosen/rejected) would train, but the stages sample the
        # policy on held-out prompts, so they need the prompt on its own.
        raise DatasetError(f"{Path(loaded.source).name}: preference rows need a prompt column (prompt, question or "
                           f"instruction) so that the policy can be sampled on held-out prompts")
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


def split_heldout(records: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, held out): `fraction` of `records` held out, drawn with `seed`, so a plan always splits the same way.

    At least one record is held out when the fraction is above 0 and there are two or more, and at
    least one is left to train on. The draw is `datasets.Dataset.train_test_split(test_size=count,
    seed=seed)`'s: a NumPy PCG64 permutation whose first `count` indices are held out and the rest
    train, in that order (SFT split that way before this helper, and its losses stay the same).
    """
    import numpy as np

    if fraction <= 0 or len(records) < 2:
        return list(records), []
    count = min(len(records) - 1, max(1, round(len(records) * fraction)))
    order = np.random.default_rng(seed).permutation(len(records))
    return [records[i] for i in order[count:]], [records[i] for i in order[:count]]


def _capped(rows: list, plan: Plan) -> list:
    """The training rows, at most `data.max_examples` of them."""
    return rows[: plan.data.max_examples] if plan.data.max_examples is not None else rows


def load_preference_rows(plan: Plan) -> tuple[list[dict], list[dict]]:
    """(train rows, held-out rows) of {"prompt", "chosen", "rejected"} for the reward model and DPO.

    Every row is checked before training starts: a missing `rejected`, an empty string or identical
    chosen / rejected answers are refused with the row's line number (DatasetError); so is data of
    another format, and pairs without a prompt column.
    """
    records, _ = _adapt(read_dataset(plan.data.dataset, plan.data.format), "preference")
    train, heldout = split_heldout(records, plan.data.eval_fraction, plan.training.seed)
    return _capped(train, plan), heldout


def load_prompt_rows(plan: Plan) -> tuple[list[dict], list[dict]]:
    """(train rows, held-out rows) for online RL, each with a "prompt".

    Any format with prompts will do: prompt/completion, chat messages (the turns before the last
    assistant reply) or preference pairs, whose rows keep "chosen" and "rejected" so that the held-out
    pairs also measure preference accuracy. Plain text is refused (DatasetError).
    """
    loaded = read_dataset(plan.data.dataset, plan.data.format)
    rows, _ = _adapt(loaded, "prompts")
    if loaded.format == "preference":
        rows = loaded.records
    train, heldout = split_heldout(rows, plan.data.eval_fraction, plan.training.seed)
    return _capped(train, plan), heldout


def check_dataset(plan: Plan, kind: str = "sft") -> None:
    """Pre-flight: the dataset loads the way the stage of `kind` will load it.

    "preference" and "prompts" run the stage's own loader; "sft" reads, validates and reshapes
    the rows as `load_training_data` does (the chat-template check needs the tokenizer, so it waits
    for the stage). Raises `DatasetError` naming the problem.
    """
    if kind == "preference":
        load_preference_rows(plan)
    elif kind == "prompts":
        load_prompt_rows(plan)
    else:
        _adapt(read_dataset(plan.data.dataset, plan.data.format), kind)


def conversational(rows: list[dict], tokenizer) -> list[dict]:
    """Plain-text prompts (and chosen / rejected replies) become chat turns when the tokenizer has a chat
    template (TRL then applies it); chat-shaped values stay as they are."""
    if not getattr(tokenizer, "chat_template", None):
        return rows
    out = []
    for row in rows:
        turns = dict(row)
        if isinstance(row.get("prompt"), str):
            turns["prompt"] = [{"role": "user", "content": row["prompt"]}]
        for key in ("chosen", "rejected"):
            if isinstance(row.get(key), str):
                turns[key] = [{"role": "assistant", "content": row[key].strip()}]
        out.append(turns)
    return out


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

    The eval split holds `data.eval_fraction` of the examples (`split_heldout`:
    at least one when the fraction is above 0 and there are 2+ examples), drawn
    with the plan's seed, so the same plan splits the same way.
    `data.max_examples` caps the training split. For SFT chat data without generation markers in the chat
    template, conversations become prompt/completion pairs (see module doc).
    """
    import datasets

    records = training_records(plan, tokenizer, kind, notify)
    train, heldout = split_heldout(records, plan.data.eval_fraction, plan.training.seed)
    eval_dataset = datasets.Dataset.from_list(heldout) if heldout else None
    return datasets.Dataset.from_list(_capped(train, plan)), eval_dataset


def training_records(plan: Plan, tokenizer=None, kind: str = "sft",
                     notify: Callable[[str], None] | None = None) -> list[dict]:
    """Every row of the dataset in file order, in the columns the stage of `kind` trains on (before the eval
    split): what `load_training_data` splits, and what the loss preview (trainer.preview) renders."""
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
    return records


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
