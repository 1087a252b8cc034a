"""The watcher: `python -m trainer.watcher RUN_DIR`, one small process per attempt of a run.

`trainer.supervisor` starts it detached (its own session, so it outlives the app and the terminal)
after recording a new attempt in run.json. The watcher starts the trainer for that attempt: it asks
the warm worker (trainer.warm) to fork a single-process trainer, which saves the imports, or starts
`python -m trainer.runner RUN_DIR` (or the `accelerate launch` command the attempt records) in a
process group of its own. It writes the trainer's pid and start time into run.json, waits for it,
and records the exit code or the killing signal. When the trainer ended without its own terminal
event (SIGKILL, out of memory, a crashed rank, a full disk) the watcher appends one: `failed` with the
signal and the tail of stdout.log, or `stopped` when a stop had been asked for and the fallback kill
ended it. Events written before the kill stay intact. A SIGKILL is explained as the kernel's OOM killer
would cause it, with the plan's host RAM estimate (from `started`) and the last measured peak; for
certain when the memory cgroup's OOM-kill count rose during the attempt (trainer.memwatch.oom_kills).

Imports nothing heavy (no torch; the warm worker's client side is standard library): it starts in milliseconds.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from advisor.errors import TunewiseError
from trainer.events import EVENTS_FILE, TERMINAL_EVENTS, EventWriter, is_disk_full, read_events, release_reserve
from trainer.memwatch import machine_ram_bytes, oom_killed_message, oom_kills
from trainer.procs import child_env, pid_alive, process_start_ticks, rank_processes
from trainer.rundir import (DISK_FULL_BYTES, EXIT_DISK_FULL, PROCS_DIR, RUN_FILE, STDOUT_FILE, STOP_FILE, is_int,
                            read_json, run_lock, tail_lines, write_json_atomic)
from trainer.status import ERROR_TAIL_LINES, current_attempt, disk_free, disk_full_description, exit_description, read_run_record

#: How long a watcher keeps retrying to record the exit when the disk is full, and how often.
RECORD_RETRY_S = 3600.0


RECORD_RETRY_EVERY_S = 2.0


def watch(run_dir: Path) -> int:
    """Start the current attempt's trainer, wait for it, record how it ended (runs in its own process)."""
    for sig in (signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    info = read_json(run_dir / RUN_FILE)
    attempt = current_attempt(info)
    procs = run_dir / PROCS_DIR
    if procs.is_dir():
        for stale in procs.glob("rank*.pid"):
            stale.unlink(missing_ok=True)
    attempt["watcher_pid"] = os.getpid()
    attempt["oom_kills"] = oom_kills()  # the trainer shares this cgroup: a rise later is the OOM killer's doing
    command = attempt["command"]
    warm_run = None
    if command[1:4] == ["-u", "-m", "trainer.runner"]:  # one process: a warm worker can fork it
        from trainer import warm

        warm_run = warm.request(run_dir, attempt.get("resume_from"), attempt.get("cwd"), child_env(),
                                run_dir / STDOUT_FILE)
    if warm_run is not None:
        # warm.request checked the pid (the worker's child, leading its own session) and read its start time.
        attempt.update(pid=warm_run.pid, pid_start=warm_run.start_ticks, warm=True)
        write_json_atomic(run_dir / RUN_FILE, info)
        with open(run_dir / STDOUT_FILE, "ab") as log:
            log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} forked by the warm worker as pid {warm_run.pid}: "
                      f"{' '.join(command)}\n".encode())
        returncode = warm_run.wait()
        if returncode is None:  # the worker went away first: watch the pid itself
            while pid_alive(warm_run.pid, attempt["pid_start"]):
                time.sleep(0.5)
        return record_exit(run_dir, info, attempt, returncode)
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
                env=child_env(),
                cwd=attempt.get("cwd") or None,
            )
        except OSError as exc:
            attempt.update(ended_at=time.time(), exit_code=127)
            write_json_atomic(run_dir / RUN_FILE, info)
            EventWriter(run_dir / EVENTS_FILE).emit("failed", error=f"could not start the trainer: {exc}", user_error=False)
            return 1
        attempt.update(pid=proc.pid, pid_start=process_start_ticks(proc.pid))
        write_json_atomic(run_dir / RUN_FILE, info)
        returncode = proc.wait()
    return record_exit(run_dir, info, attempt, returncode)


def record_exit(run_dir: Path, info: dict, attempt: dict, returncode: int | None) -> int:
    """Record how the attempt ended; add a terminal event when the trainer could not write its own."""
    # Ranks that outlived their launcher (e.g. it was killed) must not keep training unseen.
    for pid, _ in rank_processes(run_dir):
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
            with run_lock(run_dir, "recording how it ended", wait_s=RECORD_RETRY_EVERY_S):
                if len(read_run_record(run_dir)[0]["attempts"]) > len(info.get("attempts") or []):
                    return 1  # resumed meanwhile: the newer attempt has the run now
                write_json_atomic(run_dir / RUN_FILE, info)
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
    last_step = max((e["step"] for e in events if is_int(e.get("step"))), default=0)
    lines = tail_lines(run_dir / STDOUT_FILE, ERROR_TAIL_LINES)
    free = disk_free(run_dir)
    if (run_dir / STOP_FILE).exists() and killed_by is not None:
        writer.emit("stopped", step=last_step, reason=f"did not stop in time after the request; killed (signal {killed_by})",
                    signal=killed_by, forced=True)
    elif exit_code == EXIT_DISK_FULL or (exit_code and free is not None and free < DISK_FULL_BYTES):
        writer.emit("failed", step=last_step, error=disk_full_description(run_dir, free), exit_code=exit_code,
                    user_error=True, disk_full=True, lines=lines)
    elif exit_code == 0 and killed_by is None:
        writer.emit("failed", step=last_step, error="the trainer exited without reporting a result (see stdout.log)",
                    exit_code=exit_code, lines=lines)
    elif killed_by == signal.SIGKILL:
        before, after = attempt.get("oom_kills"), oom_kills()
        certain = is_int(before) and is_int(after) and after > before
        started = next((e for e in events if e.get("event") == "started"), {})
        estimate = started.get("memory_estimate") if isinstance(started.get("memory_estimate"), dict) else None
        peaks = [e.get("memory/peak_rss_bytes") or e.get("memory/max_allocated_bytes") for e in events
                 if e.get("event") == "log"]
        measured = max((p for p in peaks if is_int(p)), default=None)
        writer.emit("failed", step=last_step, error=oom_killed_message(estimate, measured, machine_ram_bytes(), certain),
                    exit_code=exit_code, signal=killed_by, lines=lines, oom="host" if certain else "maybe_host",
                    host_estimate_bytes=(estimate or {}).get("host_ram_bytes"), measured_peak_bytes=measured)
    else:
        writer.emit("failed", step=last_step, error=exit_description(exit_code, killed_by), exit_code=exit_code,
                    signal=killed_by, lines=lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.watcher",
                                     description="Start and watch the current attempt of a run (started by trainer.supervisor).")
    parser.add_argument("run_dir")
    args = parser.parse_args(argv)
    return watch(Path(args.run_dir))


if __name__ == "__main__":
    sys.exit(main())
