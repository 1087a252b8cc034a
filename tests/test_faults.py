"""Faults: what happens when things break while a run is going.

Each test breaks something for real (SIGKILL of the trainer, a half-written
event line, a full disk, a deleted run directory, two launches at once, an app
restart, a burst of concurrent API requests) and checks that the user gets a
clear status and loses no finished data.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import start_app, stop_app, wait_for
from trainer import supervisor
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
    newest = supervisor.last_checkpoint(killed_dir)
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
    newest = supervisor.last_checkpoint(run_dir)
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
    import app

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
        {"started_at": now - 12, "pid": os.getpid(), "pid_start": supervisor.process_start_ticks(os.getpid())},
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
    rows, ids = app.run_history(app.AppConfig(runs_dir=runs_dir))
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
    assert supervisor.last_checkpoint(run_dir) == good


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
    wait_for(lambda: not supervisor.pid_alive(running.pid), timeout=180, poll=0.5, what="the orphaned trainer to end")
    assert [s.run_id for s in supervisor.list_runs(runs_dir)] == [kept.name]


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
        memory, _chart, fits, _recs, status, _explained, _cli, plan_yaml = answer
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
        assert [(row[0], row[2]) for row in history["data"]] == [(run_dir.name, "running")]

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
