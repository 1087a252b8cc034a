"""Start, watch, stop and resume training runs in the background; list them; read their events.

The API the wizard and the CLI use (no torch imports: it must stay instant):

- `launch(plan, runs_dir=None, name=None) -> run_id`: creates
  `<runs>/<run_id>/` with plan.yaml and run.json, and starts the run detached
  (its own process session, so it outlives the UI and the terminal).
- `status(run) -> RunStatus`, `list_runs(runs_dir) -> [RunStatus]` (newest
  first), `read_run_events(run, offset) -> (events, offset)`.
- `stop(run, timeout=30) -> RunStatus`: cooperative (STOP file + SIGTERM to
  the training processes, which save a checkpoint and exit); after `timeout`
  seconds the processes are killed. `request_stop(run)` asks without waiting.
- `resume(run) -> run_id`: the same run directory continues from the newest
  complete checkpoint in checkpoints/ (a damaged newer one is named and passed
  over); events are appended after a `resumed` event. `resume_run(run)` says
  which checkpoint and why (`Resumed`).

Launch, resume and stop take the run's lock (`flock` on `<run>/.lock`) while
they check the state and start or signal the trainer, so two of them from
different processes (two terminals, a terminal and the app) cannot start two
trainers on one run: a second resume is refused, naming what holds the lock.

How a run is watched. `launch` starts a small watcher process
(`python -m trainer.supervisor watch RUN_DIR`, stdlib only) in a new session;
the watcher starts the trainer (`python -m trainer.runner RUN_DIR`, or
`accelerate launch --num_processes N ... -m trainer.runner RUN_DIR` when the
plan asks for several processes) in a process group of its own, writes its
pid into run.json, waits for it, and records the exit code or the killing
signal. When the trainer ended without its own terminal event (SIGKILL, out
of memory, a crashed rank) the watcher appends one: `failed` with the signal
and the tail of stdout.log, or `stopped` when a stop had been asked for and
the fallback kill ended it. Events written before the kill stay intact.

When a warm worker serves the runs folder (trainer.warm: the training stack
already imported; the app starts one), the watcher asks it to fork the
single-process trainer instead, which saves the imports (about 9 s on 2
cores); run.json marks such an attempt `"warm": true`. Multi-process runs, and
any launch the worker cannot serve, start cold as above.

State is derived, so it survives restarts of the UI: the last terminal event
of the current attempt, else the recorded exit, else whether the trainer's
pid (checked with its start time, against pid reuse) is alive. A damaged
run.json or event (wrong types, cut short, missing) never raises: the run is
listed with a `damage` note naming the file.

A full disk. Each attempt keeps a small reserve file (trainer.events), so the
trainer's `failed` event ("the disk is full") and the watcher's record of the
exit still fit; the runner exits with EXIT_DISK_FULL, so the watcher and
status() name the disk even when nothing more fitted, and a watcher that
cannot write its record retries until there is room (or the run is resumed).

run.json: {"run_id", "name", "created_at", "summary", "attempts": [{"started_at",
"command", "cwd", "resume_from", "watcher_pid", "pid", "pid_start", "ended_at",
"exit_code", "signal"}]}; one writer at a time (the launcher before the
watcher starts, then the watcher), written atomically.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from advisor.errors import TunewiseError
from advisor.plan import DEMO_DATASETS, REPO_ROOT, Plan
from trainer.context import DISK_FULL_BYTES, EXIT_DISK_FULL, STOP_FILE
from trainer.events import (EVENTS_FILE, TERMINAL_EVENTS, EventWriter, is_disk_full, make_reserve, read_events,
                            release_reserve)

RUN_FILE = "run.json"
PLAN_FILE = "plan.yaml"
STDOUT_FILE = "stdout.log"
PROCS_DIR = "procs"
ACCELERATE_CONFIG_FILE = "accelerate_config.yaml"
CHECKPOINTS_DIR = "checkpoints"
DATA_DIR = "data"
STATES = ("queued", "running", "finished", "failed", "stopped")
ACTIVE_STATES = ("queued", "running")
RUNS_DIR_ENV = "TUNEWISE_RUNS_DIR"
ERROR_TAIL_LINES = 20

LOCK_FILE = ".lock"

#: How long launch() waits for the watcher to report the trainer's pid.
LAUNCH_WAIT_S = 15.0
#: How long a stop (or the watcher recording an exit) waits for the run's lock (a launch or resume
#: holds it until the trainer's pid is recorded, at most LAUNCH_WAIT_S).
LOCK_WAIT_S = LAUNCH_WAIT_S + 5
#: A running trainer is reported as possibly stalled when it has written no event for longer than
#: max(STALL_MIN_S, STALL_FACTOR x the median gap between its recent `log` events), or STALL_MIN_S x
#: STALL_FACTOR before two logs give a gap. Ten gaps covers an evaluation or a checkpoint save of
#: usual size between two logs; two minutes keeps a fast run on a busy machine from being flagged.
STALL_MIN_S = 120.0
STALL_FACTOR = 10.0
#: How long a watcher keeps retrying to record the exit when the disk is full, and how often.
RECORD_RETRY_S = 3600.0
RECORD_RETRY_EVERY_S = 2.0


def default_runs_dir() -> Path:
    """$TUNEWISE_RUNS_DIR, else ./runs (relative to the current directory)."""
    configured = os.environ.get(RUNS_DIR_ENV)
    return Path(configured).expanduser() if configured else Path.cwd() / "runs"


# -- small file helpers -----------------------------------------------------------------------------


def _write_json_atomic(path: Path, data: dict) -> None:
    """Write `data` to `path` through a temporary file and a rename; on a full disk, use the run's reserve."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    text = json.dumps(data, indent=1)
    for last_try in (False, True):
        try:
            temporary.write_text(text, encoding="utf-8")
            os.replace(temporary, path)
            return
        except OSError as exc:
            temporary.unlink(missing_ok=True)
            if last_try or not (is_disk_full(exc) and release_reserve(path.parent)):
                raise


@contextlib.contextmanager
def _run_lock(run_dir: Path, doing: str, wait_s: float = 0.0):
    """Hold the run's lock (`flock` on <run>/.lock) while `doing` ("resumed", "stopped", ...) the run.

    The lock is per open file and dies with its process, so a crashed holder never leaves it
    stuck. When another process holds it for longer than `wait_s`, TunewiseError names what it does.
    """
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise TunewiseError(f"run {run_dir.name} is being {_lock_holder(fd)} by another process: wait "
                                        f"for it, then see `tunewise status {run_dir.name}`") from None
                time.sleep(0.05)
        try:
            os.pwrite(fd, f"{doing} (pid {os.getpid()})".encode(), 0)
        except OSError:  # a full disk: the lock holds all the same
            pass
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # still holding it: no later reader sees this holder as current
    finally:
        os.close(fd)


def _lock_holder(fd: int) -> str:
    """What the holder of a run's lock says it does; it writes that just after taking the lock, so wait a moment."""
    for _ in range(10):
        text = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
        if text:
            return text
        time.sleep(0.05)
    return "started, resumed or stopped"


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


#: run.json fields and the check each must pass (anything else is dropped and reported as damage).
_RECORD_FIELDS = {"run_id": (str, "a string"), "name": (str, "a string"), "summary": (str, "a string"),
                  "created_at": (_is_number, "a number")}
_ATTEMPT_FIELDS = {"started_at": (_is_number, "a number"), "ended_at": (_is_number, "a number"),
                   "watcher_pid": (_is_int, "a whole number"), "pid": (_is_int, "a whole number"),
                   "pid_start": (_is_int, "a whole number"), "exit_code": (_is_int, "a whole number"),
                   "signal": (_is_int, "a whole number"), "events_offset": (_is_int, "a whole number"),
                   "resume_from": (str, "a string"), "cwd": (str, "a string")}


def _passes(value, check) -> bool:
    return isinstance(value, check) if isinstance(check, type) else check(value)


def _read_run_record(run_dir: Path) -> tuple[dict, list[str]]:
    """run.json with every field of the wrong type dropped, and what was wrong with it.

    One hand-edited or damaged run.json must not break the listing of the whole folder: the run
    is shown with a note instead (RunStatus.damage)."""
    try:
        raw = json.loads((run_dir / RUN_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {"attempts": []}, [f"{RUN_FILE} is missing"]
    except OSError as exc:
        return {"attempts": []}, [f"{RUN_FILE} cannot be read ({exc.strerror or exc})"]
    except ValueError:
        return {"attempts": []}, [f"{RUN_FILE} is not valid JSON (cut short?)"]
    if not isinstance(raw, dict):
        return {"attempts": []}, [f"{RUN_FILE} holds {type(raw).__name__} {str(raw)[:40]!r}, not an object"]
    info, problems = dict(raw), []
    for key, (check, wanted) in _RECORD_FIELDS.items():
        if info.get(key) is not None and not _passes(info[key], check):
            problems.append(f"{RUN_FILE}: {key} is {info.pop(key)!r}, not {wanted}")
    attempts = info.get("attempts", [])
    if not isinstance(attempts, list):
        problems.append(f"{RUN_FILE}: attempts is {attempts!r:.40}, not a list")
        attempts = []
    clean = []
    for number, attempt in enumerate(attempts, 1):
        if not isinstance(attempt, dict):
            problems.append(f"{RUN_FILE}: attempt {number} is {attempt!r:.40}, not an object")
            continue
        attempt = dict(attempt)
        for key, (check, wanted) in _ATTEMPT_FIELDS.items():
            if attempt.get(key) is not None and not _passes(attempt[key], check):
                problems.append(f"{RUN_FILE}: attempt {number}: {key} is {attempt[key]!r:.40}, not {wanted}")
                attempt[key] = None
        command = attempt.get("command")
        if command is not None and not (isinstance(command, list) and all(isinstance(a, str) for a in command)):
            problems.append(f"{RUN_FILE}: attempt {number}: command is not a list of strings")
            attempt["command"] = None
        clean.append(attempt)
    info["attempts"] = clean
    return info, problems


def _tail_lines(path: Path, count: int, max_bytes: int = 64_000) -> list[str]:
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - max_bytes))
            data = handle.read()
    except OSError:
        return []
    text = data.decode("utf-8", "replace").replace("\r", "\n")
    return [line for line in text.splitlines() if line.strip()][-count:]


def process_start_ticks(pid: int) -> int | None:
    """Start time of `pid` in clock ticks since boot (Linux); None when unknown or gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            stat = handle.read().decode("ascii", "replace")
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()
    try:
        if fields[0] == "Z":  # a zombie has finished; only its exit status is left
            return None
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def pid_alive(pid: int | None, start_ticks: int | None = None) -> bool:
    """Whether process `pid` runs (and, when `start_ticks` is known, is the same process as recorded)."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    current = process_start_ticks(pid)
    if current is None:
        return not Path("/proc").is_dir()  # no /proc (not Linux): trust kill(0); on Linux: zombie or gone
    return start_ticks is None or current == start_ticks


# -- run directories -------------------------------------------------------------------------------


_NAME_CHARS = re.compile(r"[^A-Za-z0-9_.-]+")


def new_run_id(plan: Plan, name: str | None = None) -> str:
    """<YYYYmmdd-HHMMSS>-<label>-<4 hex>: sortable by time, readable, unique."""
    label = name or plan.name or (plan.stage if plan.pipeline == "none" else plan.pipeline) + "-" + plan.method.method
    label = _NAME_CHARS.sub("-", label).strip("-.")[:40] or "run"
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{label}-{secrets.token_hex(2)}"


def _absolutize(plan: Plan) -> Plan:
    """Local paths in the plan made absolute, so the run reproduces from any directory."""
    overrides = {}
    for dotted, value in (
        ("model.name", plan.model.name),
        ("data.dataset", plan.data.dataset),
        ("forgetting.original_data", plan.forgetting.original_data),
        ("preference.sft_model", plan.preference.sft_model),
        ("preference.reward_model", plan.preference.reward_model),
    ):
        if not value or value in DEMO_DATASETS or value == "demo":
            continue
        path = Path(value).expanduser()
        if path.exists() and not path.is_absolute():
            overrides[dotted] = str(path.resolve())
    return plan.with_overrides(overrides) if overrides else plan


def find_run_dir(run: str | Path, runs_dir: str | Path | None = None) -> Path:
    """The directory of a run given its id (in `runs_dir`) or its path; TunewiseError when there is none."""
    text = str(run).strip()
    if not text:
        raise TunewiseError("no run given: pass a run id (see `tunewise runs`) or a run directory")
    candidate = Path(text).expanduser()
    if (candidate / PLAN_FILE).is_file() or (candidate / RUN_FILE).is_file():
        return candidate.resolve()
    base = Path(runs_dir).expanduser() if runs_dir else default_runs_dir()
    if "/" not in text and text not in (".", ".."):
        direct = base / text
        if (direct / PLAN_FILE).is_file() or (direct / RUN_FILE).is_file():
            return direct.resolve()
        if base.is_dir():
            matches = sorted(p for p in base.iterdir() if p.is_dir() and p.name.startswith(text) and _is_run_dir(p))
            if len(matches) == 1:
                return matches[0].resolve()
            if len(matches) > 1:
                raise TunewiseError(f"run {text!r} is ambiguous: {', '.join(m.name for m in matches[:5])}")
    raise TunewiseError(f"no run {text!r} in {base} (see `tunewise runs --runs-dir DIR`)")


def _is_run_dir(path: Path) -> bool:
    """A run directory has plan.yaml or run.json (one of them may be lost; the run is still listed)."""
    return (path / RUN_FILE).is_file() or (path / PLAN_FILE).is_file()


def last_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint (checkpoint-<step>/ that passes `checkpoint_problem`), or None."""
    return resumable_checkpoint(run_dir)[0]


def resumable_checkpoint(run_dir: str | Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest complete checkpoint, and (checkpoint, what is wrong) for each newer one passed over."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    found = []
    if root.is_dir():
        for child in root.iterdir():
            match = re.fullmatch(r"checkpoint-(\d+)", child.name)
            if match and child.is_dir():
                found.append((int(match.group(1)), child))
    skipped = []
    for _, child in sorted(found, reverse=True):
        problem = checkpoint_problem(child)
        if problem is None:
            return child, skipped
        skipped.append((child, problem))
    return None, skipped


def checkpoint_problem(checkpoint: str | Path) -> str | None:
    """What makes `checkpoint` unusable (a file missing, empty or cut short), or None when it looks complete.

    Cheap, so a resume can check before starting a trainer: it reads trainer_state.json, the header
    of each .safetensors file (8 bytes of header length, then the JSON header, whose tensor offsets
    must fit in the file) and the zip directory at the end of each torch file (.pt / .pth / .bin:
    torch saves a zip archive); no tensor is read.
    """
    checkpoint = Path(checkpoint)
    try:
        state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return "trainer_state.json is missing (the save did not finish)"
    except (OSError, ValueError):
        return "trainer_state.json is unreadable or cut short (the save did not finish)"
    if not isinstance(state, dict) or not _is_int(state.get("global_step", 0)):
        return "trainer_state.json has no whole-number global_step"
    for path in sorted(checkpoint.iterdir()):
        if not path.is_file():
            continue
        if path.suffix == ".safetensors":
            problem = _safetensors_problem(path)
        elif path.suffix in (".pt", ".pth", ".bin"):
            problem = _torch_file_problem(path)
        else:
            continue
        if problem:
            return f"{path.name} {problem}"
    return None


def _safetensors_problem(path: Path) -> str | None:
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                return f"is cut short ({size} bytes, less than its 8-byte header length)"
            header_bytes = int.from_bytes(head, "little")
            if 8 + header_bytes > size:
                return f"is cut short: its header alone says {8 + header_bytes} bytes, the file has {size}"
            header = json.loads(handle.read(header_bytes))
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    except (ValueError, UnicodeDecodeError):
        return "has a damaged header (not valid JSON)"
    if not isinstance(header, dict):
        return "has a damaged header (not a JSON object)"
    ends = [entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"
            and isinstance(entry, dict) and isinstance(entry.get("data_offsets"), list) and len(entry["data_offsets"]) == 2
            and _is_int(entry["data_offsets"][1])]
    needed = 8 + header_bytes + max(ends, default=0)
    if needed > size:
        return f"is cut short: its tensors need {needed} bytes, the file has {size}"
    return None


def _torch_file_problem(path: Path) -> str | None:
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            magic = handle.read(4)
        if size == 0:
            return "is empty (0 bytes)"
        if magic != b"PK\x03\x04":
            return None  # not torch's zip format (an older pickle file): nothing cheap to check
        if not zipfile.is_zipfile(path):
            return f"is cut short ({size} bytes; the zip directory torch writes at the end is missing)"
        with zipfile.ZipFile(path) as archive:
            ends = [info.header_offset + info.compress_size for info in archive.infolist()]
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    except zipfile.BadZipFile as exc:
        return f"is damaged ({exc})"
    if max(ends, default=0) > size:
        return f"is cut short: its entries need {max(ends)} bytes, the file has {size}"
    return None


# -- commands --------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def training_command(run_dir: Path, plan: Plan, resume_from: Path | None = None) -> list[str]:
    """The command that trains `run_dir`: the runner alone, or under `accelerate launch` for N processes.

    Several processes mean DDP (shard none) or, for zero2 / zero3, FSDP with a
    config file generated into the run directory (trainer.accelerate_config).
    Without a GPU the processes run DDP on the CPU (gloo).
    """
    runner_args = ["-m", "trainer.runner", str(run_dir)]
    if resume_from is not None:
        runner_args += ["--resume", str(resume_from)]
    processes = plan.hardware.num_gpus
    if processes <= 1:
        return [sys.executable, "-u", *runner_args]
    from trainer.accelerate_config import write_accelerate_config

    config_path = write_accelerate_config(plan, run_dir / ACCELERATE_CONFIG_FILE)
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(config_path),
        "--num_processes",
        str(processes),
        "--num_machines",
        "1",
        "--main_process_port",
        str(_free_port()),
        *runner_args,
    ]


def _child_env() -> dict:
    env = dict(os.environ)
    root = str(REPO_ROOT)
    current = env.get("PYTHONPATH", "")
    if root not in current.split(os.pathsep):
        env["PYTHONPATH"] = root + (os.pathsep + current if current else "")
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


#: Watcher processes this process started (kept so they are reaped, not left as zombies).
_WATCHERS: list[subprocess.Popen] = []


def _reap_watchers() -> None:
    for proc in list(_WATCHERS):
        if proc.poll() is not None:
            _WATCHERS.remove(proc)


def _start_attempt(run_dir: Path, plan: Plan, resume_from: Path | None) -> int:
    """Record a new attempt in run.json and start its watcher (which starts the trainer); return the
    attempt's events_offset (where its events begin in events.jsonl). The caller holds the run's lock."""
    info, _ = _read_run_record(run_dir)  # a damaged record is rewritten with what could be read
    make_reserve(run_dir)  # room for the attempt's last records should the disk fill up (best effort)
    command = training_command(run_dir, plan, resume_from)
    events_path = run_dir / EVENTS_FILE
    attempt = {
        "started_at": time.time(),
        "command": command,
        "cwd": os.getcwd(),
        "resume_from": str(resume_from) if resume_from else None,
        "events_offset": events_path.stat().st_size if events_path.exists() else 0,
        "watcher_pid": None,
        "pid": None,
        "pid_start": None,
        "ended_at": None,
        "exit_code": None,
        "signal": None,
    }
    info["attempts"].append(attempt)
    _write_json_atomic(run_dir / RUN_FILE, info)
    _reap_watchers()
    with open(run_dir / "watcher.log", "ab") as watcher_log:
        watcher = subprocess.Popen(
            [sys.executable, "-m", "trainer.supervisor", "watch", str(run_dir)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=watcher_log,
            start_new_session=True,
            env=_child_env(),
            cwd=os.getcwd(),
        )
    _WATCHERS.append(watcher)
    # Wait until the watcher has started the trainer, so status() says "running" right away.
    deadline = time.time() + LAUNCH_WAIT_S
    while time.time() < deadline:
        current = _current_attempt(_read_run_record(run_dir)[0])
        if current.get("pid") or current.get("ended_at") or watcher.poll() is not None:
            break
        time.sleep(0.05)
    return attempt["events_offset"]


def launch(plan: Plan, runs_dir: str | Path | None = None, name: str | None = None,
           copy_dataset: bool = False) -> str:
    """Create a run directory for `plan` and start training it in the background; return the run id.

    With `copy_dataset` the plan's dataset file is copied into the run directory (`data/`) and the
    plan points at the copy, so the run keeps its data when the original goes (the app does this for
    uploads, which demo mode cleans up)."""
    if not isinstance(plan, Plan):
        raise TypeError(f"launch() needs a Plan, got {type(plan).__name__}")
    plan = _absolutize(plan)
    base = Path(runs_dir).expanduser() if runs_dir else default_runs_dir()
    base.mkdir(parents=True, exist_ok=True)
    run_id = new_run_id(plan, name)
    run_dir = (base / run_id).resolve()
    run_dir.mkdir()
    with _run_lock(run_dir, "started"):
        if copy_dataset and plan.data.dataset and Path(plan.data.dataset).is_file():
            source = Path(plan.data.dataset)
            (run_dir / DATA_DIR).mkdir()
            copy = run_dir / DATA_DIR / source.name
            shutil.copyfile(source, copy)
            plan = plan.with_overrides({"data.dataset": str(copy)})
        plan.save(run_dir / PLAN_FILE)
        _write_json_atomic(
            run_dir / RUN_FILE,
            {
                "run_id": run_id,
                "name": name or plan.name,
                "created_at": time.time(),
                "summary": plan.summary(),
                "attempts": [],
            },
        )
        _start_attempt(run_dir, plan, resume_from=None)
    return run_id


@dataclass(frozen=True)
class Resumed:
    """What `resume_run` did."""

    run_id: str
    """The run (the same directory continues)."""
    checkpoint: str | None
    """The checkpoint the new attempt continues from (a pipeline: its interrupted step's; None: that step starts over)."""
    skipped: tuple[tuple[str, str], ...]
    """(checkpoint, what is wrong with it) for each newer checkpoint passed over as damaged."""
    message: str
    """One line for the user: where it continues from, and why not from a newer checkpoint."""
    events_offset: int
    """Where the new attempt's events begin in events.jsonl (to follow it without replaying earlier attempts)."""


def resume(run: str | Path, runs_dir: str | Path | None = None) -> str:
    """Continue a stopped or failed run from its newest complete checkpoint, in the same directory; return its id.

    A pipeline continues at its first unfinished step (from that step's newest checkpoint, if any).
    `resume_run` does the same and says which checkpoint, and which damaged ones it passed over."""
    return resume_run(run, runs_dir).run_id


def resume_run(run: str | Path, runs_dir: str | Path | None = None) -> Resumed:
    """`resume`, returning what it did (see Resumed). Holds the run's lock: a second resume of the same run
    at the same moment, from any process, is refused instead of starting a second trainer."""
    run_dir = find_run_dir(run, runs_dir)
    _refuse_resume(status(run_dir))  # a refusal changes nothing in the run directory, not even its lock file
    with _run_lock(run_dir, "resumed"):
        current = status(run_dir)
        _refuse_resume(current)  # again under the lock: another process may have resumed it meanwhile
        plan = Plan.load(run_dir / PLAN_FILE)
        _close_attempt(run_dir, current)
        if plan.pipeline != "none":
            return _resume_pipeline(run_dir, plan, current)
        checkpoint, skipped = resumable_checkpoint(run_dir)
        if checkpoint is None:
            raise TunewiseError(_no_checkpoint_message(run_dir, plan, current, skipped))
        (run_dir / STOP_FILE).unlink(missing_ok=True)
        step = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8")).get("global_step", 0)
        message = _resume_message(checkpoint, step, skipped)
        EventWriter(run_dir / EVENTS_FILE).emit(
            "resumed", step=step, checkpoint=str(checkpoint), previous_state=current.state, message=message,
            skipped_checkpoints=[{"checkpoint": str(path), "problem": problem} for path, problem in skipped])
        offset = _start_attempt(run_dir, plan, resume_from=checkpoint)
    return Resumed(current.run_id, str(checkpoint), tuple((str(p), why) for p, why in skipped), message, offset)


def _refuse_resume(current: "RunStatus") -> None:
    """TunewiseError when the run cannot be resumed: it is still going, or it has finished."""
    if current.state in ACTIVE_STATES:
        raise TunewiseError(f"run {current.run_id} is still {current.state}: stop it before resuming")
    if current.state == "finished":
        raise TunewiseError(f"run {current.run_id} has finished: there is nothing to resume (launch a new run)")


def _resume_message(checkpoint: Path, step: int, skipped: list[tuple[Path, str]]) -> str:
    damaged = "".join(f"{path.name} is damaged ({problem}); " for path, problem in skipped)
    return f"{damaged}resuming from {checkpoint.name} (step {step}){' instead' if skipped else ''}"


def _no_checkpoint_message(run_dir: Path, plan: Plan, current: "RunStatus", skipped: list[tuple[Path, str]]) -> str:
    """Why there is nothing to resume from, in the run's own terms (a forced stop saves nothing)."""
    terminal = _digest(run_dir / EVENTS_FILE).terminal or {}
    if skipped:
        why = "every checkpoint there is damaged: " + "; ".join(f"{path.name}: {problem}" for path, problem in skipped)
    elif current.state == "stopped" and terminal.get("forced") is True:
        why = (f"its stop was forced: the trainer did not stop in time and was killed at step {current.step}, "
               "before it could save a checkpoint")
    elif current.state == "stopped":
        why = "it stopped before training began" if not current.step else f"it stopped at step {current.step} without saving one"
    elif current.signal:
        why = f"it was killed (signal {current.signal}) at step {current.step}, before its first checkpoint"
    else:
        why = f"it failed at step {current.step}, before its first checkpoint"
    every = (f"training.save_steps is {plan.training.save_steps}" if plan.training.save_steps
             else "training.save_steps is not set, so it checkpoints only on a stop that ends in time")
    return (f"run {current.run_id} has no checkpoint in {run_dir / CHECKPOINTS_DIR} to resume from: {why} ({every}). "
            "Launch it again; set training.save_steps to checkpoint during training")


def _close_attempt(run_dir: Path, current: "RunStatus") -> None:
    """Give the attempt that ended a terminal event when nobody could write one (its watcher was killed, or
    the disk was full), so every attempt in events.jsonl ends with one before the next begins."""
    info, _ = _read_run_record(run_dir)
    attempt = _current_attempt(info)
    if not attempt:
        return
    events, _ = read_events(run_dir / EVENTS_FILE, attempt.get("events_offset") or 0)
    if any(event.get("event") in TERMINAL_EVENTS for event in events):
        return
    # (A stopped attempt always has its event: "stopped" is read from it. So this one failed.)
    EventWriter(run_dir / EVENTS_FILE).emit("failed", step=current.step, error=current.error, exit_code=current.exit_code,
                                            signal=current.signal, recorded_by="resume")


def _resume_pipeline(run_dir: Path, plan: Plan, current: "RunStatus") -> Resumed:
    """Run a pipeline again in its directory: finished steps are skipped, an interrupted one continues
    from its own newest checkpoint (trainer.pipeline does both)."""
    from trainer.pipeline import step_dirs

    done, interrupted, skipped = [], None, []
    for stage, step_dir in step_dirs(run_dir, plan.pipeline):
        result = _read_json(step_dir / "result.json")
        if result.get("status") == "finished":
            done.append(stage)
        elif interrupted is None:
            checkpoint, skipped = resumable_checkpoint(step_dir)
            interrupted = (stage, checkpoint)
    (run_dir / STOP_FILE).unlink(missing_ok=True)
    fields = {"previous_state": current.state, "pipeline": plan.pipeline, "finished_steps": done}
    checkpoint = interrupted[1] if interrupted else None
    damaged = "".join(f"{path.name} is damaged ({problem}); " for path, problem in skipped)
    message = (f"{damaged}continuing at step {interrupted[0]}" + (f" from {checkpoint.name}" if checkpoint else "")
               if interrupted else "every step has finished: writing the pipeline's result")
    if interrupted:
        fields.update(next_stage=interrupted[0], checkpoint=str(checkpoint) if checkpoint else None)
    fields.update(message=message, skipped_checkpoints=[{"checkpoint": str(p), "problem": why} for p, why in skipped])
    EventWriter(run_dir / EVENTS_FILE).emit("resumed", step=current.step or 0, **fields)
    offset = _start_attempt(run_dir, plan, resume_from=None)
    return Resumed(current.run_id, str(checkpoint) if checkpoint else None,
                   tuple((str(p), why) for p, why in skipped), message, offset)


def _rank_processes(run_dir: Path) -> list[tuple[int, int | None]]:
    """(pid, start ticks) of each training rank of the current attempt that is still alive."""
    found = []
    procs = run_dir / PROCS_DIR
    if not procs.is_dir():
        return found
    for path in sorted(procs.glob("rank*.pid")):
        record = _read_json(path)
        pid = record.get("pid")
        if isinstance(pid, int) and pid_alive(pid, record.get("start_ticks")):
            found.append((pid, record.get("start_ticks")))
    return found


def _is_recorded_trainer(pid: object, start_ticks: object) -> bool:
    """Whether `pid` is still the trainer the attempt recorded: same start time, and it leads its own
    session and process group (every trainer is started in a new session), so a stale or forged pid
    (a reused one, pid 1, an unrelated process) is never signalled."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 1:
        return False
    if start_ticks is None and Path("/proc").is_dir():
        return False
    try:
        leads = os.getsid(pid) == pid and os.getpgid(pid) == pid
    except OSError:
        return False
    return leads and pid_alive(pid, start_ticks)


def _signal_run(run_dir: Path, attempt: dict, sig: int, whole_group: bool) -> None:
    """Send `sig` to the run's training ranks (and, with whole_group, the trainer's process group)."""
    pid = attempt.get("pid")
    targets = {p for p, _ in _rank_processes(run_dir)}
    if _is_recorded_trainer(pid, attempt.get("pid_start")):
        if whole_group:
            try:
                os.killpg(pid, sig)  # the trainer leads its own process group
            except (ProcessLookupError, PermissionError):
                pass
        if not targets:  # no rank has registered yet (still starting): signal the trainer itself
            targets.add(pid)
    for target in targets:
        try:
            os.kill(target, sig)
        except (ProcessLookupError, PermissionError):
            pass


def request_stop(run: str | Path, runs_dir: str | Path | None = None, reason: str = "stopped by the user") -> RunStatus:
    """Ask a run to stop cooperatively and return at once (the run saves a checkpoint and ends `stopped`).

    Writes the STOP file (with `reason`, which the `stopped` event repeats) and
    sends SIGTERM to the training ranks only: the accelerate launcher would tear
    the ranks down on SIGTERM instead of letting them save.
    """
    run_dir = find_run_dir(run, runs_dir)
    # A launch or resume in progress holds the lock until the trainer's pid is recorded: then stop that one.
    with _run_lock(run_dir, "stopped", wait_s=LOCK_WAIT_S):
        current = status(run_dir)
        if current.state not in ACTIVE_STATES:
            return current
        (run_dir / STOP_FILE).write_text(reason + "\n", encoding="utf-8")
        _signal_run(run_dir, _current_attempt(_read_run_record(run_dir)[0]), signal.SIGTERM, whole_group=False)
    return current


def stop(run: str | Path, timeout: float = 30, runs_dir: str | Path | None = None, reason: str = "stopped by the user") -> RunStatus:
    """Ask a run to stop (it saves a checkpoint and exits); kill it after `timeout` seconds; return its status."""
    run_dir = find_run_dir(run, runs_dir)
    current = request_stop(run_dir, reason=reason)
    if current.state not in ACTIVE_STATES:
        return current
    deadline = time.time() + timeout
    while time.time() < deadline:
        current = status(run_dir)
        if current.state not in ACTIVE_STATES:
            return _wait_for_record(run_dir)
        time.sleep(0.2)
    attempt = _current_attempt(_read_run_record(run_dir)[0])
    _signal_run(run_dir, attempt, signal.SIGKILL, whole_group=True)
    return _wait_for_record(run_dir)


def _wait_for_record(run_dir: Path, timeout: float = 30.0) -> RunStatus:
    """The status once the watcher has written the exit (or `timeout` passed).

    The terminal event comes first; the processes then still have to exit (torchrun
    tears its workers down, which takes seconds on a busy machine).
    """
    deadline = time.time() + timeout
    current = status(run_dir)
    while time.time() < deadline:
        attempt = _current_attempt(_read_run_record(run_dir)[0])
        if attempt.get("ended_at") or not pid_alive(attempt.get("watcher_pid")):
            return status(run_dir)
        time.sleep(0.1)
        current = status(run_dir)
    return current


def wait(run: str | Path, timeout: float | None = None, runs_dir: str | Path | None = None, poll_s: float = 0.25) -> RunStatus:
    """Block until the run is no longer queued or running (or `timeout` seconds pass); return its status."""
    run_dir = find_run_dir(run, runs_dir)
    deadline = None if timeout is None else time.time() + timeout
    while True:
        current = status(run_dir)
        if current.state not in ACTIVE_STATES:
            return _wait_for_record(run_dir)
        if deadline is not None and time.time() > deadline:
            return current
        time.sleep(poll_s)


# -- status ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunStatus:
    """What a run is doing or did, derived from run.json, its events and process liveness."""

    run_id: str
    """The run's directory name."""
    run_dir: str
    """Absolute path of the run directory."""
    state: str
    """queued (starting), running, finished, failed or stopped."""
    name: str | None = None
    """The label given at launch, if any."""
    summary: str = ""
    """One line: stage/pipeline, method, model, dataset."""
    stage: str | None = None
    """sft, rm, dpo or ppo."""
    pipeline: str | None = None
    """none, rlhf, dpo or compare."""
    method: str | None = None
    """full, lora or qlora."""
    exit_code: int | None = None
    """The trainer's exit code, once it exited normally."""
    signal: int | None = None
    """The signal that killed the trainer (9 for SIGKILL), if one did."""
    reason: str | None = None
    """Why it stopped (stopped runs)."""
    error: str | None = None
    """The error message (failed runs)."""
    error_lines: tuple[str, ...] = ()
    """Last traceback lines, or the tail of stdout.log when the trainer died without reporting."""
    user_error: bool = False
    """True when it failed on a problem with the plan or its inputs (the message says what to fix)."""
    step: int = 0
    """Latest optimizer step reported."""
    max_steps: int | None = None
    """Total steps of the current stage, once training began."""
    last_loss: float | None = None
    """Latest training loss."""
    last_eval_loss: float | None = None
    """Latest evaluation loss."""
    metrics: dict = field(default_factory=dict)
    """The latest `log` event's numeric metrics (loss, learning_rate, grad_norm, ...)."""
    created_at: float | None = None
    """When the run was launched (Unix seconds)."""
    started_at: float | None = None
    """When the current attempt started."""
    ended_at: float | None = None
    """When the current attempt ended (None while it runs)."""
    pid: int | None = None
    """The trainer's process id (current attempt)."""
    attempts: int = 0
    """Launch + resumes so far."""
    checkpoint: str | None = None
    """Newest checkpoint reported."""
    output_dir: str | None = None
    """Where the result was saved (finished or stopped runs)."""
    stalled_s: float | None = None
    """Seconds since a running trainer's last event, when that is far longer than its usual gap between
    logged steps (see STALL_MIN_S, STALL_FACTOR): it may be stuck, or stopped (SIGSTOP). None otherwise."""
    damage: str | None = None
    """What is wrong with a damaged run.json or event (naming the file); the rest is read as well as it can be."""

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES

    @property
    def hint(self) -> str | None:
        """What to do about a run that looks stalled (None when it does not)."""
        if self.stalled_s is None:
            return None
        return (f"no event for {self.stalled_s:.0f} s, far longer than its steps take: the trainer (pid {self.pid}) "
                "may be stuck or paused (a long evaluation or checkpoint save looks the same); "
                f"`py-spy dump --pid {self.pid}` shows where it is, `tunewise stop {self.run_id}` ends it")

    @property
    def progress(self) -> float | None:
        """step / max_steps in [0, 1], when known."""
        if not self.max_steps:
            return None
        return min(1.0, self.step / self.max_steps)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["error_lines"] = list(self.error_lines)
        data["progress"] = self.progress
        return data

    def describe(self) -> str:
        """One line for `tunewise runs` / `status`."""
        what = self.state
        if self.state == "failed" and self.signal:
            what = f"failed (signal {self.signal})"
        elif self.state == "failed" and self.exit_code not in (None, 0):
            what = f"failed (exit {self.exit_code})"
        steps = f"step {self.step}" + (f"/{self.max_steps}" if self.max_steps else "")
        loss = f" loss {self.last_loss:.4f}" if self.last_loss is not None else ""
        notes = f"  [no event for {self.stalled_s:.0f} s: stalled?]" if self.stalled_s is not None else ""
        notes += f"  [damaged: {self.damage}]" if self.damage else ""
        return f"{self.run_id}  {what:<18} {steps}{loss}  {self.summary}{notes}"


@dataclass
class _Digest:
    """What the events say so far (fed incrementally, cached per file)."""

    offset: int = 0
    step: int = 0
    max_steps: int | None = None
    last_log: dict = field(default_factory=dict)
    last_loss: float | None = None
    last_eval_loss: float | None = None
    checkpoint: str | None = None
    terminal: dict | None = None
    output_dir: str | None = None
    started: dict | None = None
    last_time: float | None = None
    """When the newest event was written."""
    begin_time: float | None = None
    """When the latest `train_begin` was written."""
    log_times: list[float] = field(default_factory=list)
    """When the `log` events since the latest `train_begin` were written (the newest 21)."""
    problems: list[str] = field(default_factory=list)
    """Fields of the wrong type met so far (ignored), for RunStatus.damage."""

    def _wrong(self, event: dict, key: str, wanted: str) -> None:
        if len(self.problems) < 3:
            self.problems.append(f"{EVENTS_FILE}: a {str(event.get('event'))[:20]} event has {key} "
                                 f"{event.get(key)!r:.30}, not {wanted}")

    def feed(self, events: list[dict]) -> None:
        for event in events:
            kind = event.get("event")
            if kind == "corrupt":
                continue
            when = event.get("time")
            if _is_number(when):
                self.last_time = float(when)
            elif when is not None:
                self._wrong(event, "time", "a number")
                when = None
            if _is_int(event.get("step")):
                self.step = event["step"]
            elif event.get("step") is not None:
                self._wrong(event, "step", "a whole number")
            if kind == "started":
                self.started = event
            elif kind == "train_begin":
                if _is_int(event.get("max_steps")) and event["max_steps"] > 0:
                    self.max_steps = event["max_steps"]
                elif event.get("max_steps") is not None:
                    self._wrong(event, "max_steps", "a whole number")
                self.begin_time, self.log_times = when, []
            elif kind == "log":
                self.last_log = {k: v for k, v in event.items() if k not in ("event", "time", "step") and _is_number(v)}
                if _is_number(event.get("loss")):
                    self.last_loss = float(event["loss"])
                if when is not None:
                    self.log_times = (self.log_times + [when])[-21:]
            elif kind == "eval" and _is_number(event.get("eval_loss")):
                self.last_eval_loss = float(event["eval_loss"])
            elif kind == "checkpoint" and isinstance(event.get("path"), str):
                self.checkpoint = event["path"]
            if kind in TERMINAL_EVENTS:
                self.terminal = event
                if isinstance(event.get("output_dir"), str) and event["output_dir"]:
                    self.output_dir = event["output_dir"]


#: path -> (file identity, digest): status() reads only the bytes added since the last call.
_DIGESTS: dict[str, tuple[tuple, _Digest]] = {}


def _digest(events_path: Path) -> _Digest:
    key = str(events_path)
    try:
        stat = events_path.stat()
    except FileNotFoundError:
        _DIGESTS.pop(key, None)
        return _Digest()
    identity = (stat.st_ino, stat.st_dev)
    cached = _DIGESTS.get(key)
    digest = cached[1] if cached and cached[0] == identity and cached[1].offset <= stat.st_size else _Digest()
    if digest.offset < stat.st_size:
        events, digest.offset = read_events(events_path, digest.offset)
        digest.feed(events)
    _DIGESTS[key] = (identity, digest)
    return digest


#: plan.yaml path -> (mtime, fields): a plan is parsed once, not at every poll.
_PLAN_FIELDS: dict[str, tuple[float, dict]] = {}


def _plan_fields(path: Path) -> dict:
    """summary / stage / pipeline / method of a run's plan ({} when it is unreadable)."""
    try:
        mtime = path.stat().st_mtime
    except OSError:
        return {}
    cached = _PLAN_FIELDS.get(str(path))
    if cached and cached[0] == mtime:
        return cached[1]
    try:
        plan = Plan.load(path)
    except TunewiseError:
        return {}
    fields = {"summary": plan.summary(), "stage": plan.stage, "pipeline": plan.pipeline, "method": plan.method.method}
    _PLAN_FIELDS[str(path)] = (mtime, fields)
    return fields


def _current_attempt(info: dict) -> dict:
    attempts = info.get("attempts")
    return attempts[-1] if isinstance(attempts, list) and attempts and isinstance(attempts[-1], dict) else {}


def _text_lines(value) -> tuple[str, ...]:
    return tuple(str(line) for line in value) if isinstance(value, list) else ()


def _disk_free(run_dir: Path) -> int | None:
    try:
        return shutil.disk_usage(run_dir).free
    except OSError:
        return None


def _disk_full_description(run_dir: Path, free: int | None) -> str:
    room = f"{free} bytes free" if free is not None else "no room"
    return (f"the disk is full ({room} on the disk holding {run_dir}): the trainer could not write the run, and its "
            f"last records may be missing. Free some space, then `tunewise resume {run_dir.name}` continues from "
            "the newest complete checkpoint")


def _stalled_s(digest: _Digest, started_at: float | None) -> float | None:
    """Seconds without an event, when far longer than this attempt's usual gap between logs (else None)."""
    if digest.last_time is None or digest.begin_time is None or started_at is None or digest.begin_time < started_at - 1e-3:
        return None  # training has not begun in this attempt: loading a model has no step time to compare with
    gaps = [later - earlier for earlier, later in zip(digest.log_times, digest.log_times[1:])]
    threshold = max(STALL_MIN_S, STALL_FACTOR * statistics.median(gaps)) if gaps else STALL_MIN_S * STALL_FACTOR
    quiet = time.time() - digest.last_time
    return round(quiet, 1) if quiet > threshold else None


def status(run: str | Path, runs_dir: str | Path | None = None) -> RunStatus:
    """The run's state and key numbers (see RunStatus)."""
    _reap_watchers()
    run_dir = find_run_dir(run, runs_dir)
    info, problems = _read_run_record(run_dir)
    attempt = _current_attempt(info)
    digest = _digest(run_dir / EVENTS_FILE)
    problems += digest.problems
    plan_fields = _plan_fields(run_dir / PLAN_FILE) or {"summary": info.get("summary", "")}

    started_at = attempt.get("started_at")
    terminal = digest.terminal
    if terminal is not None and started_at is not None:
        written = terminal.get("time") if _is_number(terminal.get("time")) else 0
        if written < started_at - 1e-3:
            terminal = None  # it belongs to an earlier attempt (before a resume)
    if terminal is None and attempt and not started_at:
        terminal = digest.terminal

    error = None
    error_lines: tuple[str, ...] = ()
    reason = None
    user_error = False
    if terminal is not None:
        state = terminal["event"]
        if state == "failed":
            error = None if terminal.get("error") is None else str(terminal["error"])
            user_error = bool(terminal.get("user_error"))
            error_lines = _text_lines(terminal.get("traceback") or terminal.get("lines"))
        elif state == "stopped":
            reason = terminal.get("reason") if isinstance(terminal.get("reason"), str) else None
    elif not attempt:
        if _rank_processes(run_dir):
            state = "running"  # its record is gone, but its trainer is not
        elif problems and not _recently_made(run_dir):
            state = "failed"
            error = f"its record is damaged ({problems[0]}), so how it ended is unknown"
        else:
            state = "queued"
    elif attempt.get("ended_at"):
        state = "failed"
        if attempt.get("exit_code") == EXIT_DISK_FULL:
            error = _disk_full_description(run_dir, _disk_free(run_dir))
        else:
            error = _exit_description(attempt.get("exit_code"), attempt.get("signal"))
        error_lines = tuple(_tail_lines(run_dir / STDOUT_FILE, ERROR_TAIL_LINES))
    elif attempt.get("pid"):
        if pid_alive(attempt["pid"], attempt.get("pid_start")):
            state = "running"
        elif (free := _disk_free(run_dir)) is not None and free < DISK_FULL_BYTES:
            # The trainer ended and nothing (its event, the watcher's record) could say how: a full disk.
            state = "failed"
            error = _disk_full_description(run_dir, free)
            error_lines = tuple(_tail_lines(run_dir / STDOUT_FILE, ERROR_TAIL_LINES))
        elif pid_alive(attempt.get("watcher_pid")):
            state = "running"  # the trainer just exited; the watcher is recording it
        else:
            state = "failed"
            error = "the training process ended without reporting (its watcher was gone too, so the exit code is unknown)"
            error_lines = tuple(_tail_lines(run_dir / STDOUT_FILE, ERROR_TAIL_LINES))
    elif pid_alive(attempt.get("watcher_pid")) or time.time() - (started_at or 0) < LAUNCH_WAIT_S:
        state = "queued"
    else:
        state = "failed"
        error = "the training process never started (see watcher.log in the run directory)"
        error_lines = tuple(_tail_lines(run_dir / "watcher.log", ERROR_TAIL_LINES))

    terminal_signal = (terminal or {}).get("signal")
    created_at = info.get("created_at")
    if created_at is None:
        try:
            created_at = (run_dir / PLAN_FILE).stat().st_mtime  # written at launch, like run.json
        except OSError:
            pass
    return RunStatus(
        run_id=info.get("run_id") or run_dir.name,
        run_dir=str(run_dir),
        state=state,
        name=info.get("name"),
        exit_code=attempt.get("exit_code"),
        signal=attempt.get("signal") or (terminal_signal if _is_int(terminal_signal) else None),
        reason=reason,
        error=error,
        error_lines=error_lines,
        user_error=user_error,
        step=digest.step,
        max_steps=digest.max_steps,
        last_loss=digest.last_loss,
        last_eval_loss=digest.last_eval_loss,
        metrics=dict(digest.last_log),
        created_at=created_at,
        started_at=started_at,
        ended_at=attempt.get("ended_at"),
        pid=attempt.get("pid"),
        attempts=len(info.get("attempts") or []),
        checkpoint=digest.checkpoint,
        output_dir=digest.output_dir,
        stalled_s=_stalled_s(digest, started_at) if state == "running" else None,
        damage="; ".join(problems[:3]) or None,
        **plan_fields,
    )


def _recently_made(run_dir: Path) -> bool:
    """Whether the run was launched moments ago (its plan.yaml is written just before run.json)."""
    try:
        return time.time() - (run_dir / PLAN_FILE).stat().st_mtime < LAUNCH_WAIT_S
    except OSError:
        return False


def list_runs(runs_dir: str | Path | None = None) -> list[RunStatus]:
    """Every run in `runs_dir` (default runs folder when None), newest first.

    A run whose files are damaged is listed with a note (RunStatus.damage); one whose status cannot
    be read at all is listed as failed with the error, so it never hides the others."""
    base = Path(runs_dir).expanduser() if runs_dir else default_runs_dir()
    if not base.is_dir():
        return []
    found = []
    for child in base.iterdir():
        if child.is_dir() and _is_run_dir(child):
            try:
                found.append(status(child))
            except TunewiseError:
                continue
            except Exception as exc:  # a damage _read_run_record and _Digest do not foresee: show it, list the rest
                found.append(RunStatus(run_id=child.name, run_dir=str(child.resolve()), state="failed",
                                       error=f"its status cannot be read ({type(exc).__name__}: {exc})",
                                       damage=f"reading it failed: {type(exc).__name__}: {exc}"))
    found.sort(key=lambda s: (s.created_at or 0, s.run_id), reverse=True)
    return found


def read_run_events(run: str | Path, offset: int = 0, runs_dir: str | Path | None = None) -> tuple[list[dict], int]:
    """Events of a run from byte `offset` (complete lines only) and the offset to continue from."""
    return read_events(find_run_dir(run, runs_dir) / EVENTS_FILE, offset)


def _exit_description(exit_code: int | None, sig: int | None) -> str:
    if sig:
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        hint = " (out of memory, or killed by hand)" if sig == signal.SIGKILL else ""
        return f"the training process was killed by signal {sig} ({name}){hint}"
    if exit_code is None:
        return "the training process ended without reporting, and its exit status is unknown (see stdout.log)"
    return f"the training process exited with code {exit_code} without reporting an error (see stdout.log)"


# -- the watcher process ---------------------------------------------------------------------------


def _watch(run_dir: Path) -> int:
    """Start the current attempt's trainer, wait for it, record how it ended (runs in its own process)."""
    for sig in (signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    info = _read_json(run_dir / RUN_FILE)
    attempt = _current_attempt(info)
    procs = run_dir / PROCS_DIR
    if procs.is_dir():
        for stale in procs.glob("rank*.pid"):
            stale.unlink(missing_ok=True)
    attempt["watcher_pid"] = os.getpid()
    command = attempt["command"]
    warm_run = None
    if command[1:4] == ["-u", "-m", "trainer.runner"]:  # one process: a warm worker can fork it
        from trainer import warm

        warm_run = warm.request(run_dir, attempt.get("resume_from"), attempt.get("cwd"), _child_env(),
                                run_dir / STDOUT_FILE)
    if warm_run is not None:
        # warm.request checked the pid (the worker's child, leading its own session) and read its start time.
        attempt.update(pid=warm_run.pid, pid_start=warm_run.start_ticks, warm=True)
        _write_json_atomic(run_dir / RUN_FILE, info)
        with open(run_dir / STDOUT_FILE, "ab") as log:
            log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} forked by the warm worker as pid {warm_run.pid}: "
                      f"{' '.join(command)}\n".encode())
        returncode = warm_run.wait()
        if returncode is None:  # the worker went away first: watch the pid itself
            while pid_alive(warm_run.pid, attempt["pid_start"]):
                time.sleep(0.5)
        return _record_exit(run_dir, info, attempt, returncode)
    with open(run_dir / STDOUT_FILE, "ab") as log:
        log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(command)}\n".encode())
        log.flush()
        try:
            proc = subprocess.Popen(
                attempt["command"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=_child_env(),
                cwd=attempt.get("cwd") or None,
            )
        except OSError as exc:
            attempt.update(ended_at=time.time(), exit_code=127)
            _write_json_atomic(run_dir / RUN_FILE, info)
            EventWriter(run_dir / EVENTS_FILE).emit("failed", error=f"could not start the trainer: {exc}", user_error=False)
            return 1
        attempt.update(pid=proc.pid, pid_start=process_start_ticks(proc.pid))
        _write_json_atomic(run_dir / RUN_FILE, info)
        returncode = proc.wait()
    return _record_exit(run_dir, info, attempt, returncode)


def _record_exit(run_dir: Path, info: dict, attempt: dict, returncode: int | None) -> int:
    """Record how the attempt ended; add a terminal event when the trainer could not write its own."""
    # Ranks that outlived their launcher (e.g. it was killed) must not keep training unseen.
    for pid, _ in _rank_processes(run_dir):
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    exit_code = returncode if returncode is not None and returncode >= 0 else None
    killed_by = -returncode if returncode is not None and returncode < 0 else None
    # accelerate / torchrun report a rank killed by a signal as exit code 1 with a message; the
    # shell-style 128 + N also means "killed by signal N".
    if killed_by is None and exit_code is not None and exit_code > 128 and exit_code - 128 in (int(s) for s in signal.Signals):
        killed_by = exit_code - 128
    attempt.update(ended_at=time.time(), exit_code=exit_code, signal=killed_by)
    # On a full disk even the reserve may be used up: keep trying while this attempt is still the run's
    # current one (no resume since), so the end is recorded once there is room again.
    deadline = time.time() + RECORD_RETRY_S
    while True:
        try:
            with _run_lock(run_dir, "recording how it ended", wait_s=RECORD_RETRY_EVERY_S):
                if len(_read_run_record(run_dir)[0]["attempts"]) > len(info.get("attempts") or []):
                    return 1  # resumed meanwhile: the newer attempt has the run now
                _write_json_atomic(run_dir / RUN_FILE, info)
                _add_terminal_event(run_dir, attempt, exit_code, killed_by)
            release_reserve(run_dir)  # the attempt's records are written; a resume makes a new reserve
            return 0
        except (OSError, TunewiseError) as exc:
            if isinstance(exc, OSError) and not is_disk_full(exc):
                raise  # e.g. the run directory was deleted: nothing to wait for
            try:
                print(f"{time.strftime('%H:%M:%S')} could not record the exit yet ({exc}); retrying", file=sys.stderr)
            except OSError:
                pass
        if time.time() > deadline:
            return 1
        time.sleep(RECORD_RETRY_EVERY_S)


def _add_terminal_event(run_dir: Path, attempt: dict, exit_code: int | None, killed_by: int | None) -> None:
    """Write the attempt's terminal event when the trainer could not write its own."""
    events, _ = read_events(run_dir / EVENTS_FILE, attempt.get("events_offset") or 0)
    if any(event.get("event") in TERMINAL_EVENTS for event in events):
        return
    writer = EventWriter(run_dir / EVENTS_FILE)
    last_step = max((e["step"] for e in events if _is_int(e.get("step"))), default=0)
    lines = _tail_lines(run_dir / STDOUT_FILE, ERROR_TAIL_LINES)
    free = _disk_free(run_dir)
    if (run_dir / STOP_FILE).exists() and killed_by is not None:
        writer.emit("stopped", step=last_step, reason=f"did not stop in time after the request; killed (signal {killed_by})",
                    signal=killed_by, forced=True)
    elif exit_code == EXIT_DISK_FULL or (exit_code and free is not None and free < DISK_FULL_BYTES):
        writer.emit("failed", step=last_step, error=_disk_full_description(run_dir, free), exit_code=exit_code,
                    user_error=True, disk_full=True, lines=lines)
    elif exit_code == 0 and killed_by is None:
        writer.emit("failed", step=last_step, error="the trainer exited without reporting a result (see stdout.log)",
                    exit_code=exit_code, lines=lines)
    else:
        writer.emit("failed", step=last_step, error=_exit_description(exit_code, killed_by), exit_code=exit_code,
                    signal=killed_by, lines=lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.supervisor")
    sub = parser.add_subparsers(dest="command", required=True)
    watch = sub.add_parser("watch", help="(internal) start and watch the current attempt of a run")
    watch.add_argument("run_dir")
    args = parser.parse_args(argv)
    return _watch(Path(args.run_dir))


if __name__ == "__main__":
    sys.exit(main())
