"""events.jsonl: the append-only log a run writes and the UI tails.

One JSON object per line, flushed (and fsync'd) after each, so a reader
sees every event the moment it is written and a crash loses at most the
line being written. Every event has `event` (its kind), `time` (Unix
seconds) and `step` (optimizer step, 0 before training).

Kinds, in the order a run meets them:

- `started` (plan summary, pid, world size, versions), `notice` (something
  the pre-flight check adjusted or wants seen), `model_loaded`,
  `train_begin` (total steps, start step), `resumed` (written by the
  supervisor before a resumed attempt: step and checkpoint);
- while training: `log` (the trainer's metric keys unchanged: loss,
  learning_rate, grad_norm, rewards/margins, objective/kl, ...), `eval`,
  `forgetting` (original-domain loss against its baseline), `replay` and
  `ewc` (the forgetting safeguards' set-up and figures), `sample` (policy
  samples: reward, KL to the reference, diversity), `alert` (a monitor
  fired: kind, plain-language message, the numbers), `note` (an
  informational message), `checkpoint`, `train_end`;
- pipelines: `stage` (a step of the pipeline begins or ends) and
  `comparison` (the side-by-side table of the compare pipeline);
- exactly one terminal event per attempt: `finished`, `failed` (error,
  `user_error`, traceback or log lines, exit code / signal) or `stopped`
  (reason).

Readers use `read_events(path, offset)`, which returns only the complete
lines after `offset` and the offset to resume from: a half-written last line
is left for the next read, and a corrupt line is skipped and reported as a
`corrupt` pseudo-event rather than raising.

Imports nothing heavy: the UI and the supervisor use it too.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from pathlib import Path
from typing import Any

EVENTS_FILE = "events.jsonl"
TERMINAL_EVENTS = ("finished", "failed", "stopped")


def _clean(value: Any) -> Any:
    """Make a value JSON-safe: NaN/inf become None (JSON has no NaN), tensors become floats."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # torch / numpy scalars
        try:
            return _clean(value.item())
        except (ValueError, RuntimeError):
            return str(value)
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if isinstance(value, Path):
        return str(value)
    return str(value)


class EventWriter:
    """Appends events to a run's events.jsonl; safe to share between threads."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self.step = 0

    def emit(self, event: str, step: int | None = None, **fields: Any) -> dict:
        if step is not None:
            self.step = int(step)
        record = {"event": event, "time": round(time.time(), 3), "step": self.step}
        record.update(_clean(fields))
        line = json.dumps(record, ensure_ascii=False) + "\n"
        with self._lock:
            # Open per write: append mode is atomic per write() for small lines, and a
            # second process (DDP rank, supervisor) can append without sharing a handle.
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(line)
                handle.flush()
                os.fsync(handle.fileno())
        return record


def read_events(path: str | Path, offset: int = 0) -> tuple[list[dict], int]:
    """Events from byte `offset` to the last complete line, and the new offset.

    A missing file gives ([], offset). A last line without its newline is not
    consumed (the writer may be mid-line). A line that is not valid JSON is
    returned as {"event": "corrupt", "offset": ..., "text": ...} and skipped.
    """
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            handle.seek(offset)
            chunk = handle.read()
    except FileNotFoundError:
        return [], offset
    end = chunk.rfind(b"\n")
    if end < 0:
        return [], offset
    complete = chunk[: end + 1]
    events: list[dict] = []
    position = offset
    for raw in complete.split(b"\n")[:-1]:
        line_offset = position
        position += len(raw) + 1
        if not raw.strip():
            continue
        try:
            record = json.loads(raw.decode("utf-8"))
            if not isinstance(record, dict) or "event" not in record:
                raise ValueError("not an event object")
        except (ValueError, UnicodeDecodeError):
            events.append({"event": "corrupt", "offset": line_offset, "text": raw[:200].decode("utf-8", "replace")})
            continue
        events.append(record)
    return events, offset + len(complete)


def read_all_events(path: str | Path) -> list[dict]:
    """Every complete event in the file (convenience for tests and summaries)."""
    events, _ = read_events(path, 0)
    return events
