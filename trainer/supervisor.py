"""Start, stop and resume training runs in the background; ask how they are doing.

The API the wizard and the CLI use (no torch imports: it must stay instant):

- `launch(plan, runs_dir=None, name=None) -> run_id`: creates
  `<runs>/<run_id>/` with plan.yaml and run.json, and starts the run detached
  (its own process session, so it outlives the UI and the terminal).
- `status(run) -> RunStatus`, `list_runs(runs_dir) -> [RunStatus]` (newest
  first), `read_run_events(run, offset) -> (events, offset)`: derived from the
  run directory alone (trainer/status.py), so they survive restarts.
- `stop(run, timeout=30) -> RunStatus`: cooperative (STOP file + SIGTERM to
  the training processes, which save a checkpoint and exit); after `timeout`
  seconds the processes are killed. `request_stop(run)` asks without waiting.
- `resume(run) -> run_id`: the same run directory continues from the newest
  complete checkpoint in checkpoints/ (a damaged newer one is named and passed
  over); events are appended after a `resumed` event. `resume_run(run)` says
  which checkpoint and why (`Resumed`).
- `wait(run, timeout)`: until the run is no longer queued or running.
- `delete(run)`: remove a run that has ended (a running one is refused).

Launch, resume and stop take the run's lock (`flock` on `<run>/.lock`) while
they check the state and start or signal the trainer, so two of them from
different processes (two terminals, a terminal and the app) cannot start two
trainers on one run: a second resume is refused, naming what holds the lock.

Each launch or resume is an attempt, recorded in run.json before its watcher
process starts (`python -m trainer.watcher RUN_DIR`, trainer/watcher.py),
which starts the trainer (through the warm worker when one serves the runs
folder), records its pid and how it ended. A stop signals only processes
whose pid and start time match what was recorded and that lead their own
session (trainer/procs.py), so a stale or forged pid is never signalled.

A full disk. Each attempt keeps a small reserve file (trainer.events), so the
trainer's `failed` event ("the disk is full") and the watcher's record of the
exit still fit; the runner exits with EXIT_DISK_FULL, so the watcher and
status() name the disk even when nothing more fitted.

run.json: {"run_id", "name", "created_at", "summary", "attempts": [{"started_at",
"command", "cwd", "resume_from", "events_offset", "watcher_pid", "pid", "pid_start",
"warm", "ended_at", "exit_code", "signal"}]}; one writer at a time (the launcher
before the watcher starts, then the watcher, each under the run's lock), written
atomically.

A cluster job (trainer/jobs.py: Slurm, SkyPilot, torchrun) has no local pid: its
attempts carry "scheduler" and "job_id" instead, and its state comes from its
events, the exit record its first node writes and, for Slurm, `squeue`
(trainer/scheduler.py). Stop writes the STOP file as for any run and, when the
job does not answer in time, cancels it (trainer.jobs.force_stop: scancel);
resume submits the job again (trainer.jobs.resubmit); a launch of a plan over
several nodes is refused (it runs on this machine only: `tunewise job`).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from advisor.errors import TunewiseError
from advisor.plan import Plan
from trainer import jobs
from trainer.events import EVENTS_FILE, TERMINAL_EVENTS, EventWriter, make_reserve, read_events
from trainer.procs import child_env, is_recorded_trainer, pid_alive, rank_processes
from trainer.rundir import (ACCELERATE_CONFIG_FILE, CHECKPOINTS_DIR, DATA_DIR, PILOT_FILE, PLAN_FILE, RESULT_FILE, RUN_FILE,
                            STOP_FILE, WATCHER_LOG, absolute_paths, default_runs_dir, find_run_dir, new_run_id,
                            read_json, resumable_checkpoint, run_lock, step_dirs, write_json_atomic)
from trainer.status import (ACTIVE_STATES, LAUNCH_WAIT_S, RunStatus, current_attempt, derive_status, digest_events,
                            read_run_record)
from trainer.status import list_runs as _list_runs

#: How long a stop waits for the run's lock (a launch or resume holds it until the trainer's pid is
#: recorded, at most LAUNCH_WAIT_S).
LOCK_WAIT_S = LAUNCH_WAIT_S + 5


# -- what a run is doing (trainer/status.py derives it) ---------------------------------------------


def status(run: str | Path, runs_dir: str | Path | None = None) -> RunStatus:
    """The run's state and key numbers (see trainer.status.RunStatus)."""
    _reap_watchers()
    return derive_status(run, runs_dir)


def list_runs(runs_dir: str | Path | None = None) -> list[RunStatus]:
    """Every run in `runs_dir` (the default runs folder when None), newest first; a damaged run is listed
    with a note, never hiding the others."""
    _reap_watchers()
    return _list_runs(runs_dir)


def read_run_events(run: str | Path, offset: int = 0, runs_dir: str | Path | None = None) -> tuple[list[dict], int]:
    """Events of a run from byte `offset` (complete lines only) and the offset to continue from."""
    return read_events(find_run_dir(run, runs_dir) / EVENTS_FILE, offset)


# -- starting a run ---------------------------------------------------------------------------------


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


#: Watcher processes this process started (kept so they are reaped, not left as zombies).
_WATCHERS: list[subprocess.Popen] = []


def _reap_watchers() -> None:
    for proc in list(_WATCHERS):
        if proc.poll() is not None:
            _WATCHERS.remove(proc)


def _start_attempt(run_dir: Path, plan: Plan, resume_from: Path | None) -> int:
    """Record a new attempt in run.json and start its watcher (which starts the trainer); return the
    attempt's events_offset (where its events begin in events.jsonl). The caller holds the run's lock."""
    info, _ = read_run_record(run_dir)  # a damaged record is rewritten with what could be read
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
    write_json_atomic(run_dir / RUN_FILE, info)
    _reap_watchers()
    with open(run_dir / WATCHER_LOG, "ab") as watcher_log:
        watcher = subprocess.Popen(
            [sys.executable, "-m", "trainer.watcher", str(run_dir)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=watcher_log,
            start_new_session=True,
            env=child_env(),
            cwd=os.getcwd(),
        )
    _WATCHERS.append(watcher)
    # Wait until the watcher has started the trainer, so status() says "running" right away.
    deadline = time.time() + LAUNCH_WAIT_S
    while time.time() < deadline:
        current = current_attempt(read_run_record(run_dir)[0])
        if current.get("pid") or current.get("ended_at") or watcher.poll() is not None:
            break
        time.sleep(0.05)
    return attempt["events_offset"]


def launch(plan: Plan, runs_dir: str | Path | None = None, name: str | None = None,
           copy_dataset: bool = False, pilot: dict | None = None) -> str:
    """Create a run directory for `plan` and start training it in the background; return the run id.

    With `copy_dataset` the plan's dataset file is copied into the run directory (`data/`) and the
    plan points at the copy, so the run keeps its data when the original goes (the app does this for
    uploads, which demo mode cleans up). With `pilot` (an `advisor.pilot.PilotDesign.to_dict()`) the run
    is a learning-rate pilot of `plan` (trainer/pilot.py) instead of its training."""
    if not isinstance(plan, Plan):
        raise TypeError(f"launch() needs a Plan, got {type(plan).__name__}")
    if plan.hardware.num_nodes > 1:
        raise TunewiseError(f"hardware.num_nodes: the plan spans {plan.hardware.num_nodes} machines and a launch runs on "
                            "this one only: write a cluster job with `tunewise job PLAN --scheduler slurm|skypilot|torchrun` "
                            "(the wizard: Export a cluster job)", field="hardware.num_nodes")
    plan = absolute_paths(plan)
    base = Path(runs_dir).expanduser() if runs_dir else default_runs_dir()
    base.mkdir(parents=True, exist_ok=True)
    run_id = new_run_id(plan, name or (f"pilot-{plan.stage}-{plan.method.method}" if pilot else None))
    run_dir = (base / run_id).resolve()
    run_dir.mkdir()
    with run_lock(run_dir, "started"):
        if copy_dataset and plan.data.dataset and Path(plan.data.dataset).is_file():
            source = Path(plan.data.dataset)
            (run_dir / DATA_DIR).mkdir()
            copy = run_dir / DATA_DIR / source.name
            shutil.copyfile(source, copy)
            plan = plan.with_overrides({"data.dataset": str(copy)})
        plan.save(run_dir / PLAN_FILE)
        if pilot is not None:
            write_json_atomic(run_dir / PILOT_FILE, {"design": pilot})
        write_json_atomic(
            run_dir / RUN_FILE,
            {
                "run_id": run_id,
                "name": name or plan.name,
                "created_at": time.time(),
                "summary": ("learning-rate pilot: " if pilot is not None else "") + plan.summary(),
                "attempts": [],
            },
        )
        _start_attempt(run_dir, plan, resume_from=None)
    return run_id


# -- resuming ---------------------------------------------------------------------------------------


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
    if (run_dir / PILOT_FILE).is_file():
        raise TunewiseError(f"run {run_dir.name} is a learning-rate pilot: it is not resumed, and what it measured is "
                            f"kept (`tunewise status {run_dir.name}`); start a new pilot to measure again")
    # Wait a moment for another holder (the watcher recording how the last attempt ended, a launch in
    # progress): then the state is settled, and a second resume is refused because the run is running.
    with run_lock(run_dir, "resumed", wait_s=LOCK_WAIT_S):
        current = status(run_dir)
        _refuse_resume(current)  # again under the lock: another process may have resumed it meanwhile
        plan = Plan.load(run_dir / PLAN_FILE)
        _close_attempt(run_dir, current)
        if current.scheduler:  # a cluster job: submit it again; its first node continues from the newest checkpoint
            checkpoint, skipped, message, offset = jobs.resubmit(run_dir)
            return Resumed(current.run_id, str(checkpoint), tuple((str(p), why) for p, why in skipped), message, offset)
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
    terminal = digest_events(run_dir / EVENTS_FILE).terminal or {}
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
    info, _ = read_run_record(run_dir)
    attempt = current_attempt(info)
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
    done, interrupted, skipped = [], None, []
    for stage, step_dir in step_dirs(run_dir, plan.pipeline):
        result = read_json(step_dir / RESULT_FILE)
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


# -- deleting -----------------------------------------------------------------------------------------


def delete(run: str | Path, runs_dir: str | Path | None = None) -> str:
    """Delete a run that has ended (its whole directory: plan, events, checkpoints, outputs); return its id.
    A queued or running run is refused: stop it first."""
    run_dir = find_run_dir(run, runs_dir)
    with run_lock(run_dir, "deleted"):
        current = status(run_dir)
        if current.state in ACTIVE_STATES:
            raise TunewiseError(f"run {current.run_id} is still {current.state}: stop it before deleting it")
        shutil.rmtree(run_dir)
    return current.run_id


def relabel(run: str | Path, runs_dir: str | Path | None = None, name: str | None = None,
            add_tags: tuple[str, ...] = (), remove_tags: tuple[str, ...] = ()) -> RunStatus:
    """Rename a run and add or remove tags (its meta.json; the run id stays); return its new status. Works
    on a running run too: the labels are the user's, the trainer never reads them."""
    from trainer.rundir import update_meta

    run_dir = find_run_dir(run, runs_dir)
    update_meta(run_dir, name=name, add_tags=tuple(add_tags), remove_tags=tuple(remove_tags))
    return status(run_dir)


def filter_runs(runs: list[RunStatus], tag: str | None = None, stage: str | None = None,
                state: str | None = None) -> list[RunStatus]:
    """The runs with `tag`, of `stage` (sft, rm, dpo, ppo, or a pipeline: rlhf, dpo-pipeline written
    "pipeline:dpo", compare) and in `state` (queued, running, finished, failed, stopped); None keeps all."""
    def stage_of(run: RunStatus) -> str:
        return f"pipeline:{run.pipeline}" if run.pipeline and run.pipeline != "none" else (run.stage or "")

    return [run for run in runs
            if (not tag or tag in run.tags) and (not stage or stage_of(run) == stage or run.pipeline == stage)
            and (not state or run.state == state)]


# -- stopping and waiting ---------------------------------------------------------------------------


def _signal_run(run_dir: Path, attempt: dict, sig: int, whole_group: bool) -> None:
    """Send `sig` to the run's training ranks (and, with whole_group, the trainer's process group)."""
    if attempt.get("scheduler"):
        return  # a cluster job's processes run on its nodes: it stops through the STOP file (or its scheduler)
    pid = attempt.get("pid")
    targets = {p for p, _ in rank_processes(run_dir)}
    if is_recorded_trainer(pid, attempt.get("pid_start")):
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
    with run_lock(run_dir, "stopped", wait_s=LOCK_WAIT_S):
        current = status(run_dir)
        if current.state not in ACTIVE_STATES:
            return current
        (run_dir / STOP_FILE).write_text(reason + "\n", encoding="utf-8")
        _signal_run(run_dir, current_attempt(read_run_record(run_dir)[0]), signal.SIGTERM, whole_group=False)
    return current


def stop(run: str | Path, timeout: float | None = None, runs_dir: str | Path | None = None,
         reason: str = "stopped by the user") -> RunStatus:
    """Ask a run to stop (it saves a checkpoint and exits); kill it after `timeout` seconds (default: the run's
    own `stop_wait_s`, scaled by its measured step, save and forgetting-check times); return its status."""
    run_dir = find_run_dir(run, runs_dir)
    current = request_stop(run_dir, reason=reason)
    if current.state not in ACTIVE_STATES:
        return current
    deadline = time.time() + (current.stop_wait_s if timeout is None else timeout)
    while time.time() < deadline:
        current = status(run_dir)
        if current.state not in ACTIVE_STATES:
            return _wait_for_record(run_dir)
        time.sleep(0.2)
    attempt = current_attempt(read_run_record(run_dir)[0])
    if attempt.get("scheduler"):  # no local process to kill: cancel the job (scancel), or say how
        return jobs.force_stop(run_dir, attempt, timeout)
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
        attempt = current_attempt(read_run_record(run_dir)[0])
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
