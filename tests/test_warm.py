"""The warm worker (trainer/warm.py): runs forked from a process with the training stack
already imported train exactly like cold ones, stop / resume / SIGKILL are recorded the
same way, requests it must not serve start cold, and it exits when its owner is gone.

Its socket is this user's alone: another user (uid 65534, a forked process that drops to it)
squatting where the socket used to live, or in a folder it created first, receives nothing
and cannot get a pid signalled; a pid the worker answers is used only if it is the worker's
child leading its own session; malformed and huge requests are refused without harm; forked
trainers carry their own process name."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import pytest

from conftest import wait_for

from trainer import procs, rundir, supervisor, warm
from trainer.events import read_all_events

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def warm_runs():
    """A runs folder served by a warm worker whose owner is a process this module controls."""
    # In a folder other users may enter (not pytest's private one), so tests can show they still cannot
    # reach the worker.
    top = Path(tempfile.mkdtemp(prefix="tw-warm-"))
    os.chmod(top, 0o755)
    runs = top / "runs"
    runs.mkdir(mode=0o755)
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
    try:
        # No run is going: the worker notices its owner is gone and exits, removing its socket.
        wait_for(lambda: warm.ping(runs) is None and not warm.socket_path(runs).exists(), 15, "the worker to exit")
        assert "exiting: owner gone" in (runs / ".warm.log").read_text()
    finally:
        shutil.rmtree(top, ignore_errors=True)


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
    checkpoint = rundir.last_checkpoint(run_dir)
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


# -- another user, fake workers, forged pids -------------------------------------------------------

NOBODY = 65534
SECRET = "hf_FAKE_SECRET_only_the_run_may_see"


def _old_socket_path(runs: Path) -> Path:
    """Where the worker's socket used to be (a predictable name in the shared temporary folder)."""
    key = hashlib.sha1(str(runs.resolve()).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"tunewise-warm-{os.getuid()}-{key}.sock"


def _listen(report, paths: list[Path], answers: list[dict], dir_mode: int) -> None:
    """Listen on each of `paths` (creating a missing folder with `dir_mode`), report what happens, and
    answer every connection with `answers`, keeping it open (so a watcher waits on it)."""
    listeners, kept = [], []
    for path in paths:
        try:
            if not path.parent.exists():
                path.parent.mkdir()
                os.chmod(path.parent, dir_mode)
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(str(path))
            os.chmod(path, 0o777)
            listener.listen(8)
            listeners.append(listener)
            report(bound=str(path))
        except OSError as exc:
            report(refused=str(path), errno=exc.errno)
    report(listening=True)
    selector = selectors.DefaultSelector()
    for listener in listeners:
        selector.register(listener, selectors.EVENT_READ)
    while True:
        for key, _ in selector.select():
            conn, _ = key.fileobj.accept()
            conn.settimeout(5)
            data = b""
            try:
                while b"\n" not in data and (chunk := conn.recv(65536)):
                    data += chunk
            except OSError:
                pass
            try:
                sent_env = sorted(json.loads(data.split(b"\n")[0]).get("env_set") or {})
            except (ValueError, AttributeError):
                sent_env = None
            report(connection=key.fileobj.getsockname(), bytes=len(data), secret=SECRET.encode() in data,
                   sent_env=sent_env)
            for message in answers:
                conn.sendall((json.dumps(message) + "\n").encode())
            kept.append(conn)


class Listener:
    """A forked process listening on Unix socket paths, as another user (`uid`) or as us (uid None);
    what it sees comes back as JSON lines through a pipe."""

    def __init__(self, paths: list[Path], answers: list[dict], uid: int | None = None, dir_mode: int = 0o700):
        read, write = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:  # the child: drop to `uid`, listen, never return
            code = 0
            try:
                os.close(read)
                if uid is not None:
                    os.setgroups([])
                    os.setgid(uid)
                    os.setuid(uid)
                out = os.fdopen(write, "w", buffering=1)
                _listen(lambda **fields: out.write(json.dumps(fields) + "\n"), paths, answers, dir_mode)
            except BaseException:  # noqa: BLE001 (the forked test child must never return into pytest)
                traceback.print_exc()
                code = 1
            finally:
                os._exit(code)
        os.close(write)
        self._reports = os.fdopen(read)
        self.reports: list[dict] = []
        while not self.reports or not self.reports[-1].get("listening"):
            line = self._reports.readline()
            assert line, "the listener died before listening"
            self.reports.append(json.loads(line))

    def finish(self) -> list[dict]:
        """Stop it; every report, including one per connection it received."""
        os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)
        self.reports += [json.loads(line) for line in self._reports.read().splitlines()]
        self._reports.close()
        return self.reports

    def outcome(self, path: Path) -> dict:
        return next(r for r in self.reports if path.as_posix() in (r.get("bound"), r.get("refused")))


@pytest.fixture
def shared_tmp(monkeypatch):
    """A temporary folder like /tmp (mode 1777: anyone may create files in it), as $TMPDIR for this test."""
    path = Path(tempfile.mkdtemp(prefix="tw-shared-"))
    os.chmod(path, 0o1777)
    monkeypatch.setenv("TMPDIR", str(path))
    monkeypatch.setattr(tempfile, "tempdir", None)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)  # the long-path fallback then uses $TMPDIR
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _folder(path: Path, mode: int) -> Path:
    path.mkdir()
    os.chmod(path, mode)
    return path


@pytest.fixture
def unrelated_sleep():
    """A process that has nothing to do with any run, leading its own session (like `setsid sleep`)."""
    proc = subprocess.Popen(["sleep", "600"], start_new_session=True)
    yield proc
    proc.kill()
    proc.wait()


def test_another_user_squatting_the_socket_receives_no_environment(make_plan, shared_tmp, monkeypatch):
    monkeypatch.setenv("TUNEWISE_TEST_SECRET", SECRET)
    layouts = {
        # A runs folder others may read: they cannot create its .warm folder.
        "readable": _folder(shared_tmp / "readable", 0o755) / "runs",
        # One others may write to: they can create .warm first, and the client refuses it.
        "writable": _folder(shared_tmp / "writable", 0o755) / "runs",
        # A path too long for a socket beside the runs: the fallback $TMPDIR/tunewise-<uid>/, created first by them.
        "long": _folder(shared_tmp / "long", 0o755) / ("runs-" + "x" * 100),
    }
    for name, runs in layouts.items():
        runs.mkdir()
        os.chmod(runs, 0o1777 if name == "writable" else 0o755)
    paths = [p for runs in layouts.values() for p in (_old_socket_path(runs), warm.socket_path(runs))]
    squatter = Listener(paths, answers=[], uid=NOBODY, dir_mode=0o777)
    try:
        runs_ids = {name: supervisor.launch(make_plan({"training.max_steps": 1}), runs_dir=runs)
                    for name, runs in layouts.items()}
        for name, run_id in runs_ids.items():
            status = supervisor.wait(run_id, timeout=300, runs_dir=layouts[name])
            assert status.state == "finished", (name, status.error)
            assert "warm" not in _attempt(layouts[name] / run_id), name  # it trained cold
    finally:
        reports = squatter.finish()
    assert not [r for r in reports if r.get("secret")], "the other user received the secret"
    assert not [r for r in reports if "connection" in r], f"the other user got connections: {reports}"
    # Where it listened: the old name in the shared folder (free to take), beside the runs (refused),
    # and in folders it created first (ignored by the client).
    assert squatter.outcome(_old_socket_path(layouts["readable"])).get("bound")
    assert squatter.outcome(warm.socket_path(layouts["readable"]))["errno"] == errno.EACCES
    assert warm.socket_path(layouts["long"]).parent == shared_tmp / f"tunewise-{os.getuid()}"
    for name in ("writable", "long"):
        assert squatter.outcome(warm.socket_path(layouts[name])).get("bound"), name


def test_a_squatter_cannot_get_an_unrelated_pid_stopped(make_plan, shared_tmp, unrelated_sleep):
    runs = _folder(shared_tmp / "top", 0o755) / "runs"
    runs.mkdir(mode=0o755)
    new_path = warm.socket_path(runs)
    squatter = Listener([_old_socket_path(runs), new_path], answers=[{"pid": unrelated_sleep.pid}], uid=NOBODY)
    try:
        run_id = supervisor.launch(make_plan({"training.max_steps": 100_000, "training.save_steps": 1000}),
                                   runs_dir=runs)
        attempt = _attempt(runs / run_id)
        assert attempt["pid"] != unrelated_sleep.pid and "warm" not in attempt
        assert squatter.outcome(new_path)["errno"] == errno.EACCES  # it cannot even create its socket there
        wait_for(lambda: _losses(runs / run_id), 180, "a first logged loss")
        stopped = supervisor.stop(run_id, timeout=120, runs_dir=runs)
        assert stopped.state == "stopped", stopped.error
        assert unrelated_sleep.poll() is None, "stop signalled a process the squatter named"
    finally:
        reports = squatter.finish()
    assert not [r for r in reports if "connection" in r], reports


def test_a_worker_answering_a_pid_that_is_not_its_child_is_not_trusted(make_plan, shared_tmp, unrelated_sleep,
                                                                       monkeypatch):
    # A "worker" of our own uid at the real socket location, answering with an unrelated process's pid
    # (one that even leads its own session) or pid 1: the watcher checks the pid's parent and session.
    monkeypatch.setenv("TUNEWISE_TEST_SECRET", SECRET)
    forged = {}
    for name, answers in {"sleep": [{"pid": unrelated_sleep.pid}], "init": [{"pid": 1}, {"returncode": 0}]}.items():
        runs = _folder(shared_tmp / name, 0o700) / "runs"
        runs.mkdir()
        forged[name] = (runs, Listener([warm.socket_path(runs)], answers=answers))
    try:
        runs = forged["sleep"][0]
        run_id = supervisor.launch(make_plan({"training.max_steps": 100_000, "training.save_steps": 1000}),
                                   runs_dir=runs)
        attempt = _attempt(runs / run_id)
        assert attempt["pid"] != unrelated_sleep.pid and "warm" not in attempt
        wait_for(lambda: _losses(runs / run_id), 180, "a first logged loss")
        assert f"answered pid {unrelated_sleep.pid}" in (runs / run_id / "watcher.log").read_text()
        stopped = supervisor.stop(run_id, timeout=120, runs_dir=runs)
        assert stopped.state == "stopped", stopped.error
        assert unrelated_sleep.poll() is None, "stop signalled the pid the fake worker answered"

        runs = forged["init"][0]
        run_id = supervisor.launch(make_plan({"training.max_steps": 2}), runs_dir=runs)
        status = supervisor.wait(run_id, timeout=300, runs_dir=runs)
        assert status.state == "finished", status.error  # trained cold, not "exited without reporting"
        assert len(_losses(runs / run_id)) == 2 and "warm" not in _attempt(runs / run_id)
        assert "answered pid 1," in (runs / run_id / "watcher.log").read_text()
    finally:
        reports = [r for _, listener in forged.values() for r in listener.finish()]
    asked = [r for r in reports if "connection" in r]
    assert len(asked) == 2  # each fake was asked, and not believed
    # It is us (same uid), so it got the request, with only what differs from its own environment: the
    # variable set for this test, not PATH or HOME, which it already has.
    for request in asked:
        assert "TUNEWISE_TEST_SECRET" in request["sent_env"] and not {"PATH", "HOME"} & set(request["sent_env"])


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
            "pid_start": procs.process_start_ticks(bystander.pid), "watcher_pid": None}]}))
        assert supervisor.status(run_dir).state == "running"
        supervisor.stop(run_dir, timeout=1)
        assert bystander.poll() is None, "stop signalled a process that does not lead its own session"
    finally:
        bystander.kill()
        bystander.wait()


def test_the_socket_folder_must_be_ours_and_private(tmp_path):
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    assert warm.private_dir(private)
    os.chmod(private, 0o777)
    assert not warm.private_dir(private)
    os.chmod(private, 0o750)
    assert not warm.private_dir(private)
    os.chmod(private, 0o700)
    os.chown(private, NOBODY, NOBODY)
    assert not warm.private_dir(private)  # another user's folder, however strict its mode
    os.chown(private, os.getuid(), os.getgid())
    (tmp_path / "link").symlink_to(private)
    assert not warm.private_dir(tmp_path / "link")
    (tmp_path / "file").write_text("")
    os.chmod(tmp_path / "file", 0o700)
    assert not warm.private_dir(tmp_path / "file")

    # A worker whose socket folder is not private refuses to serve (before importing anything).
    runs = tmp_path / "runs"
    (runs / ".warm").mkdir(parents=True)
    os.chmod(runs / ".warm", 0o777)
    assert warm.socket_path(runs).parent == runs / ".warm"
    worker = subprocess.run([sys.executable, "-m", "trainer.warm", "serve", str(runs), "--idle", "5"],
                            capture_output=True, text=True, timeout=60, env=procs.child_env())
    assert worker.returncode == 1 and "not serving" in worker.stdout, worker.stdout + worker.stderr
    assert not warm.socket_path(runs).exists()


def test_the_worker_hangs_up_on_another_user(warm_runs):
    runs = warm_runs["runs"]
    path = warm.socket_path(runs)
    assert path.parent.is_relative_to(runs)  # never open up a shared folder such as /tmp
    modes = {p: os.stat(p).st_mode for p in (path, path.parent)}
    os.chmod(path.parent, 0o755)  # let the other user reach the socket, to see the worker's own check
    os.chmod(path, 0o777)
    try:
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            answer = b"?"
            try:
                os.setgroups([])
                os.setgid(NOBODY)
                os.setuid(NOBODY)
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                    sock.settimeout(10)
                    sock.connect(str(path))
                    sock.sendall(b'{"ping": true}\n')
                    answer = b"answered:" + sock.recv(65536)
            except (BrokenPipeError, ConnectionResetError):  # hung up on before the ping was sent
                answer = b"answered:"
            except BaseException as exc:  # noqa: BLE001
                answer = f"{type(exc).__name__}: {exc}".encode()
            finally:
                os.write(write, answer)
                os._exit(0)
        os.close(write)
        os.waitpid(pid, 0)
        with os.fdopen(read, "rb") as reply:
            answer = reply.read()
    finally:
        for p, mode in modes.items():
            os.chmod(p, mode)
    assert answer == b"answered:", f"the other user got: {answer!r}"  # connected, then hung up on
    assert warm.ping(runs)["pid"] == warm_runs["pid"]


# -- the long tail ---------------------------------------------------------------------------------


def _raw(runs: Path, payload: bytes) -> dict | None:
    """Send `payload` to the worker as is; its first answer line (None: it hung up without one)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(warm.socket_path(runs)))
        sock.sendall(payload)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return json.loads(data.split(b"\n")[0]) if data.strip() else None


def test_malformed_requests_are_refused_and_the_worker_survives(warm_runs):
    runs = warm_runs["runs"]
    run_dir = runs / "not-a-launch"
    run_dir.mkdir(exist_ok=True)
    (run_dir / "plan.yaml").write_text("stage: sft\n")
    real = {"run_dir": str(run_dir), "log": str(run_dir / "stdout.log"), "resume": None, "cwd": None,
            "python": sys.executable, "env_set": {}, "env_unset": []}
    not_objects = [b"[]\n", b"5\n", b'"x"\n', b"null\n", b"[" * 100_000 + b"\n"]
    wrong_types = [{**real, "env": [1]}, {**real, "env_set": [1]}, {**real, "env_set": {"A": 1}},
                   {**real, "env_unset": [""]}, {**real, "env_set": {"A=B": "1"}}, {**real, "run_dir": 5},
                   {**real, "log": None}, {**real, "resume": {}}, {**real, "cwd": 7}, {"adopt": "me"}, {"adopt": True}]
    for payload in not_objects + [(json.dumps(m) + "\n").encode() for m in wrong_types]:
        answer = _raw(runs, payload)
        assert answer is None or set(answer) == {"error"}, (payload[:200], answer)
        if payload not in not_objects:
            assert answer and answer["error"], payload  # a request-shaped object gets a reason
        alive = warm.ping(runs)
        assert alive and alive["pid"] == warm_runs["pid"] and alive["children"] == 0, payload[:200]
    assert "forked" not in "\n".join(l for l in (runs / ".warm.log").read_text().splitlines() if "not-a-launch" in l)


def test_a_huge_request_is_cut_off_quickly(warm_runs):
    runs = warm_runs["runs"]
    sent, chunk, started = 0, b"x" * 65536, time.monotonic()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(warm.socket_path(runs)))
        with pytest.raises((BrokenPipeError, ConnectionResetError)):
            while sent < 60 * 2**20 and time.monotonic() - started < 30:  # 60 MB, no newline
                sock.sendall(chunk)
                sent += len(chunk)
    assert sent <= 4 * warm.MAX_REQUEST_BYTES, f"{sent} bytes were taken"
    assert time.monotonic() - started < 10
    assert warm.ping(runs)["pid"] == warm_runs["pid"]


def test_forked_trainers_carry_their_own_process_title(make_plan, warm_runs):
    runs = warm_runs["runs"]
    run_id = supervisor.launch(make_plan({"training.max_steps": 100_000, "training.save_steps": 1000}), runs_dir=runs)
    try:
        assert _attempt(runs / run_id).get("warm") is True
        pid = supervisor.status(run_id, runs).pid
        assert Path(f"/proc/{pid}/comm").read_text().strip() == "tunewise-train"
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
        assert cmdline == f"tunewise-train {runs / run_id}"
        ps = subprocess.run(["ps", "-o", "comm=,args=", "-p", str(pid)], capture_output=True, text=True, check=True)
        assert ps.stdout.split()[:2] == ["tunewise-train", "tunewise-train"] and "trainer.warm" not in ps.stdout
        hunted = subprocess.run(["pgrep", "-f", "trainer.warm serve"], capture_output=True, text=True)
        assert str(warm_runs["pid"]) in hunted.stdout.split() and str(pid) not in hunted.stdout.split()
        wait_for(lambda: _losses(runs / run_id), 120, "a first logged loss")  # the renamed trainer still trains
    finally:
        stopped = supervisor.stop(run_id, timeout=120, runs_dir=runs)
    assert stopped.state == "stopped"
