"""The dataset profiler: reading every file type, format detection, row-numbered errors, token statistics."""

from __future__ import annotations

import json

import pytest

from advisor.errors import DatasetError
from advisor.profile import (
    detect_format,
    Histogram,
    histogram,
    normalize_record,
    percentile,
    profile_dataset,
    read_records,
    recommend_seq_len,
    resolve_dataset,
    validate_records,
)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def test_reads_jsonl_json_csv_parquet_txt_with_row_numbers(tmp_path):
    rows = [{"prompt": f"question {i}", "completion": f"answer {i}"} for i in range(3)]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n" + json.dumps(rows[2]) + "\n")
    # A blank line is skipped but still counted, so numbers match the editor's line numbers.
    assert [n for n, _ in read_records(jsonl)] == [1, 3, 4]

    as_json = tmp_path / "d.json"
    as_json.write_text(json.dumps({"data": rows}))
    assert [record for _, record in read_records(as_json)] == rows
    jsonl_named_json = tmp_path / "lines.json"  # what datasets' to_json writes
    write_jsonl(jsonl_named_json, rows)
    assert [record for _, record in read_records(jsonl_named_json)] == rows

    csv_path = tmp_path / "d.csv"
    csv_path.write_text('prompt,completion\n"q, with comma",a1\nq2,a2\n', encoding="utf-8")
    assert list(read_records(csv_path)) == [(2, {"prompt": "q, with comma", "completion": "a1"}), (3, {"prompt": "q2", "completion": "a2"})]

    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    assert list(read_records(parquet)) == list(enumerate(rows, start=1))

    text = tmp_path / "d.txt"
    text.write_text("first line\n\nsecond line\n")
    assert list(read_records(text)) == [(1, {"text": "first line"}), (3, {"text": "second line"})]


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("data.jsonl", b'{"text": "ok"}\n{"text": "ok"}\n{"text": "ok"}\n{"text": "ok"}\n{"text": "ok"}\n{"text": "ok"}\n{"text": \n',
         "line 7 of data.jsonl is not valid JSON"),
        ("data.jsonl", b'{"text": "ok"}\n["not", "an", "object"]\n', "line 2 of data.jsonl is a JSON list"),
        ("latin.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n', "line 2 of latin.jsonl is not UTF-8"),
        ("empty.jsonl", b"\n\n", "empty.jsonl is empty"),
        ("empty.csv", b"", "empty.csv is empty"),
        ("bad.csv", b"prompt,completion\nq1,a1\nq2,a2,extra\n", "line 3 of bad.csv has 3 cells"),
        ("bad.json", b'[{"text": "a"}, 5]', "record 2 of bad.json is a JSON int"),
        ("data.xlsx", b"x", "unsupported file type '.xlsx'"),
    ],
)
def test_unreadable_files_are_reported_by_file_and_row(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DatasetError) as info:
        list(read_records(path))
    assert message in str(info.value)


@pytest.mark.parametrize(
    "record, expected_format, expected_columns",
    [
        ({"text": "hello"}, "text", {"text": "text"}),
        ({"content": "hello", "id": 3}, "text", {"text": "content"}),
        ({"instruction": "add", "input": "1 2", "output": "3"}, "prompt_completion", {"prompt": "instruction", "completion": "output", "input": "input"}),
        ({"question": "why?", "answer": "because"}, "prompt_completion", {"prompt": "question", "completion": "answer"}),
        ({"prompt": "p", "response": "r"}, "prompt_completion", {"prompt": "prompt", "completion": "response"}),
        ({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}, "messages", {"messages": "conversations"}),
        ({"prompt": "p", "chosen": "good", "rejected": "bad"}, "preference", {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected"}),
    ],
)
def test_detects_formats_and_aliases(record, expected_format, expected_columns):
    detected = detect_format([record])
    assert detected.format == expected_format
    assert dict(detected.columns) == expected_columns
    assert validate_records([(1, record)], detected, "x.jsonl") == 1


def test_normalize_maps_aliases_to_canonical_keys():
    alpaca = {"instruction": "Add the numbers.", "input": "1 2", "output": "3"}
    assert normalize_record(alpaca, detect_format([alpaca])) == {"prompt": "Add the numbers.\n\n1 2", "completion": "3"}
    sharegpt = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
    assert normalize_record(sharegpt, detect_format([sharegpt])) == {
        "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    }


def test_unknown_columns_and_forced_format_name_what_is_missing():
    with pytest.raises(DatasetError, match=r"cannot tell the format .*columns \(id, label\)"):
        detect_format([{"id": 1, "label": "x"}])
    with pytest.raises(DatasetError, match="does not look like preference data: it needs chosen and rejected"):
        detect_format([{"text": "x"}], expected="preference")


@pytest.mark.parametrize(
    "bad_record, message",
    [
        ({"prompt": "q"}, "line 4 of d.jsonl: column 'completion' is missing"),
        ({"prompt": "q", "completion": "   "}, "line 4 of d.jsonl: column 'completion' is empty"),
        ({"prompt": ["q"], "completion": "a"}, "line 4 of d.jsonl: column 'prompt' should be text, got list"),
    ],
)
def test_validation_reports_first_bad_row(bad_record, message):
    good = {"prompt": "q", "completion": "a"}
    rows = [(1, good), (2, good), (3, good), (4, bad_record), (5, {"prompt": ""})]
    detected = detect_format([good])
    with pytest.raises(DatasetError) as info:
        validate_records(rows, detected, "d.jsonl")
    assert str(info.value) == message


def test_messages_need_an_assistant_turn():
    record = {"messages": [{"role": "user", "content": "hi"}]}
    with pytest.raises(DatasetError, match="record 1 of d.parquet: column 'messages' has no assistant turn"):
        validate_records([(1, record)], detect_format([record]), "d.parquet")


def test_profile_with_a_real_tokenizer_counts_exact_tokens(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    # A word-level tokenizer: every whitespace-separated word is exactly one token.
    words = [f"w{i}" for i in range(50)]
    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator([" ".join(words)], trainers.WordLevelTrainer(special_tokens=["[UNK]"]))
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    tokenizer.save(str(model_dir / "tokenizer.json"))
    (model_dir / "config.json").write_text(json.dumps({"max_position_embeddings": 128}))

    # Example i has a 1-word prompt and an i-word completion: i + 1 tokens.
    rows = [{"prompt": "w0", "completion": " ".join(words[:i])} for i in range(1, 21)]
    data = write_jsonl(tmp_path / "sft.jsonl", rows)
    profile = profile_dataset(str(data), model=str(model_dir))
    assert profile.tokens_exact and "exact" in profile.tokenizer
    assert profile.format == "prompt_completion" and profile.examples == 20
    lengths = sorted(i + 1 for i in range(1, 21))  # 2..21
    assert (profile.tokens.p50, profile.tokens.p95, profile.tokens.max) == (11, 20, 21)
    assert profile.tokens.total == sum(lengths)
    assert sum(profile.histogram.counts) == 20
    assert profile.recommended_seq_len == 64
    assert profile.pack  # 11.5 tokens on average in a 64-token sequence

    # Long examples: the recommendation is capped at the model's 128 positions.
    long_rows = [{"text": " ".join(words * 4)} for _ in range(5)]  # 200 tokens each
    long_profile = profile_dataset(str(write_jsonl(tmp_path / "long.jsonl", long_rows)), model=str(model_dir))
    assert long_profile.tokens.p95 == 200
    assert long_profile.recommended_seq_len == 128
    assert "capped at the model's maximum of 128" in long_profile.seq_len_reason
    assert long_profile.truncated_share == 1.0
    assert not long_profile.pack


def test_profile_without_tokenizer_is_labelled_approximate(tmp_path):
    rows = [{"prompt": "p" * 40, "chosen": "c" * 400, "rejected": "r" * 100} for _ in range(10)]
    profile = profile_dataset(str(write_jsonl(tmp_path / "pref.jsonl", rows)), max_rows=4)
    assert not profile.tokens_exact
    assert profile.tokenizer.startswith("approximate: ~4 characters per token")
    # prompt + "\n" + the longer answer = 441 characters -> ceil(441 / 4) = 111 tokens.
    assert profile.tokens.max == 111
    assert profile.examples == 10 and profile.examples_profiled == 4
    assert profile.recommended_seq_len == 128
    assert not profile.pack and "preference" in profile.pack_reason


def test_hub_names_need_the_network_and_missing_files_are_named(tmp_path):
    with pytest.raises(DatasetError, match="hub dataset, which needs the network"):
        resolve_dataset("tatsu-lab/alpaca")
    with pytest.raises(DatasetError, match="dataset file .*missing.jsonl does not exist"):
        resolve_dataset(str(tmp_path / "missing.jsonl"))


def test_seq_len_and_percentile_arithmetic():
    assert percentile([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 50) == 5
    assert percentile(list(range(1, 101)), 95) == 95
    assert recommend_seq_len(65, None)[0] == 128
    assert recommend_seq_len(129, None)[0] == 192
    assert recommend_seq_len(700, None)[0] == 768
    assert recommend_seq_len(5000, 4096)[0] == 4096
    assert histogram([0, 5, 9, 10, 39]).edges[:3] == (0, 2, 4)
    assert histogram([20, 21, 23]) == Histogram((20, 21, 22, 23, 24), (1, 1, 0, 1))


def test_hub_dataset_is_streamed_when_online(monkeypatch):
    """The online path, with `datasets.load_dataset` replaced by a stand-in (tests never use the network)."""
    import datasets

    calls = []

    def fake_load_dataset(name, split, streaming):
        calls.append((name, split, streaming))
        return [{"question": f"q{i}", "answer": "a" * 8} for i in range(5)]

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    profile = profile_dataset("someone/qa-set", max_rows=3)
    assert calls == [("someone/qa-set", "train", True)]
    assert profile.format == "prompt_completion" and profile.examples_profiled == 3
    assert dict(profile.columns) == {"prompt": "question", "completion": "answer"}

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: [{"question": "q", "answer": ""}])
    with pytest.raises(DatasetError, match="record 1 of someone/qa-set: column 'answer' is empty"):
        profile_dataset("someone/qa-set")
