"""Process helpers: is a recorded process still the one we started, which ranks a run has, and the
environment a child process gets. Standard library only, one copy for the whole house (the warm
worker keeps its own liveness check on purpose: see trainer/warm.py).

A pid alone is not an identity (pids are reused), so every recorded process is stored with its start
time in clock ticks since boot (`process_start_ticks`, /proc/<pid>/stat field 22) and checked
against both.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from trainer.rundir import PROCS_DIR, read_json

#: The repository root: children get it on PYTHONPATH so `python -m trainer.*` finds this code.
REPO_ROOT = Path(__file__).resolve().parent.parent


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


def is_recorded_trainer(pid: object, start_ticks: object) -> bool:
    """Whether `pid` is still the trainer an attempt recorded: same start time, and it leads its own
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


def child_env() -> dict:
    """The environment for a watcher or trainer process: ours, with this code on PYTHONPATH, unbuffered
    output and tokenizers' thread pool off (it deadlocks after a fork)."""
    env = dict(os.environ)
    root = str(REPO_ROOT)
    current = env.get("PYTHONPATH", "")
    if root not in current.split(os.pathsep):
        env["PYTHONPATH"] = root + (os.pathsep + current if current else "")
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


# -- the ranks of a training run ---------------------------------------------------------------------


def rank_from_env() -> int:
    """This process's global rank under torchrun / accelerate (0 when launched alone)."""
    for name in ("RANK", "LOCAL_RANK"):
        value = os.environ.get(name)
        if value not in (None, ""):
            return int(value)
    return 0


def world_size_from_env() -> int:
    """How many training processes this run has (1 when launched alone)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def record_rank_pid(run_dir: Path, rank: int) -> None:
    """Write `procs/rank<N>.pid` ({"pid", "start_ticks", "rank"}) so the supervisor can signal every rank."""
    procs = Path(run_dir) / PROCS_DIR
    procs.mkdir(exist_ok=True)
    record = {"pid": os.getpid(), "start_ticks": process_start_ticks(os.getpid()), "rank": rank}
    (procs / f"rank{rank}.pid").write_text(json.dumps(record), encoding="utf-8")


def rank_processes(run_dir: Path) -> list[tuple[int, int | None]]:
    """(pid, start ticks) of each training rank of the current attempt that is still alive."""
    found = []
    procs = Path(run_dir) / PROCS_DIR
    if not procs.is_dir():
        return found
    for path in sorted(procs.glob("rank*.pid")):
        record = read_json(path)
        pid = record.get("pid")
        if isinstance(pid, int) and pid_alive(pid, record.get("start_ticks")):
            found.append((pid, record.get("start_ticks")))
    return found
