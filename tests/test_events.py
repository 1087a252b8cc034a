"""events.jsonl: every event is one flushed line; readers resume from an offset and
tolerate a half-written or corrupt line."""

from __future__ import annotations

import json
import math

from trainer.events import EventWriter, read_all_events, read_events


def test_events_carry_kind_time_and_step(tmp_path):
    writer = EventWriter(tmp_path / "events.jsonl")
    writer.emit("started", pid=123)
    writer.emit("log", step=5, loss=1.25, **{"rewards/margins": 0.5})
    writer.emit("checkpoint", path=tmp_path / "ckpt")
    events = read_all_events(tmp_path / "events.jsonl")
    assert [e["event"] for e in events] == ["started", "log", "checkpoint"]
    assert all({"event", "time", "step"} <= set(e) for e in events)
    assert events[1]["rewards/margins"] == 0.5 and events[1]["step"] == 5
    # The step carries over to later events that do not give one.
    assert events[2]["step"] == 5 and events[2]["path"] == str(tmp_path / "ckpt")


def test_nan_and_infinity_become_null(tmp_path):
    writer = EventWriter(tmp_path / "events.jsonl")
    writer.emit("log", loss=math.nan, grad_norm=math.inf)
    line = (tmp_path / "events.jsonl").read_text()
    assert json.loads(line)["loss"] is None and json.loads(line)["grad_norm"] is None


def test_reader_resumes_from_offset_and_waits_for_a_half_written_line(tmp_path):
    path = tmp_path / "events.jsonl"
    writer = EventWriter(path)
    writer.emit("log", step=1, loss=2.0)
    events, offset = read_events(path, 0)
    assert len(events) == 1 and offset == path.stat().st_size

    with open(path, "a") as handle:
        handle.write('{"event": "log", "time": 1, "step": 2, "lo')  # the writer is mid-line
    events, offset2 = read_events(path, offset)
    assert events == [] and offset2 == offset

    with open(path, "a") as handle:
        handle.write('ss": 1.5}\n')
    events, offset3 = read_events(path, offset2)
    assert [e["loss"] for e in events] == [1.5] and offset3 == path.stat().st_size


def test_corrupt_line_is_reported_and_skipped(tmp_path):
    path = tmp_path / "events.jsonl"
    writer = EventWriter(path)
    writer.emit("log", step=1, loss=2.0)
    with open(path, "a") as handle:
        handle.write("\x00garbage{{\n")
    writer.emit("log", step=2, loss=1.0)
    events = read_all_events(path)
    assert [e["event"] for e in events] == ["log", "corrupt", "log"]
    assert events[2]["loss"] == 1.0


def test_missing_file_reads_as_empty(tmp_path):
    assert read_events(tmp_path / "nope.jsonl", 0) == ([], 0)


def test_a_writer_after_a_half_written_line_starts_a_new_line(tmp_path):
    # A writer killed mid-line (or cut short by a full disk) leaves a fragment without its newline;
    # the next event, e.g. the supervisor's `resumed`, must not be glued onto it and lost.
    path = tmp_path / "events.jsonl"
    writer = EventWriter(path)
    writer.emit("log", step=6, loss=2.0)
    with open(path, "ab") as handle:
        handle.write(b'{"event": "log", "time": 179610929')
    EventWriter(path).emit("resumed", step=5, checkpoint="checkpoints/checkpoint-5")
    writer.emit("log", step=6, loss=1.9)
    events = read_all_events(path)
    assert [e["event"] for e in events] == ["log", "corrupt", "resumed", "log"]
    assert events[1]["text"] == '{"event": "log", "time": 179610929'
    assert events[2]["checkpoint"] == "checkpoints/checkpoint-5" and events[2]["step"] == 5
    assert path.read_bytes().endswith(b'"loss": 1.9}\n')
    # A file that ends with a newline gets no blank line.
    assert path.read_bytes().count(b"\n\n") == 0
