"""The loss preview (trainer.preview): rows through the chat template with the tokens that carry loss, as TRL's
SFTTrainer labels them; a row the cut to seq_len leaves without loss is named by number, by the preview and
by the runner's pre-flight check, with the fix.
"""

from __future__ import annotations

import json

import pytest

from conftest import tiny_examples


def _loss_text(row) -> str:
    return "".join(text for text, loss, _cut in row["tokens"] if loss)


def test_chat_rows_carry_loss_on_the_assistant_reply_only(make_plan, tiny_model_dir):
    from transformers import AutoTokenizer

    from trainer.preview import build_preview

    result = build_preview(make_plan(), shown_rows=2)
    question, answer = tiny_examples(2)[0]
    assert result["loss"] == "assistant tokens only" and result["checked"] == result["total"] == 48
    first = result["rows"][0]
    assert first["row"] == 1 and _loss_text(first) == answer + "<|end|>"  # the {% generation %} block
    assert "".join(t for t, _, _ in first["tokens"]) == f"<|user|>{question}<|end|><|assistant|>{answer}<|end|>"
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    ids = tokenizer.apply_chat_template([{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
                                        return_dict=True)["input_ids"]
    assert first["count"] == len(ids)
    assert first["loss_tokens"] == sum(1 for _, loss, _ in first["tokens"] if loss) > 0
    assert result["empty"] == []


def test_prompt_completion_rows_carry_loss_on_the_completion_and_its_eos(make_plan, tiny_data_dir):
    from trainer.preview import build_preview

    result = build_preview(make_plan(data__dataset=str(tiny_data_dir / "prompt_completion.jsonl")), shown_rows=1)
    question, answer = tiny_examples(1)[0]
    assert result["loss"] == "completion only"
    assert _loss_text(result["rows"][0]) == " " + answer + "<|eos|>"
    plain = build_preview(make_plan(data__dataset=str(tiny_data_dir / "text.jsonl")), shown_rows=1)
    assert plain["loss"] == "every token" and all(loss for _, loss, _ in plain["rows"][0]["tokens"])


@pytest.fixture
def long_prompt_data(tmp_path):
    """Chat rows where row 3's question is so long that, at seq_len 32, its reply falls past the cut."""
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in tiny_examples(6)]
    rows[2]["messages"][0]["content"] = " ".join(["What colour is the sky?"] * 12)
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_a_row_truncated_out_of_its_loss_is_named_as_trl_drops_it(make_plan, tiny_model_dir, long_prompt_data):
    """The preview's empty rows are exactly the rows TRL's own SFTTrainer drops at that max_length, and its labels
    are TRL's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from trainer.data import sft_loss_options, training_records
    from trainer.preview import build_preview, empty_rows_message, label_rows

    plan = make_plan(data__dataset=str(long_prompt_data), training__seq_len=32)
    result = build_preview(plan, shown_rows=3)
    assert result["empty"] == [3]
    needs = result["empty_needs"]
    assert needs > 32
    message = empty_rows_message(result)
    assert message.startswith("Row 3 of 6 checked have no token that carries loss at training.seq_len 32")
    assert f"raise training.seq_len to {needs}" in message
    assert result["rows"][2]["loss_tokens"] == 0 and any(cut for _, _, cut in result["rows"][2]["tokens"])
    assert build_preview(make_plan(data__dataset=str(long_prompt_data), training__seq_len=needs))["empty"] == []

    # TRL itself, on the same rows at max_length 32: row 3 is dropped, the others keep the preview's labels.
    import datasets

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    records = training_records(plan, tokenizer)
    dataset = datasets.Dataset.from_list(records)
    config = SFTConfig(output_dir=str(long_prompt_data.parent / "out"), max_length=32, report_to=[], bf16=False,
                       use_cpu=True, **sft_loss_options(tokenizer, dataset))
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), args=config,
                         train_dataset=dataset, processing_class=tokenizer)
    kept = [row["labels"] for row in trainer.train_dataset]
    ours, _ = label_rows(plan, tokenizer, records)
    assert kept == [row["labels"][:32] for row in ours if row["row"] != 3]


def test_preflight_names_the_empty_row_and_refuses_data_with_no_loss_left(make_plan, long_prompt_data, tmp_path):
    from advisor.errors import TunewiseError
    from trainer.context import RunContext
    from trainer.events import EventWriter, read_all_events
    from trainer.runner import preflight

    def notices(plan, name):
        run_dir = tmp_path / name
        ctx = RunContext(plan=plan, run_dir=run_dir, events=EventWriter(run_dir / "events.jsonl"))
        preflight(ctx)
        return [e["message"] for e in read_all_events(run_dir / "events.jsonl") if e["event"] == "notice"]

    (said,) = [m for m in notices(make_plan(data__dataset=str(long_prompt_data), training__seq_len=32), "one")
               if "carries loss" in m]
    assert said.startswith("Row 3 of 6") and "TRL drops them" in said
    assert not [m for m in notices(make_plan(), "none") if "carries loss" in m]
    with pytest.raises(TunewiseError, match="training.seq_len: no row keeps a token that carries loss") as refused:
        notices(make_plan(data__dataset=str(long_prompt_data), training__seq_len=8), "all")
    assert "Rows 1, 2, 3, 4, 5, 6 of 6" in str(refused.value)


def test_the_page_gets_the_preview_from_a_subprocess(make_plan):
    """`preview()` is what the page calls: JSON from `python -m trainer.preview`, HTML with the loss marked."""
    from trainer.preview import preview, preview_html, preview_markdown

    result = preview(make_plan(), rows=2, timeout_s=180)
    assert [row["row"] for row in result["rows"]] == [1, 2]
    shown = preview_html(result)
    assert shown.count("class='tw-row'") == 2 and "tw-tok tw-loss" in shown and "&lt;|assistant|&gt;" in shown
    assert "Every checked row has tokens that carry loss" in preview_markdown(result)
    from advisor.errors import TunewiseError

    with pytest.raises(TunewiseError, match="dataset file /no/such/file.jsonl does not exist"):
        preview(make_plan(data__dataset="/no/such/file.jsonl"), timeout_s=180)
