"""Faults: what happens when things break while a run is going.

Each test breaks something for real (SIGKILL of the trainer, a half-written
event line, a full disk, a deleted run directory, two launches at once, an app
restart, a burst of concurrent API requests; a disk filled by another process,
two resumes at the same instant, damaged checkpoints and run records, a paused
trainer) and checks that the user gets a clear status and loses no finished data.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import start_app, stop_app, wait_for
import trainer.status
from trainer import procs, rundir, supervisor
from trainer.events import EVENTS_FILE, read_all_events, read_events

pytestmark = pytest.mark.slow


def _losses(events: list[dict]) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in events if e.get("event") == "log" and isinstance(e.get("loss"), float)}


def _first_checkpoint(run_dir: Path):
    events, _ = read_events(run_dir / EVENTS_FILE, 0)
    saved = [e for e in events if e.get("event") == "checkpoint"]
    return saved[0] if saved else None


def test_sigkill_fails_with_signal_9_and_resume_matches_an_uninterrupted_run(make_plan, runs_dir, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    plan = make_plan(training__max_steps=24, training__save_steps=4)
    killed_id = supervisor.launch(plan, runs_dir, name="killed")
    reference_id = supervisor.launch(plan, runs_dir, name="reference")
    killed_dir = runs_dir / killed_id

    # Kill the trainer right after its first checkpoint, mid-training.
    checkpoint = wait_for(lambda: _first_checkpoint(killed_dir), timeout=240, poll=0.01, what="the first checkpoint")
    running = supervisor.status(killed_id, runs_dir)
    assert running.state == "running", running
    os.kill(running.pid, signal.SIGKILL)
    killed_at = time.time()

    failed = wait_for(
        lambda: (s := supervisor.status(killed_id, runs_dir)).state != "running" and s, timeout=10, what="the failed status", poll=0.02
    )
    assert time.time() - killed_at < 5
    assert failed.state == "failed" and failed.signal == 9, failed
    assert "signal 9" in failed.error and "failed (signal 9)" in failed.describe()

    # Events up to the kill are intact: every line is complete JSON, in order, none lost; the watcher
    # appends the `failed` event just after recording the exit in run.json.
    wait_for(lambda: read_all_events(killed_dir / EVENTS_FILE)[-1]["event"] == "failed", timeout=10,
             what="the watcher's failed event", poll=0.02)
    raw = (killed_dir / EVENTS_FILE).read_bytes()
    assert raw.endswith(b"\n")
    lines = raw.decode("utf-8").splitlines()
    parsed = [json.loads(line) for line in lines]
    assert [e["event"] for e in read_all_events(killed_dir / EVENTS_FILE)] == [e["event"] for e in parsed]
    assert parsed[-1]["event"] == "failed" and parsed[-1]["signal"] == 9
    killed_steps = sorted(_losses(parsed))
    assert killed_steps == list(range(1, killed_steps[-1] + 1)) and killed_steps[-1] >= checkpoint["step"]

    # Resume continues from the newest complete checkpoint in the same run directory.
    newest = rundir.last_checkpoint(killed_dir)
    resume_step = int(newest.name.split("-")[1])
    assert resume_step >= checkpoint["step"]
    assert supervisor.resume(killed_id, runs_dir) == killed_id
    reference = supervisor.wait(reference_id, timeout=300, runs_dir=runs_dir)
    resumed = supervisor.wait(killed_id, timeout=300, runs_dir=runs_dir)
    assert reference.state == "finished", reference
    assert resumed.state == "finished", (resumed, resumed.error_lines)
    assert resumed.attempts == 2 and resumed.step == 24

    events = read_all_events(killed_dir / EVENTS_FILE)
    marker = max(i for i, e in enumerate(events) if e["event"] == "resumed")
    assert events[marker]["step"] == resume_step
    after = _losses(events[marker:])
    assert sorted(after) == list(range(resume_step + 1, 25)), "the resumed attempt must log exactly the remaining steps"
    expected = _losses(read_all_events(runs_dir / reference_id / EVENTS_FILE))
    assert sorted(expected) == list(range(1, 25))
    for step, loss in after.items():
        assert math.isclose(loss, expected[step], rel_tol=1e-4, abs_tol=1e-5), (step, loss, expected[step])


@pytest.fixture
def small_disk(tmp_path):
    """A 450 KB filesystem (tmpfs, else a loop-mounted ext2 image): room for one tiny checkpoint, not two."""
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    attempts = [["mount", "-t", "tmpfs", "-o", "size=450k", "tmpfs", str(mount_point)]]
    if shutil.which("mkfs.ext2"):
        image = tmp_path / "small-disk.img"
        attempts.append(None)  # built below only when tmpfs failed
    reasons = []
    for command in attempts:
        if command is None:
            with open(image, "wb") as handle:
                handle.truncate(600 * 1024)
            made = subprocess.run(["mkfs.ext2", "-q", "-F", "-m", "0", str(image)], capture_output=True, text=True)
            if made.returncode != 0:
                reasons.append(made.stderr.strip())
                continue
            command = ["mount", "-o", "loop", str(image), str(mount_point)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode == 0:
            break
        reasons.append(f"{' '.join(command[:3])}: {done.stderr.strip()}")
    else:
        pytest.skip("cannot mount a size-limited filesystem here (needs root): " + "; ".join(reasons))
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


def test_full_disk_while_checkpointing_fails_clearly_and_keeps_earlier_data(make_plan, small_disk, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    runs = small_disk / "runs"
    plan = make_plan(training__max_steps=12, training__save_steps=2, training__keep_checkpoints=5)
    run_id = supervisor.launch(plan, runs)
    final = supervisor.wait(run_id, timeout=300, runs_dir=runs)
    run_dir = runs / run_id

    assert final.state == "failed", final
    assert "disk is full" in final.error and "No space left on device" in final.error, final.error
    assert "Traceback" not in final.error and not final.error_lines

    # What was finished before the disk filled up is intact: the plan, every earlier event, the first checkpoint.
    from advisor.plan import Plan

    assert Plan.load(run_dir / "plan.yaml") == plan
    events = read_all_events(run_dir / EVENTS_FILE)
    assert not [e for e in events if e["event"] == "corrupt"]
    saved = [e["step"] for e in events if e["event"] == "checkpoint"]
    assert saved and saved[0] == 2, saved
    assert sorted(_losses(events))[: saved[-1]] == list(range(1, saved[-1] + 1))
    newest = rundir.last_checkpoint(run_dir)
    assert newest is not None and newest.name == f"checkpoint-{saved[-1]}", (newest, saved)
    state = json.loads((newest / "trainer_state.json").read_text(encoding="utf-8"))
    assert state["global_step"] == saved[-1]
    from safetensors.torch import load_file

    assert load_file(str(newest / "adapter_model.safetensors"))  # the adapter weights load
    assert events[-1]["event"] == "failed" and events[-1]["user_error"] is True


def _fake_run(runs: Path, run_id: str, plan, events: bytes, attempt: dict) -> Path:
    """A run directory as the supervisor lays it out (plan.yaml, run.json, events.jsonl), without training."""
    run_dir = runs / run_id
    run_dir.mkdir(parents=True)
    plan.save(run_dir / "plan.yaml")
    started = attempt.setdefault("started_at", time.time() - 60)
    record = {"run_id": run_id, "name": None, "created_at": started, "summary": plan.summary(), "attempts": [attempt]}
    (run_dir / "run.json").write_text(json.dumps(record), encoding="utf-8")
    (run_dir / EVENTS_FILE).write_bytes(events)
    return run_dir


def _line(**event) -> bytes:
    return (json.dumps(event) + "\n").encode()


def test_corrupt_and_half_written_event_lines_give_a_clear_status(make_plan, runs_dir):
    from advisor import wizard
    from trainer import runs

    plan = make_plan()
    now = time.time()
    # A finished run whose log has a garbage line (a crash's zero-filled block) in the middle and a
    # half-written line at the end.
    finished = _fake_run(
        runs_dir, "20250101-000000-finished", plan,
        _line(event="started", time=now - 50, step=0)
        + _line(event="log", time=now - 40, step=1, loss=2.0)
        + b"\x00\x00\x00\x00{not json\n"
        + _line(event="log", time=now - 30, step=2, loss=1.5)
        + _line(event="finished", time=now - 20, step=2, output_dir="out")
        + b'{"event": "log", "time": 1, "st',
        {"started_at": now - 55, "pid": 999_999_999, "ended_at": now - 19, "exit_code": 0, "signal": None},
    )
    # A running run (this test process plays the trainer) whose writer is mid-line.
    running = _fake_run(
        runs_dir, "20250101-000001-running", plan,
        _line(event="started", time=now - 10, step=0) + _line(event="log", time=now - 5, step=1, loss=3.0)
        + b'{"event": "log", "time": 1.0, "step": 2, "lo',
        {"started_at": now - 12, "pid": os.getpid(), "pid_start": procs.process_start_ticks(os.getpid())},
    )

    done = supervisor.status(finished.name, runs_dir)
    assert (done.state, done.step, done.last_loss, done.output_dir) == ("finished", 2, 1.5, "out")
    live = supervisor.status(running.name, runs_dir)
    assert (live.state, live.step, live.last_loss) == ("running", 1, 3.0)
    assert [s.run_id for s in supervisor.list_runs(runs_dir)] == [running.name, finished.name]

    events, offset = supervisor.read_run_events(finished.name, 0, runs_dir)
    assert [e["event"] for e in events] == ["started", "log", "corrupt", "log", "finished"]
    assert offset == len((finished / EVENTS_FILE).read_bytes()) - len(b'{"event": "log", "time": 1, "st')

    # The half-written line is left for the next read; once the writer finishes it, it arrives.
    events, offset = supervisor.read_run_events(running.name, 0, runs_dir)
    assert [e["event"] for e in events] == ["started", "log"]
    with open(running / EVENTS_FILE, "ab") as handle:
        handle.write(b'ss": 2.5}\n')
    more, _ = supervisor.read_run_events(running.name, offset, runs_dir)
    assert more == [{"event": "log", "time": 1.0, "step": 2, "loss": 2.5}]
    live = supervisor.status(running.name, runs_dir)
    assert (live.step, live.last_loss) == (2, 2.5)

    # The app's run history shows both, without an error.
    statuses = runs.history(runs_dir)
    rows, ids = [wizard.run_row(status) for status in statuses], [status.run_id for status in statuses]
    assert ids == [running.name, finished.name] and len(rows) == 2


def test_a_truncated_checkpoint_is_never_resumed_from(make_plan, runs_dir):
    plan = make_plan()
    run_dir = _fake_run(
        runs_dir, "20250101-000002-stopped", plan,
        _line(event="started", time=time.time() - 5, step=0) + _line(event="stopped", time=time.time() - 4, step=4, reason="x"),
        {"started_at": time.time() - 6, "pid": 999_999_999, "ended_at": time.time() - 3, "exit_code": 0},
    )
    good = run_dir / "checkpoints" / "checkpoint-2"
    good.mkdir(parents=True)
    (good / "trainer_state.json").write_text('{"global_step": 2}', encoding="utf-8")
    cut = run_dir / "checkpoints" / "checkpoint-4"  # the disk filled up while this was saved
    cut.mkdir()
    (cut / "trainer_state.json").write_text('{"global_step": 4, "log_hist', encoding="utf-8")
    assert rundir.last_checkpoint(run_dir) == good


_NOW = time.time()


@pytest.mark.parametrize("record,events,named", [
    ({"attempts": "abc"}, None, "run.json: attempts is 'abc', not a list"),
    ({"attempts": [1]}, None, "run.json: attempt 1 is 1, not an object"),
    ({"created_at": "yesterday"}, None, "run.json: created_at is 'yesterday', not a number"),
    ({"run_id": 5}, None, "run.json: run_id is 5, not a string"),
    (None, [{"event": "started", "time": _NOW - 9, "step": 0}, {"event": "finished", "time": "late", "step": 8}],
     "events.jsonl: a finished event has time 'late', not a number"),
    (None, [{"event": "train_begin", "time": _NOW - 9, "step": 0, "max_steps": "many"}],
     "events.jsonl: a train_begin event has max_steps 'many', not a whole number"),
], ids=["attempts-str", "attempts-int", "created-at-str", "run-id-int", "event-time-str", "event-max-steps-str"])
def test_one_damaged_run_json_or_event_never_breaks_the_listing(make_plan, runs_dir, capsys, record, events, named):
    import cli
    from advisor import wizard
    from trainer import runs

    plan = make_plan()
    good = _fake_run(
        runs_dir, "20250101-000010-good", plan,
        _line(event="started", time=_NOW - 50, step=0) + _line(event="log", time=_NOW - 40, step=8, loss=1.5)
        + _line(event="finished", time=_NOW - 30, step=8, output_dir="out"),
        {"started_at": _NOW - 55, "pid": 999_999_999, "ended_at": _NOW - 29, "exit_code": 0},
    )
    damaged = _fake_run(runs_dir, "20250101-000011-damaged", plan, b"",
                        {"started_at": _NOW - 10, "pid": 999_999_999, "ended_at": _NOW - 5, "exit_code": 0})
    if record is not None:
        (damaged / "run.json").write_text(json.dumps(record), encoding="utf-8")
    if events is not None:
        (damaged / EVENTS_FILE).write_bytes(b"".join(_line(**event) for event in events))

    assert cli.main(["runs", "--runs-dir", str(runs_dir)]) == 0
    out, err = capsys.readouterr()
    lines = {line.split()[0]: line for line in out.splitlines()}
    assert set(lines) == {good.name, damaged.name}, out
    assert "finished" in lines[good.name] and "step 8" in lines[good.name] and "damaged" not in lines[good.name]
    assert f"[damaged: {named}" in lines[damaged.name], lines[damaged.name]
    assert "Traceback" not in err
    assert cli.main(["runs", "--runs-dir", str(runs_dir), "--json"]) == 0
    listed = {run["run_id"]: run for run in json.loads(capsys.readouterr().out)}
    assert listed[good.name]["damage"] is None and named in listed[damaged.name]["damage"]
    assert cli.main(["status", damaged.name, "--runs-dir", str(runs_dir)]) == 0
    assert f"damaged    {named}" in capsys.readouterr().out
    # The app's run history goes through the same listing.
    statuses = runs.history(runs_dir)
    rows, ids = [wizard.run_row(status) for status in statuses], [status.run_id for status in statuses]
    assert sorted(ids) == sorted([good.name, damaged.name]) and len(rows) == 2


def test_a_run_without_run_json_is_still_listed(make_plan, runs_dir):
    plan = make_plan()
    kept = _fake_run(
        runs_dir, "20250101-000012-kept", plan,
        _line(event="started", time=_NOW - 50, step=0) + _line(event="finished", time=_NOW - 30, step=8),
        {"started_at": _NOW - 55, "pid": 999_999_999, "ended_at": _NOW - 29, "exit_code": 0},
    )
    lost = _fake_run(
        runs_dir, "20250101-000013-lost", plan,
        _line(event="started", time=_NOW - 20, step=0) + _line(event="finished", time=_NOW - 10, step=8),
        {"started_at": _NOW - 25, "pid": 999_999_999, "ended_at": _NOW - 9, "exit_code": 0},
    )
    (lost / "run.json").unlink()
    unfinished = _fake_run(runs_dir, "20250101-000014-unfinished", plan, _line(event="started", time=_NOW - 9, step=0),
                           {"started_at": _NOW - 10, "pid": 999_999_999})
    (unfinished / "run.json").unlink()
    os.utime(unfinished / "plan.yaml", (_NOW - 60, _NOW - 60))
    runs = {run.run_id: run for run in supervisor.list_runs(runs_dir)}
    assert set(runs) == {kept.name, lost.name, unfinished.name}
    assert runs[lost.name].state == "finished" and runs[lost.name].damage == "run.json is missing"
    assert runs[lost.name].summary == plan.summary() and runs[lost.name].created_at is not None
    # Nothing says how the unfinished one ended, and no trainer of it runs: not "queued" forever.
    assert runs[unfinished.name].state == "failed" and "run.json is missing" in runs[unfinished.name].error
    assert rundir.find_run_dir("20250101-000013", runs_dir) == lost.resolve()  # a unique prefix finds it too


def test_a_deleted_run_directory_is_reported_and_listing_keeps_working(make_plan, runs_dir, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    plan = make_plan(training__max_steps=200)
    kept = _fake_run(
        runs_dir, "20250101-000003-kept", plan,
        _line(event="started", time=time.time() - 5, step=0) + _line(event="finished", time=time.time() - 4, step=8),
        {"started_at": time.time() - 6, "pid": 999_999_999, "ended_at": time.time() - 3, "exit_code": 0},
    )
    run_id = supervisor.launch(plan, runs_dir)
    running = supervisor.status(run_id, runs_dir)
    assert running.state in ("queued", "running") and running.pid
    shutil.rmtree(runs_dir / run_id)

    with pytest.raises(supervisor.TunewiseError, match=f"no run '{run_id}'"):
        supervisor.status(run_id, runs_dir)
    with pytest.raises(supervisor.TunewiseError, match="no run"):
        supervisor.read_run_events(run_id, 0, runs_dir)
    assert [s.run_id for s in supervisor.list_runs(runs_dir)] == [kept.name]
    # The orphaned trainer does not go on training unseen: it ends once it cannot write its run.
    wait_for(lambda: not procs.pid_alive(running.pid), timeout=180, poll=0.5, what="the orphaned trainer to end")
    assert [s.run_id for s in supervisor.list_runs(runs_dir)] == [kept.name]


# -- races, a disk filled by someone else, damaged checkpoints, a paused trainer ---------------------

REPO_ROOT = Path(__file__).resolve().parent.parent

#: A second process (another terminal's `tunewise resume`): resume the run once the go file appears.
_RESUME_AT_THE_SIGNAL = """
import json, sys, time
from pathlib import Path
from trainer import supervisor
run, runs, ready, go = sys.argv[1:5]
Path(ready).touch()
while not Path(go).exists():
    time.sleep(0.0005)
try:
    print(json.dumps({"resumed": supervisor.resume(run, runs)}))
except supervisor.TunewiseError as exc:
    print(json.dumps({"refused": str(exc)}))
"""


def _trainer_processes(run_dir: Path) -> list[int]:
    """Pids of the processes running `trainer.runner` on `run_dir` (read from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"trainer.runner" in args and str(run_dir).encode() in args:
            found.append(int(entry.name))
    return found


def _stop_if_active(run_id: str, runs: Path) -> None:
    if supervisor.status(run_id, runs).active:
        supervisor.stop(run_id, timeout=30, runs_dir=runs)


def test_two_resumes_at_the_same_instant_start_one_trainer(make_plan, runs_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    plan = make_plan(training__max_steps=100_000, training__save_steps=2)
    run_id = supervisor.launch(plan, runs_dir)
    run_dir = runs_dir / run_id
    try:
        wait_for(lambda: supervisor.status(run_id, runs_dir).checkpoint, timeout=240, what="a first checkpoint")
        assert supervisor.stop(run_id, timeout=120, runs_dir=runs_dir).state == "stopped"
        before = len(read_all_events(run_dir / EVENTS_FILE))

        # Two separate processes (like two terminals) resume at the same instant.
        go = tmp_path / "go"
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        racers = [subprocess.Popen([sys.executable, "-c", _RESUME_AT_THE_SIGNAL, run_id, str(runs_dir),
                                    str(tmp_path / f"ready-{i}"), str(go)], cwd=REPO_ROOT, env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
        wait_for(lambda: all((tmp_path / f"ready-{i}").exists() for i in range(2)), timeout=120,
                 what="both resumers to be ready")
        go.touch()
        outcomes = []
        for racer in racers:
            out, err = racer.communicate(timeout=120)
            assert racer.returncode == 0, err
            outcomes.append(json.loads(out))
        assert sorted(k for o in outcomes for k in o) == ["refused", "resumed"], outcomes
        refusal = next(o["refused"] for o in outcomes if "refused" in o)
        # Refused while the other holds the run's lock (or, had it been much later, because it runs).
        assert (f"run {run_id} is being resumed (pid " in refusal and "by another process" in refusal) or \
            f"run {run_id} is still" in refusal, refusal

        # Exactly one trainer, recorded in exactly one new attempt, after exactly one `resumed` event.
        wait_for(lambda: [e for e in read_all_events(run_dir / EVENTS_FILE)[before:] if e["event"] == "train_begin"],
                 timeout=240, what="the resumed trainer to begin training")
        info = json.loads((run_dir / "run.json").read_text())
        assert len(info["attempts"]) == 2
        assert info["attempts"][-1]["pid"] and info["attempts"][-1]["watcher_pid"]
        assert _trainer_processes(run_dir) == [info["attempts"][-1]["pid"]]
        after = [e["event"] for e in read_all_events(run_dir / EVENTS_FILE)[before:]]
        assert after.count("resumed") == 1 and after.count("started") == 1 and after.count("train_begin") == 1, after
    finally:
        _stop_if_active(run_id, runs_dir)
    assert supervisor.status(run_id, runs_dir).state == "stopped"  # and the one stop was enough


@pytest.fixture
def disk_40m(tmp_path):
    """A 40 MB tmpfs (needs root, as CI has): room for a run, and for a filler file to take the rest."""
    mount_point = tmp_path / "disk-40m"
    mount_point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a 40 MB tmpfs here (mount needs root): {done.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


def _fill(path: Path) -> int:
    """Write incompressible bytes to `path` until the disk is full; return how many fitted."""
    written = 0
    with open(path, "wb", buffering=0) as handle:
        chunk = os.urandom(64 * 1024)
        while True:
            try:
                written += handle.write(chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
                return written


def test_a_disk_filled_by_another_process_fails_naming_the_disk_and_loses_no_later_event(make_plan, disk_40m, capsys,
                                                                                         monkeypatch):
    import cli
    from trainer.rundir import EXIT_DISK_FULL

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    runs = disk_40m / "runs"
    plan = make_plan(training__max_steps=100_000, training__save_steps=5)
    run_id = supervisor.launch(plan, runs)
    run_dir = runs / run_id
    filler = disk_40m / "filler"
    try:
        wait_for(lambda: (s := supervisor.status(run_id, runs)).checkpoint and s.step >= 6, timeout=240,
                 what="step 6, after the first checkpoint")
        assert _fill(filler) > 10_000_000  # something else takes the rest of the disk while the run logs

        failed = wait_for(lambda: (s := supervisor.status(run_id, runs)).state not in ("queued", "running") and s,
                          timeout=120, what="the run to end on the full disk")
        failed = supervisor._wait_for_record(run_dir)
        assert failed.state == "failed", failed
        assert "the disk is full" in failed.error and "tunewise resume" in failed.error, failed.error
        assert failed.exit_code == EXIT_DISK_FULL
        assert cli.main(["status", run_id, "--runs-dir", str(runs)]) == 0
        assert "the disk is full" in capsys.readouterr().out
        events = read_all_events(run_dir / EVENTS_FILE)
        assert events[-1]["event"] == "failed" and events[-1]["disk_full"] is True  # the reserve made room for it
        assert not [e for e in events if e["event"] == "corrupt"]  # a line cut short was taken back
        assert json.loads((run_dir / "run.json").read_text())["attempts"][-1]["exit_code"] == EXIT_DISK_FULL

        # Space freed, the run resumed: the `resumed` marker and everything after it read back intact.
        filler.unlink()
        supervisor.resume(run_id, runs)
        wait_for(lambda: len([e for e in read_all_events(run_dir / EVENTS_FILE)[len(events):] if e["event"] == "log"]) >= 2,
                 timeout=240, what="two logged steps after the resume")
        after = read_all_events(run_dir / EVENTS_FILE)[len(events):]
        assert after[0]["event"] == "resumed", after[:2]
        assert not [e for e in read_all_events(run_dir / EVENTS_FILE) if e["event"] == "corrupt"]
        resumed_step = after[0]["step"]
        assert [e["step"] for e in after if e["event"] == "log"][:2] == [resumed_step + 1, resumed_step + 2]
        assert supervisor.status(run_id, runs).state == "running"
    finally:
        filler.unlink(missing_ok=True)
        _stop_if_active(run_id, runs)


def _truncate(path: Path, size: int) -> None:
    with open(path, "r+b") as handle:
        handle.truncate(size)


def _step_of(checkpoint: Path) -> int:
    return int(checkpoint.name.split("-")[1])


def test_resume_passes_over_damaged_checkpoints_and_follows_only_the_new_attempt(make_plan, runs_dir, capsys,
                                                                               monkeypatch):
    import cli
    import figures

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    plan = make_plan(training__max_steps=40, training__save_steps=2, training__keep_checkpoints=20)
    run_id = supervisor.launch(plan, runs_dir)
    run_dir = runs_dir / run_id

    def saved() -> list:
        return [e for e in read_events(run_dir / EVENTS_FILE, 0)[0] if e.get("event") == "checkpoint"]

    wait_for(lambda: len(saved()) >= 3, timeout=240, poll=0.01, what="three checkpoints")
    os.kill(supervisor.status(run_id, runs_dir).pid, signal.SIGKILL)
    wait_for(lambda: supervisor.status(run_id, runs_dir).state == "failed", timeout=30, what="the kill to be recorded")
    first_attempt = read_all_events(run_dir / EVENTS_FILE)
    complete = sorted((c for c in (run_dir / "checkpoints").iterdir() if (c / "trainer_state.json").is_file()),
                      key=_step_of)
    assert len(complete) >= 3, complete
    fallback, cut_optimizer, cut_adapter = complete[-3:]
    _truncate(cut_adapter / "adapter_model.safetensors", 1000)
    optimizer = cut_optimizer / "optimizer.pt"
    _truncate(optimizer, optimizer.stat().st_size // 2)
    assert rundir.checkpoint_problem(fallback) is None

    # One command: resume (passing over the two damaged checkpoints, saying so) and follow the new attempt.
    code = cli.main(["resume", run_id, "--runs-dir", str(runs_dir), "--follow"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert f"{cut_adapter.name} is damaged (adapter_model.safetensors is cut short: " in out, out
    assert f"{cut_optimizer.name} is damaged (optimizer.pt is cut short (" in out, out
    assert f"resuming from {fallback.name} (step {_step_of(fallback)}) instead" in out, out
    assert f"finished {run_id} at step 40" in out
    # --follow shows the new attempt only: no checkpoint line of the first attempt (none at or before the fallback).
    shown = [int(line.split()[1].rstrip(":")) for line in out.splitlines() if line.startswith("step ") and ": checkpoint " in line]
    assert shown and min(shown) > _step_of(fallback), shown

    events = read_all_events(run_dir / EVENTS_FILE)
    resumed = next(e for e in events if e["event"] == "resumed")
    assert resumed["checkpoint"] == str(fallback) and resumed["step"] == _step_of(fallback)
    assert [Path(s["checkpoint"]).name for s in resumed["skipped_checkpoints"]] == [cut_adapter.name, cut_optimizer.name]
    assert "adapter_model.safetensors" in resumed["skipped_checkpoints"][0]["problem"]
    begin = [e for e in events if e["event"] == "train_begin"][-1]
    assert begin["start_step"] == _step_of(fallback)

    # The loss chart, read back from this killed and resumed run: one line per attempt, each only going forward.
    first_logged = [e["step"] for e in first_attempt if e["event"] == "log"]
    assert max(first_logged) > _step_of(fallback) + 1  # the attempts overlap: steps after the fallback were logged twice
    lines = [t for t in figures.loss_figure(events).data if t.name.startswith("training loss")]
    assert [t.name for t in lines] == ["training loss", f"training loss (resumed at step {_step_of(fallback)})"]
    assert list(lines[0].x) == first_logged
    assert list(lines[1].x) == list(range(_step_of(fallback) + 1, 41))


def test_a_paused_trainer_gets_a_stall_hint_and_a_forced_stop_says_why_there_is_no_checkpoint(make_plan, runs_dir,
                                                                                            capsys, monkeypatch):
    import cli

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    # Small thresholds for the test: 2 s, or 3x the usual gap between logged steps (the defaults are 120 s, 10x).
    monkeypatch.setattr(trainer.status, "STALL_MIN_S", 2.0)
    monkeypatch.setattr(trainer.status, "STALL_FACTOR", 3.0)
    plan = make_plan(training__max_steps=100_000)  # no save_steps: only a stop that ends in time saves
    run_id = supervisor.launch(plan, runs_dir)
    pid = None
    try:
        going = wait_for(lambda: (s := supervisor.status(run_id, runs_dir)).step >= 3 and s, timeout=240,
                         what="three logged steps")
        pid = going.pid
        assert going.stalled_s is None and going.hint is None  # its last event is fresh
        os.kill(pid, signal.SIGSTOP)
        stalled = wait_for(lambda: (s := supervisor.status(run_id, runs_dir)).stalled_s and s, timeout=60,
                           what="the stall hint")
        assert stalled.state == "running" and stalled.stalled_s >= 2.0
        assert f"the trainer (pid {pid}) may be stuck" in stalled.hint
        assert "stalled?]" in stalled.describe()
        assert cli.main(["status", run_id, "--runs-dir", str(runs_dir)]) == 0
        assert "  stalled?   no event for " in capsys.readouterr().out

        stopped = supervisor.stop(run_id, timeout=3, runs_dir=runs_dir)  # it cannot stop cooperatively while paused
        assert stopped.state == "stopped" and "killed (signal 9)" in stopped.reason
        assert stopped.stalled_s is None
        with pytest.raises(supervisor.TunewiseError) as refused:
            supervisor.resume(run_id, runs_dir)
        message = str(refused.value)
        assert "has no checkpoint" in message and "its stop was forced" in message, message
        assert "training.save_steps is not set" in message and "a stop always saves one" not in message
    finally:
        if pid is not None:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        _stop_if_active(run_id, runs_dir)


# -- through the real app ------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parent.parent


def _stop_all_runs(runs: Path) -> None:
    for run in supervisor.list_runs(runs):
        if run.active:
            supervisor.stop(run.run_id, runs_dir=runs, timeout=20)


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory):
    runs = tmp_path_factory.mktemp("demo-runs")
    proc, url = start_app(runs, "--demo-mode", log_path=runs.parent / "demo-app.log")
    try:
        yield url, runs
    finally:
        _stop_all_runs(runs)
        stop_app(proc)


def test_two_launches_at_once_in_demo_mode_start_one_run(demo_server):
    import threading

    from gradio_client import Client

    url, runs = demo_server
    clients = [Client(url, verbose=False) for _ in range(2)]
    outcomes: list = [None, None]
    together = threading.Barrier(2)

    def launch(index: int) -> None:
        together.wait()
        try:
            clients[index].predict(model="demo", dataset="demo-sft", method="lora", max_steps=5, api_name="/launch")
            outcomes[index] = "launched"
        except Exception as exc:  # the refusal arrives as gradio_client's AppError
            outcomes[index] = str(exc)

    threads = [threading.Thread(target=launch, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    try:
        assert outcomes.count("launched") == 1, outcomes
        refusal = next(o for o in outcomes if o != "launched")
        assert "one run at a time" in refusal and "Traceback" not in refusal
        started = [p for p in runs.iterdir() if (p / "run.json").is_file()]
        assert len(started) == 1, started
    finally:
        _stop_all_runs(runs)


def test_twenty_concurrent_planner_requests_all_get_their_own_right_answer(demo_server):
    import itertools
    from concurrent.futures import ThreadPoolExecutor

    from gradio_client import Client

    from advisor import wizard
    from advisor.plan import Plan

    url, _ = demo_server
    models = ["meta-llama/Llama-2-7b-hf", "Qwen/Qwen2.5-0.5B", "HuggingFaceTB/SmolLM2-135M", "mistralai/Mistral-7B-v0.1",
              "meta-llama/Llama-3.2-1B"]
    asks = [{"model": m, "micro_batch": b, "seq_len": 256, "method": "lora", "gpu": "A100-80GB"}
            for m, b in itertools.product(models, (1, 2, 4, 8))]
    assert len(asks) == 20
    client = Client(url, verbose=False)

    def ask(values: dict):
        return client.predict(**values, api_name="/estimate")

    began = time.time()
    with ThreadPoolExecutor(max_workers=20) as pool:
        answers = list(pool.map(ask, asks))
    elapsed = time.time() - began
    assert elapsed < 120, elapsed
    totals = set()
    for values, answer in zip(asks, answers):
        memory, _chart, fits, _recs, status, _explained, _cli, plan_yaml, _pilot_cost = answer
        plan = Plan.from_yaml(plan_yaml)
        assert (plan.model.name, plan.training.micro_batch) == (values["model"], values["micro_batch"])
        direct = wizard.plan_view(plan)  # the same question asked of the advisor directly
        headers, rows = direct.memory
        assert memory["headers"] == headers and memory["data"] == rows, values
        assert fits["data"] == direct.fit[1] and status == direct.status_markdown, values
        totals.add(rows[-1][2])
    assert len(totals) >= 15  # different questions got different answers (no cross-wiring)


def test_app_restart_finds_the_running_run_and_keeps_plotting(tiny_model_dir, tiny_data_dir, tmp_path, monkeypatch):
    from gradio_client import Client

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    runs = tmp_path / "runs"
    runs.mkdir()
    first, url = start_app(runs, log_path=tmp_path / "app-1.log")
    try:
        Client(url, verbose=False).predict(
            model=str(tiny_model_dir), dataset=str(tiny_data_dir / "messages.jsonl"), gpu="none", method="lora",
            precision="fp32", max_steps=400, seq_len=64, micro_batch=4, api_name="/launch")
        (run_dir,) = [p for p in runs.iterdir() if (p / "run.json").is_file()]
    finally:
        stop_app(first, signal.SIGKILL)  # the app dies; the run must not
    second = None
    try:
        assert supervisor.status(run_dir.name, runs).state in ("queued", "running")
        second, url = start_app(runs, log_path=tmp_path / "app-2.log")
        client = Client(url, verbose=False)
        history, _choice, _compare = client.predict(api_name="/runs")
        state = history["headers"].index("status")
        assert [(row[0], row[state]) for row in history["data"]] == [(run_dir.name, "running")]

        def loss_points(outputs) -> list | None:
            loss = outputs[1]
            if isinstance(loss, dict) and loss.get("plot"):
                traces = json.loads(loss["plot"])["data"]
                return next((t["y"] for t in traces if t.get("name") == "training loss"), [])
            return None

        # Opening the page attaches to the running run (read from its first event) ...
        outputs = client.predict(api_name="/attach")
        assert run_dir.name in outputs[0]
        points = loss_points(outputs) or []
        deadline = time.time() + 240
        while len(points) < 2 and time.time() < deadline:
            time.sleep(1)
            points = loss_points(client.predict(api_name="/poll")) or points
        assert len(points) >= 2, "the restarted app never plotted the run's losses"
        # ... and later polls continue from the offset: the same points, then more.
        seen = list(points)
        deadline = time.time() + 120
        while len(points) <= len(seen) and time.time() < deadline:
            time.sleep(1)
            points = loss_points(client.predict(api_name="/poll")) or points
        assert len(points) > len(seen) and points[: len(seen)] == seen
        logged = _losses(read_all_events(run_dir / EVENTS_FILE))
        assert points == [logged[step] for step in sorted(logged)][: len(points)]
    finally:
        _stop_all_runs(runs)
        if second is not None:
            stop_app(second)
