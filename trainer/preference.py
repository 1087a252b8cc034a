"""The preference stages' data: `load_preference_rows` reads prompt/chosen/rejected rows with the
profiler's readers, refuses a bad row before any training (the message names the row), and splits off
held-out pairs; `conversational` turns plain-text pairs into chat turns for a chat template.
"""

from __future__ import annotations

import random
from pathlib import Path

from advisor.errors import DatasetError


# -- data -------------------------------------------------------------------------------------

def load_preference_rows(plan) -> tuple[list[dict], list[dict]]:
    """(train rows, held-out rows) of {"prompt", "chosen", "rejected"}; DatasetError naming the first bad row.

    Every row is checked before training starts: a missing `rejected`, an empty string or identical
    chosen / rejected answers are refused with the row's line number.
    """
    from advisor.plan import DEMO_DATASETS
    from advisor.profile import detect_format, normalize_record, read_records, resolve_dataset, validate_records

    name = plan.data.dataset
    path = DEMO_DATASETS.get(name) or resolve_dataset(name)
    if not Path(path).is_file():
        raise DatasetError(f"data.dataset: {name} does not exist (the demo data is built by assets/make_demo_data.py)")
    rows = list(read_records(path))
    if not rows:
        raise DatasetError(f"{path} has no rows: a preference stage needs prompt/chosen/rejected pairs")
    expected = "preference"
    detected = detect_format((record for _, record in rows[:200]), expected, str(path)) if plan.data.format in (
        "auto", "preference") else detect_format((r for _, r in rows[:200]), plan.data.format, str(path))
    if detected.format != expected:
        raise DatasetError(f"{path}: a preference stage needs prompt/chosen/rejected pairs, this is {detected.format} data")
    # Detection samples the first rows; re-detect over every row's columns so a later row that lacks
    # a column is named rather than silently skipped.
    detected = detect_format((record for _, record in rows), expected, str(path))
    validate_records(rows, detected, path)
    records = [normalize_record(record, detected) for _, record in rows]
    if any("prompt" not in r for r in records):
        raise DatasetError(f"{path}: preference rows need a prompt column (prompt, question or instruction) so that "
                           f"the policy can be sampled on held-out prompts")
    rng = random.Random(plan.training.seed)
    order = list(range(len(records)))
    rng.shuffle(order)
    held = int(round(len(records) * plan.data.eval_fraction))
    if plan.data.eval_fraction > 0:
        held = max(held, 2)
    if held >= len(records):
        raise DatasetError(f"{path} has only {len(records)} pairs: too few to hold {plan.data.eval_fraction:.0%} out")
    heldout = [records[i] for i in order[:held]]
    train = [records[i] for i in order[held:]]
    if plan.data.max_examples:
        train = train[: plan.data.max_examples]
    return train, heldout


def conversational(rows: list[dict], tokenizer) -> list[dict]:
    """Plain-text prompts become chat turns when the tokenizer has a chat template (TRL then applies it)."""
    if not getattr(tokenizer, "chat_template", None):
        return rows
    out = []
    for row in rows:
        prompt = row["prompt"]
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        chosen, rejected = row["chosen"], row["rejected"]
        if isinstance(chosen, str):
            chosen = [{"role": "assistant", "content": chosen.strip()}]
        if isinstance(rejected, str):
            rejected = [{"role": "assistant", "content": rejected.strip()}]
        out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return out
