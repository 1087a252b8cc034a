"""Cluster jobs: a run handed to Slurm, SkyPilot or torchrun by hand, watched through its run directory.

Tunewise has no scheduler of its own. `tunewise job PLAN --scheduler slurm|skypilot|torchrun
--nodes N --gpus-per-node G [--runs-dir SHARED/runs] [--out DIR] [--submit]` (`write_job`):

1. creates the run directory in the runs folder, as `tunewise launch` does (plan.yaml, and a
   run.json that names the job and has no attempt yet: the run shows as `queued`);
2. writes a self-contained job folder (default `<run dir>/job/`):

       plan.yaml               the plan (hardware.num_nodes x hardware.num_gpus per node)
       accelerate_config.yaml  the multi-node `accelerate launch` config: DDP, or FSDP for
                               zero2 / zero3 (trainer.accelerate_config), N machines, N x G processes
       launch_node.sh          what every node runs: its share of `accelerate launch ... -m trainer.runner`
       job.sbatch              slurm: the batch script (`srun` runs launch_node.sh once per node)
       sky.yaml                skypilot: the task (num_nodes, resources.accelerators, setup, run)
       job.json                what the node-side commands read (run directory, layout, port)
       README.md               how to submit, watch, stop and resume it

3. with `--submit`, calls `sbatch` (or `sky launch`) and records the attempt in run.json with the
   scheduler and its job id instead of a pid.

On the nodes, launch_node.sh runs this module's node-side commands around the trainer:
`python -m trainer.jobs start JOB_DIR` on the first node (claims the attempt, writes `resumed`
when a checkpoint exists, refuses a finished run or a pending stop), `resume-args RUN_DIR` on
every node (the newest checkpoint, the same on all of them since none is written before every
node has joined), and after `accelerate launch` returns, `record-exit RUN_DIR --code N` on the
first node (the exit record, and a `failed` event when the trainer died without its own, as the
local watcher does). Rank 0 of the trainer writes events.jsonl as in a local run.

So the run directory is the same contract as for a local run: `tunewise status / stop / resume`
and the wizard's monitor work from any machine that sees the folder. There is no local pid to
check: trainer/status.py derives the state of an attempt that carries a `scheduler` from the
events, the exit record and (trainer/scheduler.py) `squeue`. The supervisor hands such attempts
to this module to stop and resume: stopping is the STOP file as ever, and a Slurm job that does
not answer within the timeout is cancelled with `scancel` (`force_stop`); resuming submits the job
again (`resubmit`).

run.json is written from several machines (the submitter, the first node); every read-modify-write
here holds an flock on `.run.json.lock` beside it (NFSv4 and Lustre honour it).

No torch here: the CLI, the supervisor and the nodes' bookkeeping all import it. It imports no
process control of its own kind (the supervisor imports it, not the other way round).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import platform
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import yaml

from advisor.errors import TunewiseError
from advisor.plan import REPO_ROOT, Plan, check_gpus_per_node
from trainer.events import EVENTS_FILE, TERMINAL_EVENTS, EventWriter, read_events
from trainer.rundir import (ACCELERATE_CONFIG_FILE, CHECKPOINTS_DIR, JOB_DIR, PLAN_FILE, PROCS_DIR, RUN_FILE,
                            RUN_FILE_LOCK, STDOUT_FILE, STOP_FILE, absolute_paths, checkpoint_step, default_runs_dir,
                            last_checkpoint, new_run_id, read_json, resumable_checkpoint, tail_lines,
                            write_json_atomic)
from trainer.scheduler import slurm_job_alive
from trainer.status import ERROR_TAIL_LINES, RunStatus, derive_status

SCHEDULERS = ("slurm", "skypilot", "torchrun")
JOB_FILE = "job.json"
NODE_SCRIPT = "launch_node.sh"
SBATCH_FILE = "job.sbatch"
SKY_FILE = "sky.yaml"
README_FILE = "README.md"

#: torchrun's usual rendezvous port on the main node.
DEFAULT_PORT = 29500
#: Exit code of `start` when the job must not train (the run finished, or a stop is pending).
NOT_STARTED_EXIT = 3
#: Tunewise GPU names -> SkyPilot's accelerator names.
SKY_ACCELERATORS = {
    "T4": "T4", "L4": "L4", "A10G": "A10G", "RTX-3090": "RTX3090", "RTX-4090": "RTX4090", "A100-40GB": "A100",
    "L40S": "L40S", "A100-80GB": "A100-80GB", "H100-80GB": "H100", "H200": "H200",
}
#: How long force_stop waits, after scancel, for the job's own exit record.
CANCEL_WAIT_S = 30.0


# -- run.json, shared between machines ---------------------------------------------------------------


@contextmanager
def _run_info(run_dir: Path):
    """run.json as a dict, held under an exclusive lock and written back (atomically) on exit."""
    with open(run_dir / RUN_FILE_LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        info = read_json(run_dir / RUN_FILE)
        yield info
        write_json_atomic(run_dir / RUN_FILE, info)


def _tail(run_dir: Path) -> list[str]:
    return tail_lines(run_dir / STDOUT_FILE, ERROR_TAIL_LINES)


# -- writing a job -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """A job folder written by `write_job` (and, once submitted, its scheduler's id)."""

    run_id: str
    """The run's id (its directory name in the runs folder)."""
    run_dir: str
    """The run directory the job trains in."""
    job_dir: str
    """The job folder."""
    scheduler: str
    """slurm, skypilot or torchrun."""
    nodes: int
    """Machines."""
    gpus_per_node: int
    """GPUs (CPU processes on a CPU plan) per machine."""
    files: tuple[str, ...]
    """The files in the job folder."""
    submit_command: tuple[str, ...]
    """The command that submits it (empty for torchrun: run launch_node.sh on each node)."""
    node_commands: tuple[str, ...]
    """torchrun: the command to run on each node, in machine-rank order."""
    job_id: str | None = None
    """The scheduler's job id (Slurm) or cluster name (SkyPilot), once submitted."""

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        """What was written and how to go on, for the terminal."""
        lines = [f"run {self.run_id}: {self.nodes} node{'s' if self.nodes > 1 else ''} x {self.gpus_per_node} "
                 f"({self.scheduler}); job folder {self.job_dir}"]
        if self.job_id:
            lines.append(f"submitted: {self.scheduler} job {self.job_id}")
        elif self.submit_command:
            lines.append(f"submit it with: {shlex.join(self.submit_command)}")
        for rank, command in enumerate(self.node_commands):
            lines.append(f"on node {rank}: {command}")
        lines.append(f"watch it: tunewise status {self.run_id} --runs-dir {shlex.quote(str(Path(self.run_dir).parent))} "
                     "(or the wizard on that runs folder); stop: tunewise stop; continue: tunewise resume")
        return "\n".join(lines)

    def markdown(self) -> str:
        """The same for the wizard."""
        text = (f"**Cluster job written** for run `{self.run_id}` ({self.nodes} node{'s' if self.nodes > 1 else ''} x "
                f"{self.gpus_per_node}, {self.scheduler}): `{self.job_dir}`.\n\n")
        if self.submit_command:
            text += f"Submit it with `{shlex.join(self.submit_command)}`"
        else:
            text += "Start it on every node: " + "; ".join(f"`{c}`" for c in self.node_commands)
        return text + (". It appears in the run history as soon as it starts; watch it there like any run "
                       "(see the job folder's README.md).")


def _whole(value, name: str, what: str, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TunewiseError(f"{name} must be a whole number, got {value!r}", field=field)
    if value < 1:
        raise TunewiseError(f"{name} must be at least 1 {what}, got {value}", field=field)
    return value


def _check_writable(folder: Path) -> None:
    """Create the runs folder if needed and prove it can be written (a probe file, so root's
    permission bypass and read-only mounts are caught the same way)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(prefix=".tunewise-probe-", dir=folder)
        os.close(handle)
        os.unlink(probe)
    except OSError as exc:
        raise TunewiseError(f"runs folder {folder} is not writable ({exc.strerror or exc}): the job writes its run "
                            "directory there; give --runs-dir a folder on a filesystem shared with the nodes that "
                            "you can write", field="runs_dir") from None


def _host_ram(plan: Plan) -> tuple[int, str] | None:
    """The planner's host RAM per node for `plan` ((bytes, how)), or None when its model cannot be
    sized offline (then the job asks for no particular amount)."""
    from advisor import cluster, memory, specs

    try:
        spec = specs.resolve_model(plan.model.name, allow_hub=False)
        return cluster.host_memory(spec, memory.setup_from_plan(plan), on_cpu=plan.hardware.device == "cpu")
    except TunewiseError:
        return None


def job_accelerate_config(plan: Plan, port: int, main_ip: str | None) -> dict:
    """The multi-node `accelerate launch` config: the plan's strategy (trainer.accelerate_config), its
    N machines and N x G processes in all; every node overrides machine_rank and the main address on
    its command line."""
    from trainer.accelerate_config import accelerate_config

    hardware = plan.hardware
    world = hardware.num_nodes * hardware.num_gpus
    # The job runs elsewhere: the plan alone says CPU or GPU (not whether this machine has one).
    config = accelerate_config(plan, on_cpu=hardware.device == "cpu")
    config.update(num_processes=world, num_machines=hardware.num_nodes, machine_rank=0, main_process_port=port,
                  rdzv_backend="static", same_network=True)
    if main_ip:
        config["main_process_ip"] = main_ip
    if world == 1:
        config["distributed_type"] = "NO"
        config.pop("fsdp_config", None)
    return config


def _q(value) -> str:
    return shlex.quote(str(value))


def _comment(text: str) -> str:
    """Text safe inside a `#` comment line of a script: no line breaks or other control characters."""
    return re.sub(r"[\x00-\x1f\x7f]+", " ", str(text))


#: What a partition, a time limit or a host address may contain (they go into #SBATCH lines and scripts).
_PLAIN = re.compile(r"^[A-Za-z0-9_.,:@+/-]+$")


def _node_script(plan: Plan, run_dir: Path, run_id: str, port: int, main_ip: str | None) -> str:
    hardware = plan.hardware
    nodes, world = hardware.num_nodes, hardware.num_nodes * hardware.num_gpus
    strategy = {"none": "DDP", "zero2": "FSDP SHARD_GRAD_OP (ZeRO-2)", "zero3": "FSDP FULL_SHARD (ZeRO-3)"}[hardware.shard]
    main_default = f'\nif [ -z "$MAIN_IP" ]; then MAIN_IP={_q(main_ip)}; fi' if main_ip else ""
    return f"""#!/usr/bin/env bash
# One node's share of Tunewise run {run_id}: {_comment(plan.summary())}
# {nodes} node{'s' if nodes > 1 else ''} x {hardware.num_gpus} process{'es' if hardware.num_gpus > 1 else ''} = {world}, {strategy}. Written by `tunewise job`.
# MACHINE_RANK is this node's rank (0 is the main node), MAIN_IP the main node's address. Slurm and
# SkyPilot set both (job.sbatch, sky.yaml); by hand: MACHINE_RANK=1 MAIN_IP=10.0.0.5 bash launch_node.sh
set -uo pipefail
JOB_DIR="$(cd "$(dirname "${{BASH_SOURCE[0]}}")" && pwd)"
RUN_DIR={_q(run_dir)}
PY="${{TUNEWISE_PYTHON:-}}"
if [ -z "$PY" ]; then PY={_q(sys.executable)}; fi
ROOT="${{TUNEWISE_ROOT:-}}"
if [ -z "$ROOT" ]; then ROOT={_q(REPO_ROOT)}; fi
export PYTHONPATH="$ROOT${{PYTHONPATH:+:$PYTHONPATH}}"
export PYTHONUNBUFFERED=1
MACHINE_RANK="${{MACHINE_RANK:-${{SLURM_NODEID:-${{SKYPILOT_NODE_RANK:-}}}}}}"
MAIN_IP="${{MAIN_IP:-}}"{main_default}
if [ -z "$MACHINE_RANK" ] || [ -z "$MAIN_IP" ]; then
  echo "launch_node.sh: set MACHINE_RANK (0 to {nodes - 1}) and MAIN_IP (the main node's address)" >&2
  exit 2
fi
if [ "$MACHINE_RANK" = 0 ]; then
  # Outside Slurm (whose --output already is the run's stdout.log) the main node keeps a copy there.
  if [ -z "${{SLURM_JOB_ID:-}}" ]; then exec > >(tee -a "$RUN_DIR/{STDOUT_FILE}") 2>&1; fi
  # start prints the attempt's id, so the exit below is recorded on this attempt even if another has begun.
  ATTEMPT="$("$PY" -m trainer.jobs start "$JOB_DIR")" || exit $?
fi
mapfile -t RESUME < <("$PY" -m trainer.jobs resume-args "$RUN_DIR")
"$PY" -m accelerate.commands.launch --config_file "$JOB_DIR/{ACCELERATE_CONFIG_FILE}" \\
  --num_machines {nodes} --num_processes {world} --machine_rank "$MACHINE_RANK" \\
  --main_process_ip "$MAIN_IP" --main_process_port {port} \\
  -m trainer.runner "$RUN_DIR" "${{RESUME[@]}}"
code=$?
if [ "$MACHINE_RANK" = 0 ]; then
  "$PY" -m trainer.jobs record-exit "$RUN_DIR" --code "$code" --attempt "$ATTEMPT"
fi
exit "$code"
"""


def _sbatch_script(plan: Plan, run_dir: Path, job_dir: Path, run_id: str, host: tuple[int, str] | None,
                   partition: str | None, time_limit: str | None) -> str:
    hardware = plan.hardware
    on_cpu = hardware.device == "cpu"
    label = re.sub(r"[^A-Za-z0-9_.-]+", "-", plan.name or run_id)[:40]
    lines = [
        "#!/bin/bash",
        f"# Tunewise run {run_id}: {_comment(plan.summary())}",
        f"# Submit: sbatch {_q(job_dir / SBATCH_FILE)}   Watch: tunewise status {run_id} --runs-dir {_q(run_dir.parent)}",
        "# Stop: tunewise stop (cooperative: it saves a checkpoint); if it does not answer, scancel <job id>.",
        "# Continue: tunewise resume (or submit this script again: it resumes from the newest checkpoint).",
        f"#SBATCH --job-name=tunewise-{label}",
        f"#SBATCH --nodes={hardware.num_nodes}",
        "#SBATCH --ntasks-per-node=1",
    ]
    if not on_cpu:
        lines += [f"#SBATCH --gpus-per-node={hardware.num_gpus}",
                  "# Whole nodes: multi-node training wants every GPU, CPU and NIC of them.",
                  "#SBATCH --exclusive"]
    if host is not None:
        host_bytes, how = host
        lines += [f"# Host RAM per node from the planner: {how}.",
                  f"#SBATCH --mem={-(-host_bytes // 2**20)}M"]
    if partition:
        lines.append(f"#SBATCH --partition={partition}")
    if time_limit:
        lines.append(f"#SBATCH --time={time_limit}")
    lines += [
        f"#SBATCH --output={run_dir / STDOUT_FILE}",
        "#SBATCH --open-mode=append",
        "set -uo pipefail",
        f"JOB_DIR={_q(job_dir)}",
        "# The first node of the allocation is the main node (machine rank 0 = SLURM_NODEID 0); each node",
        "# takes its rank from SLURM_NODEID, not from a MACHINE_RANK sbatch copied from the submitter.",
        'export MAIN_IP="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"',
        "unset MACHINE_RANK",
        'srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash "$JOB_DIR/launch_node.sh"',
        "",
    ]
    return "\n".join(lines)


def _sky_yaml(plan: Plan, job_dir: Path, run_dir: Path, run_id: str, host: tuple[int, str] | None,
              bucket: str | None) -> str:
    hardware = plan.hardware
    remote_job = f"~/tunewise-jobs/{run_id}"
    resources: dict = {}
    if hardware.device == "cpu":
        resources["cpus"] = f"{hardware.num_gpus}+"
    else:
        resources["accelerators"] = f"{SKY_ACCELERATORS[hardware.gpu]}:{hardware.num_gpus}"
    if host is not None:
        resources["memory"] = f"{-(-host[0] // 10**9)}+"
    file_mounts: dict = {remote_job: str(job_dir)}
    if bucket:
        # The runs folder on every node is the bucket (MOUNT_CACHED: appends and renames work, written back
        # asynchronously); mount the same bucket where you watch it.
        file_mounts[str(run_dir.parent)] = {"source": bucket, "mode": "MOUNT_CACHED"}
    task = {
        "name": f"tunewise-{run_id.split('-')[-1]}",
        "num_nodes": hardware.num_nodes,
        "resources": resources,
        "workdir": str(REPO_ROOT),
        "file_mounts": file_mounts,
        "envs": {"TUNEWISE_PYTHON": "python"},
        "setup": "pip install -e .\n",
        "run": (
            "# The workdir (this Tunewise checkout) is the current directory on every node.\n"
            'export TUNEWISE_ROOT="$PWD"\n'
            'export MACHINE_RANK="$SKYPILOT_NODE_RANK"\n'
            'export MAIN_IP="$(echo "$SKYPILOT_NODE_IPS" | head -n 1)"\n'
            f"bash {remote_job}/{NODE_SCRIPT}\n"
        ),
    }
    where = (f"the bucket {bucket} is mounted at {run_dir.parent} on every node"
             if bucket else f"{run_dir.parent} must be a filesystem every node mounts at that path, or give --bucket")
    header = (f"# Tunewise run {run_id}: {_comment(plan.summary())}\n"
              f"# Launch: sky launch -c {task['name']} {job_dir / SKY_FILE}   (the run directory: {where})\n"
              f"# Watch: tunewise status {run_id} --runs-dir {run_dir.parent}; stop: tunewise stop (if it does not "
              f"answer: sky cancel {task['name']} --all)\n")
    return header + yaml.dump(task, Dumper=_BlockDumper, sort_keys=False)


class _BlockDumper(yaml.SafeDumper):
    """Writes multi-line strings (setup, run) as YAML literal blocks, as people write them."""


def _block_str(dumper, value: str):
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_BlockDumper.add_representer(str, _block_str)


def _job_readme(job: "Job", plan: Plan, host: tuple[int, str] | None, port: int) -> str:
    runs = Path(job.run_dir).parent
    how = {
        "slurm": f"```bash\nsbatch {job.job_dir}/{SBATCH_FILE}\n```\n\n`srun` starts `launch_node.sh` once on each "
                 "of the allocation's nodes; the first is the main node.",
        "skypilot": f"```bash\nsky launch -c {job.submit_command[-2] if job.submit_command else 'CLUSTER'} "
                    f"{job.job_dir}/{SKY_FILE}\n```\n\nSkyPilot provisions {job.nodes} node"
                    f"{'s' if job.nodes > 1 else ''}, installs this checkout (`setup`) and runs `launch_node.sh` on "
                    "each (`run`). The runs folder must be shared storage mounted at the same path on the nodes "
                    "and where you watch (a bucket with `--bucket`, or a network filesystem).",
        "torchrun": "Run on each node, the main node (rank 0) first:\n\n```bash\n" + "\n".join(job.node_commands)
                    + "\n```\n\nEach runs `accelerate launch --num_machines "
                    f"{job.nodes} --machine_rank R --main_process_ip MAIN_IP --main_process_port {port}` (torchrun "
                    "underneath).",
    }[job.scheduler]
    ram = f"\nHost RAM per node (planner): {host[0] / 1e9:.1f} GB: {host[1]}.\n" if host else ""
    return f"""# Tunewise cluster job: run {job.run_id}

{plan.summary()}: {job.nodes} node{'s' if job.nodes > 1 else ''} x {job.gpus_per_node}, {job.scheduler}.
{ram}
## Submit

{how}

The job trains in the run directory `{job.run_dir}`: `plan.yaml`, `events.jsonl` (rank 0 writes it),
`checkpoints/`, `stdout.log` and the exit record in `run.json`, as a local run.

## Watch, stop, continue

From any machine that sees `{runs}`:

```bash
tunewise status {job.run_id} --runs-dir {runs}
tunewise stop {job.run_id} --runs-dir {runs}     # cooperative: the trainer saves a checkpoint and exits
tunewise resume {job.run_id} --runs-dir {runs}   # submits the job again; it continues from the newest checkpoint
python app.py --runs-dir {runs}                  # the wizard: Results & runs -> Watch
```

Stop writes the run's STOP file; the trainer sees it after the current step. If the job does not answer
within the timeout (`--timeout`, 30 s), Slurm jobs are cancelled with `scancel <job id>` when `scancel`
is on the PATH; otherwise cancel it yourself (`scancel`, `sky cancel <cluster> --all`, or Ctrl-C on
each node for torchrun). A job submitted again while a stop is pending stops at once: `tunewise resume`
clears the request first.

## Files

- `plan.yaml`: the plan
- `{ACCELERATE_CONFIG_FILE}`: the `accelerate launch` config ({job.nodes} machines, {job.nodes * job.gpus_per_node} processes)
- `{NODE_SCRIPT}`: what each node runs
""" + {"slurm": f"- `{SBATCH_FILE}`: the Slurm batch script\n",
       "skypilot": f"- `{SKY_FILE}`: the SkyPilot task\n", "torchrun": ""}[job.scheduler] + \
        f"- `{JOB_FILE}`: the layout, for the node-side commands (`python -m trainer.jobs`)\n"


def write_job(plan: Plan, scheduler: str, runs_dir: str | Path | None = None, *, nodes: int | None = None,
              gpus_per_node: int | None = None, out: str | Path | None = None, name: str | None = None,
              port: int = DEFAULT_PORT, main_ip: str | None = None, partition: str | None = None,
              time_limit: str | None = None, bucket: str | None = None) -> Job:
    """Create the run directory and write the job folder for `plan` on `scheduler` (see the module
    docstring); `nodes` / `gpus_per_node` override the plan's layout. Nothing is submitted here."""
    if scheduler not in SCHEDULERS:
        raise TunewiseError(f"scheduler: {scheduler!r} is not one of {', '.join(SCHEDULERS)}", field="scheduler")
    nodes = _whole(plan.hardware.num_nodes if nodes is None else nodes, "--nodes", "(a machine)", "hardware.num_nodes")
    per_node = _whole(plan.hardware.num_gpus if gpus_per_node is None else gpus_per_node, "--gpus-per-node",
                      "(a GPU, or a CPU process on a CPU plan)", "hardware.num_gpus")
    # A job puts them on real nodes: the per-node limit holds for one node too.
    check_gpus_per_node(plan.hardware.gpu, per_node, nodes)
    plan = absolute_paths(plan.with_overrides({"hardware.num_nodes": nodes, "hardware.num_gpus": per_node}))
    if name:
        plan = plan.with_overrides({"name": name})
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        raise TunewiseError(f"--port must be a TCP port from 1 to 65535, got {port!r}", field="port")
    if scheduler == "skypilot" and plan.hardware.device != "cpu" and plan.hardware.gpu not in SKY_ACCELERATORS:
        raise TunewiseError("hardware.gpu: a SkyPilot job asks the cloud for a GPU type: set the plan's hardware.gpu "
                            f"to one of {', '.join(SKY_ACCELERATORS)}, got {plan.hardware.gpu!r}", field="hardware.gpu")
    if bucket and scheduler != "skypilot":
        raise TunewiseError("--bucket mounts a bucket as the runs folder of a SkyPilot job; this is a "
                            f"{scheduler} job (its runs folder must be a shared filesystem)", field="bucket")
    for flag, value in (("--partition", partition), ("--time", time_limit), ("--main-ip", main_ip)):
        if value is not None and not _PLAIN.match(value):
            raise TunewiseError(f"{flag} {value!r}: use letters, digits and . , : @ + / - only (it goes into the job "
                                "script)", field=flag.lstrip("-"))
    base = Path(runs_dir).expanduser() if runs_dir else default_runs_dir()
    base = base.resolve()
    if re.search(r"[\x00-\x1f\x7f]", str(base)) or (scheduler == "slurm" and re.search(r"\s", str(base))):
        raise TunewiseError(f"runs folder {str(base)!r}: a job's scripts name it, and "
                            + ("Slurm's #SBATCH lines cannot quote spaces" if scheduler == "slurm" else
                               "it has a line break or another control character") + ": choose another folder",
                            field="runs_dir")
    _check_writable(base)
    if out is not None:
        out_dir = Path(out).expanduser().resolve()
        if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
            raise TunewiseError(f"--out {out_dir} already exists and is not an empty folder: give a new one", field="out")
    run_id = new_run_id(plan, name)
    run_dir = base / run_id
    job_dir = out_dir if out is not None else run_dir / JOB_DIR
    run_dir.mkdir()
    job_dir.mkdir(parents=True, exist_ok=True)
    plan.save(run_dir / PLAN_FILE)
    plan.save(job_dir / PLAN_FILE)
    host = _host_ram(plan)
    config = job_accelerate_config(plan, port, main_ip)
    (job_dir / ACCELERATE_CONFIG_FILE).write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    script = job_dir / NODE_SCRIPT
    script.write_text(_node_script(plan, run_dir, run_id, port, main_ip), encoding="utf-8")
    script.chmod(0o755)
    files = [PLAN_FILE, ACCELERATE_CONFIG_FILE, NODE_SCRIPT]
    submit_command: tuple[str, ...] = ()
    node_commands: tuple[str, ...] = ()
    cluster_name = None
    if scheduler == "slurm":
        (job_dir / SBATCH_FILE).write_text(_sbatch_script(plan, run_dir, job_dir, run_id, host, partition, time_limit),
                                           encoding="utf-8")
        files.append(SBATCH_FILE)
        submit_command = ("sbatch", str(job_dir / SBATCH_FILE))
    elif scheduler == "skypilot":
        (job_dir / SKY_FILE).write_text(_sky_yaml(plan, job_dir, run_dir, run_id, host, bucket), encoding="utf-8")
        files.append(SKY_FILE)
        cluster_name = f"tunewise-{run_id.split('-')[-1]}"
        submit_command = ("sky", "launch", "-y", "--detach-run", "-c", cluster_name, str(job_dir / SKY_FILE))
    else:
        main = main_ip or "MAIN_NODE_ADDRESS"
        node_commands = tuple(f"MACHINE_RANK={rank} MAIN_IP={main} bash {_q(job_dir / NODE_SCRIPT)}" for rank in range(nodes))
    job_info = {
        "run_id": run_id, "run_dir": str(run_dir), "scheduler": scheduler, "nodes": nodes, "gpus_per_node": per_node,
        "port": port, "main_ip": main_ip, "repo_root": str(REPO_ROOT), "python": sys.executable,
        "created_at": time.time(), "submit_command": list(submit_command), "cluster_name": cluster_name,
        "host_ram_bytes": host[0] if host else None,
    }
    (job_dir / JOB_FILE).write_text(json.dumps(job_info, indent=1), encoding="utf-8")
    files += [JOB_FILE, README_FILE]
    job = Job(run_id, str(run_dir), str(job_dir), scheduler, nodes, per_node, tuple(files), submit_command, node_commands)
    (job_dir / README_FILE).write_text(_job_readme(job, plan, host, port), encoding="utf-8")
    write_json_atomic(run_dir / RUN_FILE, {
        "run_id": run_id, "name": name or plan.name, "created_at": time.time(), "summary": plan.summary(),
        "job": {"scheduler": scheduler, "job_dir": str(job_dir), "nodes": nodes, "gpus_per_node": per_node,
                "cluster_name": cluster_name},
        "attempts": [],
    })
    return job


# -- submitting ---------------------------------------------------------------------------------------


def check_can_submit(scheduler: str) -> None:
    """Refuse `--submit` clearly when the scheduler's command is not on this machine's PATH."""
    if scheduler == "torchrun":
        raise TunewiseError("--submit: a torchrun job has no scheduler to submit to: run launch_node.sh on each node "
                            "(the command for each is printed, and in the job's README.md)", field="submit")
    command = {"slurm": "sbatch", "skypilot": "sky"}[scheduler]
    if shutil.which(command) is None:
        where = ("this machine is not a Slurm submit host: run it on the cluster's login node, or submit the written "
                 "job there with `sbatch JOB_DIR/job.sbatch`" if scheduler == "slurm" else
                 "install SkyPilot (`pip install skypilot`) and configure a cloud, or run `sky launch` where it is")
        raise TunewiseError(f"--submit needs `{command}` on the PATH, and there is none: {where}. Nothing was written.",
                            field="submit")


def _new_attempt(scheduler: str, job_dir: str, events_path: Path) -> dict:
    now = time.time()
    return {
        "scheduler": scheduler, "attempt_id": secrets.token_hex(4), "job_id": None, "job_dir": job_dir, "submitted_at": now,
        # started_at is when the attempt began as far as status() is concerned; the first node resets it
        # to its own clock when the job starts (the clock the events are written with).
        "started_at": now, "job_started_at": None, "command": None, "cwd": None, "resume_from": None,
        "events_offset": events_path.stat().st_size if events_path.exists() else 0,
        "watcher_pid": None, "pid": None, "pid_start": None, "ended_at": None, "exit_code": None, "signal": None,
    }


def _submit(run_dir: Path, job_dir: Path) -> str:
    """Record a queued attempt, hand the job to its scheduler, record the job id; return it."""
    job_info = read_json(job_dir / JOB_FILE)
    scheduler = job_info.get("scheduler")
    check_can_submit(scheduler)
    with _run_info(run_dir) as info:
        info.setdefault("attempts", []).append(_new_attempt(scheduler, str(job_dir), run_dir / EVENTS_FILE))
    if scheduler == "slurm":
        command = ["sbatch", "--parsable", str(job_dir / SBATCH_FILE)]
    else:
        command = ["sky", "launch", "-y", "--detach-run", "-c", job_info["cluster_name"], str(job_dir / SKY_FILE)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=600 if scheduler == "skypilot" else 60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        done = subprocess.CompletedProcess(command, 1, "", str(exc))
    if done.returncode != 0:
        with _run_info(run_dir) as info:
            info["attempts"].pop()
        message = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise TunewiseError(f"{command[0]} refused the job (exit {done.returncode}): {' '.join(message)}", field="submit")
    job_id = done.stdout.strip().split(";")[0] if scheduler == "slurm" else job_info["cluster_name"]
    with _run_info(run_dir) as info:
        attempt = info["attempts"][-1]
        if attempt.get("job_id") in (None, job_id):
            attempt["job_id"] = job_id
    return job_id


def submit(job: Job) -> Job:
    """Submit a written job (sbatch / sky launch); return it with its job id."""
    return replace(job, job_id=_submit(Path(job.run_dir), Path(job.job_dir)))


def resubmit(run_dir: Path) -> tuple[Path, list[tuple[Path, str]], str, int]:
    """`tunewise resume` for a cluster run (the supervisor calls it under the run's lock): submit its job
    again; its first node continues from the newest complete checkpoint. Returns (that checkpoint, the
    damaged newer ones passed over with what is wrong, a line saying so, where the new attempt's events
    begin in events.jsonl)."""
    info = read_json(run_dir / RUN_FILE)
    job = info.get("job") if isinstance(info.get("job"), dict) else {}
    job_dir = Path(job.get("job_dir") or run_dir / JOB_DIR)
    job_info = read_json(job_dir / JOB_FILE)
    scheduler = job_info.get("scheduler") or "torchrun"
    checkpoint, skipped = resumable_checkpoint(run_dir)
    if checkpoint is None:
        raise TunewiseError(f"run {run_dir.name} has no checkpoint in {run_dir / CHECKPOINTS_DIR} to resume from "
                            "(set training.save_steps to checkpoint during training; a stop always saves one)")
    if scheduler == "torchrun":
        raise TunewiseError(f"run {run_dir.name} is a torchrun job: start launch_node.sh on each node again (see "
                            f"{job_dir / README_FILE}); it continues from the newest checkpoint")
    try:
        check_can_submit(scheduler)
    except TunewiseError:
        again = f"sbatch {job_dir / SBATCH_FILE}" if scheduler == "slurm" else f"sky launch {job_dir / SKY_FILE}"
        raise TunewiseError(f"run {run_dir.name} is a {scheduler} job and `{'sbatch' if scheduler == 'slurm' else 'sky'}` "
                            f"is not on this machine's PATH: delete {run_dir / STOP_FILE} if present and run `{again}` "
                            "where it is; the job continues from the newest checkpoint") from None
    (run_dir / STOP_FILE).unlink(missing_ok=True)
    events = run_dir / EVENTS_FILE
    offset = events.stat().st_size if events.exists() else 0
    job_id = _submit(run_dir, job_dir)
    damaged = "".join(f"{path.name} is damaged ({problem}); " for path, problem in skipped)
    message = (f"{damaged}submitted again as {scheduler} job {job_id}; it resumes from {checkpoint.name} "
               f"(step {checkpoint_step(checkpoint)}) when it starts")
    return checkpoint, skipped, message, offset


# -- stopping a job that does not answer ----------------------------------------------------------------------


def force_stop(run_dir: Path, attempt: dict, timeout: float) -> RunStatus:
    """A scheduler job did not stop within `timeout` s of the STOP file: cancel it (Slurm: scancel, when
    on the PATH), record it as stopped, and return its status; otherwise say how to cancel it."""
    scheduler, job_id = attempt.get("scheduler"), attempt.get("job_id")
    if scheduler != "slurm" or not job_id or shutil.which("scancel") is None:
        how = {"slurm": f"scancel {job_id}" if job_id else "scancel <job id>",
               "skypilot": f"sky cancel {job_id or '<cluster>'} --all"}.get(scheduler, "Ctrl-C launch_node.sh on each node")
        raise TunewiseError(f"run {run_dir.name} did not stop within {timeout:g} s of the request and this machine "
                            f"cannot cancel its {scheduler} job{' (no scancel on the PATH)' if scheduler == 'slurm' else ''}: "
                            f"cancel it with `{how}` where the scheduler runs; the STOP request stays, so it stops "
                            "at its next step if it is still alive")
    subprocess.run(["scancel", str(job_id)], capture_output=True, text=True, timeout=30)
    deadline = time.time() + CANCEL_WAIT_S
    while time.time() < deadline:
        attempts = read_json(run_dir / RUN_FILE).get("attempts") or [{}]
        if attempts[-1].get("ended_at") or slurm_job_alive(job_id, fresh=True) is False:
            break
        time.sleep(0.5)
    with _run_info(run_dir) as info:
        current = info["attempts"][-1]
        events, _ = read_events(run_dir / EVENTS_FILE, current.get("events_offset", 0))
        if not any(event.get("event") in TERMINAL_EVENTS for event in events):
            step = max((e["step"] for e in events if isinstance(e.get("step"), int)), default=0)
            EventWriter(run_dir / EVENTS_FILE).emit(
                "stopped", step=step, reason=f"did not stop in time after the request; cancelled with scancel {job_id}",
                forced=True, signal=int(signal.SIGTERM))
        if not current.get("ended_at"):
            current.update(ended_at=time.time(), signal=int(signal.SIGTERM))
    return derive_status(run_dir)


# -- the node-side commands: python -m trainer.jobs start | resume-args | record-exit --------------------------


def _job_id_from_env(scheduler: str) -> str | None:
    if scheduler == "slurm":
        return os.environ.get("SLURM_JOB_ID")
    if scheduler == "skypilot":
        return os.environ.get("SKYPILOT_TASK_ID")
    return None


def start(job_dir: Path) -> int:
    """On the main node before training: make sure the run directory is there, refuse a finished run
    or a pending stop, write `resumed` when continuing from a checkpoint, and claim the attempt."""
    job_info = read_json(job_dir / JOB_FILE)
    if not job_info:
        print(f"tunewise: {job_dir / JOB_FILE} is missing or unreadable: this is not a job folder", file=sys.stderr)
        return 2
    run_dir = Path(job_info["run_dir"])
    scheduler = job_info["scheduler"]
    run_dir.mkdir(parents=True, exist_ok=True)
    if not (run_dir / PLAN_FILE).is_file():  # e.g. a bucket mounted empty on the nodes
        shutil.copyfile(job_dir / PLAN_FILE, run_dir / PLAN_FILE)
    with _run_info(run_dir) as info:
        info.setdefault("run_id", job_info["run_id"])
        info.setdefault("created_at", time.time())
        info.setdefault("job", {"scheduler": scheduler, "job_dir": str(job_dir), "nodes": job_info["nodes"],
                                "gpus_per_node": job_info["gpus_per_node"], "cluster_name": job_info.get("cluster_name")})
        info.setdefault("attempts", [])
    events = read_events(run_dir / EVENTS_FILE, 0)[0]
    terminal = [e for e in events if e.get("event") in TERMINAL_EVENTS]
    writer = EventWriter(run_dir / EVENTS_FILE)
    if terminal and terminal[-1]["event"] == "finished":
        print(f"tunewise: run {run_dir.name} has finished: there is nothing to resume (launch a new run)", file=sys.stderr)
        return NOT_STARTED_EXIT
    job_id = _job_id_from_env(scheduler)
    checkpoint = last_checkpoint(run_dir)
    if (run_dir / STOP_FILE).exists():
        reason = (run_dir / STOP_FILE).read_text(encoding="utf-8", errors="replace").strip() or "stop requested"
        with _run_info(run_dir) as info:
            attempt = _claim(info, scheduler, job_id, str(job_dir), run_dir)
            attempt.update(ended_at=time.time(), exit_code=0)
        writer.emit("stopped", step=max((e["step"] for e in events if isinstance(e.get("step"), int)), default=0),
                    reason=f"{reason} (before the job started)")
        print(f"tunewise: a stop was requested for run {run_dir.name} ({run_dir / STOP_FILE}): not starting; "
              "`tunewise resume` clears it and submits again", file=sys.stderr)
        return NOT_STARTED_EXIT
    if events:  # an earlier attempt ran: this one continues
        state = terminal[-1]["event"] if terminal else "interrupted"
        step = checkpoint_step(checkpoint) if checkpoint is not None else 0
        writer.emit("resumed", step=step, checkpoint=str(checkpoint) if checkpoint else None, previous_state=state,
                    scheduler=scheduler, job_id=job_id)
    for stale in (run_dir / PROCS_DIR).glob("rank*.pid"):
        stale.unlink(missing_ok=True)
    with _run_info(run_dir) as info:
        attempt = _claim(info, scheduler, job_id, str(job_dir), run_dir)
        now = time.time()
        attempt.update(started_at=now, job_started_at=now, host=platform.node(), resume_from=str(checkpoint) if checkpoint else None,
                       command=["bash", str(job_dir / NODE_SCRIPT)],
                       events_offset=(run_dir / EVENTS_FILE).stat().st_size if (run_dir / EVENTS_FILE).exists() else 0)
    print(f"tunewise: run {run_dir.name}, {scheduler} job {job_id or '(by hand)'} on {platform.node()}"
          + (f", resuming from {checkpoint}" if checkpoint else ""), file=sys.stderr, flush=True)
    print(attempt["attempt_id"], flush=True)  # launch_node.sh hands it to record-exit
    return 0


def _claim(info: dict, scheduler: str, job_id: str | None, job_dir: str, run_dir: Path) -> dict:
    """The attempt this job is: the one `tunewise job --submit` / `resume` recorded for it, else a new one."""
    attempts = info.setdefault("attempts", [])
    last = attempts[-1] if attempts else None
    if (last and last.get("scheduler") == scheduler and not last.get("job_started_at") and not last.get("ended_at")
            and last.get("job_id") in (None, job_id)):
        last["job_id"] = job_id
        return last
    attempt = _new_attempt(scheduler, job_dir, run_dir / EVENTS_FILE)
    attempt.update(job_id=job_id, submitted_at=None)
    attempts.append(attempt)
    return attempt


def resume_args(run_dir: Path) -> list[str]:
    """The runner's resume arguments on every node: the newest complete checkpoint, if any."""
    checkpoint = last_checkpoint(run_dir)
    return ["--resume", str(checkpoint)] if checkpoint is not None else []


def record_exit(run_dir: Path, code: int, attempt_id: str | None = None) -> int:
    """After `accelerate launch` returned on the main node: record the exit in this job's attempt (by its
    id: a resume may already have added the next one) and, when the trainer ended without its own
    terminal event, write one (as the local watcher does)."""
    killed_by = code - 128 if code > 128 and code - 128 in {int(s) for s in signal.Signals} else None
    with _run_info(run_dir) as info:
        attempts = info.setdefault("attempts", [])
        mine = [a for a in attempts if attempt_id and a.get("attempt_id") == attempt_id]
        if not mine and not attempts:
            attempts.append({})
        attempt = mine[0] if mine else attempts[-1]
        attempt.update(ended_at=time.time(), exit_code=None if killed_by else code, signal=killed_by)
        events, _ = read_events(run_dir / EVENTS_FILE, attempt.get("events_offset", 0))
        later = attempt is not attempts[-1]
    if later:  # resumed already, which needs this attempt to have ended with its own terminal event
        return 0
    if any(event.get("event") in TERMINAL_EVENTS for event in events):
        return 0
    writer = EventWriter(run_dir / EVENTS_FILE)
    step = max((e["step"] for e in events if isinstance(e.get("step"), int)), default=0)
    lines = _tail(run_dir)
    if (run_dir / STOP_FILE).exists() and killed_by is not None:
        writer.emit("stopped", step=step, reason=f"did not stop in time after the request; killed (signal {killed_by})",
                    signal=killed_by, forced=True)
    elif killed_by is not None:
        writer.emit("failed", step=step, error=f"the job's trainer was killed by signal {killed_by} (see stdout.log)",
                    signal=killed_by, lines=lines)
    elif code == 0:
        writer.emit("failed", step=step, error="the job's trainer exited without reporting a result (see stdout.log)",
                    exit_code=0, lines=lines)
    else:
        writer.emit("failed", step=step, error=f"the job's trainer exited with code {code} without reporting an error "
                    "(see stdout.log)", exit_code=code, lines=lines)
    return 0


# -- `tunewise job` -------------------------------------------------------------------------------------------


def cmd_job(args: argparse.Namespace) -> int:
    if args.submit:
        check_can_submit(args.scheduler)  # before anything is written
    plan = Plan.load(args.plan)
    nodes = getattr(args, "hardware.num_nodes")
    job = write_job(plan, args.scheduler, args.runs_dir, nodes=nodes, gpus_per_node=args.gpus_per_node,
                    out=args.out, name=args.name, port=args.port, main_ip=args.main_ip, partition=args.partition,
                    time_limit=args.time, bucket=args.bucket)
    if args.submit:
        job = submit(job)
    if args.json:
        print(json.dumps(job.to_dict(), indent=2))
    else:
        print(job.describe())
    return 0


def register(subparsers) -> None:
    """Add `tunewise job` to the parser. --nodes and --name are the plan's own settings (their flags and help
    come from advisor.plan.settings()); the rest says how to run the job, not what to train."""
    from advisor.cli import add_plan_flags
    from advisor.plan import find_setting

    job = subparsers.add_parser(
        "job",
        help="write a cluster job (Slurm, SkyPilot or torchrun) for a plan; --submit hands it to the scheduler",
        description="Write a self-contained job folder that trains PLAN over N nodes x G GPUs in a run directory the "
                    "wizard and `tunewise status / stop / resume` watch, like a local run.",
    )
    job.add_argument("plan", help="a plan file (YAML), e.g. from `tunewise recommend --save` or the wizard")
    job.add_argument("--scheduler", required=True, choices=SCHEDULERS,
                     help="slurm (sbatch script), skypilot (task YAML) or torchrun (a command per node)")
    add_plan_flags(job, [find_setting("hardware.num_nodes"), find_setting("name")],
                   defaults={"hardware.num_nodes": "the plan's", "name": "the plan's"})
    job.add_argument("--gpus-per-node", type=int, help="GPUs per machine, CPU processes on a CPU plan "
                     "(the plan's hardware.num_gpus, per node; default: the plan's)")
    job.add_argument("--runs-dir", help="the runs folder, on storage every node and the watching machine share "
                     "(default: $TUNEWISE_RUNS_DIR or ./runs)")
    job.add_argument("--out", help="the job folder (default: <run dir>/job)")
    job.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"rendezvous port on the main node (default {DEFAULT_PORT})")
    job.add_argument("--main-ip", help="torchrun: the main node's address (else set MAIN_IP on each node)")
    job.add_argument("--partition", help="slurm: the partition (#SBATCH --partition)")
    job.add_argument("--time", help="slurm: the time limit (#SBATCH --time), e.g. 24:00:00")
    job.add_argument("--bucket", help="skypilot: a bucket (s3://, gs://, r2://...) mounted as the runs folder on every node")
    job.add_argument("--submit", action="store_true", help="submit it: sbatch (slurm) or sky launch (skypilot)")
    job.add_argument("--json", action="store_true", help="print the job as JSON")
    job.set_defaults(func=cmd_job)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.jobs", description="A cluster job's node-side steps.")
    sub = parser.add_subparsers(dest="command", required=True)
    begin = sub.add_parser("start", help="on the main node, before training: claim the attempt in run.json")
    begin.add_argument("job_dir")
    args_of = sub.add_parser("resume-args", help="print the runner's resume arguments, one per line")
    args_of.add_argument("run_dir")
    ended = sub.add_parser("record-exit", help="on the main node, after training: record the exit code")
    ended.add_argument("run_dir")
    ended.add_argument("--code", type=int, required=True)
    ended.add_argument("--attempt", help="the attempt id `start` printed")
    args = parser.parse_args(argv)
    if args.command == "start":
        return start(Path(args.job_dir).resolve())
    if args.command == "resume-args":
        for item in resume_args(Path(args.run_dir)):
            print(item)
        return 0
    return record_exit(Path(args.run_dir), args.code, args.attempt)


if __name__ == "__main__":
    sys.exit(main())
