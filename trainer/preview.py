"""What SFT will train on: rows through the model's chat template with the tokens that carry loss marked.

    python -m trainer.preview [--rows N] < plan.yaml      prints one JSON object

The page's data step calls `preview(plan, rows, timeout_s)`, which runs this module as a subprocess (the
tokenizer needs transformers, and TRL imports torch; the page never does). The child reads the dataset the
way the SFT stage does (`trainer.data.training_records`: the same reshaping, e.g. chat data without
`{% generation %}` markers becomes prompt / last reply) and labels every row with TRL's own preparation,
`SFTTrainer._prepare_dataset` (tokenizing through the chat template, assistant masks or completion masks,
EOS, labels of -100 where there is no loss), with the loss options the stage uses
(`trainer.data.sft_loss_options`). TRL then cuts each row to `training.seq_len` tokens from its start
(`truncation_mode="keep_start"`; with packing, the "bfd" strategy cuts the same way) and drops a row
left without a single loss token; the preview applies that cut to the labelled rows, so it can name the
rows that would be dropped (or, packed, train on nothing) instead of losing them silently.

The JSON: {"loss": "assistant tokens only" | "completion only" | "every token", "seq_len", "checked": rows
labelled (at most `MAX_CHECKED_ROWS`), "total": rows in the data, "rows": [{"row": number (1-based, file
order), "tokens": [[text, has_loss, cut], ...], "count": tokens before the cut, "loss_tokens": after the
cut}], "empty": [row numbers with no loss token after the cut], "empty_needs": the shortest seq_len that
keeps a loss token in every one of them (None when none can: no assistant / completion tokens at all),
"notes": [...]}. `empty_rows_message(result)` says what to fix; the runner's pre-flight check says it
too (`check_loss_masks`).

This module imports only the standard library at the top; the worker imports transformers and TRL.
"""

from __future__ import annotations

import argparse
import html
import json
import subprocess
import sys
from typing import Any

from advisor.errors import TunewiseError
from trainer.procs import REPO_ROOT, child_env

MAX_CHECKED_ROWS = 2000
"""Rows labelled to look for empty loss masks (the first ones, in file order)."""
MAX_SHOWN_ROWS = 8
"""Rows a preview shows at most."""
MAX_SHOWN_TOKENS = 400
"""Tokens shown per row at most (the count is of all of them)."""


def preview(plan, rows: int = 3, timeout_s: float = 180.0) -> dict:
    """The preview of `plan`'s SFT data (see the module doc), computed in a subprocess; TunewiseError
    naming the problem when the data or the tokenizer cannot be read, or it took longer than `timeout_s`."""
    rows = max(1, min(int(rows), MAX_SHOWN_ROWS))
    command = [sys.executable, "-m", "trainer.preview", "--rows", str(rows)]
    try:
        done = subprocess.run(command, input=plan.to_yaml(), capture_output=True, text=True, timeout=timeout_s,
                              cwd=str(REPO_ROOT), env=child_env())
    except subprocess.TimeoutExpired:
        raise TunewiseError(f"preview: rendering the rows took longer than {timeout_s:.0f} s", field="data.dataset") from None
    lines = done.stdout.strip().splitlines()
    result = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {}
    if done.returncode != 0 or "error" in result:
        last = result.get("error") or ((done.stderr.strip().splitlines() or ["no output"])[-1])
        raise TunewiseError(last if result.get("error") else f"preview: the rows could not be rendered: {last}",
                            field=result.get("field") or "data.dataset")
    return result


def empty_rows_message(result: dict) -> str | None:
    """What to do about rows without a loss token (None when every checked row has one)."""
    empty = result.get("empty") or []
    if not empty:
        return None
    shown = ", ".join(str(n) for n in empty[:12]) + (f" and {len(empty) - 12} more" if len(empty) > 12 else "")
    rows = "row" if len(empty) == 1 else "rows"
    what = "assistant reply" if result.get("loss") == "assistant tokens only" else "completion"
    needs = result.get("empty_needs")
    if needs:
        fix = (f"raise training.seq_len to {needs} (the shortest that keeps a token of every {what}), or shorten "
               f"the prompts of those rows")
    else:
        fix = (f"those rows have no {what} tokens at all: give each row an {what}, or use a chat template that marks "
               "assistant replies with {% generation %}")
    return (f"{rows.capitalize()} {shown} of {result.get('checked')} checked have no token that carries loss at "
            f"training.seq_len {result.get('seq_len')}: TRL drops them from training (packed, they train on "
            f"nothing). Fix: {fix}.")


def preview_html(result: dict) -> str:
    """The rows as HTML: one block per row with its token count, each token a span; loss tokens marked
    (class tw-loss), tokens past seq_len struck through (tw-cut)."""
    parts = []
    for row in result.get("rows") or []:
        spans = []
        for text, loss, cut in row["tokens"]:
            classes = "tw-tok" + (" tw-loss" if loss else "") + (" tw-cut" if cut else "")
            shown = html.escape(text).replace("\n", "\u21b5<br>")
            spans.append(f"<span class='{classes}'>{shown}</span>")
        more = row["count"] - len(row["tokens"])
        tail = f"<span class='tw-more'> ... {more} more tokens</span>" if more > 0 else ""
        empty = " tw-empty" if row["loss_tokens"] == 0 else ""
        parts.append(f"<div class='tw-row{empty}'><div class='tw-row-head'>row {row['row']}: {row['count']} tokens, "
                     f"{row['loss_tokens']} with loss</div><div class='tw-row-body'>{''.join(spans)}{tail}</div></div>")
    legend = ("<div class='tw-legend'><span class='tw-tok tw-loss'>highlighted</span> tokens carry the loss "
              "(" + html.escape(str(result.get("loss"))) + "); <span class='tw-tok tw-cut'>struck</span> tokens "
              f"fall past training.seq_len {result.get('seq_len')} and are cut.</div>")
    return "<div class='tw-preview'>" + legend + "".join(parts) + "</div>"


def preview_markdown(result: dict) -> str:
    """The summary above the rows: how the loss is placed, the token counts, and any rows without loss."""
    counts = [row["count"] for row in result.get("rows") or []]
    lines = [f"**Loss on:** {result.get('loss')}. Checked {result.get('checked'):,} of {result.get('total'):,} rows "
             f"at training.seq_len {result.get('seq_len')}."]
    if counts:
        lines.append("Tokens per row shown: " + ", ".join(f"row {r['row']}: {r['count']}" for r in result["rows"]) + ".")
    lines += [f"_{note}_" for note in result.get("notes") or []]
    problem = empty_rows_message(result)
    lines.append(f"**Check this:** {problem}" if problem else "Every checked row has tokens that carry loss.")
    return "\n\n".join(lines)


# -- the worker: labels rows with TRL's own preparation -------------------------------------------------------


class _PreparingTrainer:
    """The three attributes `SFTTrainer._prepare_dataset` reads from its trainer, set as `SFTTrainer.__init__`
    sets them (TRL 1.12): the tokenizer, whether completion-only loss applies, and the training chat template
    swapped in for assistant-only loss when the model's own has no generation markers."""

    def __init__(self, tokenizer, args, sample: dict):
        from trl.trainer import sft_trainer

        self._tokenizer = tokenizer
        if args.completion_only_loss is None:
            self.completion_only_loss = "prompt" in sample and "completion" in sample
        else:
            self.completion_only_loss = args.completion_only_loss
        if args.assistant_only_loss and not sft_trainer.has_generation_markers(tokenizer.chat_template):
            self.chat_template = sft_trainer.get_training_chat_template(tokenizer)
        else:
            self.chat_template = None


def label_rows(plan, tokenizer, records: list[dict]) -> tuple[list[dict], str]:
    """[{"row", "input_ids", "labels"}] for `records` (file order) as TRL's SFTTrainer prepares them before its
    cut to max_length, and how the loss is placed."""
    import tempfile

    import datasets
    from trl import SFTConfig, SFTTrainer

    from trainer.data import sft_loss_options

    dataset = datasets.Dataset.from_list(records)
    options = sft_loss_options(tokenizer, dataset)
    with tempfile.TemporaryDirectory() as scratch:
        # max_length None: every token is labelled, so the cut can be shown; packing off: one row per row.
        args = SFTConfig(output_dir=scratch, max_length=None, packing=False, dataset_text_field="text",
                         report_to=[], bf16=False, **options)
        stand_in = _PreparingTrainer(tokenizer, args, records[0])
        indexed = dataset.add_column("tunewise_row", list(range(1, len(records) + 1)))
        prepared = SFTTrainer._prepare_dataset(stand_in, indexed, tokenizer, args, False, None, "preview")
    loss = ("assistant tokens only" if options.get("assistant_only_loss")
            else "completion only" if stand_in.completion_only_loss else "every token")
    rows = [{"row": r["tunewise_row"], "input_ids": r["input_ids"], "labels": r["labels"]} for r in prepared]
    return rows, loss


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.preview", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=3, help="rows to show (default 3)")
    args = parser.parse_args(argv)
    import datasets

    from advisor.plan import Plan

    datasets.disable_progress_bars()
    try:
        plan = Plan.from_yaml(sys.stdin.read())
        result = build_preview(plan, args.rows)
    except TunewiseError as exc:
        print(json.dumps({"error": str(exc), "field": getattr(exc, "field", None)}))
        return 2
    print(json.dumps(result))
    return 0


def build_preview(plan, shown_rows: int = 3) -> dict:
    """The preview of `plan`'s SFT data (the module doc's JSON), in this process (it imports TRL)."""
    from trainer.data import training_records
    from trainer.models import load_tokenizer

    notes: list[str] = []
    tokenizer = load_tokenizer(plan)
    records = training_records(plan, tokenizer, "sft", notes.append)
    checked = records[:MAX_CHECKED_ROWS]
    labelled, loss = label_rows(plan, tokenizer, checked)
    seq_len = plan.training.seq_len
    if plan.data.packing:
        notes.append(f"packing: rows are packed into sequences of {seq_len} tokens; each row is cut at {seq_len} "
                     "tokens first, as shown")
    empty, empty_needs = empty_rows(labelled, seq_len)
    shown = []
    for row in labelled[:max(1, min(shown_rows, MAX_SHOWN_ROWS))]:
        tokens = [[tokenizer.decode([token]), label != -100 and i < seq_len, i >= seq_len]
                  for i, (token, label) in enumerate(zip(row["input_ids"], row["labels"]))][:MAX_SHOWN_TOKENS]
        shown.append({"row": row["row"], "tokens": tokens, "count": len(row["input_ids"]),
                      "loss_tokens": sum(1 for label in row["labels"][:seq_len] if label != -100)})
    return {"loss": loss, "seq_len": seq_len, "checked": len(labelled), "total": len(records), "rows": shown,
            "empty": empty, "empty_needs": empty_needs, "notes": notes}


def empty_rows(labelled: list[dict], seq_len: int) -> tuple[list[int], int | None]:
    """(row numbers left without a loss token by TRL's keep_start cut to `seq_len`, the shortest seq_len that
    keeps one in each of them: None when some row has no loss token at all)."""
    empty, needs = [], []
    for row in labelled:
        if not any(label != -100 for label in row["labels"][:seq_len]):
            empty.append(row["row"])
            first = next((i for i, label in enumerate(row["labels"]) if label != -100), None)
            needs.append(None if first is None else first + 1)
    return empty, (max(needs) if needs and None not in needs else None)


def check_loss_masks(plan, tokenizer, notify) -> None:
    """Pre-flight (the runner, SFT): rows the cut to seq_len leaves without loss are said by number with the
    fix (`notify`); when no checked row keeps a loss token, TunewiseError: training would learn nothing."""
    from trainer.data import training_records

    records = training_records(plan, tokenizer, "sft")[:MAX_CHECKED_ROWS]
    labelled, loss = label_rows(plan, tokenizer, records)
    seq_len = plan.training.seq_len
    empty, empty_needs = empty_rows(labelled, seq_len)
    if not empty:
        return
    result: dict[str, Any] = {"empty": empty, "checked": len(labelled), "seq_len": seq_len, "loss": loss,
                              "empty_needs": empty_needs}
    message = empty_rows_message(result)
    if len(empty) == len(labelled):
        raise TunewiseError(f"training.seq_len: no row keeps a token that carries loss. {message}", field="training.seq_len")
    notify(message)


if __name__ == "__main__":
    sys.exit(main())
