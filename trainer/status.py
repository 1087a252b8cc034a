"""A run's state, derived from its directory: run.json, events.jsonl and whether its processes live.

Nothing here starts or signals a process; `derive_status(run_dir)` only reads, so the app, the CLI and
the supervisor can ask as often as they like, and the answer survives restarts of all of them:

- the current attempt's terminal event (`finished`, `failed`, `stopped`), else
- the exit the watcher recorded in run.json (code or signal), else
- whether the trainer's pid (checked with its start time, against pid reuse) or its watcher lives;
  a cluster job's attempt has no local pid but a scheduler and job id: whether its job has started,
  and for Slurm whether `squeue` still has it (trainer/scheduler.py).

A damaged run.json or event (wrong types, cut short, missing) never raises: the run is described as
well as it can be, with a `damage` note naming the file. events.jsonl is read incrementally: each
file's digest is cached with the byte offset it has read to, so a poll reads only what was added.
"""

from __future__ import annotations

import json
import signal
import shutil
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from advisor.errors import TunewiseError
from advisor.plan import Plan
from trainer.events import EVENTS_FILE, TERMINAL_EVENTS, read_events
from trainer.procs import pid_alive, rank_processes
from trainer.rundir import (DISK_FULL_BYTES, read_meta, EXIT_DISK_FULL, PILOT_FILE, PLAN_FILE, RUN_FILE, STDOUT_FILE, WATCHER_LOG,
                            default_runs_dir, find_run_dir, is_int, is_number, is_run_dir, tail_lines)
from trainer.scheduler import scheduler_state

STATES = ("queued", "running", "finished", "failed", "stopped")
ACTIVE_STATES = ("queued", "running")
ERROR_TAIL_LINES = 20
#: How long a launch waits for the watcher to report the trainer's pid (a run younger than this with no
#: pid yet is still "queued").
LAUNCH_WAIT_S = 15.0
#: A running trainer is reported as possibly stalled when it has written no event for longer than
#: max(STALL_MIN_S, STALL_FACTOR x the median gap between its recent `log` events), or STALL_MIN_S x
#: STALL_FACTOR before two logs give a gap. Ten gaps covers an evaluation or a checkpoint save of
#: usual size between two logs; two minutes keeps a fast run on a busy machine from being flagged.
STALL_MIN_S = 120.0


STALL_FACTOR = 10.0


# -- run.json, read defensively -------------------------------------------------------------------------


#: run.json fields and the check each must pass (anything else is dropped and reported as damage).
_RECORD_FIELDS = {"run_id": (str, "a string"), "name": (str, "a string"), "summary": (str, "a string"),
                  "created_at": (is_number, "a number")}


_ATTEMPT_FIELDS = {"started_at": (is_number, "a number"), "ended_at": (is_number, "a number"),
                   "watcher_pid": (is_int, "a whole number"), "pid": (is_int, "a whole number"),
                   "pid_start": (is_int, "a whole number"), "exit_code": (is_int, "a whole number"),
                   "signal": (is_int, "a whole number"), "events_offset": (is_int, "a whole number"),
                   "resume_from": (str, "a string"), "cwd": (str, "a string"),
                   "scheduler": (str, "a string"), "job_id": (str, "a string"),
                   "job_started_at": (is_number, "a number")}


def _passes(value, check) -> bool:
    return isinstance(value, check) if isinstance(check, type) else check(value)


def read_run_record(run_dir: Path) -> tuple[dict, list[str]]:
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


def current_attempt(record: dict) -> dict:
    """The newest attempt of a run.json record ({} when there is none)."""
    attempts = record.get("attempts")
    return attempts[-1] if isinstance(attempts, list) and attempts and isinstance(attempts[-1], dict) else {}


# -- the status -----------------------------------------------------------------------------------------


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
    """What the user calls the run: its name from `tunewise runs --rename` (meta.json), else the label given
    at launch, if any."""
    tags: tuple[str, ...] = ()
    """The user's tags (`tunewise runs --tag`, meta.json)."""
    summary: str = ""
    """One line: stage/pipeline, method, model, dataset."""
    stage: str | None = None
    """sft, rm, dpo or ppo."""
    pipeline: str | None = None
    """none, rlhf, dpo or compare."""
    method: str | None = None
    """full, lora or qlora."""
    model: str | None = None
    """The plan's model.name."""
    dataset: str | None = None
    """The plan's data.dataset (a bundled name, a hub name or a file path)."""
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
    forgetting_pct: float | None = None
    """Latest forgetting check: original-domain loss above its baseline, in percent."""
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
    best_step: int | None = None
    """With early stopping: the step of the best checkpoint (lowest eval loss), which the output holds."""
    best_eval_loss: float | None = None
    """With early stopping: the eval loss at `best_step`."""
    early_stopped: bool = False
    """Early stopping ended the run before its last step (eval loss stopped improving)."""
    step_s: float | None = None
    """The median time between logged steps of this attempt (None before two logs)."""
    stop_wait_s: float = 0.0
    """How long a cooperative stop may take here: the current step, the checkpoint save and the forgetting
    measurement, each as long as the longest seen so far, twice over, plus STOP_GRACE_S (see stop_wait)."""
    stalled_s: float | None = None
    """Seconds since a running trainer's last event, when that is far longer than its usual gap between
    logged steps (see STALL_MIN_S, STALL_FACTOR): it may be stuck, or stopped (SIGSTOP). None otherwise."""
    damage: str | None = None
    """What is wrong with a damaged run.json or event (naming the file); the rest is read as well as it can be."""
    memory_estimate_bytes: int | None = None
    """The plan's memory estimate for the device it trained on (the `started` event's, see trainer.memwatch): the
    peak of allocated tensors per GPU, or the node's host RAM on the CPU."""
    memory_measured_bytes: int | None = None
    """The measured peak comparable to it (largest over the `log` events): torch.cuda.max_memory_allocated
    (the largest rank's), or the trainer process's peak RSS on the CPU."""
    memory_kind: str | None = None
    """What the two are: "GPU allocated (max_memory_allocated)" or "host RAM (peak RSS)"."""
    scheduler: str | None = None
    """slurm, skypilot or torchrun for a cluster job (trainer/jobs.py); None for a local run."""
    job_id: str | None = None
    """The scheduler's job id (SkyPilot: the cluster), once known."""

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES

    @property
    def hint(self) -> str | None:
        """What to do about a run that looks stalled (None when it does not)."""
        if self.stalled_s is None:
            return None
        if self.scheduler:
            job = f"the {self.scheduler} job" + (f" {self.job_id}" if self.job_id else "")
            return (f"no event for {self.stalled_s:.0f} s, far longer than its steps take: {job} may be stuck or "
                    "paused (a long evaluation or checkpoint save looks the same); "
                    f"`tunewise stop {self.run_id}` ends it")
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
        if self.best_step is not None:
            notes += f"  [best step {self.best_step}{': early-stopped' if self.early_stopped else ''}]"
        notes += f"  [damaged: {self.damage}]" if self.damage else ""
        notes += f"  [{self.scheduler}{f' job {self.job_id}' if self.job_id else ''}]" if self.scheduler else ""
        labels = (f"  \"{self.name}\"" if self.name else "") + (f"  #{' #'.join(self.tags)}" if self.tags else "")
        return f"{self.run_id}  {what:<18} {steps}{loss}  {self.summary}{labels}{notes}"


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
    best: dict | None = None
    """The latest `best_checkpoint` event (early stopping)."""
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
    forgetting_pct: float | None = None
    """The latest forgetting check's degradation (original-domain loss above its baseline, %)."""
    memory_measured: int | None = None
    """The largest measured memory the `log` events report (peak RSS or max allocated)."""
    save_s: float = 0.0
    """The longest a checkpoint took to write so far (from the event before a `checkpoint` event to it)."""
    measure_s: float = 0.0
    """The longest a forgetting measurement took so far (its `eval_ms`)."""

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
            if is_number(when):
                self.last_time = float(when)
            elif when is not None:
                self._wrong(event, "time", "a number")
                when = None
            if is_int(event.get("step")):
                self.step = event["step"]
            elif event.get("step") is not None:
                self._wrong(event, "step", "a whole number")
            if kind == "started":
                self.started = event
            elif kind == "train_begin" and "stage" in event:
                # A pipeline step's, forwarded: its max_steps counts that step's own steps, not the run's.
                self.begin_time, self.log_times = when, []
            elif kind == "train_begin":
                if is_int(event.get("max_steps")) and event["max_steps"] > 0:
                    self.max_steps = event["max_steps"]
                elif event.get("max_steps") is not None:
                    self._wrong(event, "max_steps", "a whole number")
                self.begin_time, self.log_times = when, []
            elif kind == "log":
                self.last_log = {k: v for k, v in event.items() if k not in ("event", "time", "step") and is_number(v)}
                if is_number(event.get("loss")):
                    self.last_loss = float(event["loss"])
                for key in ("memory/max_allocated_bytes", "memory/peak_rss_bytes"):
                    if is_int(event.get(key)):
                        self.memory_measured = max(self.memory_measured or 0, event[key])
                if when is not None:
                    self.log_times = (self.log_times + [when])[-21:]
            elif kind == "eval" and is_number(event.get("eval_loss")):
                self.last_eval_loss = float(event["eval_loss"])
            elif kind == "best_checkpoint" and is_int(event.get("step")):
                self.best = event
            elif kind == "forgetting" and is_number(event.get("degradation_pct")):
                self.forgetting_pct = float(event["degradation_pct"])
            elif kind == "checkpoint" and isinstance(event.get("path"), str):
                self.checkpoint = event["path"]
                if when is not None and self.log_times:
                    self.save_s = max(self.save_s, when - self.log_times[-1])
            if kind == "forgetting" and is_number(event.get("eval_ms")):
                self.measure_s = max(self.measure_s, event["eval_ms"] / 1000)
            if kind in TERMINAL_EVENTS:
                self.terminal = event
                if isinstance(event.get("output_dir"), str) and event["output_dir"]:
                    self.output_dir = event["output_dir"]


#: path -> (file identity, digest): status() reads only the bytes added since the last call.
_DIGESTS: dict[str, tuple[tuple, _Digest]] = {}


def digest_events(events_path: Path) -> _Digest:
    """What `events_path` says so far: its cached digest, fed with the bytes added since the last call."""
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


#: path -> (file identity, offset, events): whole event lists for charts that compare runs, read
#: incrementally like the digests; only the newest EVENT_LISTS_KEPT files are kept in memory.
_EVENT_LISTS: dict[str, tuple[tuple, int, list[dict]]] = {}
EVENT_LISTS_KEPT = 16


def events_so_far(events_path: Path) -> list[dict]:
    """Every event in `events_path` (complete lines), reading only the bytes added since the last call."""
    key = str(events_path)
    try:
        stat = events_path.stat()
    except FileNotFoundError:
        _EVENT_LISTS.pop(key, None)
        return []
    identity = (stat.st_ino, stat.st_dev)
    cached_identity, offset, events = _EVENT_LISTS.pop(key, ((), 0, []))
    if cached_identity != identity or offset > stat.st_size:
        offset, events = 0, []
    if offset < stat.st_size:
        more, offset = read_events(events_path, offset)
        events = events + more
    _EVENT_LISTS[key] = (identity, offset, events)  # (re)inserted last: the dict keeps use order
    while len(_EVENT_LISTS) > EVENT_LISTS_KEPT:
        _EVENT_LISTS.pop(next(iter(_EVENT_LISTS)))
    return events


#: plan.yaml path -> (mtime, fields): a plan is parsed once, not at every poll.
_PLAN_FIELDS: dict[str, tuple[float, dict]] = {}


def _plan_fields(path: Path) -> dict:
    """summary / stage / pipeline / method / model / dataset of a run's plan ({} when it is unreadable)."""
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
    fields = {"summary": plan.summary(), "stage": plan.stage, "pipeline": plan.pipeline, "method": plan.method.method,
              "model": plan.model.name, "dataset": plan.data.dataset}
    _PLAN_FIELDS[str(path)] = (mtime, fields)
    return fields


def _text_lines(value) -> tuple[str, ...]:
    return tuple(str(line) for line in value) if isinstance(value, list) else ()


def disk_free(run_dir: Path) -> int | None:
    try:
        return shutil.disk_usage(run_dir).free
    except OSError:
        return None


def disk_full_description(run_dir: Path, free: int | None) -> str:
    room = f"{free} bytes free" if free is not None else "no room"
    return (f"the disk is full ({room} on the disk holding {run_dir}): the trainer could not write the run, and its "
            f"last records may be missing. Free some space, then `tunewise resume {run_dir.name}` continues from "
            "the newest complete checkpoint")


#: The least a stop is given before it is forced (a step and a save on a quiet machine fit in it many times).
STOP_GRACE_S = 30.0


def _step_s(digest: _Digest) -> float | None:
    gaps = [later - earlier for earlier, later in zip(digest.log_times, digest.log_times[1:])]
    return round(statistics.median(gaps), 3) if gaps else None


def stop_wait(digest: _Digest) -> float:
    """Seconds to wait for a cooperative stop before killing the trainer: STOP_GRACE_S plus twice what the
    stop has to do, as measured in this run (finish the current step, save a checkpoint, then the final
    forgetting measurement), so a slow machine or a large model is not killed while it saves."""
    work = (_step_s(digest) or 0.0) + digest.save_s + digest.measure_s
    return round(STOP_GRACE_S + 2 * work, 1)


def _stalled_s(digest: _Digest, started_at: float | None) -> float | None:
    """Seconds without an event, when far longer than this attempt's usual gap between logs (else None)."""
    if digest.last_time is None or digest.begin_time is None or started_at is None or digest.begin_time < started_at - 1e-3:
        return None  # training has not begun in this attempt: loading a model has no step time to compare with
    gaps = [later - earlier for earlier, later in zip(digest.log_times, digest.log_times[1:])]
    threshold = max(STALL_MIN_S, STALL_FACTOR * statistics.median(gaps)) if gaps else STALL_MIN_S * STALL_FACTOR
    quiet = time.time() - digest.last_time
    return round(quiet, 1) if quiet > threshold else None


def derive_status(run: str | Path, runs_dir: str | Path | None = None) -> RunStatus:
    """The run's state and key numbers (see RunStatus), from its directory alone."""
    run_dir = find_run_dir(run, runs_dir)
    info, problems = read_run_record(run_dir)
    attempt = current_attempt(info)
    digest = digest_events(run_dir / EVENTS_FILE)
    problems += digest.problems
    plan_fields = _plan_fields(run_dir / PLAN_FILE) or {"summary": info.get("summary", "")}
    meta = read_meta(run_dir)
    if (run_dir / PILOT_FILE).is_file() and not plan_fields["summary"].startswith("learning-rate pilot"):
        plan_fields["summary"] = "learning-rate pilot: " + plan_fields["summary"]  # trainer/pilot.py's run

    started_at = attempt.get("started_at")
    terminal = digest.terminal
    if terminal is not None and started_at is not None:
        written = terminal.get("time") if is_number(terminal.get("time")) else 0
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
        if rank_processes(run_dir):
            state = "running"  # its record is gone, but its trainer is not
        elif problems and not _recently_made(run_dir):
            state = "failed"
            error = f"its record is damaged ({problems[0]}), so how it ended is unknown"
        else:
            state = "queued"
    elif attempt.get("ended_at"):
        state = "failed"
        if attempt.get("exit_code") == EXIT_DISK_FULL:
            error = disk_full_description(run_dir, disk_free(run_dir))
        else:
            error = exit_description(attempt.get("exit_code"), attempt.get("signal"))
        error_lines = tuple(tail_lines(run_dir / STDOUT_FILE, ERROR_TAIL_LINES))
    elif attempt.get("scheduler"):  # a cluster job: no local pid; its start, exit record and scheduler say
        state, error = scheduler_state(run_dir, attempt)
        if state == "failed":
            error_lines = tuple(tail_lines(run_dir / STDOUT_FILE, ERROR_TAIL_LINES))
    elif attempt.get("pid"):
        if pid_alive(attempt["pid"], attempt.get("pid_start")):
            state = "running"
        elif (free := disk_free(run_dir)) is not None and free < DISK_FULL_BYTES:
            # The trainer ended and nothing (its event, the watcher's record) could say how: a full disk.
            state = "failed"
            error = disk_full_description(run_dir, free)
            error_lines = tuple(tail_lines(run_dir / STDOUT_FILE, ERROR_TAIL_LINES))
        elif pid_alive(attempt.get("watcher_pid")):
            state = "running"  # the trainer just exited; the watcher is recording it
        else:
            state = "failed"
            error = "the training process ended without reporting (its watcher was gone too, so the exit code is unknown)"
            error_lines = tuple(tail_lines(run_dir / STDOUT_FILE, ERROR_TAIL_LINES))
    elif pid_alive(attempt.get("watcher_pid")) or time.time() - (started_at or 0) < LAUNCH_WAIT_S:
        state = "queued"
    else:
        state = "failed"
        error = "the training process never started (see watcher.log in the run directory)"
        error_lines = tuple(tail_lines(run_dir / WATCHER_LOG, ERROR_TAIL_LINES))

    estimate = (digest.started or {}).get("memory_estimate")
    estimate = estimate if isinstance(estimate, dict) else {}
    memory_kind = {"cuda": "GPU allocated (max_memory_allocated)", "cpu": "host RAM (peak RSS)"}.get(estimate.get("device"))
    terminal_signal = (terminal or {}).get("signal")
    job = info.get("job") if isinstance(info.get("job"), dict) else {}  # a cluster job's layout (trainer/jobs.py)
    scheduler = attempt.get("scheduler") or (job.get("scheduler") if isinstance(job.get("scheduler"), str) else None)
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
        name=meta["name"] or info.get("name"),
        tags=tuple(meta["tags"]),
        exit_code=attempt.get("exit_code"),
        signal=attempt.get("signal") or (terminal_signal if is_int(terminal_signal) else None),
        reason=reason,
        error=error,
        error_lines=error_lines,
        user_error=user_error,
        step=digest.step,
        max_steps=digest.max_steps,
        last_loss=digest.last_loss,
        last_eval_loss=digest.last_eval_loss,
        forgetting_pct=digest.forgetting_pct,
        metrics=dict(digest.last_log),
        created_at=created_at,
        started_at=started_at,
        ended_at=attempt.get("ended_at"),
        pid=attempt.get("pid"),
        attempts=len(info.get("attempts") or []),
        checkpoint=digest.checkpoint,
        output_dir=digest.output_dir,
        best_step=digest.best["step"] if digest.best else None,
        best_eval_loss=digest.best.get("eval_loss") if digest.best and is_number(digest.best.get("eval_loss")) else None,
        early_stopped=bool(digest.best and digest.best.get("early_stopped") is True),
        step_s=_step_s(digest),
        stop_wait_s=stop_wait(digest),
        stalled_s=_stalled_s(digest, started_at) if state == "running" else None,
        damage="; ".join(problems[:3]) or None,
        memory_estimate_bytes=estimate.get("estimate_bytes") if is_int(estimate.get("estimate_bytes")) else None,
        memory_measured_bytes=digest.memory_measured,
        memory_kind=memory_kind,
        scheduler=scheduler,
        job_id=attempt.get("job_id"),
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
        if child.is_dir() and is_run_dir(child):
            try:
                found.append(derive_status(child))
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


def exit_description(exit_code: int | None, sig: int | None) -> str:
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


