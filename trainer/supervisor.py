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
  checkpoint in checkpoints/; events are appended after a `resumed` event.

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
pid (checked with its start time, against pid reuse) is alive.

run.json: {"run_id", "name", "created_at", "summary", "attempts": [{"started_at",
"command", "cwd", "resume_from", "watcher_pid", "pid", "pid_start", "ended_at",
"exit_code", "signal"}]}; one writer at a time (the launcher before the
watcher starts, then the watcher), written atomically.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from advisor.errors import TunewiseError
from advisor.plan import DEMO_DATASETS, REPO_ROOT, Plan
from trainer.context import STOP_FILE
from trainer.events import EVENTS_FILE, TERMINAL_EVENTS, EventWriter, read_events

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

#: How long launch() waits for the watcher to report the trainer's pid.
LAUNCH_WAIT_S = 15.0


def default_runs_dir() -> Path:
    """$TUNEWISE_RUNS_DIR, else ./runs (relative to the current directory)."""
    configured = os.environ.get(RUNS_DIR_ENV)
    return Path(configured).expanduser() if configured else Path.cwd() / "runs"


# -- small file helpers -----------------------------------------------------------------------------


def _write_json_atomic(path: Path, data: dict) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(data, indent=1), encoding="utf-8")
    os.replace(temporary, path)


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


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
            matches = sorted(p for p in base.iterdir() if p.is_dir() and p.name.startswith(text) and (p / RUN_FILE).is_file())
            if len(matches) == 1:
                return matches[0].resolve()
            if len(matches) > 1:
                raise TunewiseError(f"run {text!r} is ambiguous: {', '.join(m.name for m in matches[:5])}")
    raise TunewiseError(f"no run {text!r} in {base} (see `tunewise runs --runs-dir DIR`)")


def last_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint (checkpoint-<step>/ with trainer_state.json), or None."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    best: tuple[int, Path] | None = None
    if not root.is_dir():
        return None
    for child in root.iterdir():
        match = re.fullmatch(r"checkpoint-(\d+)", child.name)
        if match and (child / "trainer_state.json").is_file():
            try:
                json.loads((child / "trainer_state.json").read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue  # half-written (the disk filled up or the process died mid-save)
            step = int(match.group(1))
            if best is None or step > best[0]:
                best = (step, child)
    return best[1] if best else None


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


def _start_attempt(run_dir: Path, plan: Plan, resume_from: Path | None) -> None:
    """Record a new attempt in run.json and start its watcher (which starts the trainer)."""
    info = _read_json(run_dir / RUN_FILE)
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
    info.setdefault("attempts", []).append(attempt)
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
        current = _current_attempt(_read_json(run_dir / RUN_FILE))
        if current.get("pid") or current.get("ended_at") or watcher.poll() is not None:
            break
        time.sleep(0.05)


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


def resume(run: str | Path, runs_dir: str | Path | None = None) -> str:
    """Continue a stopped or failed run from its newest checkpoint, in the same directory; return its id.

    A pipeline continues at its first unfinished step (from that step's newest checkpoint, if any)."""
    run_dir = find_run_dir(run, runs_dir)
    current = status(run_dir)
    if current.state in ACTIVE_STATES:
        raise TunewiseError(f"run {current.run_id} is still {current.state}: stop it before resuming")
    if current.state == "finished":
        raise TunewiseError(f"run {current.run_id} has finished: there is nothing to resume (launch a new run)")
    plan = Plan.load(run_dir / PLAN_FILE)
    if plan.pipeline != "none":
        return _resume_pipeline(run_dir, plan, current)
    checkpoint = last_checkpoint(run_dir)
    if checkpoint is None:
        raise TunewiseError(
            f"run {current.run_id} has no checkpoint in {run_dir / CHECKPOINTS_DIR} to resume from "
            "(set training.save_steps to checkpoint during training; a stop always saves one)"
        )
    (run_dir / STOP_FILE).unlink(missing_ok=True)
    state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
    step = int(state.get("global_step", 0))
    writer = EventWriter(run_dir / EVENTS_FILE)
    writer.emit("resumed", step=step, checkpoint=str(checkpoint), previous_state=current.state)
    _start_attempt(run_dir, plan, resume_from=checkpoint)
    return current.run_id


def _resume_pipeline(run_dir: Path, plan: Plan, current: "RunStatus") -> str:
    """Run a pipeline again in its directory: finished steps are skipped, an interrupted one continues
    from its own newest checkpoint (trainer.pipeline does both)."""
    from trainer.pipeline import step_dirs

    done, interrupted = [], None
    for stage, step_dir in step_dirs(run_dir, plan.pipeline):
        result = _read_json(step_dir / "result.json")
        if result.get("status") == "finished":
            done.append(stage)
        elif interrupted is None:
            interrupted = (stage, last_checkpoint(step_dir))
    (run_dir / STOP_FILE).unlink(missing_ok=True)
    fields = {"previous_state": current.state, "pipeline": plan.pipeline, "finished_steps": done}
    if interrupted:
        fields.update(next_stage=interrupted[0], checkpoint=str(interrupted[1]) if interrupted[1] else None)
    EventWriter(run_dir / EVENTS_FILE).emit("resumed", step=current.step or 0, **fields)
    _start_attempt(run_dir, plan, resume_from=None)
    return current.run_id


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
    current = status(run_dir)
    if current.state not in ACTIVE_STATES:
        return current
    (run_dir / STOP_FILE).write_text(reason + "\n", encoding="utf-8")
    _signal_run(run_dir, _current_attempt(_read_json(run_dir / RUN_FILE)), signal.SIGTERM, whole_group=False)
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
    attempt = _current_attempt(_read_json(run_dir / RUN_FILE))
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
        attempt = _current_attempt(_read_json(run_dir / RUN_FILE))
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

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES

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
        return f"{self.run_id}  {what:<18} {steps}{loss}  {self.summary}"


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

    def feed(self, events: list[dict]) -> None:
        for event in events:
            kind = event.get("event")
            if isinstance(event.get("step"), int):
                self.step = event["step"]
            if kind == "started":
                self.started = event
            elif kind == "train_begin" and event.get("max_steps"):
                self.max_steps = event["max_steps"]
            elif kind == "log":
                self.last_log = {k: v for k, v in event.items() if k not in ("event", "time", "step") and isinstance(v, (int, float))}
                if isinstance(event.get("loss"), (int, float)):
                    self.last_loss = float(event["loss"])
            elif kind == "eval" and isinstance(event.get("eval_loss"), (int, float)):
                self.last_eval_loss = float(event["eval_loss"])
            elif kind == "checkpoint":
                self.checkpoint = event.get("path")
            if kind in TERMINAL_EVENTS:
                self.terminal = event
                if event.get("output_dir"):
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
    attempts = info.get("attempts") or []
    return attempts[-1] if attempts else {}


def status(run: str | Path, runs_dir: str | Path | None = None) -> RunStatus:
    """The run's state and key numbers (see RunStatus)."""
    _reap_watchers()
    run_dir = find_run_dir(run, runs_dir)
    info = _read_json(run_dir / RUN_FILE)
    attempt = _current_attempt(info)
    digest = _digest(run_dir / EVENTS_FILE)
    plan_fields = _plan_fields(run_dir / PLAN_FILE) or {"summary": info.get("summary", "")}

    started_at = attempt.get("started_at")
    terminal = digest.terminal
    if terminal is not None and started_at is not None and terminal.get("time", 0) < started_at - 1e-3:
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
            error = terminal.get("error")
            user_error = bool(terminal.get("user_error"))
            error_lines = tuple(terminal.get("traceback") or terminal.get("lines") or ())
        elif state == "stopped":
            reason = terminal.get("reason")
    elif not attempt:
        state = "queued"
    elif attempt.get("ended_at"):
        state = "failed"
        error = _exit_description(attempt.get("exit_code"), attempt.get("signal"))
        error_lines = tuple(_tail_lines(run_dir / STDOUT_FILE, ERROR_TAIL_LINES))
    elif attempt.get("pid"):
        if pid_alive(attempt["pid"], attempt.get("pid_start")):
            state = "running"
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

    return RunStatus(
        run_id=info.get("run_id") or run_dir.name,
        run_dir=str(run_dir),
        state=state,
        name=info.get("name"),
        exit_code=attempt.get("exit_code"),
        signal=attempt.get("signal") or (terminal or {}).get("signal"),
        reason=reason,
        error=error,
        error_lines=error_lines,
        user_error=user_error,
        step=digest.step,
        max_steps=digest.max_steps,
        last_loss=digest.last_loss,
        last_eval_loss=digest.last_eval_loss,
        metrics=dict(digest.last_log),
        created_at=info.get("created_at"),
        started_at=started_at,
        ended_at=attempt.get("ended_at"),
        pid=attempt.get("pid"),
        attempts=len(info.get("attempts") or []),
        checkpoint=digest.checkpoint,
        output_dir=digest.output_dir,
        **plan_fields,
    )


def list_runs(runs_dir: str | Path | None = None) -> list[RunStatus]:
    """Every run in `runs_dir` (default runs folder when None), newest first."""
    base = Path(runs_dir).expanduser() if runs_dir else default_runs_dir()
    if not base.is_dir():
        return []
    found = []
    for child in base.iterdir():
        if child.is_dir() and (child / RUN_FILE).is_file():
            try:
                found.append(status(child))
            except TunewiseError:
                continue
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
    _write_json_atomic(run_dir / RUN_FILE, info)

    events, _ = read_events(run_dir / EVENTS_FILE, attempt.get("events_offset", 0))
    if any(event.get("event") in TERMINAL_EVENTS for event in events):
        return 0
    writer = EventWriter(run_dir / EVENTS_FILE)
    last_step = max((e["step"] for e in events if isinstance(e.get("step"), int)), default=0)
    lines = _tail_lines(run_dir / STDOUT_FILE, ERROR_TAIL_LINES)
    if (run_dir / STOP_FILE).exists() and killed_by is not None:
        writer.emit("stopped", step=last_step, reason=f"did not stop in time after the request; killed (signal {killed_by})",
                    signal=killed_by, forced=True)
    elif exit_code == 0 and killed_by is None:
        writer.emit("failed", step=last_step, error="the trainer exited without reporting a result (see stdout.log)",
                    exit_code=exit_code, lines=lines)
    else:
        writer.emit("failed", step=last_step, error=_exit_description(exit_code, killed_by), exit_code=exit_code,
                    signal=killed_by, lines=lines)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.supervisor")
    sub = parser.add_subparsers(dest="command", required=True)
    watch = sub.add_parser("watch", help="(internal) start and watch the current attempt of a run")
    watch.add_argument("run_dir")
    args = parser.parse_args(argv)
    return _watch(Path(args.run_dir))


if __name__ == "__main__":
    sys.exit(main())
