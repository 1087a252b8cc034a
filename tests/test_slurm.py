"""Slurm for real: a one-node cluster on this machine (Debian's slurm-wlm and munge, as .ci/run installs).

The `slurm_cluster` fixture writes a slurm.conf for localhost with this machine's CPU count and memory
(from `slurmd -C`), on free ports, with every file in a temporary folder; starts munged with its own
key and socket, slurmctld and slurmd (as root, which the daemons need); waits for `sinfo` to show the
node idle; and tears all three down (after cancelling any job left). Nothing outside the folder is
touched, so it can run beside another Slurm.

The end-to-end test is what a user does: the wizard's "Export a cluster job" writes the job, `sbatch`
submits it, the job trains the demo model, `tunewise status` and the wizard (its API, through
gradio_client against a served app) see its events while it runs, `tunewise stop` ends it
cooperatively with a checkpoint, `tunewise resume` submits it again and it continues from that
checkpoint. A second test stops a job still waiting in the queue (the partition is down), which
`tunewise stop` cancels with scancel.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import free_port, start_app, stop_app, wait_for

from trainer.events import read_all_events

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
CLI = str(REPO / "cli.py")
TOOLS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "sinfo", "squeue", "scancel", "scontrol")


def _unavailable(reason: str):
    if os.environ.get("TUNEWISE_REQUIRE_SLURM") == "1":
        pytest.fail(f"Slurm test required but {reason}")
    pytest.skip(reason)


def tunewise(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, CLI, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


def _node_hardware() -> dict:
    """This machine as slurmd sees it (`slurmd -C`: CPUs, RealMemory in MB)."""
    line = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, timeout=30).stdout.splitlines()[0]
    fields = dict(item.split("=", 1) for item in line.split() if "=" in item)
    return {"CPUs": int(fields["CPUs"]), "RealMemory": int(fields["RealMemory"])}


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        _unavailable(f"Slurm is not installed (apt-get install slurm-wlm munge): no {', '.join(missing)}")
    if os.geteuid() != 0:
        _unavailable("the Slurm daemons of the test cluster run as root")
    base = tmp_path_factory.mktemp("slurm")
    base.chmod(0o700)
    for folder in ("munge", "state", "spool", "log"):
        (base / folder).mkdir(mode=0o700)
    key, sock = base / "munge" / "munge.key", base / "munge" / "munge.socket"
    subprocess.run(["mungekey", "--create", f"--keyfile={key}"], check=True, capture_output=True, timeout=30)
    key.chmod(0o600)
    host = socket.gethostname().split(".")[0]
    hardware = _node_hardware()
    conf = base / "slurm.conf"

    def write_conf():  # fresh ports on every call
        conf.write_text("\n".join([
            "ClusterName=tunewise-test",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={free_port()}",
            f"SlurmdPort={free_port()}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={sock}",
            f"StateSaveLocation={base / 'state'}",
            f"SlurmdSpoolDir={base / 'spool'}",
            f"SlurmctldPidFile={base / 'slurmctld.pid'}",
            f"SlurmdPidFile={base / 'slurmd.pid'}",
            f"SlurmctldLogFile={base / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={base / 'log' / 'slurmd.log'}",
            # No cgroups in a container: track processes by their parent pid, bind no tasks.
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "MpiDefault=none",
            "ReturnToService=2",
            "SchedulerType=sched/builtin",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "KillWait=10",
            f"NodeName={host} NodeAddr=127.0.0.1 CPUs={hardware['CPUs']} RealMemory={hardware['RealMemory']} State=UNKNOWN",
            f"PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP",
            "",
        ]))

    saved = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(conf)  # for sbatch, squeue, scancel here and in every subprocess
    logs = {name: open(base / "log" / f"{name}.out", "w") for name in ("munged", "slurmctld", "slurmd")}
    commands = {
        "munged": ["munged", "--foreground", "--force", f"--socket={sock}", f"--key-file={key}",
                   f"--pid-file={base / 'munge' / 'munged.pid'}", f"--log-file={base / 'munge' / 'munged.log'}",
                   f"--seed-file={base / 'munge' / 'munged.seed'}"],
        "slurmctld": ["slurmctld", "-D", "-f", str(conf)],
        "slurmd": ["slurmd", "-D", "-f", str(conf), "-N", host],
    }
    daemons: dict[str, subprocess.Popen] = {}

    def queue_empty() -> bool:
        done = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, timeout=10)
        return done.returncode != 0 or not done.stdout.strip()

    def teardown():
        if "slurmctld" in daemons and daemons["slurmctld"].poll() is None:
            # Cancel what is left and let it end while slurmd still runs: a job step's slurmstepd waits for
            # slurmd to hear it finish and would outlive the daemons otherwise.
            subprocess.run(["scancel", "--user", "root"], capture_output=True, timeout=30)
            try:
                wait_for(queue_empty, 60, "the test cluster's jobs to end", poll=0.5)
            except AssertionError:
                pass
        for name in ("slurmd", "slurmctld", "munged"):
            proc = daemons.get(name)
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        for log in logs.values():
            log.close()
        if saved is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = saved

    def idle():
        for name, proc in daemons.items():
            if proc.poll() is not None:
                raise AssertionError(f"{name} exited with {proc.returncode}: "
                                     f"{(base / 'log' / f'{name}.out').read_text()[-2000:]}")
        done = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True, timeout=10)
        return done.returncode == 0 and f"{host} idle" in done.stdout

    try:
        daemons["munged"] = subprocess.Popen(commands["munged"], stdout=logs["munged"], stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, start_new_session=True)
        wait_for(sock.exists, 20, "munged's socket")
        for attempt in range(3):
            # A port found free can still be taken before the daemon binds it: then start both on new ports.
            write_conf()
            for name in ("slurmctld", "slurmd"):
                daemons[name] = subprocess.Popen(commands[name], stdout=logs[name], stderr=subprocess.STDOUT,
                                                 stdin=subprocess.DEVNULL, start_new_session=True)
            try:
                wait_for(idle, 60, "the Slurm node to be idle")
                break
            except AssertionError as failed:
                if attempt == 2 or "Address already in use" not in str(failed):
                    raise
                for name in ("slurmd", "slurmctld"):
                    if daemons[name].poll() is None:
                        daemons[name].terminate()
                        daemons[name].wait(timeout=20)
        yield {"conf": conf, "host": host, "base": base}
    finally:
        teardown()


def _status(run_id: str, runs: Path) -> dict:
    done = tunewise("status", run_id, "--runs-dir", str(runs), "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _logged_steps(run_dir: Path, after: int = 0) -> list[int]:
    events = read_all_events(run_dir / "events.jsonl")
    return [e["step"] for e in events[after:] if e["event"] == "log"]


def test_a_job_exported_by_the_wizard_trains_under_slurm_and_is_watched_stopped_and_resumed(slurm_cluster, tmp_path):
    from gradio_client import Client

    runs = tmp_path / "shared" / "runs"
    runs.mkdir(parents=True)
    app, url = start_app(runs, "--no-warm-worker", log_path=tmp_path / "app.log")
    try:
        client = Client(url, verbose=False)
        # The wizard's plan over two 8-GPU nodes: the plan step shows what each node needs.
        status_md = client.predict(model="llama-2-7b", gpu="H100-80GB", num_gpus=8, num_nodes=2, method="full",
                                   shard="zero3", api_name="/estimate")[4]
        assert "per GPU (2 nodes x 8 GPUs, everything sharded (ZeRO-3 / FSDP))" in status_md and "GB of host RAM" in status_md
        # "Export a cluster job" for the demo model on the CPU (what this test cluster has).
        note = client.predict("slurm", model="demo", dataset="demo-sft", gpu="none", method="lora", max_steps=100000,
                              micro_batch=4, seq_len=128, api_name="/export_job")
        assert note.startswith("**Cluster job written**")
        job_dir = Path(re.search(r"\): `([^`]+)`", note).group(1))
        assert f"Submit it with `sbatch {job_dir / 'job.sbatch'}`" in note
        run_dir = job_dir.parent
        run_id = run_dir.name
        assert run_dir.parent == runs.resolve() and (run_dir / "plan.yaml").is_file()

        # Submit the folder the way the wizard says to.
        started_at = time.time()
        first = subprocess.run(["sbatch", "--parsable", str(job_dir / "job.sbatch")], capture_output=True, text=True,
                               timeout=60)
        assert first.returncode == 0, first.stderr
        first_id = first.stdout.strip().split(";")[0]

        running = wait_for(lambda: (s := _status(run_id, runs))["state"] == "running" and s["step"] >= 3 and s, 150,
                           "the Slurm job to log three steps")
        assert (running["scheduler"], running["job_id"], running["pid"]) == ("slurm", first_id, None)
        assert running["last_loss"] > 0
        squeue = subprocess.run(["squeue", "-h", "-j", first_id, "-o", "%T"], capture_output=True, text=True)
        assert squeue.stdout.strip() == "RUNNING"

        # The wizard on this runs folder: a fresh page attaches to the running job and draws its loss.
        watcher = Client(url, verbose=False)
        attached = watcher.predict(api_name="/attach")
        header, loss = attached[0], attached[1]
        assert "tw-badge-running" in header and run_id in header
        points = next(t["y"] for t in json.loads(loss["plot"])["data"] if t.get("name") == "training loss")
        assert len(points) >= 2
        step_then = int(re.search(r"step (\d+)", header).group(1))
        later = wait_for(lambda: (h := watcher.predict(api_name="/poll")[0]) and
                         int(re.search(r"step (\d+)", h).group(1)) > step_then and h, 60, "the wizard to see new steps")
        assert "tw-badge-running" in later
        history = watcher.predict(api_name="/runs")[0]
        assert [row[0] for row in history["data"]] == [run_id]

        stopped = tunewise("stop", run_id, "--runs-dir", str(runs), "--json", timeout=180)
        assert stopped.returncode == 0, stopped.stderr
        stopped = json.loads(stopped.stdout)
        assert stopped["state"] == "stopped" and stopped["reason"] == "stopped by the user"
        checkpoint = Path(stopped["checkpoint"])
        stop_step = int(checkpoint.name.split("-")[1])
        assert stop_step == stopped["step"] >= 3 and (checkpoint / "trainer_state.json").is_file()
        # The main node records the exit once the job step ends, and Slurm lets the job go.
        wait_for(lambda: json.loads((run_dir / "run.json").read_text())["attempts"][0].get("ended_at"), 60,
                 "the job's exit record")
        (attempt,) = json.loads((run_dir / "run.json").read_text())["attempts"]
        assert (attempt["exit_code"], attempt["job_id"]) == (0, first_id)
        wait_for(lambda: subprocess.run(["squeue", "-h", "-j", first_id, "-o", "%T"], capture_output=True,
                                        text=True).stdout.strip() in ("", "COMPLETED"), 60, "the first job to leave")
        assert "tw-badge-stopped" in watcher.predict(api_name="/poll")[0]

        events_before = len(read_all_events(run_dir / "events.jsonl"))
        resumed = tunewise("resume", run_id, "--runs-dir", str(runs), "--json")
        assert resumed.returncode == 0, resumed.stderr
        second_id = json.loads((run_dir / "run.json").read_text())["attempts"][-1]["job_id"]
        assert second_id and second_id != first_id
        steps = wait_for(lambda: (found := _logged_steps(run_dir, events_before))[2:] and found, 150,
                         "three steps after the resume")
        assert steps[:3] == [stop_step + 1, stop_step + 2, stop_step + 3]
        after = read_all_events(run_dir / "events.jsonl")[events_before:]
        (marker,) = [e for e in after if e["event"] == "resumed"]
        assert marker["checkpoint"] == str(checkpoint) and marker["step"] == stop_step
        assert marker["previous_state"] == "stopped" and marker["job_id"] == second_id
        assert [e for e in after if e["event"] == "train_begin"][0]["start_step"] == stop_step
        again = _status(run_id, runs)
        assert (again["state"], again["job_id"], again["attempts"]) == ("running", second_id, 2)

        final = json.loads(tunewise("stop", run_id, "--runs-dir", str(runs), "--json", timeout=180).stdout)
        assert final["state"] == "stopped" and final["step"] > stop_step
        assert (run_dir / "output" / "adapter_model.safetensors").is_file()
        wait_for(lambda: json.loads((run_dir / "run.json").read_text())["attempts"][-1].get("ended_at"), 60,
                 "the second job's exit record")
        assert json.loads((run_dir / "run.json").read_text())["attempts"][-1]["exit_code"] == 0
        wait_for(lambda: subprocess.run(["squeue", "-h", "-j", second_id, "-o", "%T"], capture_output=True,
                                        text=True).stdout.strip() in ("", "COMPLETED"), 60, "the second job to leave")
        print(f"slurm end to end: {time.time() - started_at:.0f} s from sbatch to the second stop")
    finally:
        stop_app(app)


def test_a_job_still_in_the_queue_is_cancelled_by_stop(slurm_cluster, tmp_path):
    from advisor.plan import Plan

    plan = tmp_path / "plan.yaml"
    Plan.from_dict({"model": {"name": "demo"}, "training": {"max_steps": 5}, "hardware": {"device": "cpu"}}).save(plan)
    runs = tmp_path / "runs"
    subprocess.run(["scontrol", "update", "PartitionName=debug", "State=DOWN"], check=True, timeout=30)
    try:
        written = tunewise("job", str(plan), "--scheduler", "slurm", "--runs-dir", str(runs), "--submit", "--json")
        assert written.returncode == 0, written.stderr
        job = json.loads(written.stdout)
        status = _status(job["run_id"], runs)
        assert (status["state"], status["job_id"]) == ("queued", job["job_id"])
        pending = subprocess.run(["squeue", "-h", "-j", job["job_id"], "-o", "%T"], capture_output=True, text=True)
        assert pending.stdout.strip() == "PENDING"
        stopped = tunewise("stop", job["run_id"], "--runs-dir", str(runs), "--timeout", "2", "--json")
        assert stopped.returncode == 0, stopped.stderr
        stopped = json.loads(stopped.stdout)
        assert stopped["state"] == "stopped"
        assert stopped["reason"] == f"did not stop in time after the request; cancelled with scancel {job['job_id']}"
        gone = subprocess.run(["squeue", "-h", "-j", job["job_id"], "-o", "%T"], capture_output=True, text=True)
        assert gone.stdout.strip() in ("", "CANCELLED")
        # Cancelled behind Tunewise's back (scancel by hand, a preemption): no pid to check, no exit record,
        # so squeue's answer is what tells it ended.
        other = json.loads(tunewise("job", str(plan), "--scheduler", "slurm", "--runs-dir", str(runs), "--submit",
                                    "--json").stdout)
        assert _status(other["run_id"], runs)["state"] == "queued"
        subprocess.run(["scancel", other["job_id"]], check=True, timeout=30)
        failed = wait_for(lambda: (s := _status(other["run_id"], runs))["state"] != "queued" and s, 30,
                          "the cancelled job to show")
        assert failed["state"] == "failed"
        assert failed["error"].startswith(f"Slurm job {other['job_id']} ended before it started without recording how")
    finally:
        subprocess.run(["scontrol", "update", "PartitionName=debug", "State=UP"], check=True, timeout=30)
