"""The state of a cluster job's attempt (Slurm, SkyPilot, torchrun by hand), from its run directory and `squeue`.

A cluster job (trainer/jobs.py) has no local pid: its attempt in run.json carries `scheduler` and
`job_id` instead, and the first node sets `job_started_at` when it starts training. So while the
attempt has neither a terminal event nor an exit record, its state is:

- `running` once the job has started, `queued` before;
- `failed` when it is a Slurm job that `squeue` no longer has (cancelled with scancel behind
  Tunewise's back, out of time, or its node died): nothing on the nodes was left to record how.

Nothing here starts, signals or cancels anything (trainer/jobs.py does): trainer/status.py asks it
while deriving a run's status, and trainer/jobs.py asks it while cancelling a job.

Standard library only (plus the run directory's own modules).
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

from trainer.events import EVENTS_FILE, TERMINAL_EVENTS, read_events

#: Slurm job states in which the job still holds or waits for its nodes (squeue %T).
SLURM_ALIVE = ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "REQUEUE_HOLD",
               "REQUEUE_FED", "RESIZING", "SIGNALING", "STAGE_OUT", "RESV_DEL_HOLD")
#: squeue answers are reused this long (the wizard polls status every second).
SQUEUE_CACHE_S = 3.0

#: job id -> (when asked, the answer).
_SQUEUE: dict[str, tuple[float, bool | None]] = {}


def slurm_job_alive(job_id: str | None, fresh: bool = False) -> bool | None:
    """Whether Slurm still has `job_id` (queued or running): True / False, or None when it cannot tell
    (no squeue on this machine, no job id, or slurmctld does not answer). `fresh` skips the cache."""
    if not job_id or shutil.which("squeue") is None:
        return None
    job_id = str(job_id)
    cached = _SQUEUE.get(job_id)
    if not fresh and cached and time.monotonic() - cached[0] < SQUEUE_CACHE_S:
        return cached[1]
    try:
        done = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        answer = None
    else:
        states = done.stdout.split()
        if done.returncode == 0:
            answer = any(state in SLURM_ALIVE for state in states)
        elif "invalid job id" in done.stderr.lower():
            answer = False  # gone from the controller's memory (MinJobAge after it ended)
        else:
            answer = None
    _SQUEUE[job_id] = (time.monotonic(), answer)
    return answer


def scheduler_state(run_dir: Path, attempt: dict) -> tuple[str, str | None]:
    """(state, error) of a scheduler attempt that has neither a terminal event nor an exit record: running
    once the job has started, queued before; failed when Slurm no longer has it."""
    started = bool(attempt.get("job_started_at"))
    if attempt.get("scheduler") == "slurm" and slurm_job_alive(attempt.get("job_id")) is False:
        # Its records may be just behind: the batch script writes them before the job leaves the queue.
        offset = attempt.get("events_offset")
        events, _ = read_events(Path(run_dir) / EVENTS_FILE, offset if isinstance(offset, int) else 0)
        if not any(event.get("event") in TERMINAL_EVENTS for event in events):
            when = "" if started else " before it started"
            return "failed", (f"Slurm job {attempt.get('job_id')} ended{when} without recording how (cancelled, out "
                              "of time, or its node failed); see stdout.log in the run directory")
    return ("running" if started else "queued"), None
