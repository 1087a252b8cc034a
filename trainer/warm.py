"""A warm trainer: a process that has already imported torch, transformers, TRL, PEFT and
datasets, and forks one training process per run, so a launch skips the imports.

Importing the training stack takes about 9 s of the 14 s from `launch()` to the
first logged loss on 2 CPU cores (bench/launch_latency.py). The warm worker
pays that once: `python -m trainer.warm serve RUNS_DIR` imports the libraries
(never Tunewise's own modules, so a child always runs the code on disk), then
listens on a Unix socket only its user can open. For each request it forks a
child that starts its own session, redirects its output to the run's
stdout.log and runs `trainer.runner.main([RUN_DIR, ...])`: the same process a
cold start would run, minus the imports.

Protocol (one JSON object per line): the watcher sends {"run_dir", "resume",
"cwd", "env", "log"}; the worker answers {"pid": N} once the child exists (or
{"error": "..."} to make the watcher start cold), and {"returncode": R} when
it ends (negative: killed by signal -R, as with subprocess). The worker refuses
run directories outside its runs folder, and requests whose environment
differs from its own in a variable the libraries read at import time (HF_*,
CUDA_*, ...): those start cold, so a setting is never silently ignored.

The worker is single-threaded (a selector loop), which keeps fork() safe. It
exits when its owner (the app that started it, or the app that adopted it
after a restart) is gone and no child is running, after `--idle` seconds without a request, or on SIGTERM. Only
single-process runs use it; `accelerate launch` runs start cold.

`ensure_warm(runs_dir, owner_pid)` starts a worker unless one answers;
`request(...)` is the watcher's side (see trainer.supervisor).
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

#: What the worker imports up front: the training stack, not Tunewise's code.
HEAVY_MODULES = ("torch", "transformers", "peft", "datasets", "accelerate", "trl",
                 "trl.trainer.sft_trainer", "trl.trainer.dpo_trainer", "trl.trainer.reward_trainer")
#: Environment variables read when those libraries are imported: a request must match the worker's.
IMPORT_TIME_ENV_PREFIXES = ("HF_", "HUGGINGFACE_", "TRANSFORMERS_", "CUDA_", "PYTORCH_", "TORCH", "OMP_", "MKL_",
                            "TOKENIZERS_", "BNB_", "ACCELERATE_", "NCCL_", "TRL_", "PYTHONHASHSEED")
DISABLE_ENV = "TUNEWISE_WARM"
READY_S = 120.0
IDLE_S = 1800.0


def enabled() -> bool:
    """Off when TUNEWISE_WARM=0 (or false / no / off)."""
    return os.environ.get(DISABLE_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def socket_path(runs_dir: str | Path) -> Path:
    """The worker's socket for `runs_dir`: short (Unix socket paths are limited), per user and runs folder."""
    key = hashlib.sha1(str(Path(runs_dir).expanduser().resolve()).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"tunewise-warm-{os.getuid()}-{key}.sock"


def import_env(env: dict) -> dict:
    """The part of an environment that the pre-imported libraries have already read."""
    return {k: v for k, v in env.items() if k.startswith(IMPORT_TIME_ENV_PREFIXES)}


def _connect(path: Path, timeout: float) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(path))
    except OSError:
        sock.close()
        return None
    return sock


def _send(sock: socket.socket, message: dict) -> None:
    sock.sendall((json.dumps(message) + "\n").encode())


class _Lines:
    """Newline-delimited JSON from a socket."""

    def __init__(self, sock: socket.socket):
        self.sock, self.buffer = sock, b""

    def next(self) -> dict | None:
        while b"\n" not in self.buffer:
            try:
                chunk = self.sock.recv(65536)
            except OSError:
                return None
            if not chunk:
                return None
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        try:
            return json.loads(line)
        except ValueError:
            return None


def ping(runs_dir: str | Path, timeout: float = 1.0) -> dict | None:
    """The worker's {"pid", "ready", "runs_dir", "children"} if one answers for `runs_dir`, else None."""
    sock = _connect(socket_path(runs_dir), timeout)
    if sock is None:
        return None
    with sock:
        try:
            _send(sock, {"ping": True})
            return _Lines(sock).next()
        except OSError:
            return None


def ensure_warm(runs_dir: str | Path, owner_pid: int | None = None, idle_s: float = IDLE_S) -> int | None:
    """Start a warm worker for `runs_dir` unless one answers; return its pid (None when disabled).

    Returns at once: the worker imports in the background and serves requests once
    ready; until then launches start cold.
    """
    if not enabled() or not hasattr(os, "fork"):
        return None
    answer = ping(runs_dir)
    if answer:
        if owner_pid and answer.get("owner") != owner_pid:
            _adopt(runs_dir, owner_pid)  # e.g. a restarted app takes over a worker still running its runs
        return answer.get("pid")
    runs_dir = Path(runs_dir).expanduser().resolve()
    runs_dir.mkdir(parents=True, exist_ok=True)
    # The lock file says "a worker lives (or is starting)": taken here, handed to the worker.
    lock = os.open(lock_path(runs_dir), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return _lock_owner(lock)
        command = [sys.executable, "-m", "trainer.warm", "serve", str(runs_dir), "--idle", str(idle_s),
                   "--lock-fd", str(lock)]
        if owner_pid:
            command += ["--owner", str(owner_pid)]
        from trainer.supervisor import _child_env  # noqa: PLC0415 (supervisor imports this module)

        with open(runs_dir / ".warm.log", "ab") as log:
            proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True, env=_child_env(), pass_fds=(lock,))
        os.ftruncate(lock, 0)
        os.pwrite(lock, str(proc.pid).encode(), 0)
        return proc.pid
    finally:
        os.close(lock)  # the worker holds its own copy of the locked file


def _adopt(runs_dir: str | Path, owner_pid: int) -> None:
    sock = _connect(socket_path(runs_dir), 1.0)
    if sock is not None:
        with sock:
            try:
                _send(sock, {"adopt": owner_pid})
                _Lines(sock).next()
            except OSError:
                pass


def lock_path(runs_dir: str | Path) -> Path:
    """The lock that says "a worker lives (or is starting)": in the runs folder, beside `.warm.log`
    (the socket goes to the temporary folder only because socket paths must be short)."""
    return Path(runs_dir).expanduser().resolve() / ".warm.lock"


def _lock_owner(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).decode().strip() or 0) or None
    except (OSError, ValueError):
        return None


def wait_ready(runs_dir: str | Path, timeout: float = READY_S) -> bool:
    """Wait until a worker for `runs_dir` has finished importing; True when it has."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        answer = ping(runs_dir)
        if answer and answer.get("ready"):
            return True
        time.sleep(0.2)
    return False


class WarmRun:
    """The watcher's handle on a forked trainer: its pid, and `wait()` for its return code."""

    def __init__(self, sock: socket.socket, pid: int):
        self.sock, self.pid, self._lines = sock, pid, _Lines(sock)

    def wait(self) -> int | None:
        """The child's return code (negative: killed by that signal); None when the worker went away first."""
        self.sock.settimeout(None)
        try:
            while True:
                message = self._lines.next()
                if message is None:
                    return None
                if "returncode" in message:
                    return int(message["returncode"])
        finally:
            self.sock.close()


def request(run_dir: Path, resume: str | None, cwd: str | None, env: dict, log: Path) -> WarmRun | None:
    """Ask the warm worker for `run_dir`'s runs folder to fork the trainer; None means start cold."""
    if not enabled():
        return None
    sock = _connect(socket_path(Path(run_dir).parent), timeout=2.0)
    if sock is None:
        return None
    try:
        _send(sock, {"run_dir": str(run_dir), "resume": resume, "cwd": cwd, "env": env, "log": str(log),
                     "python": sys.executable})
        answer = _Lines(sock).next()
    except OSError:
        answer = None
    if not answer or "pid" not in answer:
        sock.close()
        return None
    return WarmRun(sock, int(answer["pid"]))


# -- the worker ----------------------------------------------------------------------------------


def _child(message: dict, inherited: list) -> None:
    """In the forked child: become the trainer. Never returns."""
    code = 1
    try:
        for item in inherited:  # the worker's sockets, selector and lock: the trainer must not hold them
            os.close(item) if isinstance(item, int) else item.close()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        os.setsid()
        if message.get("cwd"):
            os.chdir(message["cwd"])
        os.environ.clear()
        os.environ.update(message.get("env") or {})
        for entry in reversed(os.environ.get("PYTHONPATH", "").split(os.pathsep)):
            if entry and entry not in sys.path:
                sys.path.insert(0, entry)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        log = os.open(message["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        sys.stdout = os.fdopen(1, "w", buffering=1)
        sys.stderr = os.fdopen(2, "w", buffering=1)
        argv = [message["run_dir"]] + (["--resume", message["resume"]] if message.get("resume") else [])
        sys.argv = ["trainer.runner", *argv]
        from trainer import runner

        code = runner.main(argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 (the child must always exit here, never return to the loop)
        traceback.print_exc()
        code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _refusal(message: dict, runs_dir: Path, own_env: dict) -> str | None:
    """Why this request must start cold instead (None: fork it)."""
    try:
        run_dir = Path(message["run_dir"]).resolve()
        log = Path(message["log"]).resolve()
    except (KeyError, TypeError):
        return "the request has no run directory"
    if run_dir.parent != runs_dir or not (run_dir / "plan.yaml").is_file() or log.parent != run_dir:
        return f"{run_dir} is not a run directory of {runs_dir}"
    if message.get("python") not in (None, sys.executable):
        return "a different Python"
    if import_env(message.get("env") or {}) != own_env:
        return "the environment differs in a variable the libraries read at import time"
    return None


def serve(runs_dir: Path, owner: int | None = None, idle_s: float = IDLE_S, lock_fd: int | None = None) -> int:
    """Import the training stack, then fork trainers on request until idle or orphaned."""
    runs_dir = Path(runs_dir).resolve()
    path = socket_path(runs_dir)
    if lock_fd is None:  # started by hand: take the lock ourselves
        lock_fd = os.open(lock_path(runs_dir), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"a warm worker (pid {_lock_owner(lock_fd)}) already serves {runs_dir}", flush=True)
            return 0
    os.set_inheritable(lock_fd, False)  # trainers must not keep the lock
    os.ftruncate(lock_fd, 0)
    os.pwrite(lock_fd, str(os.getpid()).encode(), 0)
    path.unlink(missing_ok=True)
    old_umask = os.umask(0o077)  # only this user may ask for a fork
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    os.umask(old_umask)
    socket_inode = os.stat(path).st_ino
    listener.listen(16)
    listener.setblocking(False)
    started = time.time()
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    signal.signal(signal.SIGINT, lambda *_: stopping.append(True))
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    buffers: dict[socket.socket, bytes] = {}
    waiting: dict[int, socket.socket] = {}  # child pid -> the watcher waiting for its end
    ready = False
    last_request = time.time()

    def answer(conn: socket.socket, message: dict) -> None:
        try:
            conn.setblocking(True)
            conn.settimeout(2.0)
            _send(conn, message)
            conn.setblocking(False)
        except OSError:
            pass

    def close(conn: socket.socket) -> None:
        try:
            selector.unregister(conn)
        except (KeyError, ValueError):
            pass
        buffers.pop(conn, None)
        conn.close()

    def handle(conn: socket.socket, message: dict) -> None:
        nonlocal last_request, owner
        if message.get("ping"):
            answer(conn, {"pid": os.getpid(), "ready": ready, "runs_dir": str(runs_dir), "children": len(waiting),
                          "owner": owner})
            close(conn)
            return
        if isinstance(message.get("adopt"), int):
            owner = message["adopt"]
            print(f"{time.strftime('%H:%M:%S')} new owner {owner}", flush=True)
            answer(conn, {"owner": owner})
            close(conn)
            return
        last_request = time.time()
        reason = "still importing" if not ready else _refusal(message, runs_dir, own_env)
        if reason:
            answer(conn, {"error": reason})
            close(conn)
            return
        pid = os.fork()
        if pid == 0:
            _child(message, [lock_fd, listener, selector, *buffers, *waiting.values()])
        selector.unregister(conn)
        buffers.pop(conn, None)
        waiting[pid] = conn
        answer(conn, {"pid": pid})
        print(f"{time.strftime('%H:%M:%S')} forked {pid} for {message['run_dir']}", flush=True)

    def accept_and_read(timeout: float) -> None:
        for key, _ in selector.select(timeout):
            sock = key.fileobj
            if sock is listener:
                try:
                    conn, _ = listener.accept()
                except OSError:
                    continue
                conn.setblocking(False)
                selector.register(conn, selectors.EVENT_READ)
                buffers[conn] = b""
                continue
            try:
                chunk = sock.recv(65536)
            except OSError:
                chunk = b""
            if not chunk:
                close(sock)
                continue
            buffers[sock] += chunk
            if b"\n" in buffers[sock]:
                line = buffers[sock].split(b"\n", 1)[0]
                try:
                    message = json.loads(line)
                except ValueError:
                    close(sock)
                    continue
                handle(sock, message)

    def reap() -> None:
        while waiting:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            conn = waiting.pop(pid, None)
            if conn is not None:
                answer(conn, {"returncode": os.waitstatus_to_exitcode(status)})
                conn.close()

    # Answer pings while importing, so a second ensure_warm() does not start another worker.
    own_env = import_env(dict(os.environ))
    import importlib

    for name in HEAVY_MODULES:
        accept_and_read(0)
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 (a missing optional piece only costs its import later)
            print(f"could not pre-import {name}: {exc}", flush=True)
    ready = True
    print(f"ready after {time.time() - started:.1f} s: {', '.join(HEAVY_MODULES)}", flush=True)
    try:
        while not stopping:
            accept_and_read(0.5)
            reap()
            owner_gone = owner is not None and not _alive(owner)
            idle = time.time() - last_request > idle_s
            if not waiting and (owner_gone or idle):
                print(f"exiting: {'owner gone' if owner_gone else 'idle'}", flush=True)
                break
    finally:
        try:
            if os.stat(path).st_ino == socket_inode:  # not a newer worker's socket
                path.unlink()
        except OSError:
            pass
        listener.close()
        for conn in list(waiting.values()):  # their watchers fall back to watching the pid
            conn.close()
    return 0


def _alive(pid: int) -> bool:
    """Like supervisor.pid_alive, repeated here: the worker must not import Tunewise modules (its children
    would inherit them instead of loading the code on disk)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped) is gone as far as we are concerned
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.warm", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("serve", help="pre-import the training stack and fork trainers for RUNS_DIR's runs")
    run.add_argument("runs_dir")
    run.add_argument("--owner", type=int, help="exit once this process is gone and no run is going")
    run.add_argument("--idle", type=float, default=IDLE_S, help="exit after this many seconds without a request")
    run.add_argument("--lock-fd", type=int, help=argparse.SUPPRESS)  # the locked file ensure_warm() hands over
    args = parser.parse_args(argv)
    return serve(Path(args.runs_dir), args.owner, args.idle, args.lock_fd)


if __name__ == "__main__":
    sys.exit(main())
