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

A full disk. A writer whose line was cut short removes its fragment when it
can; one that finds the file ending mid-line (a writer killed, or a fragment
it could not remove) starts a new line first, so the fragment reads as one
`corrupt` line and the next event is intact. Each attempt of a run keeps a
small reserve file (`.disk-reserve`, made by the supervisor): a write that
fails with ENOSPC deletes it and tries once more, so the `failed` event that
says the disk is full, and the watcher's record of the exit, still fit.

Imports nothing heavy: the UI and the supervisor use it too.
"""

from __future__ import annotations

import errno
import json
import math
import os
import threading
import time
from pathlib import Path
from typing import Any

EVENTS_FILE = "events.jsonl"
TERMINAL_EVENTS = ("finished", "failed", "stopped")
RESERVE_FILE = ".disk-reserve"
#: Room kept for the last records of an attempt on a full disk: the `failed` event, the watcher's
#: run.json and its log line, each rounded up to a 4 KiB block, with room to spare.
RESERVE_BYTES = 32 * 1024


def make_reserve(directory: str | Path, size: int = RESERVE_BYTES) -> bool:
    """Create (or top up) the disk reserve in `directory`; False when there is no room for it.

    Random bytes, not zeros: a compressing filesystem would store zeros in no space at all."""
    path = Path(directory) / RESERVE_FILE
    try:
        if path.is_file() and path.stat().st_size >= size:
            return True
        with open(path, "wb") as handle:
            handle.write(os.urandom(size))
            handle.flush()
            os.fsync(handle.fileno())
        return True
    except OSError:
        Path(path).unlink(missing_ok=True)
        return False


def release_reserve(directory: str | Path) -> bool:
    """Delete the disk reserve in `directory` to make room; True when there was one to delete."""
    try:
        (Path(directory) / RESERVE_FILE).unlink()
        return True
    except OSError:
        return False


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


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
        data = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        with self._lock:
            try:
                self._append(data)
            except OSError as exc:
                if not (is_disk_full(exc) and release_reserve(self.path.parent)):
                    raise
                self._append(data)  # the reserve made room for this line and the run's last few records
        return record

    def _append(self, data: bytes) -> None:
        # Open per write: append mode is atomic per write() for small lines, and a second
        # process (DDP rank, supervisor) can append without sharing a handle.
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                data = b"\n" + data  # the file ends mid-line: end that fragment, or this event would join it
            written = 0
            try:
                while written < len(data):
                    written += os.write(fd, data[written:])
                os.fsync(fd)
            except OSError:
                # Cut short (disk full): take back the fragment unless another writer appended since.
                if written and os.fstat(fd).st_size == size + written:
                    os.ftruncate(fd, size)
                raise
        finally:
            os.close(fd)


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
