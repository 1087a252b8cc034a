"""A warm trainer: a process that has already imported torch, transformers, TRL, PEFT and
datasets, and forks one training process per run, so a launch skips the imports.

Importing the training stack takes about 9 s of the 14 s from `launch()` to the
first logged loss on 2 CPU cores (bench/launch_latency.py). The warm worker
pays that once: `python -m trainer.warm serve RUNS_DIR` imports the libraries
(never Tunewise's own modules, so a child always runs the code on disk), then
listens on a Unix socket. For each request it forks a child that starts its
own session, names itself `tunewise-train` (see `_set_process_title`),
redirects its output to the run's stdout.log and runs
`trainer.runner.main([RUN_DIR, ...])`: the same process a cold start would run,
minus the imports.

Who may talk to whom. A launch hands the worker its environment (HF_TOKEN,
cloud keys) and then signals the pid the worker reports, so both ends must be
this user's own processes:

- The socket lives in a directory only this user can create entries in
  (`socket_path`): `<runs>/.warm/warm.sock`, the `.warm` folder made with mode
  0700; when that path is too long for a Unix socket (107 bytes), in
  `$XDG_RUNTIME_DIR/tunewise/` (when that folder is ours and 0700), else in
  `$TMP/tunewise-<uid>/`. Every end checks the folder with lstat (a real
  directory, not a symlink, owned by us, no access for group or others:
  `private_dir`); the worker refuses to serve and the client starts cold when
  it is not, e.g. when another user created `$TMP/tunewise-<uid>` first.
- Before sending a byte the client checks the socket file (a socket owned by
  us) and the listening process's uid (SO_PEERCRED); the worker checks each
  caller's uid the same way and hangs up on anyone else. Without SO_PEERCRED
  (not Linux) the client never uses a worker.
- The request carries only the part of the launch environment that differs
  from the worker's own (`env_set`, `env_unset`): the worker started from the
  same user's environment, which the client reads from
  /proc/<worker>/environ (the pid SO_PEERCRED gave). A secret the two share is
  never sent; one only the launcher has (HF_TOKEN exported in the terminal
  that runs `tunewise launch`) is, because the run needs it and a cold start
  would have it. An allow-list would make warm runs differ from cold ones.
- The client records the pid the worker answers only if /proc/<pid>/stat says
  it is the worker's child and leads its own session and process group (the
  child calls setsid() before the worker answers); otherwise the run starts
  cold. trainer.supervisor signals a recorded pid only while its start time
  matches and it still leads its own session.

Protocol (one JSON object per line, at most `MAX_REQUEST_BYTES`): the watcher
sends {"run_dir", "resume", "cwd", "env_set", "env_unset", "log", "python"};
the worker answers {"pid": N} once the child exists (or {"error": "..."} to
make the watcher start cold), and {"returncode": R} when it ends (negative:
killed by signal -R, as with subprocess). `{"ping": true}` and `{"adopt":
PID}` ask for its state and hand it a new owner. The worker refuses malformed
requests (not an object, a field of the wrong type), run directories outside
its runs folder, and requests whose environment differs from its own in a
variable the libraries read at import time (HF_*, CUDA_*, ...): those start
cold, so a setting is never silently ignored.

The worker is single-threaded (a selector loop), which keeps fork() safe. It
exits when its owner (the app that started it, or the app that adopted it
after a restart) is gone and no child is running, after `--idle` seconds without a request, or on SIGTERM. Only
single-process runs use it; `accelerate launch` runs start cold.

`ensure_warm(runs_dir, owner_pid)` starts a worker unless one answers;
`request(...)` is the watcher's side (see trainer.watcher).
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import hashlib
import json
import os
import selectors
import signal
import socket
import stat
import struct
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
#: A Unix socket path holds at most 107 bytes (sun_path is 108, with the closing NUL).
MAX_SOCKET_PATH = 107
#: A request line longer than this is refused (a real one is a few kB: paths and an environment diff).
MAX_REQUEST_BYTES = 1 << 20
#: What a forked trainer calls itself: its comm (`ps -o comm`, `pgrep tunewise-train`) and the start of its
#: command line, so `pkill -f trainer.warm` hits the worker, not training runs.
TRAINER_TITLE = "tunewise-train"
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
_PR_SET_NAME = 15


def enabled() -> bool:
    """Off when TUNEWISE_WARM=0 (or false / no / off)."""
    return os.environ.get(DISABLE_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def socket_path(runs_dir: str | Path) -> Path:
    """Where the worker for `runs_dir` listens: in a folder only this user may write to (see the module
    docstring); `<runs>/.warm/warm.sock` unless that is too long for a Unix socket."""
    runs = Path(runs_dir).expanduser().resolve()
    beside_runs = runs / ".warm" / "warm.sock"
    if len(os.fsencode(beside_runs)) <= MAX_SOCKET_PATH:
        return beside_runs
    name = f"warm-{hashlib.sha1(str(runs).encode()).hexdigest()[:16]}.sock"
    runtime = os.environ.get("XDG_RUNTIME_DIR", "")
    if runtime.startswith("/") and private_dir(Path(runtime)):
        return Path(runtime) / "tunewise" / name
    return Path(tempfile.gettempdir()) / f"tunewise-{os.getuid()}" / name


def private_dir(path: str | Path) -> bool:
    """Whether `path` is a real directory (not a symlink) owned by this user that nobody else may enter."""
    try:
        info = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid() and stat.S_IMODE(info.st_mode) & 0o077 == 0


def _make_private_dir(path: Path) -> bool:
    """Create `path` with mode 0700 unless it exists; True when it is (now) private (see private_dir)."""
    old_umask = os.umask(0o077)
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        pass
    except OSError:
        return False
    finally:
        os.umask(old_umask)
    return private_dir(path)


def import_env(env: dict) -> dict:
    """The part of an environment that the pre-imported libraries have already read."""
    return {k: v for k, v in env.items() if k.startswith(IMPORT_TIME_ENV_PREFIXES)}


def _peer(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a connected Unix socket (Linux: SO_PEERCRED)."""
    return _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))


def _connect(path: Path, timeout: float) -> tuple[socket.socket, int] | None:
    """A connection to the worker at `path` and the worker's pid, or None unless everything is ours:
    the folder (private_dir), the socket file, and the process listening on it (SO_PEERCRED)."""
    if not hasattr(socket, "SO_PEERCRED") or not private_dir(path.parent):
        return None
    try:
        info = os.lstat(path)
    except OSError:
        return None
    if not stat.S_ISSOCK(info.st_mode) or info.st_uid != os.getuid():
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(path))
        pid, uid, _ = _peer(sock)
    except OSError:
        sock.close()
        return None
    if uid != os.getuid() or pid <= 0:
        sock.close()
        return None
    return sock, pid


def _send(sock: socket.socket, message: dict) -> None:
    sock.sendall((json.dumps(message) + "\n").encode())


class _Lines:
    """Newline-delimited JSON objects from a socket (anything else, or a line over the limit, ends it)."""

    def __init__(self, sock: socket.socket):
        self.sock, self.buffer = sock, bytearray()

    def next(self) -> dict | None:
        while b"\n" not in self.buffer:
            if len(self.buffer) > MAX_REQUEST_BYTES:
                return None
            try:
                chunk = self.sock.recv(65536)
            except OSError:
                return None
            if not chunk:
                return None
            self.buffer += chunk
        line, _, rest = bytes(self.buffer).partition(b"\n")
        self.buffer = bytearray(rest)
        try:
            message = json.loads(line)
        except (ValueError, RecursionError):
            return None
        return message if isinstance(message, dict) else None


def _environ_of(pid: int) -> dict | None:
    """The environment process `pid` (one of ours) was started with, as /proc/<pid>/environ holds it."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as handle:
            raw = handle.read()
    except OSError:
        return None
    env: dict[str, str] = {}
    for entry in raw.split(b"\0"):
        name, sep, value = entry.partition(b"=")
        if sep and name:
            env.setdefault(os.fsdecode(name), os.fsdecode(value))
    return env


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/<pid>/stat after the command name: [state, ppid, pgrp, session, ...] (man 5 proc, from field 3)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            return handle.read().decode("ascii", "replace").rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _forked_child_start(pid: object, worker_pid: int) -> int | None:
    """The start time (clock ticks) of `pid` if it is a live child of `worker_pid` that leads its own
    session and process group, as the worker's children do; else None (the pid must not be trusted)."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 1:
        return None
    fields = _stat_fields(pid)
    try:
        state, ppid, pgrp, session = fields[0], int(fields[1]), int(fields[2]), int(fields[3])
        start_ticks = int(fields[19])
    except (TypeError, IndexError, ValueError):
        return None
    if state == "Z" or ppid != worker_pid or pgrp != pid or session != pid:
        return None
    return start_ticks


def ping(runs_dir: str | Path, timeout: float = 1.0) -> dict | None:
    """The worker's {"pid", "ready", "runs_dir", "children"} if one answers for `runs_dir`, else None."""
    connected = _connect(socket_path(runs_dir), timeout)
    if connected is None:
        return None
    with connected[0] as sock:
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
    if not enabled() or not hasattr(os, "fork") or not hasattr(socket, "SO_PEERCRED"):
        return None  # (without SO_PEERCRED neither end could tell who is at the other)
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
        from trainer.procs import child_env  # (here, not at the top: the worker imports no Tunewise module)

        with open(runs_dir / ".warm.log", "ab") as log:
            proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True, env=child_env(), pass_fds=(lock,))
        os.ftruncate(lock, 0)
        os.pwrite(lock, str(proc.pid).encode(), 0)
        return proc.pid
    finally:
        os.close(lock)  # the worker holds its own copy of the locked file


def ready_for(runs_dir: str | Path, owner_pid: int) -> int | None:
    """`ensure_warm` for an app: never raises (no worker only means launches start cold, which is logged)."""
    try:
        return ensure_warm(runs_dir, owner_pid=owner_pid)
    except OSError as exc:
        print(f"trainer.warm: no warm worker, launches start cold: {exc}", file=sys.stderr, flush=True)
        return None


def start_when_serving(runs_dir: str | Path, host: str, port: int, owner_pid: int, wait_s: float = 120.0) -> int | None:
    """Once the app answers on `host:port`, start a warm worker for `runs_dir` owned by `owner_pid`.

    Waiting for the server first keeps the worker's imports from slowing the app's start on a small
    machine. The worker exits when its owner does (once no run it forked is going). Run it in a thread."""
    address = ("127.0.0.1" if host in ("0.0.0.0", "::", "") else host, port)
    deadline = time.time() + wait_s
    while time.time() < deadline:
        try:
            with socket.create_connection(address, timeout=1):
                break
        except OSError:
            time.sleep(0.5)
    return ready_for(runs_dir, owner_pid)


def _adopt(runs_dir: str | Path, owner_pid: int) -> None:
    connected = _connect(socket_path(runs_dir), 1.0)
    if connected is not None:
        with connected[0] as sock:
            try:
                _send(sock, {"adopt": owner_pid})
                _Lines(sock).next()
            except OSError:
                pass


def lock_path(runs_dir: str | Path) -> Path:
    """The lock that says "a worker lives (or is starting)": in the runs folder, beside `.warm.log`."""
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
    """The watcher's handle on a forked trainer: its pid and start time, and `wait()` for its return code."""

    def __init__(self, sock: socket.socket, pid: int, start_ticks: int):
        self.sock, self.pid, self.start_ticks, self._lines = sock, pid, start_ticks, _Lines(sock)

    def wait(self) -> int | None:
        """The child's return code (negative: killed by that signal); None when the worker went away first."""
        self.sock.settimeout(None)
        try:
            while True:
                message = self._lines.next()
                if message is None:
                    return None
                if isinstance(message.get("returncode"), int):
                    return message["returncode"]
        finally:
            self.sock.close()


def request(run_dir: Path, resume: str | None, cwd: str | None, env: dict, log: Path) -> WarmRun | None:
    """Ask the warm worker for `run_dir`'s runs folder to fork the trainer with environment `env`;
    None means start cold (no worker, one that is not ours, a refusal, or an answer that fails the checks)."""
    if not enabled():
        return None
    connected = _connect(socket_path(Path(run_dir).parent), timeout=2.0)
    if connected is None:
        return None
    sock, worker_pid = connected
    base = _environ_of(worker_pid)  # what the worker started with: only the difference is sent
    if base is None:
        sock.close()
        return None
    message = {"run_dir": str(run_dir), "resume": resume, "cwd": cwd, "log": str(log), "python": sys.executable,
               "env_set": {k: v for k, v in env.items() if base.get(k) != v},
               "env_unset": sorted(k for k in base if k not in env)}
    try:
        line = (json.dumps(message) + "\n").encode()
        if len(line) > MAX_REQUEST_BYTES:
            sock.close()
            return None
        sock.sendall(line)
        answer = _Lines(sock).next()
    except (OSError, ValueError):  # ValueError: an environment value JSON cannot carry
        answer = None
    start_ticks = _forked_child_start(answer.get("pid"), worker_pid) if answer else None
    if start_ticks is None:
        if answer and "pid" in answer:
            print(f"trainer.warm: the worker (pid {worker_pid}) answered pid {answer['pid']!r}, which is not a "
                  "child of it leading its own session: starting cold", file=sys.stderr, flush=True)
        sock.close()
        return None
    return WarmRun(sock, answer["pid"], start_ticks)


# -- the worker ----------------------------------------------------------------------------------


def _set_process_title(*titles: str) -> None:
    """Make the forked trainer look like one: comm (`ps -o comm`, `pgrep NAME`) through prctl(PR_SET_NAME),
    and /proc/self/cmdline (`ps -o args`, `pgrep -f`) by overwriting the memory holding the worker's
    argv, which the kernel reads it from (what the setproctitle package does). The first of `titles`
    that fits in the old command line is used, else the last one cut to fit. Best effort: a failure
    leaves the worker's name."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_NAME, TRAINER_TITLE.encode()[:15], 0, 0, 0)
    except (OSError, AttributeError):
        pass
    fields = _stat_fields(os.getpid())
    try:
        arg_start, arg_end = int(fields[45]), int(fields[46])  # man 5 proc: fields 48 and 49
        with open("/proc/self/cmdline", "rb") as handle:
            current = handle.read()
    except (TypeError, IndexError, ValueError, OSError):
        return
    size = arg_end - arg_start
    # Write only where the kernel says argv is and only if it holds what /proc shows (ending in NUL,
    # which keeps the kernel reading exactly that range).
    if arg_start <= 0 or size < 2 or len(current) != size or ctypes.string_at(arg_start, size) != current:
        return
    encoded = [title.encode() for title in titles]
    title = next((t for t in encoded if len(t) < size), encoded[-1][:size - 1])
    ctypes.memmove(arg_start, title.ljust(size, b"\0"), size)


def _child(message: dict, env: dict, started: int, inherited: list) -> None:
    """In the forked child: become the trainer; write to `started` once in a session of our own. Never returns."""
    code = 1
    try:
        for item in inherited:  # the worker's sockets, selector and lock: the trainer must not hold them
            os.close(item) if isinstance(item, int) else item.close()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        os.setsid()
        run_dir = message["run_dir"]
        _set_process_title(f"{TRAINER_TITLE} {run_dir}", f"{TRAINER_TITLE} {Path(run_dir).name}")
        os.write(started, b"1")  # the worker answers {"pid"} only now, so the watcher sees the new session
        os.close(started)
        if message.get("cwd"):
            os.chdir(message["cwd"])
        os.environ.clear()
        os.environ.update(env)
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
        argv = [run_dir] + (["--resume", message["resume"]] if message.get("resume") else [])
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


#: The fields of a fork request and the types each may have.
REQUEST_FIELDS = {"run_dir": (str,), "log": (str,), "resume": (str, type(None)), "cwd": (str, type(None)),
                  "python": (str, type(None)), "env_set": (dict,), "env_unset": (list,)}


def _env_name_ok(name: object) -> bool:
    return isinstance(name, str) and name != "" and "=" not in name and "\0" not in name


def _requested_env(message: dict, base_env: dict) -> dict | str:
    """The environment the child runs with (the worker's start-up environment with the request's changes),
    or why the request's `env_set` / `env_unset` are malformed."""
    env_set, env_unset = message["env_set"], message["env_unset"]
    if not all(_env_name_ok(k) and isinstance(v, str) and "\0" not in v for k, v in env_set.items()):
        return "env_set must map variable names to strings"
    if not all(_env_name_ok(name) for name in env_unset):
        return "env_unset must list variable names"
    env = {k: v for k, v in base_env.items() if k not in env_unset}
    env.update(env_set)
    return env


def _refusal(message: dict, runs_dir: Path, own_env: dict, env: dict) -> str | None:
    """Why this well-formed request must start cold instead (None: fork it with `env`)."""
    try:
        run_dir = Path(message["run_dir"]).resolve()
        log = Path(message["log"]).resolve()
    except (OSError, ValueError):
        return "the run directory is not a valid path"
    if run_dir.parent != runs_dir or not (run_dir / "plan.yaml").is_file() or log.parent != run_dir:
        return f"{run_dir} is not a run directory of {runs_dir}"
    if message["cwd"] is not None and not Path(message["cwd"]).is_dir():
        return f"{message['cwd']} is not a directory"
    if message["python"] not in (None, sys.executable):
        return "a different Python"
    if import_env(env) != own_env:
        return "the environment differs in a variable the libraries read at import time"
    return None


def _malformed(message: object) -> str | None:
    """Why `message` is not a request the worker understands (None: it is one)."""
    if not isinstance(message, dict):
        return "a request must be a JSON object"
    unknown = sorted(set(message) - set(REQUEST_FIELDS))
    if unknown:
        return f"unknown request fields: {', '.join(unknown)}"
    for name, types in REQUEST_FIELDS.items():
        if name not in message and type(None) not in types:
            return f"the request has no {name}"
        if not isinstance(message.get(name), types):
            return f"{name} must be {' or '.join('null' if t is type(None) else t.__name__ for t in types)}"
    return None


def serve(runs_dir: Path, owner: int | None = None, idle_s: float = IDLE_S, lock_fd: int | None = None) -> int:
    """Import the training stack, then fork trainers on request until idle or orphaned."""
    runs_dir = Path(runs_dir).resolve()
    path = socket_path(runs_dir)
    if not hasattr(socket, "SO_PEERCRED"):
        print("not serving: this system has no SO_PEERCRED to tell who connects; launches start cold", flush=True)
        return 1
    if not _make_private_dir(path.parent):
        print(f"not serving: {path.parent} is not a folder only this user (uid {os.getuid()}) can use "
              "(it must be a directory, not a symlink, owned by us, with mode 0700); launches start cold", flush=True)
        return 1
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
    old_umask = os.umask(0o077)  # the folder already keeps others out; the socket file too
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
    buffers: dict[socket.socket, bytearray] = {}
    waiting: dict[int, socket.socket] = {}  # child pid -> the watcher waiting for its end
    ready = False
    last_request = time.time()
    # What the worker started with, read the way a client reads it (request() sends only the difference).
    base_env = _environ_of(os.getpid())
    if base_env is None:
        base_env = dict(os.environ)
    own_env = import_env(base_env)

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

    def refuse(conn: socket.socket, reason: str) -> None:
        answer(conn, {"error": reason})
        close(conn)

    def handle(conn: socket.socket, message: object) -> None:
        nonlocal last_request, owner
        if isinstance(message, dict) and message.get("ping") is True:
            answer(conn, {"pid": os.getpid(), "ready": ready, "runs_dir": str(runs_dir), "children": len(waiting),
                          "owner": owner})
            close(conn)
            return
        if isinstance(message, dict) and "adopt" in message:
            adopt = message["adopt"]
            if not isinstance(adopt, int) or isinstance(adopt, bool) or adopt <= 0:
                refuse(conn, "adopt must be a process id")
                return
            owner = adopt
            print(f"{time.strftime('%H:%M:%S')} new owner {owner}", flush=True)
            answer(conn, {"owner": owner})
            close(conn)
            return
        last_request = time.time()
        reason = _malformed(message)
        env = None
        if reason is None:
            env = _requested_env(message, base_env)
            if isinstance(env, str):
                reason = env
        if reason is None:
            reason = "still importing" if not ready else _refusal(message, runs_dir, own_env, env)
        if reason:
            refuse(conn, reason)
            return
        child_started, child_started_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(child_started)
            _child(message, env, child_started_w, [lock_fd, listener, selector, *buffers, *waiting.values()])
        os.close(child_started_w)
        try:
            in_session = os.read(child_started, 1) == b"1"  # the child writes at once, or dies and we read EOF
        finally:
            os.close(child_started)
        if not in_session:
            refuse(conn, "the forked trainer died before it started")
            return
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
                try:
                    caller_uid = _peer(conn)[1]
                except OSError:
                    caller_uid = None
                if caller_uid != os.getuid():  # only this user may ask for a fork (or learn we exist)
                    conn.close()
                    continue
                conn.setblocking(False)
                selector.register(conn, selectors.EVENT_READ)
                buffers[conn] = bytearray()
                continue
            if sock not in buffers:  # closed earlier in this round
                continue
            try:
                chunk = sock.recv(65536)
            except OSError:
                chunk = b""
            if not chunk:
                close(sock)
                continue
            buffer = buffers[sock]
            newline = chunk.find(b"\n")
            buffer += chunk if newline < 0 else chunk[:newline]
            if len(buffer) > MAX_REQUEST_BYTES:
                refuse(sock, f"a request may be at most {MAX_REQUEST_BYTES} bytes")
                continue
            if newline < 0:
                continue
            try:
                message = json.loads(bytes(buffer))
            except (ValueError, RecursionError):  # not JSON, or nested too deep to parse
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
    """Like trainer.procs.pid_alive, repeated here: the worker must not import Tunewise modules (its children
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
