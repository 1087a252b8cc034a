"""Read, check and profile a fine-tuning dataset before any training starts.

Three layers, each usable on its own (the trainer reuses the first three to
load its data, so a file that profiles cleanly also trains):

1. `read_records(path)` yields `(row_number, record)` from JSONL, JSON, CSV,
   Parquet or plain-text files, and raises `DatasetError` naming the file and
   the row for anything unreadable (bad JSON on line 7, non-UTF-8 bytes, an
   empty file).
2. `detect_format(records)` decides which of the four shapes the data has
   (plain text, prompt/completion, chat messages, prompt/chosen/rejected) and
   which columns hold each part, accepting the usual aliases
   (instruction/question/prompt, output/response/answer/completion, ...).
3. `validate_records(rows, detected, source)` checks every row against that
   shape and reports the first bad one by number; `normalize_record` turns a
   row into the canonical keys (`text`; `prompt`/`completion`; `messages`;
   `prompt`/`chosen`/`rejected`).
4. `profile_dataset(dataset, model)` puts it together: example count, token
   lengths (p50 / p95 / max) with the model's own tokenizer when a
   `tokenizer.json` is on this machine or a labelled ~4 characters per token
   approximation otherwise, a histogram for the UI, and the recommended
   sequence length and packing choice with their reasons.

Pure Python: json and csv from the standard library; pyarrow (Parquet),
tokenizers and datasets are imported only when needed.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

from advisor.errors import DatasetError

# -- file reading --------------------------------------------------------------------------------

#: File suffixes we read, and how rows in them are named in messages.
SUFFIX_FORMATS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".tsv": "tsv",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".txt": "txt",
}

#: Columns whose CSV cells may hold JSON (a list of chat turns) rather than plain text.
_JSON_CELL_COLUMNS = ("messages", "conversations", "chosen", "rejected")


def file_kind(path: str | Path) -> str:
    """The reader used for `path`, from its suffix (jsonl, json, csv, tsv, parquet, txt)."""
    suffix = Path(path).suffix.lower()
    if suffix not in SUFFIX_FORMATS:
        raise DatasetError(
            f"{Path(path).name}: unsupported file type {suffix or '(no suffix)'!r}; "
            f"use one of {', '.join(sorted(SUFFIX_FORMATS))}"
        )
    return SUFFIX_FORMATS[suffix]


def describe_row(path: str | Path, row_number: int) -> str:
    """How messages name a row: "line 7 of data.jsonl" (line-based files) or "record 7 of data.parquet"."""
    name = Path(path).name if Path(path).suffix else str(path)
    kind = SUFFIX_FORMATS.get(Path(path).suffix.lower())
    unit = "line" if kind in ("jsonl", "csv", "tsv", "txt") else "record"
    return f"{unit} {row_number} of {name}"


def resolve_dataset(dataset: str | Path) -> Path:
    """Turn a bundled name ("demo-sft"), or a local file path, into an existing file path.

    Anything else is taken to be a `datasets` hub name, which needs the network:
    raises `DatasetError` with the offline message (see `hub_dataset_message`).
    """
    from advisor.plan import DEMO_DATASETS

    text = str(dataset).strip()
    if not text:
        raise DatasetError("the dataset is empty: give a file path or a bundled name such as demo-sft")
    if text in DEMO_DATASETS:
        path = Path(DEMO_DATASETS[text])
        if not path.is_file():
            raise DatasetError(f"bundled dataset {text!r} is missing at {path}: build it with `tunewise build-demo`")
        return path
    path = Path(text).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        raise DatasetError(f"{text} is a directory: give one data file (.jsonl, .json, .csv, .parquet)")
    if path.suffix.lower() in SUFFIX_FORMATS or text.startswith((".", "/", "~")) or not _looks_like_hub_name(text):
        raise DatasetError(f"dataset file {text} does not exist")
    raise HubDatasetName(text)


class HubDatasetName(DatasetError):
    """The dataset is not a local file but has the shape of a `datasets` hub name (`name`).

    `profile_dataset` catches it and loads the hub dataset when the network is allowed
    (`hub_offline()` is False); everywhere else it is the offline message.
    """

    def __init__(self, name: str, cause: str | None = None):
        self.name = name
        super().__init__(hub_dataset_message(name, cause))


def hub_offline() -> bool:
    """True when Hugging Face access is switched off (HF_HUB_OFFLINE or HF_DATASETS_OFFLINE set to 1/true)."""
    return any(os.environ.get(key, "").strip().lower() in ("1", "true", "yes", "on")
               for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _looks_like_hub_name(text: str) -> bool:
    """'org/name' or 'name' with no file suffix: the shape of a `datasets` hub id."""
    parts = text.split("/")
    return len(parts) <= 2 and all(parts) and Path(text).suffix.lower() not in SUFFIX_FORMATS


def hub_dataset_message(name: str, cause: str | None = None) -> str:
    """The message for a hub dataset that cannot be read here: hub datasets need the network."""
    why = f"loading it failed ({cause})" if cause else (
        "Hugging Face access is off here (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)" if hub_offline() else "this needs the network"
    )
    return (
        f"dataset {name!r} is not a local file, so it would be a Hugging Face hub dataset, which needs the network; "
        f"{why}. Download it where you have access (e.g. `datasets.load_dataset(name, split='train').to_json('data.jsonl')`) "
        "and pass the local file, or use a bundled dataset such as demo-sft"
    )


def read_hub_records(name: str, max_rows: int) -> tuple[list[tuple[int, dict]], int | None]:
    """Up to `max_rows` records of a hub dataset's train split, streamed (online only), and its size when known.

    Raises HubDatasetName (the offline message) when hub access is off or loading fails.
    """
    if hub_offline():
        raise HubDatasetName(name)
    try:
        import datasets

        stream = datasets.load_dataset(name, split="train", streaming=True)
        rows = []
        for index, record in enumerate(stream, start=1):
            if index > max_rows:
                break
            rows.append((index, dict(record)))
        size = None
        info = getattr(stream, "info", None)
        splits = getattr(info, "splits", None) or {}
        if "train" in splits and getattr(splits["train"], "num_examples", None):
            size = int(splits["train"].num_examples)
    except Exception as exc:  # no network, unknown name, gated dataset: all mean "not available here"
        raise HubDatasetName(name, f"{type(exc).__name__}: {exc}") from None
    if not rows:
        raise DatasetError(f"hub dataset {name!r} has no rows in its train split")
    return rows, size


def read_records(path: str | Path) -> Iterator[tuple[int, dict]]:
    """Yield `(row_number, record)` for every row of a local data file.

    Row numbers are 1-based and are what error messages quote: the file line for
    JSONL, CSV and text files (blank lines are skipped but still counted), the
    position in the list for JSON and Parquet. Records are dicts of column name
    to value. Supported: .jsonl/.ndjson (one JSON object per line), .json (a list
    of objects, an object holding one such list under "data"/"train"/"rows"/
    "examples", or JSON Lines saved as .json), .csv/.tsv (header row; cells of
    messages/chosen/rejected columns that hold a JSON list are decoded),
    .parquet, and .txt (one {"text": line} record per non-blank line).

    Raises `DatasetError` naming the file and row for a malformed row, for bytes
    that are not UTF-8, and for a file with no records.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"dataset file {path} does not exist")
    kind = file_kind(path)
    readers = {
        "jsonl": _read_jsonl,
        "json": _read_json,
        "csv": _read_csv,
        "tsv": _read_csv,
        "parquet": _read_parquet,
        "txt": _read_text,
    }
    produced = 0
    for row_number, record in readers[kind](path):
        produced += 1
        yield row_number, record
    if produced == 0:
        raise DatasetError(f"{path.name} is empty: it has no records")


def _decode_line(path: Path, raw: bytes, line_number: int) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DatasetError(
            f"line {line_number} of {path.name} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at column "
            f"{exc.start + 1}): re-save the file as UTF-8"
        ) from None
    if line_number == 1:
        text = text.lstrip("\ufeff")  # a UTF-8 byte-order mark some editors write
    return text


def _parse_json_line(path: Path, text: str, line_number: int) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DatasetError(
            f"line {line_number} of {path.name} is not valid JSON: {exc.msg} (column {exc.colno})"
        ) from None
    if not isinstance(value, dict):
        raise DatasetError(
            f"line {line_number} of {path.name} is a JSON {type(value).__name__}, not an object with named "
            'fields such as {"text": ...}'
        )
    return value


def _read_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    with path.open("rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            text = _decode_line(path, raw, line_number)
            if not text.strip():
                continue
            yield line_number, _parse_json_line(path, text, line_number)


def _read_whole_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line_number = data.count(b"\n", 0, exc.start) + 1
        raise DatasetError(
            f"line {line_number} of {path.name} is not UTF-8 text (byte 0x{data[exc.start]:02x}): "
            "re-save the file as UTF-8"
        ) from None


def _read_json(path: Path) -> Iterator[tuple[int, dict]]:
    text = _read_whole_text(path)
    if not text.strip():
        return
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        # Many tools (datasets' to_json among them) write JSON Lines with a .json suffix.
        first_line = text.lstrip().split("\n", 1)[0]
        if first_line.strip().startswith("{") and exc.lineno > 1:
            yield from _read_jsonl(path)
            return
        raise DatasetError(
            f"line {exc.lineno} of {path.name} is not valid JSON: {exc.msg} (column {exc.colno})"
        ) from None
    if isinstance(value, dict):
        for key in ("data", "train", "rows", "examples"):
            if isinstance(value.get(key), list):
                value = value[key]
                break
        else:
            # A single object: one record.
            value = [value]
    if not isinstance(value, list):
        raise DatasetError(f"{path.name} must hold a list of objects, got a JSON {type(value).__name__}")
    for index, item in enumerate(value, start=1):
        if not isinstance(item, dict):
            raise DatasetError(
                f"record {index} of {path.name} is a JSON {type(item).__name__}, not an object with named fields"
            )
        yield index, item


def _read_csv(path: Path) -> Iterator[tuple[int, dict]]:
    text = _read_whole_text(path)
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = next(reader, None)
        if header is None:
            return
        header = [name.strip() for name in header]
        if not any(header):
            raise DatasetError(f"line 1 of {path.name} should be a header row naming the columns, but it is blank")
        for row in reader:
            line_number = reader.line_num
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                raise DatasetError(
                    f"line {line_number} of {path.name} has {len(row)} cells but the header names {len(header)} "
                    "columns (is a comma inside a value missing its quotes?)"
                )
            record: dict[str, Any] = {}
            for name, cell in zip(header, row):
                if name in _JSON_CELL_COLUMNS and cell.lstrip().startswith("["):
                    try:
                        record[name] = json.loads(cell)
                        continue
                    except json.JSONDecodeError as exc:
                        raise DatasetError(
                            f"line {line_number} of {path.name}: column {name!r} looks like a JSON list but is "
                            f"not valid JSON: {exc.msg}"
                        ) from None
                record[name] = cell
            yield line_number, record
    except csv.Error as exc:
        raise DatasetError(f"line {reader.line_num} of {path.name} is not valid CSV: {exc}") from None


def _read_parquet(path: Path) -> Iterator[tuple[int, dict]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:  # pragma: no cover - pyarrow is a dependency
        raise DatasetError(f"reading {path.name} needs pyarrow: pip install pyarrow") from None
    try:
        parquet_file = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid / OSError for a damaged file
        raise DatasetError(f"{path.name} is not a readable Parquet file: {exc}") from None
    index = 0
    for batch in parquet_file.iter_batches(batch_size=1024):
        for record in batch.to_pylist():
            index += 1
            yield index, record


def _read_text(path: Path) -> Iterator[tuple[int, dict]]:
    with path.open("rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            text = _decode_line(path, raw, line_number).rstrip("\r\n")
            if text.strip():
                yield line_number, {"text": text}


def count_records(path: str | Path) -> int:
    """Number of records in a file, cheaply where the format allows (JSONL lines, Parquet metadata)."""
    path = Path(path)
    kind = file_kind(path)
    if kind in ("jsonl", "txt"):
        with path.open("rb") as handle:
            return sum(1 for raw in handle if raw.strip())
    if kind == "parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    return sum(1 for _ in read_records(path))


# -- format detection ----------------------------------------------------------------------------

FORMATS = ("text", "prompt_completion", "messages", "preference")

#: Accepted column names for each role, in order of preference.
TEXT_COLUMNS = ("text", "content")
PROMPT_COLUMNS = ("prompt", "instruction", "question", "query")
INPUT_COLUMNS = ("input", "context")
COMPLETION_COLUMNS = ("completion", "response", "output", "answer")
MESSAGES_COLUMNS = ("messages", "conversations", "conversation")
CHOSEN_COLUMNS = ("chosen",)
REJECTED_COLUMNS = ("rejected",)

#: ShareGPT-style speaker names mapped onto chat roles.
_SPEAKER_ROLES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "bot": "assistant",
    "model": "assistant",
    "tool": "tool",
}


@dataclass(frozen=True)
class DetectedFormat:
    """Which shape the data has and which column holds each part."""

    format: str
    """text, prompt_completion, messages or preference."""
    columns: Mapping[str, str]
    """Role -> column name. Roles: text; prompt, completion (and optional input, the Alpaca
    "input" joined to the instruction); messages; prompt (optional), chosen, rejected."""

    def describe(self) -> str:
        """E.g. "prompt_completion (prompt='instruction', completion='output')"."""
        used = ", ".join(f"{role}={column!r}" for role, column in self.columns.items())
        return f"{self.format} ({used})"


def _first_present(columns: Iterable[str], candidates: Sequence[str]) -> str | None:
    available = set(columns)
    for name in candidates:
        if name in available:
            return name
    lowered = {column.lower(): column for column in available}
    for name in candidates:
        if name in lowered:
            return lowered[name]
    return None


def detect_format(records: Iterable[Mapping[str, Any]], expected: str = "auto", source: str = "the dataset") -> DetectedFormat:
    """Decide the data's shape from the columns of `records` (a few dozen rows are plenty).

    Order of preference: preference (has chosen and rejected), messages (has
    messages/conversations), prompt_completion (a prompt column and a
    completion column), text (text/content). `expected` forces one format (the
    plan's `data.format`); "auto" detects. Raises `DatasetError` listing the
    columns found and the accepted names when nothing matches.
    """
    columns: list[str] = []
    seen = set()
    for record in records:
        for name in record:
            if name not in seen:
                seen.add(name)
                columns.append(name)
    if not columns:
        raise DatasetError(f"{source} has no columns: each record needs named fields such as text")

    candidates: dict[str, dict[str, str]] = {}
    chosen = _first_present(columns, CHOSEN_COLUMNS)
    rejected = _first_present(columns, REJECTED_COLUMNS)
    prompt = _first_present(columns, PROMPT_COLUMNS)
    if chosen and rejected:
        roles = {"chosen": chosen, "rejected": rejected}
        if prompt:
            roles = {"prompt": prompt, **roles}
        candidates["preference"] = roles
    messages = _first_present(columns, MESSAGES_COLUMNS)
    if messages:
        candidates["messages"] = {"messages": messages}
    completion = _first_present(columns, COMPLETION_COLUMNS)
    if prompt and completion:
        roles = {"prompt": prompt, "completion": completion}
        extra_input = _first_present(columns, INPUT_COLUMNS)
        if extra_input and prompt.lower() == "instruction":
            roles["input"] = extra_input
        candidates["prompt_completion"] = roles
    text = _first_present(columns, TEXT_COLUMNS)
    if text:
        candidates["text"] = {"text": text}

    accepted = {
        "text": f"a text column ({' or '.join(TEXT_COLUMNS)})",
        "prompt_completion": f"a prompt column ({'/'.join(PROMPT_COLUMNS)}) and a completion column ({'/'.join(COMPLETION_COLUMNS)})",
        "messages": f"a chat column ({'/'.join(MESSAGES_COLUMNS)})",
        "preference": "chosen and rejected columns (and usually prompt)",
    }
    found = ", ".join(columns)
    if expected != "auto":
        if expected not in FORMATS:
            raise DatasetError(f"data format {expected!r} is not one of auto, {', '.join(FORMATS)}")
        if expected not in candidates:
            raise DatasetError(f"{source} does not look like {expected} data: it needs {accepted[expected]}; found columns: {found}")
        return DetectedFormat(expected, candidates[expected])
    for name in ("preference", "messages", "prompt_completion", "text"):
        if name in candidates:
            return DetectedFormat(name, candidates[name])
    raise DatasetError(
        f"cannot tell the format of {source} from its columns ({found}): use "
        + "; or ".join(accepted.values())
    )


# -- validation ----------------------------------------------------------------------------------


def _is_chat(value: Any) -> bool:
    return isinstance(value, list)


def _check_text(value: Any, column: str) -> str | None:
    """The problem with one text cell, or None."""
    if value is None:
        return f"column {column!r} is missing"
    if not isinstance(value, str):
        return f"column {column!r} should be text, got {type(value).__name__}"
    if not value.strip():
        return f"column {column!r} is empty"
    return None


def _check_messages(value: Any, column: str, need_assistant: bool = True) -> str | None:
    """The problem with a list of chat turns, or None."""
    if value is None:
        return f"column {column!r} is missing"
    if not isinstance(value, list):
        return f"column {column!r} should be a list of chat turns, got {type(value).__name__}"
    if not value:
        return f"column {column!r} has no turns"
    has_assistant = False
    for position, turn in enumerate(value, start=1):
        if not isinstance(turn, dict):
            return f"turn {position} of column {column!r} should be an object with role and content, got {type(turn).__name__}"
        speaker = turn.get("role", turn.get("from"))
        content = turn.get("content", turn.get("value"))
        if speaker is None:
            return f"turn {position} of column {column!r} has no role (or from)"
        role = _SPEAKER_ROLES.get(str(speaker).lower())
        if role is None:
            return f"turn {position} of column {column!r} has unknown role {speaker!r} (use system, user or assistant)"
        if not isinstance(content, str):
            return f"turn {position} of column {column!r} should have text content, got {type(content).__name__}"
        if role == "assistant":
            if not content.strip():
                return f"turn {position} of column {column!r} is an empty assistant reply"
            has_assistant = True
    if need_assistant and not has_assistant:
        return f"column {column!r} has no assistant turn, so there is nothing to learn from"
    return None


def validate_record(record: Mapping[str, Any], detected: DetectedFormat) -> str | None:
    """The first problem with one record under `detected`'s format, or None when it is usable."""
    cols = detected.columns
    if detected.format == "text":
        return _check_text(record.get(cols["text"]), cols["text"])
    if detected.format == "prompt_completion":
        problem = _check_text(record.get(cols["prompt"]), cols["prompt"])
        if problem:
            return problem
        if "input" in cols and record.get(cols["input"]) not in (None, "") and not isinstance(record.get(cols["input"]), str):
            return f"column {cols['input']!r} should be text, got {type(record.get(cols['input'])).__name__}"
        return _check_text(record.get(cols["completion"]), cols["completion"])
    if detected.format == "messages":
        return _check_messages(record.get(cols["messages"]), cols["messages"])
    if detected.format == "preference":
        if "prompt" in cols:
            prompt = record.get(cols["prompt"])
            problem = _check_messages(prompt, cols["prompt"], need_assistant=False) if _is_chat(prompt) else _check_text(prompt, cols["prompt"])
            if problem:
                return problem
        for role in ("chosen", "rejected"):
            value = record.get(cols[role])
            problem = _check_messages(value, cols[role]) if _is_chat(value) else _check_text(value, cols[role])
            if problem:
                return problem
        if record.get(cols["chosen"]) == record.get(cols["rejected"]):
            return f"columns {cols['chosen']!r} and {cols['rejected']!r} are identical, so the pair teaches no preference"
        return None
    raise DatasetError(f"unknown data format {detected.format!r}")  # pragma: no cover - DetectedFormat is built here


def validate_records(rows: Iterable[tuple[int, Mapping[str, Any]]], detected: DetectedFormat, source: str | Path) -> int:
    """Check every `(row_number, record)`; return how many there were.

    Raises `DatasetError` at the first bad row, naming it the way `describe_row`
    does ("line 5 of data.jsonl: column 'completion' is empty"). `source` is the
    file path (or any name) used in the message.
    """
    count = 0
    for row_number, record in rows:
        problem = validate_record(record, detected)
        if problem:
            raise DatasetError(f"{describe_row(source, row_number)}: {problem}")
        count += 1
    return count


def normalize_messages(turns: list) -> list[dict]:
    """Chat turns as [{"role", "content"}], mapping ShareGPT's from/value and human/gpt names."""
    return [
        {
            "role": _SPEAKER_ROLES.get(str(turn.get("role", turn.get("from"))).lower(), "user"),
            "content": turn.get("content", turn.get("value")),
        }
        for turn in turns
    ]


def normalize_record(record: Mapping[str, Any], detected: DetectedFormat) -> dict:
    """One validated record with canonical keys (what TRL's trainers expect).

    text -> {"text"}; prompt_completion -> {"prompt", "completion"} (an Alpaca "input"
    is appended to the instruction after a blank line); messages -> {"messages"} with
    role/content turns; preference -> {"prompt", "chosen", "rejected"} ("prompt" only when
    the data has one; chat-shaped values are normalised turn by turn).
    """
    cols = detected.columns
    if detected.format == "text":
        return {"text": record[cols["text"]]}
    if detected.format == "prompt_completion":
        prompt = record[cols["prompt"]]
        extra = record.get(cols["input"]) if "input" in cols else None
        if isinstance(extra, str) and extra.strip():
            prompt = f"{prompt}\n\n{extra}"
        return {"prompt": prompt, "completion": record[cols["completion"]]}
    if detected.format == "messages":
        return {"messages": normalize_messages(record[cols["messages"]])}
    out = {}
    for role in ("prompt", "chosen", "rejected"):
        if role in cols:
            value = record[cols[role]]
            out[role] = normalize_messages(value) if _is_chat(value) else value
    return out


# -- token lengths -------------------------------------------------------------------------------

#: The approximation used without a tokenizer. OpenAI's rule of thumb: "one token generally
#: corresponds to ~4 characters of text for common English text" (help.openai.com, "What are
#: tokens and how to count them?"). Code and non-English text use more tokens per character.
CHARS_PER_TOKEN = 4

#: Tokens we allow per chat turn for the template's role markers (e.g. "<|im_start|>user\n" ...
#: "<|im_end|>\n"). Our own approximation; the exact count depends on the model's chat template.
TOKENS_PER_TURN = 4


def _chat_text(turns: list) -> str:
    return "\n".join(str(turn.get("content", turn.get("value", ""))) for turn in turns)


def example_texts(record: Mapping[str, Any], detected: DetectedFormat) -> tuple[list[str], int]:
    """The sequences one record becomes, and the chat-turn count they carry.

    text and prompt_completion give one sequence; messages one (all turns joined);
    preference two (prompt + chosen, prompt + rejected): the longer one sets the length.
    """
    normal = normalize_record(record, detected)
    if detected.format == "text":
        return [normal["text"]], 0
    if detected.format == "prompt_completion":
        return [normal["prompt"] + "\n" + normal["completion"]], 0
    if detected.format == "messages":
        return [_chat_text(normal["messages"])], len(normal["messages"])
    prompt = normal.get("prompt", "")
    turns = 0
    if isinstance(prompt, list):
        turns += len(prompt)
        prompt = _chat_text(prompt)
    texts = []
    for role in ("chosen", "rejected"):
        value = normal[role]
        if isinstance(value, list):
            turns = max(turns, len(value))
            value = _chat_text(value)
        texts.append(f"{prompt}\n{value}" if prompt else value)
    return texts, turns


def completion_text(record: Mapping[str, Any], detected: DetectedFormat) -> tuple[str, int]:
    """The part of one record that training puts a loss on, and its chat-turn count: the completion
    (prompt_completion), the assistant turns (messages), the chosen reply (preference), all of it (text).
    Its tokens are what the Tinker LoRA primer calls completion tokens (advisor.recommend's capacity check)."""
    normal = normalize_record(record, detected)
    if detected.format == "text":
        return normal["text"], 0
    if detected.format == "prompt_completion":
        return normal["completion"], 0
    if detected.format == "messages":
        replies = [turn for turn in normal["messages"] if turn.get("role") == "assistant"]
        return _chat_text(replies), len(replies)
    chosen = normal["chosen"]
    if isinstance(chosen, list):
        return _chat_text(chosen), len(chosen)
    return str(chosen), 0


def find_tokenizer_file(model: str | None) -> Path | None:
    """A local tokenizer.json for `model`, or None.

    Looks in: the model directory itself ("demo" is the bundled model), then the
    Hugging Face cache (`$HF_HOME/hub` or ~/.cache/huggingface/hub) for a hub id.
    Never touches the network.
    """
    if not model:
        return None
    from advisor.plan import DEMO_MODEL_DIR

    directory = DEMO_MODEL_DIR if model == "demo" else Path(model).expanduser()
    if directory.is_file() and directory.name == "tokenizer.json":
        return directory
    if (directory / "tokenizer.json").is_file():
        return directory / "tokenizer.json"
    hub_id = model
    try:
        from advisor import specs

        hub_id = specs.canonical_model_id(model) or model
    except Exception:  # specs missing, or the name is not in the catalogue: try it as given
        pass
    if "/" not in hub_id:
        return None
    cache = Path(os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub")
    repo_dir = cache / ("models--" + hub_id.replace("/", "--"))
    for candidate in sorted(repo_dir.glob("snapshots/*/tokenizer.json")):
        return candidate
    return None


#: config.json keys that hold a model's longest sequence, in the order transformers' configs use them.
MAX_LENGTH_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def config_max_length(model_dir: str | Path) -> int | None:
    """The longest sequence the model in `model_dir` accepts, from its config.json (None: no such file or key)."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    return next((config[key] for key in MAX_LENGTH_KEYS if isinstance(config.get(key), int)), None)


def model_max_length(model: str | None) -> int | None:
    """The longest sequence `model` accepts (max_position_embeddings), when we can tell offline."""
    if not model:
        return None
    from advisor.plan import DEMO_MODEL_DIR

    directory = DEMO_MODEL_DIR if model == "demo" else Path(model).expanduser()
    from_config = config_max_length(directory)
    if from_config is not None:
        return from_config
    try:
        from advisor import specs

        spec = specs.resolve_model(model)
    except Exception:  # unknown model or specs not available: no cap
        return None
    for key in ("max_position_embeddings", "max_seq_len", "n_positions"):
        value = getattr(spec, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


class TokenCounter:
    """Counts tokens with a real tokenizer.json, or approximates at ~4 characters per token."""

    def __init__(self, tokenizer_file: Path | None, model: str | None = None):
        self.tokenizer = None
        self.exact = False
        if tokenizer_file is not None:
            try:
                from tokenizers import Tokenizer

                self.tokenizer = Tokenizer.from_file(str(tokenizer_file))
                self.exact = True
            except Exception as exc:  # unreadable or incompatible file: fall back, and say so
                self.description = (
                    f"approximate: ~{CHARS_PER_TOKEN} characters per token ({tokenizer_file} could not be loaded: {exc})"
                )
        if self.exact:
            self.description = f"exact: tokenizer from {tokenizer_file}"
        elif tokenizer_file is None:
            why = f"no tokenizer.json found on this machine for {model}" if model else "no model given"
            self.description = f"approximate: ~{CHARS_PER_TOKEN} characters per token ({why})"

    def count(self, texts: list[str]) -> list[int]:
        """Token count per text (no special tokens)."""
        if self.tokenizer is not None:
            return [len(encoding.ids) for encoding in self.tokenizer.encode_batch(texts, add_special_tokens=False)]
        return [math.ceil(len(text) / CHARS_PER_TOKEN) for text in texts]


# -- the profile ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenStats:
    """Token lengths per example (the longest sequence an example produces)."""

    p50: int
    """Median length (nearest-rank)."""
    p95: int
    """95th percentile length (nearest-rank): 95% of examples are at most this long."""
    max: int
    """Longest example."""
    mean: float
    """Average length."""
    total: int
    """Tokens in all profiled examples."""
    completion_total: int = 0
    """Tokens that carry the training loss in the profiled examples (see `completion_text`)."""


@dataclass(frozen=True)
class Histogram:
    """Token-length histogram for the UI: counts[i] examples have edges[i] <= length < edges[i+1]."""

    edges: tuple[int, ...]
    """Bin edges in tokens, len(counts) + 1 of them, equally spaced."""
    counts: tuple[int, ...]
    """Examples per bin."""


@dataclass(frozen=True)
class DatasetProfile:
    """What the profiler found, and what it recommends."""

    source: str
    """The dataset as given (bundled name, path)."""
    path: str
    """The file read."""
    format: str
    """text, prompt_completion, messages or preference."""
    columns: Mapping[str, str]
    """Role -> column used (see DetectedFormat.columns)."""
    examples: int
    """Examples in the file."""
    examples_profiled: int
    """Examples read and measured (fewer than `examples` when capped by max_rows)."""
    tokens: TokenStats
    """Token lengths of the profiled examples."""
    tokens_exact: bool
    """True when counted with the model's tokenizer, False for the ~4 chars/token approximation."""
    tokenizer: str
    """How tokens were counted, in words (exact with which file, or approximate and why)."""
    histogram: Histogram
    """Length histogram of the profiled examples."""
    recommended_seq_len: int
    """p95 rounded up to a multiple of 64 from the 2^k / 1.5 x 2^k ladder, capped at the model's maximum."""
    seq_len_reason: str
    """Why that sequence length."""
    truncated_share: float
    """Share of profiled examples longer than recommended_seq_len (they would be truncated)."""
    pack: bool
    """Whether to pack several examples into each sequence."""
    pack_reason: str
    """Why (or why not) pack."""
    model_max_len: int | None
    """The model's longest sequence, when known."""
    warnings: tuple[str, ...] = ()
    """Things to look at (tiny dataset, long tails, ...)."""

    @property
    def estimated_total_tokens(self) -> int:
        """Tokens in the whole file (scaled up from the profiled rows when capped)."""
        if self.examples_profiled == 0:
            return 0
        return round(self.tokens.total * self.examples / self.examples_profiled)

    @property
    def estimated_completion_tokens(self) -> int:
        """Loss-carrying tokens in the whole file (scaled up like `estimated_total_tokens`)."""
        if self.examples_profiled == 0:
            return 0
        return round(self.tokens.completion_total * self.examples / self.examples_profiled)

    def to_dict(self) -> dict:
        """Plain JSON-ready dict (for `tunewise profile --json` and the UI)."""
        return {
            "source": self.source,
            "path": self.path,
            "format": self.format,
            "columns": dict(self.columns),
            "examples": self.examples,
            "examples_profiled": self.examples_profiled,
            "tokens": {
                "p50": self.tokens.p50,
                "p95": self.tokens.p95,
                "max": self.tokens.max,
                "mean": round(self.tokens.mean, 2),
                "total": self.tokens.total,
                "estimated_total": self.estimated_total_tokens,
                "completion_total": self.tokens.completion_total,
                "estimated_completion": self.estimated_completion_tokens,
            },
            "tokens_exact": self.tokens_exact,
            "tokenizer": self.tokenizer,
            "histogram": {"edges": list(self.histogram.edges), "counts": list(self.histogram.counts)},
            "recommended_seq_len": self.recommended_seq_len,
            "seq_len_reason": self.seq_len_reason,
            "truncated_share": round(self.truncated_share, 4),
            "pack": self.pack,
            "pack_reason": self.pack_reason,
            "model_max_len": self.model_max_len,
            "warnings": list(self.warnings),
        }


def percentile(sorted_values: Sequence[int], pct: float) -> int:
    """Nearest-rank percentile of an ascending list: the smallest value with at least pct% at or below it."""
    if not sorted_values:
        return 0
    rank = max(1, math.ceil(pct / 100.0 * len(sorted_values)))
    return sorted_values[rank - 1]


def _nice_width(span: int, max_bins: int) -> int:
    """Smallest 1/2/5 x 10^k bin width giving at most max_bins bins over span."""
    raw = max(1.0, span / max_bins)
    magnitude = 10 ** math.floor(math.log10(raw))
    for step in (1, 2, 5, 10):
        width = step * magnitude
        if width >= raw:
            return int(width)
    return int(10 * magnitude)  # pragma: no cover - the loop always returns


def histogram(lengths: Sequence[int], max_bins: int = 20) -> Histogram:
    """Equal-width bins with a round width (1, 2, 5 x 10^k tokens), from the shortest length (rounded down) to the longest."""
    if not lengths:
        return Histogram((0, 1), (0,))
    top = max(lengths)
    width = _nice_width(top - min(lengths) + 1, max_bins)
    start = min(lengths) // width * width
    bins = (top - start) // width + 1
    counts = [0] * bins
    for length in lengths:
        counts[(length - start) // width] += 1
    return Histogram(tuple(start + i * width for i in range(bins + 1)), tuple(counts))


def seq_len_ladder(limit: int = 1 << 20) -> list[int]:
    """64, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, ...: 2^k and 1.5 x 2^k, multiples of 64."""
    ladder = {64}
    power = 128
    while power <= limit:
        ladder.add(power)
        ladder.add(power * 3 // 2)
        power *= 2
    return sorted(step for step in ladder if step <= limit)


def recommend_seq_len(p95: int, max_len: int | None) -> tuple[int, str]:
    """p95 rounded up the 2^k / 1.5 x 2^k ladder of multiples of 64, capped at the model maximum."""
    choice = next(step for step in seq_len_ladder() if step >= max(p95, 1))
    reason = f"p95 of token lengths is {p95}; rounded up to {choice} (a multiple of 64 on the 2^k / 1.5 x 2^k ladder)"
    if max_len is not None and choice > max_len:
        choice = max_len
        reason += f", capped at the model's maximum of {max_len} tokens"
    return choice, reason


def profile_dataset(dataset: str | Path, model: str | None = None, max_rows: int = 100_000, expected_format: str = "auto") -> DatasetProfile:
    """Profile a local dataset (or a bundled name) for `model`.

    Reads up to `max_rows` rows (the example count still covers the whole file),
    detects and validates the format (the first malformed row raises
    `DatasetError` naming it), and measures token lengths with the model's
    tokenizer.json when it is on this machine, else with the labelled ~4
    characters per token approximation.
    """
    if not isinstance(max_rows, int) or max_rows < 1:
        raise DatasetError(f"max_rows must be a whole number of at least 1, got {max_rows!r}")
    rows: list[tuple[int, dict]] = []
    truncated = False
    try:
        path = resolve_dataset(dataset)
    except HubDatasetName as hub:
        path = Path(hub.name)
        rows, hub_size = read_hub_records(hub.name, max_rows + 1)
        truncated = len(rows) > max_rows
        rows = rows[:max_rows]
    else:
        for row in read_records(path):
            if len(rows) >= max_rows:
                truncated = True
                break
            rows.append(row)
        hub_size = None
    detected = detect_format((record for _, record in rows[:200]), expected_format, source=path.name)
    validate_records(rows, detected, path)
    if not truncated:
        examples = len(rows)
    elif hub_size is not None:
        examples = hub_size
    elif path.is_file():
        examples = count_records(path)
    else:
        examples = len(rows)  # a hub stream of unknown size: at least this many

    counter = TokenCounter(find_tokenizer_file(model), model)
    per_example_texts: list[list[str]] = []
    turn_counts: list[int] = []
    for _, record in rows:
        texts, turns = example_texts(record, detected)
        per_example_texts.append(texts)
        turn_counts.append(turns)
    flat = [text for texts in per_example_texts for text in texts]
    flat_counts = counter.count(flat)
    lengths = []
    position = 0
    for texts, turns in zip(per_example_texts, turn_counts):
        longest = max(flat_counts[position:position + len(texts)])
        position += len(texts)
        lengths.append(longest + TOKENS_PER_TURN * turns)
    completions = [completion_text(record, detected) for _, record in rows]
    completion_total = sum(counter.count([text for text, _ in completions])) + sum(
        TOKENS_PER_TURN * turns for _, turns in completions)
    ordered = sorted(lengths)
    stats = TokenStats(
        p50=percentile(ordered, 50),
        p95=percentile(ordered, 95),
        max=ordered[-1],
        mean=sum(ordered) / len(ordered),
        total=sum(ordered),
        completion_total=completion_total,
    )
    max_len = model_max_length(model)
    seq_len, seq_reason = recommend_seq_len(stats.p95, max_len)
    over = sum(1 for length in lengths if length > seq_len)
    truncated_share = over / len(lengths)
    if over:
        seq_reason += f"; {over} of {len(lengths)} examples ({truncated_share:.1%}) are longer and will be truncated"

    # Packing: when the average example fills at most half a sequence, most of every
    # padded batch is padding; packing concatenates examples so those tokens do work.
    fill = stats.mean / seq_len
    if detected.format == "preference":
        pack, pack_reason = False, "preference pairs are compared whole (chosen vs rejected), so they are not packed"
    elif fill <= 0.5 and len(lengths) >= 2:
        per_sequence = max(1, int(seq_len // max(stats.mean, 1)))
        pack = True
        pack_reason = (
            f"examples average {stats.mean:.0f} tokens, {fill:.0%} of a {seq_len}-token sequence: packing fits about "
            f"{per_sequence} per sequence instead of padding the rest"
        )
    else:
        pack = False
        pack_reason = f"examples average {stats.mean:.0f} tokens, {fill:.0%} of a {seq_len}-token sequence: little padding to save"

    warnings = []
    if not counter.exact:
        warnings.append(f"token counts are {counter.description}")
    if examples < 1000:
        warnings.append(f"only {examples} examples: the guide's SFT stage typically uses 10k-100k")
    if stats.max > 4 * max(stats.p95, 1):
        warnings.append(f"the longest example ({stats.max} tokens) is over 4x the p95 ({stats.p95}): check for outliers")
    if truncated:
        warnings.append(f"profiled the first {len(rows)} of {examples} examples")
    return DatasetProfile(
        source=str(dataset),
        path=str(path),
        format=detected.format,
        columns=dict(detected.columns),
        examples=examples,
        examples_profiled=len(rows),
        tokens=stats,
        tokens_exact=counter.exact,
        tokenizer=counter.description,
        histogram=histogram(lengths),
        recommended_seq_len=seq_len,
        seq_len_reason=seq_reason,
        truncated_share=truncated_share,
        pack=pack,
        pack_reason=pack_reason,
        model_max_len=max_len,
        warnings=tuple(warnings),
    )


def format_profile(profile: DatasetProfile) -> str:
    """A readable multi-line report of a profile (what `tunewise profile` prints)."""
    lines = [
        f"dataset      {profile.source} ({profile.path})",
        f"format       {profile.format} ({', '.join(f'{role}={col!r}' for role, col in profile.columns.items())})",
        f"examples     {profile.examples}" + (f" (profiled {profile.examples_profiled})" if profile.examples_profiled != profile.examples else ""),
        f"tokens       p50 {profile.tokens.p50}, p95 {profile.tokens.p95}, max {profile.tokens.max}, "
        f"mean {profile.tokens.mean:.1f}, total ~{profile.estimated_total_tokens} "
        f"(~{profile.estimated_completion_tokens} carry the loss)",
        f"counted by   {profile.tokenizer}",
        f"seq_len      {profile.recommended_seq_len}: {profile.seq_len_reason}",
        f"packing      {'yes' if profile.pack else 'no'}: {profile.pack_reason}",
        "histogram    (tokens: examples)",
    ]
    peak = max(profile.histogram.counts) or 1
    for index, count in enumerate(profile.histogram.counts):
        low, high = profile.histogram.edges[index], profile.histogram.edges[index + 1]
        bar = "#" * max(1 if count else 0, round(30 * count / peak))
        lines.append(f"  {low:>6}-{high - 1:<6} {count:>6} {bar}")
    for warning in profile.warnings:
        lines.append(f"warning: {warning}")
    return "\n".join(lines)
