"""The warm worker (trainer/warm.py): runs forked from a process with the training stack
already imported train exactly like cold ones, stop / resume / SIGKILL are recorded the
same way, requests it must not serve start cold, and it exits when its owner is gone."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import wait_for

from trainer import supervisor, warm
from trainer.events import read_all_events

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def warm_runs(tmp_path_factory):
    """A runs folder served by a warm worker whose owner is a process this module controls."""
    runs = tmp_path_factory.mktemp("warm-runs")
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
    with pytest.MonkeyPatch.context() as env:
        # The same environment the tests' autouse fixture gives each test (the worker checks it).
        env.setenv("HF_HUB_OFFLINE", "1")
        env.setenv("HF_DATASETS_OFFLINE", "1")
        env.setenv("TOKENIZERS_PARALLELISM", "false")
        if "OMP_NUM_THREADS" not in os.environ:
            env.setenv("OMP_NUM_THREADS", "1")
        worker_pid = warm.ensure_warm(runs, owner_pid=owner.pid)
        assert worker_pid, "the warm worker did not start"
        assert warm.ensure_warm(runs, owner_pid=owner.pid) == worker_pid  # one worker per runs folder
    assert warm.wait_ready(runs, timeout=240), (runs / ".warm.log").read_text()
    yield {"runs": runs, "owner": owner, "pid": worker_pid}
    owner.kill()
    owner.wait()
    # No run is going: the worker notices its owner is gone and exits, removing its socket.
    wait_for(lambda: warm.ping(runs) is None and not warm.socket_path(runs).exists(), 15, "the worker to exit")
    assert "exiting: owner gone" in (runs / ".warm.log").read_text()


def _attempt(run_dir: Path) -> dict:
    return json.loads((run_dir / "run.json").read_text())["attempts"][-1]


def _losses(run_dir: Path) -> list[float]:
    return [e["loss"] for e in read_all_events(run_dir / "events.jsonl") if e["event"] == "log"]


def test_warm_run_trains_exactly_like_a_cold_one(make_plan, warm_runs, tmp_path):
    plan = make_plan({"training.max_steps": 4, "training.seed": 3})
    cold_runs = tmp_path / "cold"
    cold_id = supervisor.launch(plan, runs_dir=cold_runs)  # no worker serves this folder
    warm_id = supervisor.launch(plan, runs_dir=warm_runs["runs"])
    cold = supervisor.wait(cold_id, timeout=300, runs_dir=cold_runs)
    hot = supervisor.wait(warm_id, timeout=300, runs_dir=warm_runs["runs"])
    assert cold.state == hot.state == "finished", (cold.error, hot.error)
    warm_dir = warm_runs["runs"] / warm_id
    assert _attempt(warm_dir).get("warm") is True and _attempt(warm_dir)["exit_code"] == 0
    assert "warm" not in _attempt(cold_runs / cold_id)
    cold_losses, warm_losses = _losses(cold_runs / cold_id), _losses(warm_dir)
    assert len(warm_losses) == 4
    assert warm_losses == pytest.approx(cold_losses, rel=1e-5)
    # The forked trainer did not import the training stack itself: it found it loaded.
    kinds = [e["event"] for e in read_all_events(warm_dir / "events.jsonl")]
    assert kinds[0] == "started" and kinds[-1] == "finished"
    assert "forked by the warm worker" in (warm_dir / "stdout.log").read_text()


def test_warm_stop_resume_and_sigkill_are_recorded(make_plan, warm_runs):
    runs = warm_runs["runs"]
    plan = make_plan({"training.max_steps": 100_000, "training.save_steps": 1000})
    run_id = supervisor.launch(plan, runs_dir=runs)
    run_dir = runs / run_id
    wait_for(lambda: _losses(run_dir), 120, "a first logged loss")
    assert _attempt(run_dir).get("warm") is True

    stopped = supervisor.stop(run_id, timeout=120, runs_dir=runs)
    assert stopped.state == "stopped" and stopped.exit_code == 0 and stopped.signal is None
    checkpoint = supervisor.last_checkpoint(run_dir)
    assert checkpoint is not None

    supervisor.resume(run_id, runs)
    assert _attempt(run_dir).get("warm") is True
    before = len(read_all_events(run_dir / "events.jsonl"))
    wait_for(lambda: [e for e in read_all_events(run_dir / "events.jsonl")[before:] if e["event"] == "log"],
             120, "a logged loss after the resume")
    status = supervisor.status(run_id, runs)
    assert status.state == "running"
    os.kill(status.pid, signal.SIGKILL)
    killed = wait_for(lambda: (s := supervisor.status(run_id, runs)).state != "running" and s, 10,
                      "the kill to be recorded")
    assert killed.state == "failed" and killed.signal == 9 and "signal 9" in killed.error
    assert read_all_events(run_dir / "events.jsonl")[-1]["signal"] == 9
    # The worker reaped its child and still serves.
    assert warm.ping(runs)["children"] == 0


def test_requests_the_worker_must_not_serve_start_cold(make_plan, warm_runs, tmp_path, monkeypatch):
    runs = warm_runs["runs"]
    # A run directory outside its runs folder is refused (the watcher would then start it cold).
    outside = tmp_path / "elsewhere" / "run"
    outside.mkdir(parents=True)
    (outside / "plan.yaml").write_text("stage: sft\n")
    sock_path = warm.socket_path(runs)
    monkeypatch.setattr(warm, "socket_path", lambda _runs: sock_path)
    assert warm.request(outside, None, None, dict(os.environ), outside / "stdout.log") is None
    monkeypatch.undo()

    # A setting the libraries read at import time differs: the run starts cold, and the setting holds.
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    run_id = supervisor.launch(make_plan({"training.max_steps": 1}), runs_dir=runs)
    status = supervisor.wait(run_id, timeout=300, runs_dir=runs)
    assert status.state == "finished", status.error
    assert "warm" not in _attempt(runs / run_id)

    # TUNEWISE_WARM=0 turns the worker off for launches.
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS")
    monkeypatch.setenv("TUNEWISE_WARM", "0")
    assert warm.request(runs / run_id, None, None, dict(os.environ), runs / run_id / "stdout.log") is None


def test_a_restarted_app_adopts_the_running_worker(warm_runs):
    runs = warm_runs["runs"]
    restarted = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
    try:
        assert warm.ensure_warm(runs, owner_pid=restarted.pid) == warm_runs["pid"]  # no second worker
        assert warm.ping(runs)["owner"] == restarted.pid
    finally:
        warm.ensure_warm(runs, owner_pid=warm_runs["owner"].pid)  # hand it back for the fixture's teardown
        restarted.kill()
        restarted.wait()
    assert warm.ping(runs)["owner"] == warm_runs["owner"].pid


def test_stop_never_signals_a_recorded_pid_that_is_not_a_trainer(make_plan, tmp_path):
    # run.json names a live process that is not a trainer (it shares this test's session, as a trainer
    # never does): stop must leave it alone, even after its timeout.
    bystander = subprocess.Popen(["sleep", "600"])
    try:
        run_dir = tmp_path / "runs" / "20250101-000000-forged-0000"
        run_dir.mkdir(parents=True)
        make_plan().save(run_dir / "plan.yaml")
        (run_dir / "run.json").write_text(json.dumps({"run_id": run_dir.name, "attempts": [{
            "started_at": time.time(), "pid": bystander.pid,
            "pid_start": supervisor.process_start_ticks(bystander.pid), "watcher_pid": None}]}))
        assert supervisor.status(run_dir).state == "running"
        supervisor.stop(run_dir, timeout=1)
        assert bystander.poll() is None, "stop signalled a process that does not lead its own session"
    finally:
        bystander.kill()
        bystander.wait()
